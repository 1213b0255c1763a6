//! The daemon's side of the holder protocol, and starting a holder.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use crate::{
    DONE, ENTRY, FAILED, HELLO, Held, LIST, MAX_MESSAGE, OK, PUT, REMOVE, STOP, header,
    parse_header, protocol_error, receive, reply_u32, send,
};

/// Longest INIT request a PUT carries: a message less its op and id.
const MAX_INIT: usize = MAX_MESSAGE - 9;

/// The daemon's side: a connection to the holder. While it is open the holder does not exit on
/// its idle timeout.
#[derive(Debug)]
pub struct HolderClient {
    sock: Mutex<OwnedFd>,
    path: PathBuf,
}

impl HolderClient {
    /// Connects to a running holder.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
        let client = Self {
            sock: Mutex::new(sock),
            path: path.to_owned(),
        };
        client.hello()?;
        Ok(client)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call(&self, message: &[u8], fd: Option<RawFd>) -> io::Result<Vec<u8>> {
        let sock = self.sock.lock().expect("holder socket lock");
        send(sock.as_fd(), message, fd)?;
        let (reply, _) = receive(sock.as_fd())?;
        match reply.first() {
            Some(&OK) => Ok(reply[1..].to_vec()),
            Some(&FAILED) => Err(io::Error::other(format!(
                "fuse holder: {}",
                String::from_utf8_lossy(&reply[1..])
            ))),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "fuse holder: the holder closed the connection",
            )),
            _ => Err(protocol_error("unexpected reply")),
        }
    }

    /// The holder's process id.
    pub fn hello(&self) -> io::Result<u32> {
        let reply = self.call(&header(HELLO, 0), None)?;
        reply_u32(&reply, "hello")
    }

    /// Keeps a copy of `fd` (and the connection's INIT request) under `id`, replacing any.
    pub fn put(&self, id: u64, fd: BorrowedFd<'_>, init: &[u8]) -> io::Result<()> {
        if init.len() > MAX_INIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fuse holder: an INIT request of {} bytes is longer than the protocol \
                     carries ({MAX_INIT})",
                    init.len()
                ),
            ));
        }
        let mut message = header(PUT, id);
        message.extend_from_slice(init);
        self.call(&message, Some(fd.as_raw_fd())).map(drop)
    }

    /// Closes the holder's copy of `id` (when its layer is unmounted for good).
    pub fn remove(&self, id: u64) -> io::Result<()> {
        self.call(&header(REMOVE, id), None).map(drop)
    }

    /// The daemon stops for good (its layers are unmounted): the holder closes every copy it
    /// still keeps and exits. Returns how many copies it closed (0 after a clean unmount).
    pub fn stop(&self) -> io::Result<usize> {
        let reply = self.call(&header(STOP, 0), None)?;
        Ok(reply_u32(&reply, "stop")? as usize)
    }

    /// Every connection the holder keeps, with a copy of its descriptor.
    pub fn list(&self) -> io::Result<Vec<Held>> {
        let sock = self.sock.lock().expect("holder socket lock");
        send(sock.as_fd(), &header(LIST, 0), None)?;
        let mut held = Vec::new();
        loop {
            let (message, fd) = receive(sock.as_fd())?;
            match message.first() {
                Some(&DONE) => return Ok(held),
                Some(&ENTRY) => {
                    let (_, id, init) = parse_header(&message)?;
                    let fd = fd.ok_or_else(|| protocol_error("entry without a descriptor"))?;
                    held.push(Held {
                        id,
                        fd,
                        init: init.to_vec(),
                    });
                }
                _ => return Err(protocol_error("unexpected list reply")),
            }
        }
    }
}

/// Starts a holder process, detached (its own session), so it outlives the daemon. It exits
/// after `idle_timeout` holding nothing with no daemon connected (`None`: never).
pub fn spawn_holder(
    binary: &Path,
    socket: &Path,
    log: &Path,
    idle_timeout: Option<Duration>,
) -> io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = std::process::Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .arg("--idle-timeout")
        .arg(idle_timeout.map_or(0, |t| t.as_secs().max(1)).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it only makes
    // the child leave the daemon's session and process group.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    // Reap it when it exits (idle, or stopped) while this process still runs: no zombie.
    let _ = std::thread::Builder::new()
        .name("holder-reaper".into())
        .spawn(move || child.wait());
    Ok(pid)
}
