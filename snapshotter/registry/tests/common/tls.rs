//! TLS in front of an in-process [`Server`](super::Server), for tests of what the client does with
//! a registry it reaches over HTTPS.
//!
//! The certificate in `tests/fixtures/tls` is issued by the test CA there for
//! `IP:::ffff:127.0.0.1`, `IP:127.0.0.1` and `DNS:localhost`, valid until 2126. The client reaches
//! loopback registries over plain HTTP, so tests name the front `[::ffff:127.0.0.1]:PORT`: an
//! address the client does not take for loopback (HTTPS), which still reaches 127.0.0.1. The
//! client trusts the CA when `SSL_CERT_FILE` names `ca.pem` before it is built. Regenerate with
//! `openssl req -x509` (CA) and `openssl x509 -req -extfile` (server, with those SANs).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A TLS-terminating proxy on 127.0.0.1 that forwards each connection, in clear, to `backend`.
pub struct TlsFront {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TlsFront {
    pub fn start(backend: SocketAddr) -> Self {
        let certs = CertificateDer::pem_file_iter(fixture("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let config = config.clone();
                std::thread::spawn(move || forward(config, stream, backend));
            }
        });
        Self { addr, stop }
    }

    /// `[::ffff:127.0.0.1]:PORT`: the registry name a client reaches over HTTPS.
    pub fn registry(&self) -> String {
        format!("[::ffff:127.0.0.1]:{}", self.addr.port())
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.registry())
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies between the TLS client and the backend until either side closes. Both sockets poll
/// with a short read timeout, so one thread serves both directions.
fn forward(config: Arc<rustls::ServerConfig>, client: TcpStream, backend: SocketAddr) {
    let Ok(mut backend) = TcpStream::connect(backend) else {
        return;
    };
    let poll = Some(Duration::from_millis(5));
    if client.set_read_timeout(poll).is_err() || backend.set_read_timeout(poll).is_err() {
        return;
    }
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, client);
    let mut buf = vec![0u8; 64 << 10];
    let idle = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if backend.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => break,
        }
        match backend.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                    break;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => break,
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
}
