//! A TCP proxy in front of a registry (or anything on TCP) that counts the bytes it forwards and
//! can misbehave on request: added latency, a blackhole (connections stay open, nothing moves),
//! refused connections. The kernel here has no netem, so this is how tests slow down or cut off
//! the registry. Plain threads: two per connection, one accept loop.
//!
//! Latency: a new connection waits [`CountingProxy::set_latency`] before it is connected
//! upstream, and every chunk read from either side waits it before it is forwarded. A request
//! and its response therefore cost at least two latencies, and a large body one per chunk read
//! (up to 64 KiB each).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context;

const POLL: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BUFFER: usize = 64 * 1024;

/// A fault injected into a response chunk (see [`CountingProxy::set_fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip one byte in the middle of the chunk: a wrong body.
    Corrupt,
    /// Forward half the chunk, then close the connection: a short body.
    Truncate,
    /// Close the connection without forwarding the chunk: a reset mid-response.
    Reset,
    /// Hold the chunk this long, then forward it: a stalled response.
    Stall(Duration),
}

/// A running proxy on `127.0.0.1:PORT`. See the module doc. Dropping it closes every
/// connection and joins its threads.
#[derive(Debug)]
pub struct CountingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    latency_micros: AtomicU64,
    /// Requests whose first line contains this are held until it changes.
    hold: Mutex<Option<String>>,
    /// Injected faults on responses: what, and every how many responses (0 = off).
    fault: Mutex<Option<Fault>>,
    fault_every: AtomicU64,
    responses: AtomicU64,
    faults_injected: AtomicU64,
    downstream: AtomicU64,
    upstream_bytes: AtomicU64,
    connections: AtomicU64,
    /// Both sockets of each open connection, to shut them down from outside.
    open: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl CountingProxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:PORT`, resolved now) on a free loopback port.
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream = upstream
            .to_socket_addrs()
            .with_context(|| format!("resolving {upstream}"))?
            .next()
            .with_context(|| format!("{upstream} resolves to no address"))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            latency_micros: AtomicU64::new(0),
            hold: Mutex::new(None),
            fault: Mutex::new(None),
            fault_every: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            faults_injected: AtomicU64::new(0),
            downstream: AtomicU64::new(0),
            upstream_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("proxy-accept".into())
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

    /// Bytes forwarded to clients (responses) since the start.
    pub fn downstream_bytes(&self) -> u64 {
        self.shared.downstream.load(Ordering::SeqCst)
    }

    /// Bytes forwarded to the upstream (requests) since the start.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream_bytes.load(Ordering::SeqCst)
    }

    /// Connections accepted (refused ones included) since the start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Delay before connecting upstream and before forwarding each chunk; zero turns it off.
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_micros.store(micros, Ordering::SeqCst);
    }

    /// While on, new connections are accepted but not connected upstream, and open connections
    /// forward nothing (what was read is held, and forwarded once it is off again).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, new connections are closed right after they are accepted; open ones go on.
    /// Injects `fault` into every `every`-th HTTP response forwarded to clients; `None` turns
    /// faults off. Corrupt and Truncate act on the response's first body read of at least
    /// 8 KiB (a response without one passes untouched); Reset closes the connection instead of
    /// forwarding the response; Stall holds the response before forwarding it.
    pub fn set_fault(&self, fault: Option<Fault>, every: u64) {
        *self.shared.fault.lock().expect("proxy lock poisoned") = fault;
        self.shared.fault_every.store(
            if fault.is_some() { every.max(1) } else { 0 },
            Ordering::SeqCst,
        );
    }

    /// Faults injected so far.
    pub fn faults_injected(&self) -> u64 {
        self.shared.faults_injected.load(Ordering::SeqCst)
    }

    /// Holds every request whose first line (`GET /v2/... HTTP/1.1`) contains `marker`
    /// before it goes upstream, until the hold is lifted (`None`) or changed: a response that
    /// takes as long as the test wants.
    pub fn set_hold(&self, marker: Option<&str>) {
        *self.shared.hold.lock().expect("proxy lock poisoned") = marker.map(str::to_owned);
    }

    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Closes every open connection now (both sides see the connection end).
    pub fn drop_connections(&self) {
        let open = self.shared.open.lock().expect("proxy lock poisoned");
        for (client, upstream) in open.values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.drop_connections();
        let threads =
            std::mem::take(&mut *self.shared.threads.lock().expect("proxy lock poisoned"));
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
                if shared.refuse.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                next_id += 1;
                let id = next_id;
                let conn_shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("proxy-conn-{id}"))
                    .spawn(move || serve(id, client, &conn_shared));
                let mut threads = shared.threads.lock().expect("proxy lock poisoned");
                threads.retain(|t| !t.is_finished());
                if let Ok(t) = spawned {
                    threads.push(t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn serve(id: u64, client: TcpStream, shared: &Arc<Shared>) {
    if client.set_nonblocking(false).is_err() {
        return;
    }
    let _ = client.set_nodelay(true);
    delay(shared);
    if !wait_while_blackholed(shared) {
        return;
    }
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (Ok(client_clone), Ok(upstream_clone)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    shared
        .open
        .lock()
        .expect("proxy lock poisoned")
        .insert(id, (client_clone, upstream_clone));
    if shared.stop.load(Ordering::SeqCst) {
        // Drop may have shut down the open connections before this one was registered.
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    }
    let up = {
        let (Ok(from), Ok(to)) = (client.try_clone(), upstream.try_clone()) else {
            return;
        };
        let shared = Arc::clone(shared);
        thread::spawn(move || pump(from, to, &shared, &shared.upstream_bytes))
    };
    pump(upstream, client, shared, &shared.downstream);
    let _ = up.join();
    shared.open.lock().expect("proxy lock poisoned").remove(&id);
}

/// Copies `from` to `to` until EOF or an error, then half-closes `to` (EOF) or, on an error,
/// shuts both down so the other direction ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, counter: &AtomicU64) {
    let mut buf = vec![0u8; BUFFER];
    // A fault chosen for the response being forwarded, waiting for its body.
    let mut pending: Option<Fault> = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        delay(shared);
        if !wait_while_blackholed(shared) {
            break;
        }
        if std::ptr::eq(counter, &shared.upstream_bytes) && !wait_while_held(shared, &buf[..n]) {
            break;
        }
        if std::ptr::eq(counter, &shared.downstream) {
            // On a keep-alive connection a response starts a read: the client sends its next
            // request only after reading the whole previous response.
            if buf[..n].starts_with(b"HTTP/1.") {
                pending = next_fault(shared);
                match pending {
                    Some(Fault::Reset) => break,
                    Some(Fault::Stall(how_long)) => {
                        thread::sleep(how_long);
                        pending = None;
                    }
                    _ => {}
                }
            }
            if n >= 8192 {
                match pending.take() {
                    Some(Fault::Corrupt) => buf[n / 2] ^= 0x5a,
                    Some(Fault::Truncate) => {
                        let _ = to.write_all(&buf[..n / 2]);
                        counter.fetch_add((n / 2) as u64, Ordering::SeqCst);
                        break;
                    }
                    _ => {}
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The fault for the response starting now, if it is its turn.
fn next_fault(shared: &Shared) -> Option<Fault> {
    let every = shared.fault_every.load(Ordering::SeqCst);
    if every == 0 {
        return None;
    }
    let nth = shared.responses.fetch_add(1, Ordering::SeqCst) + 1;
    if !nth.is_multiple_of(every) {
        return None;
    }
    let fault = *shared.fault.lock().expect("proxy lock poisoned");
    if fault.is_some() {
        shared.faults_injected.fetch_add(1, Ordering::SeqCst);
    }
    fault
}

fn delay(shared: &Shared) {
    let micros = shared.latency_micros.load(Ordering::SeqCst);
    if micros > 0 {
        thread::sleep(Duration::from_micros(micros));
    }
}

/// Waits while `request` (what was read from the client) starts with a first line the hold
/// names; false when the proxy stops meanwhile.
fn wait_while_held(shared: &Shared, request: &[u8]) -> bool {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let held = || {
        shared
            .hold
            .lock()
            .expect("proxy lock poisoned")
            .as_deref()
            .is_some_and(|marker| line.contains(marker))
    };
    while held() {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        thread::sleep(POLL);
    }
    true
}

/// Waits while the blackhole is on; false when the proxy stops meanwhile.
fn wait_while_blackholed(shared: &Shared) -> bool {
    while shared.blackhole.load(Ordering::SeqCst) {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        thread::sleep(POLL);
    }
    !shared.stop.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An echo server answering each connection until EOF; stops with the test process.
    fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let _ = std::io::copy(&mut reader, &mut stream);
                });
            }
        });
        addr
    }

    fn round_trip(addr: &str, data: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(data)?;
        s.shutdown(Shutdown::Write)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn forwards_and_counts_both_ways() {
        let proxy = CountingProxy::start(&echo_server()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let back = round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap();
        assert_eq!(back, data);
        assert_eq!(proxy.downstream_bytes(), data.len() as u64);
        assert_eq!(proxy.upstream_bytes(), data.len() as u64);
        assert_eq!(proxy.connections(), 1);
    }

    #[test]
    fn latency_delays_setup_and_each_chunk() {
        let proxy = CountingProxy::start(&echo_server()).unwrap();
        proxy.set_latency(Duration::from_millis(100));
        let start = Instant::now();
        round_trip(&proxy.addr(), b"ping", Duration::from_secs(10)).unwrap();
        // Setup, the request chunk and the echoed chunk.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn faults_hit_every_nth_response_body() {
        let proxy = CountingProxy::start(&echo_server()).unwrap();
        // The echo server sends back what it gets: make it look like a response.
        let mut data = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        data.extend((0..20_000u32).map(|i| (i % 251) as u8));
        proxy.set_fault(Some(Fault::Corrupt), 1);
        let back = round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap();
        assert_eq!(back.len(), data.len());
        assert_ne!(back, data, "a corrupted body must differ");
        assert_eq!(proxy.faults_injected(), 1);
        // Not a response start: untouched.
        let plain: Vec<u8> = (0..20_000u32).map(|i| (i % 13) as u8).collect();
        assert_eq!(
            round_trip(&proxy.addr(), &plain, Duration::from_secs(10)).unwrap(),
            plain
        );

        proxy.set_fault(Some(Fault::Truncate), 1);
        let back = round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap_or_default();
        assert!(back.len() < data.len(), "a truncated body must be short");
        proxy.set_fault(Some(Fault::Corrupt), 2);
        let first = round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap();
        let second = round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap();
        assert!(
            (first == data) != (second == data),
            "exactly one of two responses is hit"
        );
        proxy.set_fault(None, 0);
        assert_eq!(
            round_trip(&proxy.addr(), &data, Duration::from_secs(10)).unwrap(),
            data
        );
    }

    #[test]
    fn blackhole_stalls_and_refuse_closes() {
        let proxy = CountingProxy::start(&echo_server()).unwrap();
        proxy.set_blackhole(true);
        let stalled = round_trip(&proxy.addr(), b"ping", Duration::from_millis(300));
        assert!(stalled.is_err(), "{stalled:?}");
        assert_eq!(proxy.downstream_bytes(), 0);

        // A connection opened during the blackhole goes through once it lifts.
        let mut held = TcpStream::connect(proxy.addr()).unwrap();
        held.write_all(b"held").unwrap();
        thread::sleep(Duration::from_millis(50));
        proxy.set_blackhole(false);
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 4];
        held.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"held");

        proxy.set_refuse(true);
        let refused = round_trip(&proxy.addr(), b"ping", Duration::from_secs(5));
        assert!(
            matches!(&refused, Ok(v) if v.is_empty()) || refused.is_err(),
            "{refused:?}"
        );
        proxy.set_refuse(false);
        assert_eq!(
            round_trip(&proxy.addr(), b"ok", Duration::from_secs(5)).unwrap(),
            b"ok"
        );
    }

    #[test]
    fn a_hold_keeps_the_requests_it_names_until_lifted() {
        let proxy = CountingProxy::start(&echo_server()).unwrap();
        proxy.set_hold(Some("/blobs/held"));
        let held = round_trip(
            &proxy.addr(),
            b"GET /v2/r/blobs/held HTTP/1.1\r\n\r\n",
            Duration::from_millis(300),
        );
        assert!(held.is_err(), "{held:?}");
        // Others pass.
        let other = b"GET /v2/r/blobs/other HTTP/1.1\r\n\r\n";
        assert_eq!(
            round_trip(&proxy.addr(), other, Duration::from_secs(5)).unwrap(),
            other
        );

        let mut waiting = TcpStream::connect(proxy.addr()).unwrap();
        waiting
            .write_all(b"GET /v2/r/blobs/held HTTP/1.1\r\n\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(50));
        proxy.set_hold(None);
        waiting
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 8];
        waiting.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"GET /v2/");
    }
}
