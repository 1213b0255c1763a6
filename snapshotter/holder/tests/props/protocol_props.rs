//! The holder's protocol: whatever any client sends (well-formed requests, garbage, messages
//! too short or too long, with or without a descriptor), the holder keeps serving, and what it
//! holds is exactly what the well-formed puts and removes left, with the INIT bytes they sent.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    sendmsg, socket,
};
use proptest::prelude::*;
use streamsnap_holder::{Exit, HolderClient, ServeOptions, serve};

use crate::config;

/// The protocol's longest message (`MAX_MESSAGE` in src/lib.rs).
const MAX_MESSAGE: usize = 64 << 10;

#[derive(Clone)]
enum Op {
    Put(u64, Vec<u8>),
    Remove(u64),
    List,
    /// A message from a client of its own: raw bytes, maybe with a descriptor.
    Raw(Vec<u8>, bool),
}

/// Byte strings by length and first bytes: a failing case of 64 KiB stays readable.
impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = |b: &[u8]| format!("{} bytes {:?}", b.len(), &b[..b.len().min(12)]);
        match self {
            Op::Put(id, init) => write!(f, "Put({id}, {})", bytes(init)),
            Op::Remove(id) => write!(f, "Remove({id})"),
            Op::List => write!(f, "List"),
            Op::Raw(message, fd) => write!(f, "Raw({}, fd: {fd})", bytes(message)),
        }
    }
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..4, 1 => any::<u64>()]
}

fn init() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..128),
        1 => (60_000usize..66_000).prop_map(|n| vec![0x5a; n]),
    ]
}

fn raw() -> impl Strategy<Value = Vec<u8>> {
    let op = prop::sample::select(&[b'P', b'R', b'L', b'H', b'K', b'F', b'D', b'E', 0, b'x'][..]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..24),
        (op.clone(), id(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(op, id, rest)| { [vec![op], id.to_le_bytes().to_vec(), rest].concat() }),
        (op.clone(), 0usize..9).prop_map(|(op, n)| [vec![op], vec![7; n]].concat()),
        (op, id(), 65_520usize..65_560).prop_map(|(op, id, n)| {
            [vec![op], id.to_le_bytes().to_vec(), vec![0x5a; n - 9]].concat()
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (id(), init()).prop_map(|(id, init)| Op::Put(id, init)),
        2 => id().prop_map(Op::Remove),
        1 => Just(Op::List),
        3 => (raw(), any::<bool>()).prop_map(|(bytes, fd)| Op::Raw(bytes, fd)),
    ]
}

/// A file standing in for a /dev/fuse descriptor, its content naming it.
fn marked_file(mark: &[u8]) -> std::fs::File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(mark).unwrap();
    file
}

fn content_of(fd: OwnedFd) -> Vec<u8> {
    let mut file = std::fs::File::from(fd);
    file.rewind().unwrap();
    let mut out = Vec::new();
    file.read_to_end(&mut out).unwrap();
    out
}

/// Sends `message` on a connection of its own and reads what comes back until the holder
/// closes it or goes quiet: the holder must answer or hang up, never stop serving.
fn send_raw(path: &Path, message: &[u8], fd: Option<RawFd>) {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(sock.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(fd) => {
            fds = [fd];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    // An empty message is an end of stream to the holder: it then closes the connection.
    let _ = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(message)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    let timeout = nix::sys::time::TimeVal::new(0, 200_000);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .unwrap();
    let mut buf = vec![0u8; 1 << 17];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    for _ in 0..64 {
        let bytes = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<UnixAddr>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            // received descriptors are closed here
            for cmsg in msg.cmsgs().unwrap() {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                    for fd in fds {
                        let _ = nix::unistd::close(fd);
                    }
                }
            }
            msg.bytes
        };
        if bytes == 0 {
            return;
        }
        let reply = buf[0];
        assert!(
            matches!(reply, b'K' | b'E' | b'F' | b'D'),
            "reply {:?}",
            &buf[..bytes]
        );
        if reply == b'D' || (message.len() >= 9 && message[0] != b'L') {
            return;
        }
    }
}

/// What a client sees held: per id, the mark of the file and the INIT bytes' length and sum
/// (short enough to print when a case fails).
fn summary(held: &BTreeMap<u64, Vec<u8>>) -> Vec<(u64, String, usize, u64)> {
    held.iter()
        .map(|(id, value)| {
            let (mark, init) = value.split_at(value.iter().position(|&b| b == b'|').unwrap_or(0));
            let sum = init
                .iter()
                .enumerate()
                .map(|(i, &b)| (i as u64 + 1) * u64::from(b))
                .sum();
            (
                *id,
                String::from_utf8_lossy(mark).into_owned(),
                init.len().saturating_sub(1),
                sum,
            )
        })
        .collect()
}

fn listed(client: &HolderClient) -> BTreeMap<u64, Vec<u8>> {
    client
        .list()
        .unwrap()
        .into_iter()
        .map(|h| (h.id, [content_of(h.fd), b"|".to_vec(), h.init].concat()))
        .collect()
}

fn connect_client(path: &Path) -> HolderClient {
    for _ in 0..500 {
        if let Ok(client) = HolderClient::connect(path) {
            return client;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("the holder did not start");
}

/// What the holder should hold after a raw message, by the protocol's rules.
fn apply_raw(model: &mut BTreeMap<u64, Vec<u8>>, message: &[u8], with_fd: bool, mark: &[u8]) {
    // too short for a header, or too long for the protocol: the holder hangs up
    if message.len() < 9 || message.len() > MAX_MESSAGE {
        return;
    }
    let id = u64::from_le_bytes(message[1..9].try_into().unwrap());
    match message[0] {
        b'P' if with_fd => {
            model.insert(id, [mark, b"|", &message[9..]].concat());
        }
        b'R' => {
            model.remove(&id);
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config(576))]

    #[test]
    fn the_holder_keeps_exactly_what_was_put_whatever_else_comes(ops in prop::collection::vec(op(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let (done, exit) = mpsc::channel();
        let server_path = path.clone();
        std::thread::spawn(move || {
            let _ = done.send(serve(&server_path, &ServeOptions { idle_timeout: None }));
        });
        let client = connect_client(&path);
        // id -> mark of the file held and the INIT bytes, as "mark|init"
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (step, op) in ops.iter().enumerate() {
            let mark = format!("file {step}").into_bytes();
            match op {
                Op::Put(id, init) => {
                    let file = marked_file(&mark);
                    match client.put(*id, file.as_fd(), init) {
                        Ok(()) => {
                            model.insert(*id, [&mark[..], b"|", init].concat());
                        }
                        Err(error) => {
                            // only a message the protocol cannot carry may be refused
                            prop_assert!(init.len() + 9 > MAX_MESSAGE, "put refused: {}", error);
                            break;
                        }
                    }
                }
                Op::Remove(id) => {
                    client.remove(*id).unwrap();
                    model.remove(id);
                }
                Op::List => prop_assert_eq!(summary(&listed(&client)), summary(&model)),
                Op::Raw(message, with_fd) => {
                    if message.first() == Some(&b'S') {
                        continue; // a stop ends the holder: the end of the case does that
                    }
                    let file = marked_file(&mark);
                    send_raw(&path, message, with_fd.then(|| file.as_raw_fd()));
                    apply_raw(&mut model, message, *with_fd, &mark);
                }
            }
        }
        // A fresh daemon sees what the model says, then stops the holder.
        let client = connect_client(&path);
        prop_assert_eq!(summary(&listed(&client)), summary(&model));
        prop_assert_eq!(client.stop().unwrap(), model.len());
        let exit = exit.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        prop_assert_eq!(exit, Exit::Stopped { released: model.len() });
    }
}

/// Found by the property above: an INIT request longer than a message can carry was cut to
/// fit and kept, silently. Now the client refuses to send it and the holder refuses a message
/// that arrives cut short.
#[test]
fn seed_an_init_longer_than_a_message_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holder.sock");
    let server_path = path.clone();
    let server =
        std::thread::spawn(move || serve(&server_path, &ServeOptions { idle_timeout: None }));
    let client = connect_client(&path);
    let file = marked_file(b"f");
    let error = client
        .put(1, file.as_fd(), &vec![0x5a; MAX_MESSAGE - 8])
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    client
        .put(2, file.as_fd(), &vec![0x5a; MAX_MESSAGE - 9])
        .unwrap();
    let message = [
        vec![b'P'],
        3u64.to_le_bytes().to_vec(),
        vec![0x5a; MAX_MESSAGE],
    ]
    .concat();
    send_raw(&path, &message, Some(file.as_raw_fd()));
    let held: Vec<(u64, usize)> = client
        .list()
        .unwrap()
        .into_iter()
        .map(|h| (h.id, h.init.len()))
        .collect();
    assert_eq!(held, [(2, MAX_MESSAGE - 9)]);
    assert_eq!(client.stop().unwrap(), 1);
    assert_eq!(
        server.join().unwrap().unwrap(),
        Exit::Stopped { released: 1 }
    );
}
