//! Handing every mounted layer over to the next daemon without unmounting, so running
//! containers do not notice a restart or an upgrade.
//!
//! The connections stay open in the holder. What must not happen is a request taken from the
//! kernel by this process and never answered. So each session's descriptor is swapped for one
//! end of a socket pair (whatever the session still writes, its replies, arrives there and is
//! forwarded to the connection), the event loops are woken from a read they may be blocked in on
//! the connection (a signal makes it fail with EINTR, and fuser reads again, now from the socket),
//! a marker request proves each loop has moved over, and the reads still running are waited for.
//! Requests that arrive meanwhile wait in the kernel for the next daemon.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::mount::{MountedLayer, replace_fd, socket_pair};

/// The signal that wakes fuser's event loops out of a read on /dev/fuse.
const WAKE: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR2;
/// FUSE_STATFS opcode: the marker request, harmless and answered inline by the event loop.
const FUSE_STATFS: u32 = 17;
/// Unique id of the marker requests (the kernel's ids never get this high).
const MARKER: u64 = u64::MAX - 1;

/// What a handover did.
#[derive(Debug, Default)]
pub struct HandoverReport {
    pub layers: usize,
    /// Replies forwarded to the kernel after the swap (requests that were in flight).
    pub forwarded: usize,
    /// Layers whose event loop or reads did not finish within the time allowed; their unanswered
    /// requests are resent to the next daemon where the kernel supports it.
    pub timed_out: usize,
}

/// Stops serving every layer without unmounting, answering what was taken. Call it once, at the
/// end of the process, with the runtime that runs the reads still alive.
pub fn handover(layers: Vec<MountedLayer>, timeout: Duration) -> io::Result<HandoverReport> {
    install_wake_handler()?;
    let mut swapped = Vec::with_capacity(layers.len());
    for mut layer in layers {
        let (session_end, our_end) = socket_pair()?;
        replace_fd(session_end.as_raw_fd(), layer.session_fd)?;
        drop(session_end); // the session's descriptor number now refers to it
        // The session must neither be joined (its loop now waits on the socket) nor dropped
        // into an unmount: the process is about to exit and leave the connection to the holder.
        if let Some(session) = layer.session.take() {
            std::mem::forget(session);
        }
        swapped.push((layer, our_end));
    }
    wake_event_loops();
    for (_, our_end) in &swapped {
        nix::unistd::write(our_end, &marker_request()).map_err(io::Error::from)?;
    }
    let deadline = Instant::now() + timeout;
    let mut report = HandoverReport {
        layers: swapped.len(),
        ..Default::default()
    };
    for (layer, our_end) in &swapped {
        match forward_until_idle(layer, our_end, deadline) {
            Ok(forwarded) => report.forwarded += forwarded,
            Err(error) => {
                report.timed_out += 1;
                tracing::warn!(mountpoint = %layer.mountpoint.display(), %error, "handover did not finish in time");
            }
        }
    }
    // Leave the mounts alone: MountedLayer's drop would unmount.
    for (layer, _) in swapped {
        std::mem::forget(layer);
    }
    Ok(report)
}

/// Forwards replies from the session's socket to the connection until the marker came back and
/// no read is in flight; returns how many replies were forwarded.
fn forward_until_idle(
    layer: &MountedLayer,
    our_end: &OwnedFd,
    deadline: Instant,
) -> io::Result<usize> {
    nix::fcntl::fcntl(
        our_end,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    let mut buf = vec![0u8; (1 << 20) + 4096];
    let mut marker_back = false;
    let mut forwarded = 0;
    loop {
        match nix::unistd::read(our_end, &mut buf) {
            Ok(n) if n >= 16 => {
                let unique = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
                if unique == MARKER {
                    marker_back = true;
                } else {
                    // The kernel may already have given up on it (interrupted): not an error.
                    let _ = nix::unistd::write(&layer.connection.fd, &buf[..n]);
                    forwarded += 1;
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(error) => return Err(error.into()),
        }
        if marker_back && layer.in_flight.load(Ordering::SeqCst) == 0 {
            // A reply written just before the count dropped is already in the socket: one more
            // non-blocking pass above would have taken it, and the count drops after the write.
            return Ok(forwarded);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "requests still in flight",
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A FUSE_STATFS request on the root with the marker's unique id (fuse_in_header only).
fn marker_request() -> Vec<u8> {
    let mut request = Vec::with_capacity(40);
    request.extend_from_slice(&40u32.to_ne_bytes()); // len
    request.extend_from_slice(&FUSE_STATFS.to_ne_bytes()); // opcode
    request.extend_from_slice(&MARKER.to_ne_bytes()); // unique
    request.extend_from_slice(&1u64.to_ne_bytes()); // nodeid: the root
    request.extend_from_slice(&0u32.to_ne_bytes()); // uid
    request.extend_from_slice(&0u32.to_ne_bytes()); // gid
    request.extend_from_slice(&std::process::id().to_ne_bytes()); // pid
    request.extend_from_slice(&0u16.to_ne_bytes()); // total_extlen
    request.extend_from_slice(&0u16.to_ne_bytes()); // padding
    request
}

extern "C" fn wake_handler(_: libc::c_int) {}

/// A handler that does nothing, installed without SA_RESTART: a read it interrupts fails with
/// EINTR, which fuser retries on the (swapped) descriptor.
fn install_wake_handler() -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(wake_handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is an empty extern "C" function, async-signal-safe by construction.
    unsafe { sigaction(WAKE, &action) }?;
    Ok(())
}

/// Signals every fuser event-loop thread of this process (threads named `fuser-N`).
fn wake_event_loops() {
    let pid = std::process::id() as libc::pid_t;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = comm.trim_end();
        let is_loop = name
            .strip_prefix("fuser-")
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
        if !is_loop {
            continue;
        }
        let Ok(tid) = task.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: tgkill sends a signal to a thread of this process; no memory is involved.
        unsafe {
            libc::syscall(libc::SYS_tgkill, pid, tid, WAKE as libc::c_int);
        }
    }
}
