//! HTTPS for tests without an async stack: a blocking in-process HTTPS server (std threads,
//! `rustls::StreamOwned` over `std::net::TcpStream`) and a one-shot HTTPS client, both with the
//! certificates of a [`TestCa`].
//!
//! The server answers one request per connection (`Connection: close`), so Go, curl, skopeo and
//! hyper clients all work against it; a client that does not trust the test CA fails the
//! handshake and is dropped. The client sends HTTP/1.0 and reads to EOF, like [`crate::http`],
//! verifying the server's certificate against the test CA for the IP or name it connects to.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::http::Response;
use crate::test_ca::TestCa;

/// How long one connection may take (handshake, request, response) before it is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// The largest request head or body the server reads.
const MAX_REQUEST: usize = 64 * 1024;

/// A request the in-process server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// Every `name=value` of the query string, percent-decoded (`+` is a space).
    pub fn query(&self) -> Vec<(String, String)> {
        self.target
            .split_once('?')
            .map(|(_, q)| parse_form(q))
            .unwrap_or_default()
    }
}

/// What the server calls for each request.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// A running HTTPS server on `127.0.0.1:PORT` with the test CA's server certificate. Dropping it
/// stops accepting and joins its threads.
pub struct HttpsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpsServer {
    /// Starts serving `handler` on a free loopback port.
    pub fn start(ca: &TestCa, handler: Arc<Handler>) -> anyhow::Result<Self> {
        let config = Arc::new(server_config(ca)?);
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("https-accept".into())
                .spawn(move || accept_loop(&listener, &config, &handler, &stop))?
        };
        Ok(Self {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    config: &Arc<rustls::ServerConfig>,
    handler: &Arc<Handler>,
    stop: &AtomicBool,
) {
    let workers: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let config = Arc::clone(config);
                let handler = Arc::clone(handler);
                let worker = thread::Builder::new()
                    .name("https-conn".into())
                    .spawn(move || serve_connection(stream, config, handler.as_ref()));
                let mut workers = workers.lock().expect("no panics while locked");
                workers.retain(|w| !w.is_finished());
                if let Ok(worker) = worker {
                    workers.push(worker);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
    // Each connection has I/O timeouts, so joining is bounded.
    for worker in workers.into_inner().expect("no panics while locked") {
        let _ = worker.join();
    }
}

/// Handshake, one request, one response, close. Errors (a client that does not trust the CA,
/// a malformed request) just drop the connection.
fn serve_connection(stream: TcpStream, config: Arc<rustls::ServerConfig>, handler: &Handler) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let Ok(request) = read_request(&mut tls) else {
        return;
    };
    let response = handler(&request);
    let _ = write_response(&mut tls, &response);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
}

fn read_request(stream: &mut impl Read) -> anyhow::Result<Request> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if raw.len() > MAX_REQUEST {
            bail!("request head over {MAX_REQUEST} bytes");
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed before the end of the request head");
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut request = Request {
        method,
        target,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    let length: usize = request
        .header("content-length")
        .map(|v| v.parse().context("bad content-length"))
        .transpose()?
        .unwrap_or(0);
    if length > MAX_REQUEST {
        bail!("request body of {length} bytes");
    }
    while request.body.len() < length {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed in the request body");
        }
        request.body.extend_from_slice(&buf[..n]);
    }
    request.body.truncate(length);
    Ok(request)
}

fn write_response(stream: &mut impl Write, response: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(&response.body)?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    }
}

/// Parses `a=b&c=d` (a query string or an `application/x-www-form-urlencoded` body).
pub fn parse_form(form: &str) -> Vec<(String, String)> {
    form.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config with the test CA's server certificate (127.0.0.1 and localhost).
pub fn server_config(ca: &TestCa) -> anyhow::Result<rustls::ServerConfig> {
    let server = ca.server();
    let cert = std::fs::read(&server.cert_der)
        .with_context(|| format!("reading {}", server.cert_der.display()))?;
    let key = std::fs::read(&server.key_der)
        .with_context(|| format!("reading {}", server.key_der.display()))?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .context("building the TLS server config")
}

/// A rustls client config that trusts the test CA only.
pub fn client_config(ca: &TestCa) -> anyhow::Result<rustls::ClientConfig> {
    let der = std::fs::read(&ca.ca().cert_der)
        .with_context(|| format!("reading {}", ca.ca().cert_der.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `METHOD https://{addr}{path}` (HTTP/1.0, empty body) trusting the test CA; `addr` is
/// `127.0.0.1:PORT` or `localhost:PORT`.
pub fn https_request(
    ca: &TestCa,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let what = || format!("{method} https://{addr}{path}");
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let name = ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a TLS server name"))?;
    let conn = rustls::ClientConnection::new(Arc::new(client_config(ca)?), name)?;
    let tcp = TcpStream::connect(addr).with_context(|| format!("connecting for {}", what()))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes())
        .and_then(|()| tls.flush())
        .with_context(|| format!("sending {}", what()))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify: the response is what came before.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e).with_context(|| format!("reading the response to {}", what())),
    }
    parse_response(&raw).with_context(|| format!("parsing the response to {}", what()))
}

/// `GET https://{addr}{path}` trusting the test CA.
pub fn https_get(
    ca: &TestCa,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    https_request(ca, addr, "GET", path, headers)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {} bytes", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_forms_and_queries() {
        assert_eq!(
            parse_form("scope=repository%3Aa%2Fb%3Apull&x=1+2&bad=%zz&e="),
            [
                ("scope".to_owned(), "repository:a/b:pull".to_owned()),
                ("x".to_owned(), "1 2".to_owned()),
                ("bad".to_owned(), "%zz".to_owned()),
                ("e".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn serves_https_with_the_test_ca_and_echoes_requests() {
        let ca = TestCa::generate().unwrap();
        let handler: Arc<Handler> = Arc::new(|r: &Request| Response {
            status: 200,
            headers: vec![("X-Path".into(), r.path().to_owned())],
            body: r.header("x-echo").unwrap_or_default().as_bytes().to_vec(),
        });
        let server = HttpsServer::start(&ca, handler).unwrap();
        for host in ["127.0.0.1", "localhost"] {
            let addr = server.addr().replace("127.0.0.1", host);
            let r = https_get(&ca, &addr, "/a?b=c", &[("X-Echo", "hello")]).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
            assert_eq!(r.header("x-path"), Some("/a"));
        }
        // A client trusting another CA fails the handshake.
        let other = TestCa::generate().unwrap();
        let err = https_get(&other, &server.addr(), "/", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    }
}
