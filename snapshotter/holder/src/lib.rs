//! The FUSE connection holder: a small process that keeps a copy of every `/dev/fuse`
//! descriptor of the snapshotter's layer mounts, so a FUSE connection outlives the daemon that
//! serves it. When the daemon crashes or is upgraded, the next daemon takes the descriptors back
//! and goes on serving the same mounts: running containers do not notice.
//!
//! The holder does nothing else: no network, no cache, no parsing of image data. It stores, per
//! snapshot id, a descriptor and the FUSE INIT request the kernel sent on that connection (the
//! next daemon needs it to set up its session), and hands them out on request. Everything here is
//! the wire protocol (a unix SOCK_SEQPACKET socket, descriptors passed with SCM_RIGHTS), its
//! client ([`HolderClient`]), and the server ([`serve`]).
//!
//! A holder's work ends in two ways, and only when that cannot cost a container its files: a
//! daemon stopping for good (SIGINT) asks it to let everything go and exit
//! ([`HolderClient::stop`]); and a holder that holds no connection while no daemon is connected
//! exits after an idle timeout. A holder that keeps connections never exits on its own.

mod client;
mod server;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};

pub use client::{HolderClient, spawn_holder};
pub use server::{DEFAULT_IDLE_TIMEOUT, Exit, ServeOptions, serve};

/// Largest protocol message (an INIT request is about 100 bytes).
const MAX_MESSAGE: usize = 64 << 10;

const PUT: u8 = b'P';
const REMOVE: u8 = b'R';
const LIST: u8 = b'L';
const HELLO: u8 = b'H';
const STOP: u8 = b'S';
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
        // A message longer than the buffer arrives cut short: refuse it rather than act on
        // part of it (a PUT would keep a truncated INIT request).
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(protocol_error("message longer than the protocol allows"));
        }
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

/// The first four bytes of a reply as a little-endian u32.
fn reply_u32(reply: &[u8], what: &str) -> io::Result<u32> {
    let bytes: [u8; 4] = reply
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| protocol_error(what))?;
    Ok(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests;
