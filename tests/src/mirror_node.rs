//! A node of the mirror tests: a daemon whose config sends an origin registry's chunk reads to
//! a mirror first, and a containerd using it.

use crate::{
    Containerd, ContainerdOptions, Snapshotterd, SnapshotterdOptions, rpull, run_container,
};

#[derive(Debug)]
pub struct MirrorNode {
    // Field order is drop order: containerd before the daemon it uses.
    pub containerd: Containerd,
    pub daemon: Snapshotterd,
}

impl MirrorNode {
    /// A node reading `origin`'s blobs through `mirror` first (none: from the origin only),
    /// metrics on; `timeout_seconds`: its `[fetch] timeout_seconds` (the daemon's default
    /// when `None`).
    pub fn start(
        origin: &str,
        mirror: Option<&str>,
        timeout_seconds: Option<u64>,
    ) -> anyhow::Result<Self> {
        let daemon = Snapshotterd::start(SnapshotterdOptions {
            extra_config: mirror
                .map(|m| format!("[registry.hosts.\"{origin}\"]\nmirrors = [\"{m}\"]\n"))
                .unwrap_or_default(),
            fetch_timeout_seconds: timeout_seconds,
            // The mirror tests count what reads cost each registry and which chunks a later
            // read still has to fetch: the read-ahead after a miss would fetch chunks no read
            // asked for, in the background, as fast as the machine lets it (CI saw a probe read
            // find its chunks already cached).
            fetch_lines: "readahead_after_miss_bytes = 0\n".into(),
            metrics: true,
            ..SnapshotterdOptions::default()
        })?;
        let containerd = Containerd::start(
            ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
        )?;
        Ok(Self { containerd, daemon })
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(String::from_utf8(self.daemon.get("/metrics")?)?)
    }

    /// Pulls `image` lazily and starts container `id` reading every one of `files` (path,
    /// sha256 hex) at once; checks their digests.
    pub fn start_reading(
        &self,
        image: &str,
        id: &str,
        files: &[(String, String)],
    ) -> anyhow::Result<()> {
        rpull(&self.containerd, image, "streamsnap", true)?;
        let script = crate::sha256_check_parallel(files);
        run_container(
            &self.containerd,
            image,
            "streamsnap",
            id,
            &["sh", "-c", &script],
        )?;
        Ok(())
    }
}
