//! Mounting layers: the seam between the snapshotter and the kernel. The real implementation
//! mounts FUSE through `streamsnap_fs`; tests pass a recording fake.

use std::io;
use std::path::Path;
use std::sync::Arc;

use streamsnap_fs::{FuseConnection, Layer, MountOptions, MountedLayer};

/// Mounts a layer filesystem on a directory.
pub trait Mounter: Send + Sync + 'static {
    /// A new mount; with `lowers` (the layers below, nearest first, down to the image's first)
    /// the mount presents them merged with `fs` as one tree.
    fn mount(
        &self,
        fs: Arc<Layer>,
        lowers: Vec<Arc<Layer>>,
        mountpoint: &Path,
    ) -> io::Result<Box<dyn MountedFs>>;
    /// Serves a connection that is already mounted there and was initialised by a previous
    /// process (taken back from the holder), with the `lowers` it was mounted with.
    fn attach(
        &self,
        fs: Arc<Layer>,
        lowers: Vec<Arc<Layer>>,
        connection: FuseConnection,
        mountpoint: &Path,
    ) -> io::Result<Box<dyn MountedFs>>;
}

/// A mounted layer; unmounted by `unmount` (or when dropped).
pub trait MountedFs: Send + Sync {
    fn unmount(self: Box<Self>) -> io::Result<()>;
    /// Another descriptor of the mount's FUSE connection, for the holder.
    fn connection(&self) -> io::Result<FuseConnection>;
    /// The FUSE mount itself, to hand over at exit; `None` for mounts that cannot be.
    fn into_layer(self: Box<Self>) -> Option<MountedLayer>;
}

/// FUSE mounts served on the daemon's runtime.
#[derive(Debug)]
pub struct FuseMounter {
    handle: tokio::runtime::Handle,
    options: MountOptions,
}

impl FuseMounter {
    pub fn new(handle: tokio::runtime::Handle, options: MountOptions) -> Self {
        Self { handle, options }
    }
}

impl FuseMounter {
    fn options(&self, lowers: Vec<Arc<Layer>>) -> MountOptions {
        MountOptions {
            lowers,
            ..self.options.clone()
        }
    }
}

impl Mounter for FuseMounter {
    fn mount(
        &self,
        fs: Arc<Layer>,
        lowers: Vec<Arc<Layer>>,
        mountpoint: &Path,
    ) -> io::Result<Box<dyn MountedFs>> {
        if streamsnap_fs::is_stale_mount(mountpoint) {
            tracing::info!(mountpoint = %mountpoint.display(), "replacing a stale FUSE mount");
            streamsnap_fs::force_unmount(mountpoint)?;
        }
        let options = self.options(lowers);
        let mounted = streamsnap_fs::mount(fs, mountpoint, self.handle.clone(), &options)?;
        Ok(Box::new(mounted))
    }

    fn attach(
        &self,
        fs: Arc<Layer>,
        lowers: Vec<Arc<Layer>>,
        connection: FuseConnection,
        mountpoint: &Path,
    ) -> io::Result<Box<dyn MountedFs>> {
        let mounted = streamsnap_fs::serve(
            fs,
            connection,
            mountpoint,
            self.handle.clone(),
            &self.options(lowers),
            false,
        )?;
        Ok(Box::new(mounted))
    }
}

impl MountedFs for MountedLayer {
    fn unmount(self: Box<Self>) -> io::Result<()> {
        MountedLayer::unmount(*self)
    }

    fn connection(&self) -> io::Result<FuseConnection> {
        MountedLayer::connection(self)
    }

    fn into_layer(self: Box<Self>) -> Option<MountedLayer> {
        Some(*self)
    }
}

/// Detaches every mount at or below `path` (deepest first), e.g. stale FUSE mounts left by a
/// crashed daemon. Errors are logged, not returned: this is cleanup.
pub fn detach_all_under(path: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|target| Path::new(target).starts_with(path))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for target in targets {
        match nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(target, "detached a leftover mount"),
            Err(error) => tracing::warn!(target, %error, "cannot detach a leftover mount"),
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/var/lib/a\040b"), "/var/lib/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
