//! The conversion service (`streamsnap serve`) as the end-to-end tests run it: a private
//! instance on a free 127.0.0.1 port, its state dir, API token and webhook secret in a temp dir
//! ([`ServiceHome`], which outlives restarts; kept with `STREAMSNAP_E2E_KEEP=1`), and the process ([`ServiceProcess`]: killed with
//! SIGKILL or stopped with SIGTERM by PID, its log printed when a test panics).
//!
//! [`ServiceHome::replica`] makes another replica of the same service (same token, secret and
//! PostgreSQL store: [`ServiceHome::use_postgres`]), on its own port and state dir.
//!
//! [`WebhookRelay`] sits between the registry and the service when a test needs to see, or
//! disturb, the deliveries: it forwards every notification to the service and can answer the
//! registry 500 for the first delivery of chosen events *after* the service handled it, so the
//! real registry delivers the same event again.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::bins::workspace_bin;
use crate::http::Response;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a service keeps its state across restarts, and how it is reached.
#[derive(Debug)]
pub struct ServiceHome {
    dir: Option<TempDir>,
    port: u16,
    /// `--store URL` and `--store-password-file FILE` (PostgreSQL), if not the embedded store.
    store: Option<(String, PathBuf)>,
    /// The API token (also in `token_file()`).
    pub token: String,
    /// The webhook secret (also in `secret_file()`).
    pub secret: String,
}

impl ServiceHome {
    /// A temp dir with a fresh token and secret (mode 0600), and a port that was free.
    pub fn new() -> anyhow::Result<Self> {
        let token = format!("tok-{}", random_hex()?);
        let secret = format!("hook-{}", random_hex()?);
        Self::with_secrets(token, secret, None)
    }

    /// Another replica of the same service: the same token, secret and store, its own port
    /// and state dir.
    pub fn replica(&self) -> anyhow::Result<Self> {
        Self::with_secrets(self.token.clone(), self.secret.clone(), self.store.clone())
    }

    /// Keeps the state in PostgreSQL (`serve --store URL --store-password-file FILE`).
    pub fn use_postgres(&mut self, url: String, password_file: PathBuf) {
        self.store = Some((url, password_file));
    }

    fn with_secrets(
        token: String,
        secret: String,
        store: Option<(String, PathBuf)>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-service.")
            .tempdir()
            .context("creating a temp dir for the service")?;
        for (name, value) in [("token", &token), ("secret", &secret)] {
            let path = dir.path().join(name);
            fs::write(&path, format!("{value}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(Self {
            dir: Some(dir),
            port,
            store,
            token,
            secret,
        })
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir is only taken on drop").path()
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The webhook URL the registry should post to.
    pub fn webhook_url(&self) -> String {
        format!("{}/v1/registry-events", self.url())
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir().join("token")
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir().join("secret")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The registry config's `notifications:` section for an endpoint at `url` sending the
    /// secret; blob events and pulls are not sent; failed deliveries are retried after 100 ms.
    pub fn notifications_yaml(&self, url: &str) -> String {
        format!(
            "notifications:\n  endpoints:\n    - name: streamsnap\n      url: {url}\n      \
             headers:\n        Authorization: [Bearer {}]\n      timeout: 10s\n      \
             threshold: 3\n      backoff: 100ms\n      ignore:\n        mediatypes: \
             [application/octet-stream]\n        actions: [pull]\n",
            self.secret
        )
    }

    /// The registry config's `notifications:` section with one endpoint per URL (each gets
    /// every event: the replicas of one service, each notified of every push), sending the
    /// secret; blob events and pulls are not sent.
    pub fn notifications_yaml_for_all(&self, urls: &[String]) -> String {
        let mut yaml = String::from("notifications:\n  endpoints:\n");
        for (i, url) in urls.iter().enumerate() {
            yaml.push_str(&format!(
                "    - name: streamsnap-{i}\n      url: {url}\n      headers:\n        \
                 Authorization: [Bearer {}]\n      timeout: 10s\n      threshold: 3\n      \
                 backoff: 100ms\n      ignore:\n        mediatypes: \
                 [application/octet-stream]\n        actions: [pull]\n",
                self.secret
            ));
        }
        yaml
    }

    /// Starts `streamsnap serve` for `registry` (`127.0.0.1:PORT`) and waits until
    /// `/v1/healthz` answers. `extra` goes last on the command line (e.g. `-vv`).
    pub fn start(&self, registry: &str, extra: &[&str]) -> anyhow::Result<ServiceProcess> {
        let log_path = self
            .dir()
            .join(format!("service.{}.log", fs::read_dir(self.dir())?.count()));
        let log = File::create(&log_path)?;
        let mut command = Command::new(workspace_bin("streamsnap")?);
        command
            .args(["serve", "--registry", registry, "--listen", &self.addr()])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--webhook-secret-file")
            .arg(self.secret_file());
        if !extra.contains(&"--insecure-dev-loopback") {
            command.arg("--token-file").arg(self.token_file());
        }
        if let Some((url, password_file)) = &self.store {
            command
                .args(["--store", url])
                .arg("--store-password-file")
                .arg(password_file);
        }
        command
            .args(extra)
            .env_remove("STREAMSNAP_LOG")
            .env_remove("STREAMSNAP_STORE")
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().context("spawning streamsnap serve")?;
        let mut process = ServiceProcess {
            child,
            log_path,
            addr: self.addr(),
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "streamsnap serve exited at start with {status}; its log:\n{}",
                    process.log()
                );
            }
            if crate::http::get(&process.addr, "/v1/healthz", &[]).is_ok_and(|r| r.status == 200) {
                return Ok(process);
            }
            if Instant::now() > deadline {
                bail!(
                    "streamsnap serve did not answer within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    process.log()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for ServiceHome {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && std::env::var_os(crate::registry::KEEP_ENV).is_some()
        {
            eprintln!("keeping service dir {}", dir.keep().display());
        }
    }
}

/// A running `streamsnap serve`. Dropping it kills it (SIGKILL).
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    log_path: PathBuf,
    addr: String,
}

impl ServiceProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILL, as a crash would; waits for it.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing streamsnap serve")?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for the exit (SIGKILL after a generous timeout, then an error).
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) takes no pointers; the child is not reaped yet (try_wait returned
        // None), so the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "streamsnap serve did not stop within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the service log {} ---\n{}",
                self.log_path.display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// One HTTP/1.0 request with a body (`crate::http` sends none).
pub fn request_with_body(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let what = || format!("{method} http://{addr}{path}");
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("connecting for {}", what()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {}", what()))?;
    parse_response(&raw).with_context(|| format!("parsing the answer to {}", what()))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {} bytes", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// Decides, for an event (`serde_json` value of one element of `events`), whether the relay
/// answers the registry 500 on the event's first delivery.
pub type FailFirst = Box<dyn Fn(&serde_json::Value) -> bool + Send + Sync>;

/// A notification relay on `127.0.0.1:PORT`. See the module doc.
pub struct WebhookRelay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WebhookRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRelay")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct RelayShared {
    upstream: String,
    fail_first: FailFirst,
    stop: AtomicBool,
    /// Event ID -> deliveries forwarded to the service.
    deliveries: Mutex<HashMap<String, u32>>,
    /// Every envelope forwarded, as received, with its Authorization header.
    envelopes: Mutex<Vec<(String, Vec<u8>)>>,
}

impl WebhookRelay {
    /// Relays to the service at `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str, fail_first: FailFirst) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(RelayShared {
            upstream: upstream.to_owned(),
            fail_first,
            stop: AtomicBool::new(false),
            deliveries: Mutex::new(HashMap::new()),
            envelopes: Mutex::new(Vec::new()),
        });
        let for_thread = shared.clone();
        let acceptor = thread::spawn(move || {
            while !for_thread.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = for_thread.clone();
                        thread::spawn(move || {
                            let _ = relay(&shared, stream);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(_) => thread::sleep(POLL),
                }
            }
        });
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The URL to configure as the registry's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/v1/registry-events", self.addr)
    }

    /// Event ID -> how many times it was forwarded to the service.
    pub fn deliveries(&self) -> HashMap<String, u32> {
        self.shared.deliveries.lock().unwrap().clone()
    }

    /// Every envelope forwarded: its Authorization header and body.
    pub fn envelopes(&self) -> Vec<(String, Vec<u8>)> {
        self.shared.envelopes.lock().unwrap().clone()
    }
}

impl Drop for WebhookRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Reads one request from the registry, forwards it, answers, closes.
fn relay(shared: &RelayShared, stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or("/v1/registry-events")
        .to_owned();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let authorization = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let forwarded: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(n, _)| {
            n.eq_ignore_ascii_case("authorization") || n.eq_ignore_ascii_case("content-type")
        })
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let status = match request_with_body(&shared.upstream, "POST", &path, &forwarded, &body) {
        Ok(response) => response.status,
        Err(_) => 502,
    };
    let mut fail = false;
    if status == 200 {
        shared
            .envelopes
            .lock()
            .unwrap()
            .push((authorization, body.clone()));
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut deliveries = shared.deliveries.lock().unwrap();
        for event in envelope["events"].as_array().into_iter().flatten() {
            let id = event["id"].as_str().unwrap_or_default().to_owned();
            let count = deliveries.entry(id).or_insert(0);
            *count += 1;
            if *count == 1 && (shared.fail_first)(event) {
                fail = true;
            }
        }
    }
    let answer = if fail { 500 } else { status };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {answer} Relayed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    Ok(())
}

fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Pushes an image by tag with the registry client (its layers, its config, then its OCI
/// manifest); returns the manifest digest.
pub async fn push_image(
    client: &streamsnap_registry::Client,
    repo: &streamsnap_registry::Repository,
    tag: &str,
    spec: &crate::ImageSpec,
) -> anyhow::Result<streamsnap_format::Digest> {
    use streamsnap_format::media;
    use streamsnap_format::oci::{Descriptor, ImageManifest};
    let mut layers = Vec::new();
    for layer in &spec.layers {
        let blob = layer.compressed()?;
        let descriptor = Descriptor::of(layer.media_type(), &blob);
        client
            .push_blob(repo, &descriptor.digest, blob.into())
            .await?;
        layers.push(descriptor);
    }
    let diff_ids: Vec<_> = spec.layers.iter().map(crate::LayerBlob::diff_id).collect();
    let config = spec.config_json(&diff_ids);
    let config_descriptor = Descriptor::of(media::OCI_CONFIG, &config);
    client
        .push_blob(repo, &config_descriptor.digest, config.into())
        .await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: None,
        config: config_descriptor,
        layers,
        subject: None,
        annotations: Default::default(),
    };
    let put = client
        .put_manifest(
            repo,
            tag,
            media::OCI_MANIFEST,
            serde_json::to_vec(&manifest)?.into(),
        )
        .await?;
    Ok(put.digest)
}

/// A repository name or a reference as one path segment of the API (`team%2Fapp`).
pub fn encode_segment(s: &str) -> String {
    s.replace('/', "%2F").replace(':', "%3A")
}

/// An API operation's `state` (empty if it has none).
pub fn op_state(op: &serde_json::Value) -> &str {
    op["state"].as_str().unwrap_or_default()
}

/// A digest field of an API answer.
pub fn digest_field(value: &serde_json::Value) -> anyhow::Result<streamsnap_format::Digest> {
    value
        .as_str()
        .context("not a string")?
        .parse()
        .context("not a digest")
}

/// A one-layer image whose one file, `id`, holds `content` (each content its own image).
pub fn small_spec(content: &str) -> crate::ImageSpec {
    crate::ImageSpec::linux_amd64(vec![crate::LayerBlob::gzip(
        crate::TarGen::new()
            .file("id", 0o644, content.as_bytes())
            .finish(),
    )])
}
