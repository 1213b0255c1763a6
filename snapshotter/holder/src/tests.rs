use std::io::{self, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{Exit, HolderClient, ServeOptions, serve};

/// A server on a thread; its result arrives on the receiver.
fn start(path: &Path, idle_timeout: Option<Duration>) -> mpsc::Receiver<io::Result<Exit>> {
    let (done, result) = mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = done.send(serve(&path, &ServeOptions { idle_timeout }));
    });
    result
}

fn connect(path: &Path) -> HolderClient {
    (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            HolderClient::connect(path).ok()
        })
        .expect("holder starts")
}

fn socket_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holder.sock");
    (dir, path)
}

#[test]
fn descriptors_round_trip_through_the_holder_and_outlive_the_client() {
    let (_dir, path) = socket_path();
    let _server = start(&path, None);
    let client = connect(&path);
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
        serve(&path, &ServeOptions::default()).is_err(),
        "a second holder on the same socket is refused"
    );
}

#[test]
fn an_idle_holder_exits_after_the_timeout_and_removes_its_socket() {
    let (_dir, path) = socket_path();
    let started = Instant::now();
    let server = start(&path, Some(Duration::from_millis(300)));
    let exit = server.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(exit.unwrap(), Exit::Idle);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn a_connected_daemon_keeps_the_holder_and_the_timeout_counts_from_its_leaving() {
    let (_dir, path) = socket_path();
    let timeout = Duration::from_millis(300);
    let server = start(&path, Some(timeout));
    let client = connect(&path);
    assert!(
        server.recv_timeout(timeout * 3).is_err(),
        "the holder exited while a daemon was connected"
    );
    let left = Instant::now();
    drop(client);
    let exit = server.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(exit.unwrap(), Exit::Idle);
    assert!(left.elapsed() >= timeout, "{:?}", left.elapsed());
}

#[test]
fn a_holder_keeping_connections_never_times_out() {
    let (_dir, path) = socket_path();
    let timeout = Duration::from_millis(200);
    let server = start(&path, Some(timeout));
    let (kept, _peer) = UnixStream::pair().unwrap();
    let client = connect(&path);
    client.put(1, kept.as_fd(), b"init").unwrap();
    drop(client);
    assert!(
        server.recv_timeout(timeout * 4).is_err(),
        "the holder exited while keeping a connection: its mount would die"
    );
    // Once the daemon lets the connection go (and leaves), the holder is idle.
    let client = HolderClient::connect(&path).unwrap();
    client.remove(1).unwrap();
    drop(client);
    let exit = server.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(exit.unwrap(), Exit::Idle);
}

#[test]
fn without_a_timeout_an_idle_holder_stays() {
    let (_dir, path) = socket_path();
    let server = start(&path, None);
    drop(connect(&path));
    assert!(server.recv_timeout(Duration::from_millis(500)).is_err());
}

#[test]
fn a_stop_closes_every_kept_connection_and_ends_the_holder() {
    let (_dir, path) = socket_path();
    let server = start(&path, None);
    let (kept, mut peer) = UnixStream::pair().unwrap();
    let (other, _other_peer) = UnixStream::pair().unwrap();
    let client = connect(&path);
    client.put(1, kept.as_fd(), b"a").unwrap();
    client.put(2, other.as_fd(), b"b").unwrap();
    drop(kept);
    peer.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        peer.read(&mut buf).is_err(),
        "the holder's copy keeps the connection open"
    );

    assert_eq!(client.stop().unwrap(), 2);
    let exit = server.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(exit.unwrap(), Exit::Stopped { released: 2 });
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        peer.read(&mut buf).unwrap(),
        0,
        "the connection is closed: nobody holds it any more"
    );
    assert!(!path.exists(), "the socket file is removed");
}
