//! The FUSE connection holder: a small process that keeps a copy of every `/dev/fuse`
//! descriptor of the snapshotter's layer mounts, so a FUSE connection outlives the daemon that
//! serves it. When the daemon crashes or is upgraded, the next daemon takes the descriptors back
//! and goes on serving the same mounts: running containers do not notice.
//!
//! The holder does nothing else: no network, no cache, no parsing of image data. It stores, per
//! snapshot id, a descriptor and the FUSE INIT request the kernel sent on that connection (the
//! next daemon needs it to set up its session), and hands them out on request. Everything here is
//! the wire protocol (a unix SOCK_SEQPACKET socket, descriptors passed with SCM_RIGHTS), its
//! client, and the server loop.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, socket,
};

/// Largest protocol message (an INIT request is about 100 bytes).
const MAX_MESSAGE: usize = 64 << 10;

const PUT: u8 = b'P';
const REMOVE: u8 = b'R';
const LIST: u8 = b'L';
const HELLO: u8 = b'H';
const OK: u8 = b'K';
const ENTRY: u8 = b'F';
const DONE: u8 = b'D';
const FAILED: u8 = b'E';

/// A connection the holder keeps: a descriptor and the INIT request of its FUSE connection.
#[derive(Debug)]
pub struct Held {
    pub id: u64,
    pub fd: OwnedFd,
    pub init: Vec<u8>,
}

fn send(sock: BorrowedFd<'_>, message: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(fd) => {
            fds = [fd];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(message)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// One message and the descriptor that came with it, if any. An empty message is EOF.
fn receive(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us; it
                    // is owned by nobody else, so wrapping it (once) is sound.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    buf.truncate(len);
    Ok((buf, fd))
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("fuse holder protocol: {what}"),
    )
}

fn header(op: u8, id: u64) -> Vec<u8> {
    let mut message = vec![op];
    message.extend_from_slice(&id.to_le_bytes());
    message
}

fn parse_header(message: &[u8]) -> io::Result<(u8, u64, &[u8])> {
    if message.len() < 9 {
        return Err(protocol_error("short message"));
    }
    let id = u64::from_le_bytes(message[1..9].try_into().expect("8 bytes"));
    Ok((message[0], id, &message[9..]))
}

/// The daemon's side: a connection to the holder.
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
            _ => Err(protocol_error("unexpected reply")),
        }
    }

    /// The holder's process id.
    pub fn hello(&self) -> io::Result<u32> {
        let reply = self.call(&header(HELLO, 0), None)?;
        let pid: [u8; 4] = reply
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| protocol_error("hello"))?;
        Ok(u32::from_le_bytes(pid))
    }

    /// Keeps a copy of `fd` (and the connection's INIT request) under `id`, replacing any.
    pub fn put(&self, id: u64, fd: BorrowedFd<'_>, init: &[u8]) -> io::Result<()> {
        let mut message = header(PUT, id);
        message.extend_from_slice(init);
        self.call(&message, Some(fd.as_raw_fd())).map(drop)
    }

    /// Closes the holder's copy of `id` (when its layer is unmounted for good).
    pub fn remove(&self, id: u64) -> io::Result<()> {
        self.call(&header(REMOVE, id), None).map(drop)
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

/// Starts a holder process, detached (its own session), so it outlives the daemon.
pub fn spawn_holder(binary: &Path, socket: &Path, log: &Path) -> io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = std::process::Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it only makes
    // the child leave the daemon's session and process group.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = command.spawn()?;
    Ok(child.id())
}

/// The holder's server: serves clients until the process is killed.
pub fn serve(path: &Path) -> io::Result<()> {
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
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&listener, Backlog::new(8)?)?;
    let held: Arc<Store> = Arc::default();
    loop {
        let raw = match accept(listener.as_raw_fd()) {
            Ok(raw) => raw,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
        };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        let held = held.clone();
        std::thread::spawn(move || {
            if let Err(error) = serve_client(&client, &held) {
                eprintln!("streamsnap-fuse-holder: client error: {error}");
            }
        });
    }
}

type Store = Mutex<HashMap<u64, (OwnedFd, Vec<u8>)>>;

fn serve_client(client: &OwnedFd, held: &Store) -> io::Result<()> {
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
                    held.lock()
                        .expect("holder store lock")
                        .insert(id, (fd, payload.to_vec()));
                    reply_ok(&[])?;
                }
                None => send(client.as_fd(), b"Eput without a descriptor", None)?,
            },
            REMOVE => {
                held.lock().expect("holder store lock").remove(&id);
                reply_ok(&[])?;
            }
            LIST => {
                let entries: Vec<(u64, RawFd, Vec<u8>)> = held
                    .lock()
                    .expect("holder store lock")
                    .iter()
                    .map(|(id, (fd, init))| (*id, fd.as_raw_fd(), init.clone()))
                    .collect();
                for (id, fd, init) in entries {
                    let mut message = header(ENTRY, id);
                    message.extend_from_slice(&init);
                    send(client.as_fd(), &message, Some(fd))?;
                }
                send(client.as_fd(), &[DONE], None)?;
            }
            _ => send(client.as_fd(), b"Eunknown request", None)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};

    use super::*;

    #[test]
    fn descriptors_round_trip_through_the_holder_and_outlive_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server_path = path.clone();
        std::thread::spawn(move || serve(&server_path));
        let client = (0..100)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                HolderClient::connect(&path).ok()
            })
            .expect("holder starts");
        assert_eq!(client.hello().unwrap(), std::process::id());

        // A file stands in for /dev/fuse: what matters is that the same open file comes back.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"connection 7").unwrap();
        client.put(7, file.as_fd(), b"init-bytes").unwrap();
        drop(file);
        drop(client);

        let client = HolderClient::connect(&path).unwrap();
        let held = client.list().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].id, held[0].init.as_slice()),
            (7, &b"init-bytes"[..])
        );
        let mut back = std::fs::File::from(held.into_iter().next().unwrap().fd);
        back.rewind().unwrap();
        let mut text = String::new();
        back.read_to_string(&mut text).unwrap();
        assert_eq!(text, "connection 7");

        client.remove(7).unwrap();
        assert!(client.list().unwrap().is_empty());
        assert!(
            serve(&path).is_err(),
            "a second holder on the same socket is refused"
        );
    }
}
