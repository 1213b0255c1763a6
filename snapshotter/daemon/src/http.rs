//! `/metrics` (Prometheus text), `/healthz` and, when `[debug] profile` is on, `/debug/profile`
//! (the chunks the mounted layers' first reads touched, as a start-up profile in JSON) on the
//! metrics address.
//!
//! The address is often reachable from the whole cluster (the DaemonSet binds 0.0.0.0), so the
//! listener defends the node: at most [`Limits::max_connections`] connections at a time, request
//! headers within [`Limits::header_read_timeout`] (slow or idle clients are closed), every
//! connection closed after [`Limits::connection_lifetime`], and accept errors (out of file
//! descriptors, ...) met with a growing pause and a warning at most once a minute, never a busy
//! loop or a flood of log lines.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::snapshotter::Snapshotter;

/// What the endpoints look at.
#[derive(Debug)]
pub struct Endpoints {
    pub metrics: Metrics,
    pub snapshotter: Arc<Snapshotter>,
    /// Set once the snapshots API is being served.
    pub serving: Arc<AtomicBool>,
    /// Serve `/debug/profile` (`[debug] profile`): it names the layers and chunks the node read.
    pub profile: bool,
}

/// Bounds on what clients of the metrics address can hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's headers must arrive within this time, and an idle keep-alive connection is
    /// closed after it.
    pub header_read_timeout: Duration,
    /// Every connection is closed after this long, whatever it is doing (a client that does
    /// not read its answer).
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// Serves until the task is dropped. Binding errors are returned at once.
pub async fn serve(
    address: SocketAddr,
    endpoints: Arc<Endpoints>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    serve_with(address, endpoints, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    address: SocketAddr,
    endpoints: Arc<Endpoints>,
    limits: Limits,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    if endpoints.profile {
        tracing::info!(%address, "serving /metrics, /healthz and /debug/profile");
    } else {
        tracing::info!(%address, "serving /metrics and /healthz");
    }
    Ok(tokio::spawn(listen(listener, limits, move |request| {
        answer(&endpoints, request)
    })))
}

/// Accepts on `listener` within `limits`, answering each request with `respond`.
async fn listen<R>(listener: tokio::net::TcpListener, limits: Limits, respond: R)
where
    R: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    accept_loop(accept, limits.max_connections, move |stream| {
        let respond = respond.clone();
        async move {
            let service = service_fn(move |request| {
                let respond = respond.clone();
                async move { Ok::<_, Infallible>(respond(&request)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_lifetime, connection).await;
        }
    })
    .await;
}

/// Takes connections from `accept` and runs `handle` on each in a task of its own, with at most
/// `max_connections` running: the next connection is only accepted once a slot is free. An
/// accept error that is about one connection (aborted, reset) is skipped; any other (out of file
/// descriptors or memory) pauses the loop, longer each time in a row ([`AcceptBackoff`]).
async fn accept_loop<S, A, AFut, H, HFut>(mut accept: A, max_connections: usize, handle: H)
where
    A: FnMut() -> AFut,
    AFut: Future<Output = io::Result<S>>,
    H: Fn(S) -> HFut,
    HFut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = AcceptBackoff::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match accept().await {
            Ok(stream) => {
                backoff.succeeded();
                let connection = handle(stream);
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            Err(error) if is_per_connection(&error) => {
                tracing::debug!(%error, "metrics listener: a connection failed before it was accepted");
            }
            Err(error) => {
                let pause = backoff.failed(&error, Instant::now());
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The pause after an accept error (5 ms, doubling to 1 s while errors continue) and a warning
/// at most once per [`ACCEPT_WARNING_INTERVAL`], counting the errors it did not report.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    last_warning: Option<Instant>,
    unreported: u64,
}

impl AcceptBackoff {
    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// Records an error at `now`; returns how long to pause, and warns if a warning is due.
    fn failed(&mut self, error: &io::Error, now: Instant) -> Duration {
        self.pause = (self.pause * 2).clamp(FIRST_ACCEPT_PAUSE, MAX_ACCEPT_PAUSE);
        if self.warning_due(now) {
            tracing::warn!(
                %error,
                more_errors_since_last_warning = self.unreported,
                pause = ?self.pause,
                "metrics listener cannot accept connections; if this is 'too many open files', \
                 raise the daemon's file limit (LimitNOFILE) or find what holds its connections"
            );
            self.unreported = 0;
        } else {
            self.unreported += 1;
        }
        self.pause
    }

    fn warning_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_WARNING_INTERVAL);
        if due {
            self.last_warning = Some(now);
        }
        due
    }
}

fn json_text(json: Vec<u8>) -> String {
    String::from_utf8(json).expect("serde_json writes UTF-8")
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn answer(endpoints: &Endpoints, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    answer_get(endpoints, request.uri().path())
}

fn answer_get(endpoints: &Endpoints, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            endpoints.snapshotter.refresh_gauges(&endpoints.metrics);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                endpoints.metrics.render(),
            )
        }
        "/healthz" => {
            if endpoints.serving.load(Ordering::Relaxed) && endpoints.snapshotter.healthy() {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not serving\n".into(),
                )
            }
        }
        "/debug/profile" if !endpoints.profile => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "/debug/profile is off: set `profile = true` in the [debug] section of the daemon's \
             config to serve it (docs/snapshotter.md)\n"
                .into(),
        ),
        "/debug/profile" => match &endpoints.snapshotter.remote {
            Some(remote) => match remote.profile().encode() {
                Ok(json) => reply(StatusCode::OK, "application/json", json_text(json)),
                Err(error) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{error}\n"),
                ),
            },
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "remote snapshots are off on this node: no profile\n".into(),
            ),
        },
        _ if endpoints.profile => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /debug/profile\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    #[tokio::test]
    async fn accept_errors_pause_longer_each_time_instead_of_spinning() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let accept = move || {
            let counted = counted.clone();
            async move {
                // A loop without a pause would make this a million calls in no time: past 10,000
                // accept() never answers, so the test ends either way.
                if counted.fetch_add(1, Ordering::SeqCst) >= 10_000 {
                    std::future::pending::<()>().await;
                }
                Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE))
            }
        };
        let task = tokio::spawn(accept_loop(accept, 4, |()| async {}));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let n = calls.load(Ordering::SeqCst);
        // 5 ms doubling: the 9th call comes after 1.275 s of pauses, the 10th after 2.275 s.
        assert!((6..=10).contains(&n), "{n} accept calls in 1.5 s");
        task.abort();
    }

    #[tokio::test]
    async fn an_aborted_connection_is_skipped_without_a_pause() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let accept = move || {
            let counted = counted.clone();
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) >= 100 {
                    std::future::pending::<()>().await;
                }
                Err::<(), _>(io::Error::from(io::ErrorKind::ConnectionAborted))
            }
        };
        let task = tokio::spawn(accept_loop(accept, 4, |()| async {}));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 101);
        task.abort();
    }

    #[test]
    fn accept_warnings_come_at_most_once_a_minute() {
        let mut backoff = AcceptBackoff::default();
        let start = Instant::now();
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        let mut warned = 0;
        for ms in (0..180_000).step_by(10) {
            let now = start + Duration::from_millis(ms);
            let before = backoff.last_warning;
            backoff.failed(&error, now);
            if backoff.last_warning != before {
                warned += 1;
            }
        }
        assert_eq!(warned, 3, "one warning per minute over three minutes");
        assert_eq!(backoff.pause, MAX_ACCEPT_PAUSE);
        backoff.succeeded();
        assert_eq!(backoff.failed(&error, start), FIRST_ACCEPT_PAUSE);
    }

    async fn ok_server(limits: Limits) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(listen(listener, limits, |_| {
            reply(StatusCode::OK, "text/plain", "ok\n".into())
        }));
        address
    }

    async fn get(address: SocketAddr) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// Reads until the peer closes; the time it took.
    async fn closed_after(mut stream: TcpStream) -> Duration {
        let start = std::time::Instant::now();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        start.elapsed()
    }

    #[tokio::test]
    async fn slow_clients_are_closed_and_cannot_hold_more_than_the_cap() {
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(30),
        };
        let address = ok_server(limits).await;
        // Two clients that send half a request line and stop (slowloris), filling the cap.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"GET /metr").await.unwrap();
            slow.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), get(address))
            .await
            .expect("a third client is served once the slow ones are closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // It waited for a slot: the cap held.
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        for stream in slow {
            let after = tokio::time::timeout(Duration::from_secs(5), closed_after(stream))
                .await
                .expect("a slow client is closed after the header timeout");
            assert!(after < Duration::from_secs(1), "{after:?}");
        }
        // An idle connection (no request at all) is closed too.
        let idle = TcpStream::connect(address).await.unwrap();
        let after = tokio::time::timeout(Duration::from_secs(5), closed_after(idle))
            .await
            .expect("an idle client is closed after the header timeout");
        assert!(after < Duration::from_secs(1), "{after:?}");
    }

    #[tokio::test]
    async fn a_connection_is_closed_after_its_lifetime_whatever_it_does() {
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_millis(300),
        };
        let address = ok_server(limits).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        let after = tokio::time::timeout(Duration::from_secs(5), closed_after(stream))
            .await
            .expect("closed after its lifetime");
        assert!(after < Duration::from_secs(2), "{after:?}");
    }

    fn endpoints(profile: bool) -> (tempfile::TempDir, Endpoints) {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Arc::new(Snapshotter::open(dir.path(), None).unwrap());
        let endpoints = Endpoints {
            metrics: Metrics::new().unwrap(),
            snapshotter,
            serving: Arc::new(AtomicBool::new(true)),
            profile,
        };
        (dir, endpoints)
    }

    async fn body(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_profile_is_served_only_when_the_config_turns_it_on() {
        let (_dir, off) = endpoints(false);
        let (status, text) = body(answer_get(&off, "/debug/profile")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            text.contains("[debug]") && text.contains("profile = true"),
            "{text}"
        );
        let (_, text) = body(answer_get(&off, "/nope")).await;
        assert!(!text.contains("/debug/profile"), "{text}");
        let (status, _) = body(answer_get(&off, "/healthz")).await;
        assert_eq!(status, StatusCode::OK);

        let (_dir, on) = endpoints(true);
        let (status, text) = body(answer_get(&on, "/debug/profile")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(text.contains("remote snapshots are off"), "{text}");
        let (_, text) = body(answer_get(&on, "/nope")).await;
        assert!(text.contains("/debug/profile"), "{text}");
    }
}
