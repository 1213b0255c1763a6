//! Mounting a [`Layer`] with fuser, unmounting it, and cleaning up after a daemon that died.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicUsize;

use fuser::{BackgroundSession, Config, SessionACL};
use nix::errno::Errno;
use nix::mount::MntFlags;
use tokio::runtime::Handle;

use crate::conn::{ConnectionOptions, FuseConnection};
use crate::features::KernelFeatures;
use crate::fuse::FuseLayer;
use crate::layer::LayerFs;
use crate::metadata::Layer;
use crate::metrics::Metrics;
use crate::passthrough::PassthroughStore;

/// What [`mount`] and [`serve`] serve: a [`Layer`] (the daemon's, metadata loaded on demand),
/// or a [`LayerFs`] built from a TOC in memory (resident).
pub trait IntoLayer {
    fn into_layer(self) -> Arc<Layer>;
}

impl IntoLayer for Arc<Layer> {
    fn into_layer(self) -> Arc<Layer> {
        self
    }
}

impl IntoLayer for Arc<LayerFs> {
    fn into_layer(self) -> Arc<Layer> {
        Arc::new(Layer::resident(self))
    }
}

/// How a layer is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The mount's source as `mount` and `/proc/self/mountinfo` show it.
    pub fsname: String,
    /// Let users other than the mounter in (with the kernel checking permissions as stored).
    /// Not needed for overlayfs lower layers: overlayfs reads them with the mounter's rights.
    pub allow_other: bool,
    /// Unused: each layer has one event loop (reads are answered from tasks). Kept so configs
    /// that set it still work.
    pub threads: usize,
    /// How long the kernel may cache entries and attributes (the content never changes).
    pub ttl: Duration,
    /// The kernel's readahead for the mount in bytes: how far ahead of a sequential reader it
    /// asks for pages, in parallel requests of up to 1 MiB. FUSE mounts otherwise get the 128 KiB
    /// the kernel offers at INIT, one request at a time. 0: none, the kernel reads only the
    /// pages asked for (what an access trace wants).
    pub readahead_bytes: u64,
    /// Where the mounted layer counts its requests, their latency and errors, and bytes read;
    /// share one among all the mounts. `None`: handles registered nowhere (see
    /// [`Metrics::register`] to export them).
    pub metrics: Option<Arc<Metrics>>,
    /// The optional kernel features the mount may use where the kernel offers them (all by
    /// default). A connection taken back from the holder keeps what its first INIT answer
    /// asked for (READDIRPLUS); zero-message opens follow this on every serve.
    pub kernel_features: KernelFeatures,
    /// Where whole files are copied for FUSE passthrough; share one among all the mounts.
    /// `None`: no passthrough (opens then take no request where the kernel allows).
    pub passthrough: Option<Arc<PassthroughStore>>,
    /// The layers below the mounted one, nearest first, down to the image's first layer: the
    /// mount then presents them merged with it as one tree (whiteouts and opaque directories
    /// applied, not shown), and overlayfs needs no other lower directory. Empty: the layer
    /// alone, as a lower directory of its own. At most [`MAX_MERGED_LAYERS`](crate::MAX_MERGED_LAYERS)
    /// layers in all.
    pub lowers: Vec<Arc<Layer>>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "streamsnap".into(),
            allow_other: false,
            threads: 2,
            ttl: Duration::from_secs(3600),
            readahead_bytes: DEFAULT_READAHEAD_BYTES,
            metrics: None,
            kernel_features: KernelFeatures::default(),
            passthrough: None,
            lowers: Vec::new(),
        }
    }
}

/// The kernel readahead asked for by default: 4 MiB, four 1 MiB requests in flight for a
/// sequential reader (about twice the warm sequential throughput of the kernel's 128 KiB,
/// docs/benchmarks.md). When a readahead fails the kernel retries page by page; the daemon
/// answers those retries fast while the registry is known to be down, so a read still fails
/// after about one fetch deadline.
pub const DEFAULT_READAHEAD_BYTES: u64 = 4 << 20;

/// A mounted layer. Unmounted by [`unmount`](Self::unmount) or on drop; handed over to the next
/// daemon with [`handover`].
#[derive(Debug)]
pub struct MountedLayer {
    pub(crate) session: Option<BackgroundSession>,
    pub(crate) mountpoint: PathBuf,
    /// The descriptor number the fuser session reads and writes (a handover swaps what it is).
    pub(crate) session_fd: RawFd,
    /// This process's own descriptor of the connection, and its INIT request.
    pub(crate) connection: FuseConnection,
    /// Reads taken and not answered yet.
    pub(crate) in_flight: Arc<AtomicUsize>,
}

/// Mounts `fs` read-only on `mountpoint` (an existing directory) and serves it. Reads run on
/// `handle`.
pub fn mount(
    fs: impl IntoLayer,
    mountpoint: &Path,
    handle: Handle,
    options: &MountOptions,
) -> io::Result<MountedLayer> {
    let mountpoint = mountpoint.canonicalize()?;
    let connection = FuseConnection::mount(
        &mountpoint,
        &ConnectionOptions {
            fsname: options.fsname.clone(),
            allow_other: options.allow_other,
        },
    )?;
    serve(fs, connection, &mountpoint, handle, options, true)
}

/// Serves `fs` on an existing connection mounted on `mountpoint`. `answer_init`: the kernel still
/// waits for the answer to the connection's INIT request (a fresh mount); otherwise a previous
/// process answered it (a connection taken back from the holder) and the kernel must not see
/// another.
///
/// fuser's session always runs the INIT handshake, so it runs it on one end of a socket pair fed
/// with the kept INIT request; its answer is forwarded to the kernel or dropped, and then the
/// session's descriptor is replaced by the connection's, before the session serves.
pub fn serve(
    fs: impl IntoLayer,
    connection: FuseConnection,
    mountpoint: &Path,
    handle: Handle,
    options: &MountOptions,
    answer_init: bool,
) -> io::Result<MountedLayer> {
    let mut config = Config::default();
    let acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.acl = acl;
    // One event loop per layer, reading the shared descriptor: fuser's cloned descriptors would
    // close with this process and abort the requests in flight on them. Reads are answered from
    // tasks, so one loop is not a bottleneck.
    config.n_threads = Some(1);
    config.clone_fd = false;
    let mut layer = FuseLayer::new(fs, handle, options.ttl)
        .with_kernel_features(options.kernel_features)
        .answering_init(answer_init)
        .with_lowers(options.lowers.clone())?;
    if let Some(metrics) = &options.metrics {
        layer = layer.with_metrics(Arc::clone(metrics));
    }
    if let Some(store) = &options.passthrough {
        layer = layer.with_passthrough(Arc::clone(store));
    }
    let in_flight = layer.in_flight();
    let (session_end, our_end) = socket_pair()?;
    nix::unistd::write(&our_end, &connection.init).map_err(io::Error::from)?;
    let session_fd = session_end.as_raw_fd();
    let session = fuser::Session::from_fd(layer, session_end, acl, config)?;
    let mut reply = vec![0u8; 64 << 10];
    let n = nix::unistd::read(&our_end, &mut reply).map_err(io::Error::from)?;
    if answer_init {
        nix::unistd::write(&connection.fd, &reply[..n]).map_err(io::Error::from)?;
    }
    replace_fd(connection.fd.as_raw_fd(), session_fd)?;
    let session = session.spawn()?;
    if let Err(error) = set_readahead(mountpoint, options.readahead_bytes) {
        // Only slower sequential reads: keep serving.
        tracing::warn!(
            mountpoint = %mountpoint.display(), %error,
            "cannot set the kernel readahead of a layer mount; sequential reads will be slower"
        );
    }
    tracing::debug!(mountpoint = %mountpoint.display(), answer_init, "layer served");
    Ok(MountedLayer {
        session: Some(session),
        mountpoint: mountpoint.to_owned(),
        session_fd,
        connection,
        in_flight,
    })
}

/// Sets the kernel's readahead for the filesystem mounted on `mountpoint`: the `read_ahead_kb`
/// of its backing device info, which a FUSE mount names after its anonymous device
/// (`/sys/class/bdi/MAJOR:MINOR`). Needs root. The INIT answer cannot raise it past what the
/// kernel offers (128 KiB); this can.
pub fn set_readahead(mountpoint: &Path, bytes: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let knob = readahead_knob(dev);
    std::fs::write(&knob, format!("{}\n", bytes.div_ceil(1024)))
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", knob.display())))
}

/// The kernel readahead of the filesystem mounted on `mountpoint`, in bytes.
pub fn readahead(mountpoint: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let knob = readahead_knob(std::fs::metadata(mountpoint)?.dev());
    let text = std::fs::read_to_string(&knob)?;
    text.trim().parse::<u64>().map(|kb| kb * 1024).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", knob.display()),
        )
    })
}

fn readahead_knob(dev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
}

/// A unix SOCK_SEQPACKET pair (message boundaries kept, like /dev/fuse), with buffers large
/// enough for the largest FUSE reply.
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for fd in [&a, &b] {
        // Forced sizes (root) go past net.core.[rw]mem_max; a failure only limits reply sizes.
        let _ = setsockopt(fd, sockopt::SndBufForce, &SOCKET_BUFFER);
        let _ = setsockopt(fd, sockopt::RcvBufForce, &SOCKET_BUFFER);
    }
    Ok((a, b))
}

/// Socket pair buffers: a FUSE read reply is at most 1 MiB (256 pages) plus its header.
const SOCKET_BUFFER: usize = 4 << 20;

/// Makes descriptor number `target` refer to what `source` refers to (atomically).
pub(crate) fn replace_fd(source: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup3 only changes the descriptor table: `target` is owned by a fuser session that
    // outlives this call and keeps owning the number (closing it later closes the new file);
    // `source` is a valid open descriptor borrowed for the call.
    let result = unsafe { libc::dup3(source, target, libc::O_CLOEXEC) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Another descriptor of this layer's FUSE connection, with its INIT request: what a holder
    /// keeps so the connection outlives this process.
    pub fn connection(&self) -> io::Result<FuseConnection> {
        self.connection.try_clone()
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
