//! Mounting a [`LayerFs`] with fuser, unmounting it, and cleaning up after a daemon that died.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use nix::errno::Errno;
use nix::mount::MntFlags;
use tokio::runtime::Handle;

use crate::fuse::FuseLayer;
use crate::layer::LayerFs;
use crate::metrics::Metrics;

/// How a layer is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The mount's source as `mount` and `/proc/self/mountinfo` show it.
    pub fsname: String,
    /// Let users other than the mounter in (with the kernel checking permissions as stored).
    /// Not needed for overlayfs lower layers: overlayfs reads them with the mounter's rights.
    pub allow_other: bool,
    /// fuser event-loop threads, each with its own /dev/fuse descriptor.
    pub threads: usize,
    /// How long the kernel may cache entries and attributes (the content never changes).
    pub ttl: Duration,
    /// Where the mounted layer counts its requests, their latency and errors, and bytes read;
    /// share one among all the mounts. `None`: handles registered nowhere (see
    /// [`Metrics::register`] to export them).
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "streamsnap".into(),
            allow_other: false,
            threads: 2,
            ttl: Duration::from_secs(3600),
            metrics: None,
        }
    }
}

/// A mounted layer. Unmounted by [`unmount`](Self::unmount) or on drop.
#[derive(Debug)]
pub struct MountedLayer {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

/// Mounts `fs` read-only on `mountpoint` (an existing directory). Reads run on `handle`.
pub fn mount(
    fs: Arc<LayerFs>,
    mountpoint: &Path,
    handle: Handle,
    options: &MountOptions,
) -> io::Result<MountedLayer> {
    let mountpoint = mountpoint.canonicalize()?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(options.fsname.clone()),
        // passed to the kernel as is: the mount shows as type fuse.streamsnap
        MountOption::CUSTOM("subtype=streamsnap".into()),
        // images carry device nodes and setuid binaries; containerd adds nodev/nosuid itself
        // where it wants them
        MountOption::Dev,
        MountOption::Suid,
    ];
    if options.allow_other {
        config.mount_options.push(MountOption::DefaultPermissions);
        config.acl = SessionACL::All;
    }
    let threads = options.threads.max(1);
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;
    let mut layer = FuseLayer::new(fs, handle, options.ttl);
    if let Some(metrics) = &options.metrics {
        layer = layer.with_metrics(Arc::clone(metrics));
    }
    let session = fuser::spawn_mount(layer, &mountpoint, &config)?;
    tracing::debug!(mountpoint = %mountpoint.display(), threads, "layer mounted");
    Ok(MountedLayer {
        session: Some(session),
        mountpoint,
    })
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session to end. When the mount is busy (an overlay or a
    /// process still uses it) it is detached instead: it disappears from the mount table now and
    /// keeps being served until its last user lets go, then the session ends by itself.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match nix::mount::umount(&self.mountpoint) {
            Ok(()) => {
                // Normally the connection ends with the mount and the event loops stop at once.
                // An overlay using this layer holds its own clone of the mount: then the session
                // must go on serving it, and ends when the overlay is unmounted.
                let ended = reap(session);
                match ended.recv_timeout(SESSION_END_WAIT) {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::debug!(
                            mountpoint = %self.mountpoint.display(),
                            "layer unmounted but still in use by another mount; served until released"
                        );
                        Ok(())
                    }
                }
            }
            Err(Errno::EBUSY) => {
                let detached = nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH);
                tracing::debug!(mountpoint = %self.mountpoint.display(), "busy layer mount detached");
                drop(reap(session));
                detached.map_err(|error| unmount_error(&self.mountpoint, error))
            }
            // Not mounted any more (someone unmounted it): the session ends when its users do.
            Err(Errno::EINVAL) => {
                drop(reap(session));
                Ok(())
            }
            Err(error) => {
                drop(reap(session));
                Err(unmount_error(&self.mountpoint, error))
            }
        }
    }
}

/// How long a clean unmount waits for the session's threads to end before leaving them to end
/// on their own.
const SESSION_END_WAIT: Duration = Duration::from_millis(300);

fn unmount_error(mountpoint: &Path, error: Errno) -> io::Error {
    io::Error::new(
        io::Error::from(error).kind(),
        format!(
            "unmount {}: {error}; detach it with `umount -l` if it stays",
            mountpoint.display()
        ),
    )
}

/// Waits for a session to end on a thread of its own and reports how it ended. Dropping the
/// session instead would make fuser unmount the path again, which by then may hold another
/// mount.
fn reap(session: BackgroundSession) -> mpsc::Receiver<io::Result<()>> {
    let (done, ended) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("streamsnap-fs-reap".into())
        .spawn(move || {
            let result = session.join();
            if let Err(error) = &result {
                tracing::debug!(%error, "layer session ended with an error");
            }
            let _ = done.send(result);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a thread to wait for a layer session");
    }
    ended
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_inner() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "layer unmount failed");
        }
    }
}

/// Whether `path` is a FUSE mount whose daemon is gone ("Transport endpoint is not connected").
/// Asks statfs, which FUSE never answers from a cache (stat may be answered from cached
/// attributes for as long as their TTL), and stat for other kinds of stale mounts.
pub fn is_stale_mount(path: &Path) -> bool {
    let not_connected = |error: Errno| error == Errno::ENOTCONN;
    nix::sys::statfs::statfs(path).is_err_and(not_connected)
        || std::fs::symlink_metadata(path)
            .is_err_and(|error| error.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches whatever is mounted on `path` (`umount -l`), e.g. a stale layer mount left by a
/// daemon that crashed.
pub fn force_unmount(path: &Path) -> io::Result<()> {
    nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|error| {
        io::Error::new(
            io::Error::from(error).kind(),
            format!("detach mount {}: {error}", path.display()),
        )
    })
}
