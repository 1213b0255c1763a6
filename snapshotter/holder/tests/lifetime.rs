//! The real `streamsnap-fuse-holder` binary: its command line, and when it exits. It must stay
//! while it keeps a connection (a running container's layer lives in it) or a daemon is
//! connected, and exit when the daemon stops for good or after its idle timeout.
//!
//! The last two tests also run the real `streamsnap-snapshotterd` from the same target dir
//! (built by `cargo build --workspace --bins`, or by `cargo test --workspace`); they say so and
//! pass without checking anything when it is not there.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use streamsnap_holder::HolderClient;

const HOLDER: &str = env!("CARGO_BIN_EXE_streamsnap-fuse-holder");

fn holder(args: &[&str]) -> Output {
    Command::new(HOLDER).args(args).output().unwrap()
}

fn spawn_holder(socket: &Path, idle_timeout: &str) -> Child {
    Command::new(HOLDER)
        .arg("--socket")
        .arg(socket)
        .args(["--idle-timeout", idle_timeout])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn connect(socket: &Path) -> HolderClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match HolderClient::connect(socket) {
            Ok(client) => return client,
            Err(error) if Instant::now() > deadline => panic!("no holder on {socket:?}: {error}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The child's exit status once it exits within `within`, or `None` if it still runs.
fn exited_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(mut child: Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    let _ = child.wait();
    text
}

#[test]
fn help_prints_the_usage_and_succeeds() {
    let output = holder(&["--help"]);
    assert!(output.status.success(), "{output:?}");
    let usage = String::from_utf8(output.stdout).unwrap();
    assert!(
        usage.contains("Usage: streamsnap-fuse-holder --socket PATH"),
        "{usage}"
    );
    assert!(usage.contains("--idle-timeout SECONDS"), "{usage}");
    let output = holder(&["--version"]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("streamsnap-fuse-holder "));
}

#[test]
fn a_wrong_command_line_is_an_error_with_the_usage() {
    for args in [
        &[][..],
        &["--socket"][..],
        &["--socket", "/x", "--idle"][..],
    ] {
        let output = holder(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.contains("Usage:"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_idle_holder_exits_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let started = Instant::now();
    let mut child = spawn_holder(&socket, "1");
    let _cleanup = KillOnDrop(child.id(), dir.path().to_owned());
    let status = exited_within(&mut child, Duration::from_secs(10)).expect("the holder exits");
    assert!(status.success(), "{status}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(!socket.exists(), "the socket file is removed");
    let log = stderr_of(child);
    assert!(
        log.contains("no daemon connected for 1 s: exiting"),
        "{log}"
    );
}

#[test]
fn a_holder_that_keeps_a_connection_stays_until_the_daemon_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let mut child = spawn_holder(&socket, "1");
    let _cleanup = KillOnDrop(child.id(), dir.path().to_owned());
    let (kept, mut peer) = UnixStream::pair().unwrap();
    let daemon = connect(&socket);
    daemon.put(5, kept.as_fd(), b"init").unwrap();
    drop(kept);
    drop(daemon);
    // Well past the idle timeout, with no daemon connected: it must stay.
    assert_eq!(exited_within(&mut child, Duration::from_secs(3)), None);
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    assert!(
        peer.read(&mut buf).is_err(),
        "the kept connection is still open"
    );

    // The next daemon stops for good: the holder closes what it kept and exits.
    let daemon = connect(&socket);
    assert_eq!(daemon.stop().unwrap(), 1);
    let status = exited_within(&mut child, Duration::from_secs(5)).expect("the holder exits");
    assert!(status.success(), "{status}");
    peer.set_nonblocking(false).unwrap();
    assert_eq!(peer.read(&mut buf).unwrap(), 0, "the connection is closed");
    let log = stderr_of(child);
    assert!(
        log.contains("the daemon stopped for good; closed 1 kept connection, exiting"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// With the real daemon

/// `streamsnap-snapshotterd` next to the holder binary, if it was built.
fn daemon_binary() -> Option<PathBuf> {
    let path = Path::new(HOLDER).with_file_name("streamsnap-snapshotterd");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is not built (run `cargo build --workspace --bins` first)",
            path.display()
        );
        None
    }
}

/// Whether process `pid` runs (a zombie, waiting for whoever adopted it, does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a process this test started (directly or through the daemon) if it still runs when
/// the test ends, so a failed test leaves nothing behind. Only a process whose command line
/// names the test's directory: never another that reused the pid.
struct KillOnDrop(u32, PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        let needle = self.1.to_string_lossy();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*needle);
        if ours && running(self.0) {
            let pid = nix::unistd::Pid::from_raw(self.0 as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A daemon on a fresh root with `config`, serving; and the pid of the holder it started.
fn start_daemon(daemon: &Path, root: &Path, config: &str) -> (Child, u32) {
    std::fs::write(root.join("config.toml"), config).unwrap();
    let address = root.join("snapshotter.sock");
    let child = Command::new(daemon)
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(&address)
        .arg("--config")
        .arg(root.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _cleanup = KillOnDrop(child.id(), root.to_owned());
    wait_until("the daemon serves", Duration::from_secs(20), || {
        UnixStream::connect(&address).is_ok()
    });
    let holder = connect(&root.join("fuse-holder.sock")).hello().unwrap();
    std::mem::forget(_cleanup);
    (child, holder)
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

#[test]
fn the_holder_exits_when_its_daemon_stops_for_good() {
    let Some(daemon) = daemon_binary() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    // A long idle timeout: only the stop request can end the holder within the test.
    let (mut child, holder) = start_daemon(
        &daemon,
        root.path(),
        "[fuse]\nholder_idle_timeout_seconds = 3600\n",
    );
    let _cleanup = (
        KillOnDrop(child.id(), root.path().to_owned()),
        KillOnDrop(holder, root.path().to_owned()),
    );
    assert!(running(holder));
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = exited_within(&mut child, Duration::from_secs(30)).expect("the daemon exits");
    assert!(status.success(), "{status}");
    wait_until("the holder exits", Duration::from_secs(5), || {
        !running(holder)
    });
    let log = std::fs::read_to_string(root.path().join("fuse-holder.log")).unwrap();
    assert!(log.contains("the daemon stopped for good"), "{log}");
}

#[test]
fn after_a_handover_with_nothing_to_keep_the_holder_exits_once_idle() {
    let Some(daemon) = daemon_binary() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (mut child, holder) = start_daemon(
        &daemon,
        root.path(),
        "[fuse]\nholder_idle_timeout_seconds = 2\n",
    );
    let _cleanup = (
        KillOnDrop(child.id(), root.path().to_owned()),
        KillOnDrop(holder, root.path().to_owned()),
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = exited_within(&mut child, Duration::from_secs(30)).expect("the daemon exits");
    assert!(status.success(), "{status}");
    // SIGTERM is a restart: the holder waits for the next daemon...
    assert!(running(holder), "the holder left right after a handover");
    // ...but not for ever when it keeps nothing.
    wait_until("the idle holder exits", Duration::from_secs(10), || {
        !running(holder)
    });
    let log = std::fs::read_to_string(root.path().join("fuse-holder.log")).unwrap();
    assert!(log.contains("no daemon connected for 2 s"), "{log}");
}
