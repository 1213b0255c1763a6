//! A TCP proxy that behaves like a network link in front of a registry: a bandwidth shared by
//! every connection (one token bucket per direction, full duplex) and a round-trip time. The
//! kernel here has no netem; [`crate::CountingProxy`] adds a delay per chunk, which caps
//! throughput per connection but is no model of a link. This one is, for benchmarks.
//!
//! Model: a byte read from one side is put on the link of its direction when the link is free
//! (the link sends `bandwidth` bytes per second, first come first served over all connections,
//! with a token bucket 2 ms deep) and arrives `rtt / 2` after its last byte left. A new connection costs one round trip before
//! its first byte goes upstream (the TCP handshake). So a request on a new connection and its
//! small response take two round trips, on a kept-alive connection one, and a large body adds
//! its size over the bandwidth, whatever the number of connections sharing the link.
//!
//! Plain threads: per connection one reader and one writer per direction, joined by a bounded
//! queue; the reader sleeps until its bytes have left the link, so what is buffered stays near
//! `bandwidth * rtt / 2`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;

const POLL: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest piece read from a socket at once (0.5 ms of a 1 Gbit/s link).
const PIECE: usize = 64 * 1024;
/// Pieces queued between the reader and the writer of one direction.
const QUEUE: usize = 64;
/// Depth of the token bucket, as time of the link: a sender that wakes up late may send this
/// much at once to catch up (thread wake-ups are late by up to a few ms on a loaded machine).
const BURST: Duration = Duration::from_millis(2);

/// What the link does: bandwidth per direction and round-trip time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkShape {
    /// Bytes per second in each direction, shared by all connections; 0 is unlimited.
    pub bytes_per_second: u64,
    /// Round-trip time added to loopback's.
    pub rtt: Duration,
}

impl LinkShape {
    /// `mbit` megabits (10^6 bits) per second and `rtt_ms` milliseconds of round trip.
    pub fn mbit(mbit: f64, rtt_ms: f64) -> Self {
        Self {
            bytes_per_second: (mbit * 1e6 / 8.0) as u64,
            rtt: Duration::from_secs_f64(rtt_ms / 1e3),
        }
    }

    /// Time `bytes` take on the link, without the round trip.
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        if self.bytes_per_second == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64)
        }
    }
}

/// An HTTP request seen going upstream (see [`ShapingProxy::set_request_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// When its first bytes reached the proxy.
    pub at: Instant,
    /// Which connection carried it (in accept order).
    pub connection: u64,
    pub method: String,
    pub path: String,
    /// The `Range: bytes=FIRST-LAST` header, as `(first, last)` inclusive.
    pub range: Option<(u64, u64)>,
}

/// A running shaping proxy on `127.0.0.1:PORT`. See the module doc. Dropping it closes every
/// connection and joins its threads.
#[derive(Debug)]
pub struct ShapingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    shape: LinkShape,
    stop: AtomicBool,
    /// When each direction's link is free again: to the client, to the upstream.
    down_link: Mutex<Instant>,
    up_link: Mutex<Instant>,
    downstream: AtomicU64,
    upstream_bytes: AtomicU64,
    connections: AtomicU64,
    responses: AtomicU64,
    log_requests: AtomicBool,
    requests: Mutex<Vec<RequestRecord>>,
    open: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ShapingProxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:PORT`, resolved now) on a free loopback port.
    pub fn start(upstream: &str, shape: LinkShape) -> anyhow::Result<Self> {
        let upstream = upstream
            .to_socket_addrs()
            .with_context(|| format!("resolving {upstream}"))?
            .next()
            .with_context(|| format!("{upstream} resolves to no address"))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            upstream,
            shape,
            stop: AtomicBool::new(false),
            down_link: Mutex::new(now),
            up_link: Mutex::new(now),
            downstream: AtomicU64::new(0),
            upstream_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            log_requests: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("shaper-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `127.0.0.1:PORT`, to use in image references instead of the registry's address.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn shape(&self) -> LinkShape {
        self.shared.shape
    }

    /// Bytes delivered to clients (responses, headers included) since the start.
    pub fn downstream_bytes(&self) -> u64 {
        self.shared.downstream.load(Ordering::SeqCst)
    }

    /// Bytes delivered to the upstream (requests) since the start.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream_bytes.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// While on, every HTTP request going upstream is recorded (method, path, range), for an
    /// access trace; [`Self::take_requests`] hands them over. Exact for clients that send each
    /// request in one write, as HTTP clients do.
    pub fn set_request_log(&self, on: bool) {
        self.shared.log_requests.store(on, Ordering::SeqCst);
    }

    /// The requests recorded so far, oldest first; the record starts empty again.
    pub fn take_requests(&self) -> Vec<RequestRecord> {
        std::mem::take(&mut *self.shared.requests.lock().expect("shaper lock"))
    }

    /// HTTP responses seen going to clients since the start (pieces starting with `HTTP/1.`:
    /// exact for clients that wait for a response before sending the next request).
    pub fn responses(&self) -> u64 {
        self.shared.responses.load(Ordering::SeqCst)
    }
}

impl Drop for ShapingProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (client, upstream) in self.shared.open.lock().expect("shaper lock").values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().expect("shaper lock"));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                next_id += 1;
                let id = next_id;
                let conn = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("shaper-conn-{id}"))
                    .spawn(move || serve(id, client, &conn));
                let mut threads = shared.threads.lock().expect("shaper lock");
                threads.retain(|t| !t.is_finished());
                if let Ok(t) = spawned {
                    threads.push(t);
                }
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn serve(id: u64, client: TcpStream, shared: &Arc<Shared>) {
    if client.set_nonblocking(false).is_err() {
        return;
    }
    let _ = client.set_nodelay(true);
    // The handshake: one round trip before the client's first byte can leave.
    thread::sleep(shared.shape.rtt);
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let clones = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    );
    let (Ok(c1), Ok(u1), Ok(c2), Ok(c3), Ok(u3)) = clones else {
        return;
    };
    shared
        .open
        .lock()
        .expect("shaper lock")
        .insert(id, (c3, u3));
    if shared.stop.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    }
    let to_upstream = direction(c1, u1, shared, Direction::Up(id));
    let to_client = direction(upstream, c2, shared, Direction::Down);
    for handles in [to_upstream, to_client] {
        for h in handles.into_iter().flatten() {
            let _ = h.join();
        }
    }
    drop(client);
    shared.open.lock().expect("shaper lock").remove(&id);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client to upstream (requests), on connection N.
    Up(u64),
    /// Upstream to client (responses).
    Down,
}

/// A piece on its way: when it arrives, and its bytes (`None`: the sender closed).
type Piece = (Instant, Option<Vec<u8>>);

/// Starts the reader and the writer of one direction.
fn direction(
    from: TcpStream,
    to: TcpStream,
    shared: &Arc<Shared>,
    dir: Direction,
) -> [Option<JoinHandle<()>>; 2] {
    let (tx, rx) = sync_channel::<Piece>(QUEUE);
    let reader = {
        let shared = Arc::clone(shared);
        let to = to.try_clone().ok();
        thread::Builder::new()
            .name("shaper-read".into())
            .spawn(move || read_side(from, to, tx, &shared, dir))
            .ok()
    };
    let writer = {
        let shared = Arc::clone(shared);
        thread::Builder::new()
            .name("shaper-write".into())
            .spawn(move || write_side(to, rx, &shared, dir))
            .ok()
    };
    [reader, writer]
}

fn read_side(
    mut from: TcpStream,
    to: Option<TcpStream>,
    tx: SyncSender<Piece>,
    shared: &Shared,
    dir: Direction,
) {
    let half_rtt = shared.shape.rtt / 2;
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send((Instant::now() + half_rtt, None));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        match dir {
            Direction::Down if buf[..n].starts_with(b"HTTP/1.") => {
                shared.responses.fetch_add(1, Ordering::SeqCst);
            }
            Direction::Up(connection) if shared.log_requests.load(Ordering::SeqCst) => {
                if let Some(record) = parse_request(&buf[..n], connection) {
                    shared.requests.lock().expect("shaper lock").push(record);
                }
            }
            _ => {}
        }
        let left = reserve(shared, dir, n as u64);
        sleep_until(left);
        if tx.send((left + half_rtt, Some(buf[..n].to_vec()))).is_err() {
            break;
        }
    }
    // An error: end both directions.
    let _ = from.shutdown(Shutdown::Both);
    if let Some(to) = to {
        let _ = to.shutdown(Shutdown::Both);
    }
}

fn write_side(mut to: TcpStream, rx: Receiver<Piece>, shared: &Shared, dir: Direction) {
    let counter = match dir {
        Direction::Up(_) => &shared.upstream_bytes,
        Direction::Down => &shared.downstream,
    };
    while let Ok((arrives, piece)) = rx.recv() {
        sleep_until(arrives);
        match piece {
            Some(bytes) => {
                if to.write_all(&bytes).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                counter.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Puts `bytes` on the link of `dir`; returns when their last byte has left.
fn reserve(shared: &Shared, dir: Direction, bytes: u64) -> Instant {
    let link = match dir {
        Direction::Up(_) => &shared.up_link,
        Direction::Down => &shared.down_link,
    };
    let mut free_at = link.lock().expect("shaper lock");
    let now = Instant::now();
    let start = (*free_at).max(now.checked_sub(BURST).unwrap_or(now));
    let done = start + shared.shape.transfer_time(bytes);
    *free_at = done;
    done
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

/// The request starting `piece`, if it starts one: `METHOD PATH HTTP/1.x` and its Range header.
fn parse_request(piece: &[u8], connection: u64) -> Option<RequestRecord> {
    let at = Instant::now();
    let head = std::str::from_utf8(&piece[..piece.len().min(8192)]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?;
    let path = first.next()?;
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !first.next()?.starts_with("HTTP/1.")
    {
        return None;
    }
    let range = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, value)| {
            let (first, last) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
            Some((first.parse().ok()?, last.parse().ok()?))
        });
    Some(RequestRecord {
        at,
        connection,
        method: method.to_owned(),
        path: path.to_owned(),
        range,
    })
}
