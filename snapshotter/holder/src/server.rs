//! The holder's server: a thread per client, and a main loop that accepts clients and decides
//! when the holder's work is over (a stop request, or the idle timeout).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, listen, socket,
};

use crate::{
    DONE, ENTRY, HELLO, HolderClient, LIST, OK, PUT, REMOVE, STOP, header, parse_header, receive,
    send,
};

/// How long a holder waits, holding no connection with no daemon connected, before it exits.
/// Long enough for any restart or upgrade of the daemon; the next daemon starts a new holder
/// anyway when none answers.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The mode of the holder's socket: its owner only (root on a node). Whoever connects can take
/// and drop the FUSE connections of every layer on the node.
pub const SOCKET_MODE: u32 = 0o600;

/// How the server runs.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Exit after this long holding no connection with no client connected (`None`: never).
    /// A holder that keeps a connection never exits on its own: the mount would die with it.
    pub idle_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// Why [`serve`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A daemon stopping for good asked the holder to exit ([`HolderClient::stop`]); the holder
    /// closed the `released` connections it still kept.
    Stopped { released: usize },
    /// No connection held and no client connected for the idle timeout.
    Idle,
}

type Store = HashMap<u64, (OwnedFd, Vec<u8>)>;

#[derive(Debug)]
struct State {
    held: Store,
    clients: usize,
    /// Since when nothing is held and no client is connected (`None` while either is not so).
    idle_since: Option<Instant>,
    /// Set by a stop request: the connections it closed.
    stopped: Option<usize>,
}

impl State {
    fn update_idle(&mut self) {
        let idle = self.clients == 0 && self.held.is_empty();
        match (idle, self.idle_since) {
            (true, None) => self.idle_since = Some(Instant::now()),
            (false, Some(_)) => self.idle_since = None,
            _ => {}
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Write end of a pipe the main loop polls: a client thread wakes it when the holder may
    /// have become idle or was asked to stop.
    wake: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("holder state lock")
    }

    fn wake(&self) {
        // Non-blocking: a full pipe already has the main loop's attention.
        let _ = nix::unistd::write(&self.wake, &[1]);
    }
}

/// Serves clients on the unix socket `path` until a daemon asks the holder to stop or the
/// holder has been idle for `options.idle_timeout`; removes the socket file on the way out.
pub fn serve(path: &Path, options: &ServeOptions) -> io::Result<Exit> {
    if path.exists() {
        // Another holder answering there? Then this one is not needed.
        if HolderClient::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("a holder already serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    let bound = std::fs::symlink_metadata(path)?;
    // The mode is set before listen(): until then a connect is refused, so no client ever
    // reaches the socket with the umask's mode.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    listen(&listener, Backlog::new(8)?)?;
    let (wake_read, wake_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            held: Store::new(),
            clients: 0,
            idle_since: Some(Instant::now()),
            stopped: None,
        }),
        wake: wake_write,
    });
    let exit = run(&listener, &wake_read, &shared, options);
    drop(listener);
    // Only our own socket: after an idle exit a new holder may already have bound the path.
    if std::fs::symlink_metadata(path)
        .is_ok_and(|now| (now.dev(), now.ino()) == (bound.dev(), bound.ino()))
    {
        let _ = std::fs::remove_file(path);
    }
    exit
}

fn run(
    listener: &OwnedFd,
    wake_read: &OwnedFd,
    shared: &Arc<Shared>,
    options: &ServeOptions,
) -> io::Result<Exit> {
    loop {
        let wait = {
            let state = shared.lock();
            if let Some(released) = state.stopped {
                return Ok(Exit::Stopped { released });
            }
            match (state.idle_since, options.idle_timeout) {
                (Some(since), Some(timeout)) => {
                    let left = timeout.saturating_sub(since.elapsed());
                    // A daemon connecting at this very moment is served, not dropped.
                    if left.is_zero() && !readable(listener, PollTimeout::ZERO)? {
                        return Ok(Exit::Idle);
                    }
                    Some(left)
                }
                _ => None,
            }
        };
        let timeout = match wait {
            // Rounded up, so the loop does not spin through the last millisecond.
            Some(left) => PollTimeout::try_from(left.as_millis().saturating_add(1))
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
        }
        let [incoming, woken] = fds.map(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
        if woken {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(wake_read, &mut buf), Ok(n) if n > 0) {}
        }
        if incoming {
            accept_client(listener, shared)?;
        }
    }
}

fn readable(fd: &OwnedFd, timeout: PollTimeout) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(true),
        Err(error) => Err(error.into()),
    }
}

/// Accepts one pending client, if it is still there, and serves it on a thread of its own.
fn accept_client(listener: &OwnedFd, shared: &Arc<Shared>) -> io::Result<()> {
    let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
        Ok(raw) => raw,
        // Gone before we took it, or a transient condition: the loop polls again.
        Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let client = unsafe { OwnedFd::from_raw_fd(raw) };
    {
        let mut state = shared.lock();
        state.clients += 1;
        state.update_idle();
    }
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("holder-client".into())
        .spawn(move || {
            if let Err(error) = serve_client(&client, &thread_shared) {
                eprintln!("streamsnap-fuse-holder: client error: {error}");
            }
            let mut state = thread_shared.lock();
            state.clients -= 1;
            state.update_idle();
            drop(state);
            thread_shared.wake();
        });
    if let Err(error) = spawned {
        eprintln!("streamsnap-fuse-holder: cannot serve a client: {error}");
        let mut state = shared.lock();
        state.clients -= 1;
        state.update_idle();
    }
    Ok(())
}

fn serve_client(client: &OwnedFd, shared: &Shared) -> io::Result<()> {
    loop {
        let (message, fd) = receive(client.as_fd())?;
        if message.is_empty() {
            return Ok(()); // the client went away
        }
        let (op, id, payload) = parse_header(&message)?;
        let reply_ok = |extra: &[u8]| {
            let mut reply = vec![OK];
            reply.extend_from_slice(extra);
            send(client.as_fd(), &reply, None)
        };
        match op {
            HELLO => reply_ok(&std::process::id().to_le_bytes())?,
            PUT => match fd {
                Some(fd) => {
                    let mut state = shared.lock();
                    state.held.insert(id, (fd, payload.to_vec()));
                    state.update_idle();
                    drop(state);
                    reply_ok(&[])?;
                }
                None => send(client.as_fd(), b"Eput without a descriptor", None)?,
            },
            REMOVE => {
                let mut state = shared.lock();
                state.held.remove(&id);
                state.update_idle();
                drop(state);
                reply_ok(&[])?;
            }
            LIST => {
                // Copies, so a removal meanwhile cannot close a descriptor being sent.
                let entries: Vec<(u64, OwnedFd, Vec<u8>)> = shared
                    .lock()
                    .held
                    .iter()
                    .map(|(id, (fd, init))| Ok((*id, fd.try_clone()?, init.clone())))
                    .collect::<io::Result<_>>()?;
                for (id, fd, init) in entries {
                    let mut message = header(ENTRY, id);
                    message.extend_from_slice(&init);
                    send(client.as_fd(), &message, Some(fd.as_raw_fd()))?;
                }
                send(client.as_fd(), &[DONE], None)?;
            }
            STOP => {
                let released = {
                    let mut state = shared.lock();
                    let released = state.held.len();
                    state.held.clear();
                    state.stopped = Some(released);
                    released
                };
                let count = u32::try_from(released).unwrap_or(u32::MAX);
                let replied = reply_ok(&count.to_le_bytes());
                shared.wake();
                return replied;
            }
            _ => send(client.as_fd(), b"Eunknown request", None)?,
        }
    }
}

#[cfg(test)]
mod socket_mode {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    use std::time::Duration;

    use super::{Exit, SOCKET_MODE, ServeOptions, serve};

    #[test]
    fn the_socket_has_its_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server_path = path.clone();
        let server = std::thread::spawn(move || {
            serve(
                &server_path,
                &ServeOptions {
                    idle_timeout: Some(Duration::from_millis(500)),
                },
            )
        });
        // Once a client gets in, the holder listens: its socket has its final mode.
        let client = (0..200)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(5));
                crate::HolderClient::connect(&path).ok()
            })
            .expect("the holder serves");
        drop(client);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        // The umask alone would give 0755 (022) or 0775 (002).
        assert_eq!(meta.permissions().mode() & 0o7777, SOCKET_MODE);
        assert_eq!(server.join().unwrap().unwrap(), Exit::Idle);
    }
}
