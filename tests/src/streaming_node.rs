//! A node for end-to-end tests of the snapshotter: a registry behind a fault-injecting proxy, a
//! converted busybox image with incompressible data files (and `/data/sums` for
//! `sha256sum -c`), `streamsnap-snapshotterd` and a containerd using it, the image pulled lazily
//! through the proxy and one container started so what every start reads is cached.

use std::process::Command;

use anyhow::ensure;
use streamsnap_format::Digest;

use crate::container::{rpull, run_container};
use crate::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use crate::targen::pseudo_random_bytes;
use crate::{
    Containerd, ContainerdOptions, CountingProxy, Registry, Snapshotterd, SnapshotterdOptions,
    TarGen, require_root_tools, skopeo_push, workspace_bin,
};

/// Data files in the test image: incompressible, several chunks each.
pub const FILES: usize = 8;
pub const FILE_SIZE: usize = 3 << 20;

/// A registry behind a fault-injecting proxy, a converted busybox image with data files, a
/// snapshotter daemon and a containerd using it, the image pulled lazily through the proxy.
#[derive(Debug)]
pub struct StreamingNode {
    pub registry: Registry,
    pub proxy: CountingProxy,
    pub daemon: Snapshotterd,
    pub containerd: Containerd,
    pub image: String,
    /// (path in the image, sha256 hex) of every data file.
    pub files: Vec<(String, String)>,
}

impl StreamingNode {
    pub fn start(options: SnapshotterdOptions) -> anyhow::Result<Self> {
        Self::start_converted(options, &[])
    }

    /// [`start`](Self::start), with more arguments for `artifact-streaming create` (e.g.
    /// `--kind index`).
    pub fn start_converted(options: SnapshotterdOptions, create: &[&str]) -> anyhow::Result<Self> {
        require_root_tools(crate::STREAMING_NODE_TOOLS)?;
        // With background fetch on, the daemon fetches whole layers right after mounting them.
        let background = options.extra_config.contains("[background_fetch]");
        let registry = Registry::start()?;
        let mut tar = TarGen::new();
        tar.dir("data", 0o755);
        let mut files = Vec::new();
        let mut sums = String::new();
        for i in 0..FILES {
            let data = pseudo_random_bytes(100 + i as u64, FILE_SIZE);
            let path = format!("data/f{i}.bin");
            tar.file(&path, 0o644, &data);
            let digest = Digest::sha256(&data).hex();
            sums.push_str(&format!("{digest}  /{path}\n"));
            files.push((format!("/{path}"), digest));
        }
        // For `sha256sum -c /data/sums` inside a container.
        tar.file("data/sums", 0o644, sums.as_bytes());
        push_converted(&registry, "res/app:v1", tar.finish(), create)?;
        let proxy = CountingProxy::start(&registry.addr())?;
        let daemon = Snapshotterd::start(options)?;
        let containerd = Containerd::start(
            ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
        )?;
        let image = format!("{}/res/app:v1", proxy.addr());
        // The conversion read the layers; count only what the pull reads.
        let before = registry.served_blob_bytes()?;
        rpull(&containerd, &image, "streamsnap", true)?;
        let pulled = registry.served_blob_bytes()? - before;
        ensure!(
            background || pulled < 2 << 20,
            "the pull was not lazy: {pulled} bytes served"
        );
        let node = Self {
            registry,
            proxy,
            daemon,
            containerd,
            image,
            files,
        };
        // Start one container so what every start reads (busybox, /etc) is cached: the tests
        // below are about reads of the data files.
        run_container(
            &node.containerd,
            &node.image,
            "streamsnap",
            "warm-up",
            &["true"],
        )?;
        Ok(node)
    }

    /// Checks every digest of `files` with `sha256sum -c` in a new container.
    pub fn check_digests(&self, id: &str, files: &[(String, String)]) -> anyhow::Result<()> {
        let check = crate::sha256_check(files);
        run_container(
            &self.containerd,
            &self.image,
            "streamsnap",
            id,
            &["sh", "-c", &check],
        )?;
        Ok(())
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(String::from_utf8(self.daemon.get("/metrics")?)?)
    }
}

/// Pushes busybox and a gzip layer of `layer` (a tar) as `REGISTRY/NAME:v1` (`name_tag` is
/// `NAME:v1`) and converts it with `streamsnap artifact-streaming create`, `create` being more
/// arguments for it (e.g. `--kind index`).
pub fn push_converted(
    registry: &Registry,
    name_tag: &str,
    layer: Vec<u8>,
    create: &[&str],
) -> anyhow::Result<()> {
    let spec = ImageSpec::busybox(vec![LayerBlob::new(layer, Compression::Gzip)])?;
    let mut layout = OciLayout::new()?;
    let tag = name_tag.rsplit_once(':').map_or("latest", |(_, t)| t);
    layout.write_image(&spec, tag)?;
    let direct = format!("{}/{name_tag}", registry.addr());
    skopeo_push(layout.path(), tag, &direct)?;
    crate::run(
        Command::new(workspace_bin("streamsnap")?)
            .args(["artifact-streaming", "create", "--image", &direct])
            .args(create),
    )?;
    Ok(())
}

/// The value of a metric line `name{labels} value` (summed over label sets that contain
/// every fragment of `labels`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|frag| l.contains(frag)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
