//! A private instance of the distribution registry (`docker-registry serve`, Debian package
//! `docker-registry`, distribution 2.8), on a free 127.0.0.1 port with its storage, config and
//! log in a temp dir. Killed and removed on drop. Any number can run at once.
//!
//! The registry writes two lines per request to its log: a logrus "response completed" line and
//! an Apache combined access log line (`127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 1000 ""
//! "ua"`), whose byte count is what the handler actually wrote to the connection: the range
//! length for a 206, what got out before the client hung up for an aborted download. The
//! combined line is also written for responses the logrus line skips (e.g. 416), so that is the
//! one [`Registry::access_log`] parses.

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::http;

/// How long the registry may take to answer `GET /v2/` after it is spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM'd registry may take to exit before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Spawn attempts when another process takes the chosen port before the registry binds it.
const PORT_ATTEMPTS: usize = 5;
/// How long to wait for a barrier request to show up in the log.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// Set this variable to keep the registry's temp dir (storage, config, log) after the test.
pub const KEEP_ENV: &str = "STREAMSNAP_E2E_KEEP";

/// A running `docker-registry`. See the module doc.
#[derive(Debug)]
pub struct Registry {
    process: Process,
}

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// The request URI as sent, query included.
    pub uri: String,
    pub status: u16,
    /// Bytes of response body the registry wrote.
    pub bytes: u64,
}

impl AccessLogEntry {
    /// The digest of a `GET /v2/<name>/blobs/<digest>` request, `None` for anything else (blob
    /// uploads, manifests, HEAD requests).
    pub fn blob_get_digest(&self) -> Option<&str> {
        if self.method != "GET" {
            return None;
        }
        let path = self.uri.split('?').next().unwrap_or_default();
        let (repo, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
        (!repo.is_empty() && digest.contains(':') && !digest.contains('/')).then_some(digest)
    }

    /// Whether this line is a blob GET that served blob content (200 or 206).
    pub fn is_served_blob(&self) -> bool {
        self.blob_get_digest().is_some() && matches!(self.status, 200 | 206)
    }
}

enum StartError {
    PortTaken,
    Failed(anyhow::Error),
}

/// A `docker-registry` process and its temp dir, for [`Registry`] and
/// [`crate::secure_registry::SecureRegistry`]: started on a free port (again on another when a
/// process took it first), stopped by PID on drop, its log printed when a test panics, its dir
/// removed (kept with [`KEEP_ENV`]).
#[derive(Debug)]
pub(crate) struct Process {
    child: Child,
    addr: String,
    dir: Option<TempDir>,
    log_path: PathBuf,
    barriers: AtomicU64,
}

impl Process {
    /// Starts `docker-registry serve` with its config and log in `dir`, on the first port
    /// `pick_port` gives that it manages to bind, with the config `config(addr)` gives. Ready
    /// when the log says it listens on `addr` (so the listener is ours, not a process that took
    /// the port) and `ready(addr)` holds (`ready_what` says what that is, for the error).
    pub(crate) fn start(
        dir: TempDir,
        mut pick_port: impl FnMut() -> anyhow::Result<u16>,
        config: impl Fn(&str) -> String,
        ready: impl Fn(&str) -> bool,
        ready_what: &str,
    ) -> anyhow::Result<Self> {
        let log_path = dir.path().join("registry.log");
        let config_path = dir.path().join("config.yml");
        for _ in 0..PORT_ATTEMPTS {
            let addr = format!("127.0.0.1:{}", pick_port()?);
            fs::write(&config_path, config(&addr))
                .with_context(|| format!("writing {}", config_path.display()))?;
            let mut child = spawn(&config_path, &log_path)?;
            match wait_ready(&mut child, &addr, &log_path, &ready, ready_what) {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        addr,
                        dir: Some(dir),
                        log_path,
                        barriers: AtomicU64::new(0),
                    });
                }
                Err(e) => {
                    stop(&mut child);
                    match e {
                        StartError::PortTaken => continue,
                        StartError::Failed(e) => return Err(e),
                    }
                }
            }
        }
        bail!("docker-registry could not bind a free port in {PORT_ATTEMPTS} attempts")
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir is only taken on drop").path()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a uniquely numbered `GET /v2/?…` with `get`, which must answer one of `statuses`,
    /// and waits until the registry logged it; returns the whole log then. The registry logs a
    /// request after its handler returned, a moment after the client saw the last byte; the
    /// barrier closes that gap for requests that already finished.
    pub(crate) fn barrier(
        &self,
        get: impl Fn(&str) -> anyhow::Result<http::Response>,
        statuses: &[u16],
    ) -> anyhow::Result<String> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let marker = format!("/v2/?streamsnap-e2e-barrier={n} ");
        let response = get(marker.trim_end())?;
        if !statuses.contains(&response.status) {
            bail!("registry barrier request answered {}", response.status);
        }
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        loop {
            let log = fs::read(&self.log_path)
                .with_context(|| format!("reading {}", self.log_path.display()))?;
            let log = String::from_utf8_lossy(&log).into_owned();
            if log.contains(&marker) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!(
                    "the registry did not log request {marker:?} within {BARRIER_TIMEOUT:?}: is \
                     the access log disabled? see {}",
                    self.log_path.display()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        stop(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "--- last lines of the registry log {} ---\n{}",
                self.log_path.display(),
                log_tail(&self.log_path, 40)
            );
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("keeping registry dir {}", dir.keep().display());
            } else if let Err(e) = dir.close() {
                eprintln!("warning: removing the registry's temp dir: {e}");
            }
        }
    }
}

impl Registry {
    /// Starts a registry with filesystem storage and deletes enabled.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_config_extra("")
    }

    /// Starts a registry whose config.yml ends with `yaml_fragment`: top-level keys such as a
    /// `notifications:` section. It must not repeat the keys written here (`version`, `log`,
    /// `storage`, `http`).
    pub fn start_with_config_extra(yaml_fragment: &str) -> anyhow::Result<Self> {
        Self::start_on_ports(yaml_fragment, free_port)
    }

    /// Starts on the first port `pick_port` gives that the registry manages to bind.
    fn start_on_ports(
        yaml_fragment: &str,
        pick_port: impl FnMut() -> anyhow::Result<u16>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-registry.")
            .tempdir()
            .context("creating a temp dir for the registry")?;
        let storage = dir.path().join("storage");
        let process = Process::start(
            dir,
            pick_port,
            |addr| config_yaml(&storage, addr, yaml_fragment),
            |addr| http::get(addr, "/v2/", &[]).is_ok_and(|r| r.status == 200),
            "GET http:///v2/ answering 200",
        )?;
        Ok(Self { process })
    }

    /// `127.0.0.1:PORT`, for image references (`{addr}/repo:tag`) and [`http::get`].
    pub fn addr(&self) -> String {
        self.process.addr().to_owned()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.process.addr())
    }

    /// The registry's stdout and stderr (logrus lines and the access log).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The temp dir holding config.yml, the log and the storage (`storage/`).
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// The registry's process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Every access log line so far. Requests that completed (from the client's point of view)
    /// before this call are included: it first sends a barrier request and waits for it to be
    /// logged.
    pub fn access_log(&self) -> anyhow::Result<Vec<AccessLogEntry>> {
        let log = self.barrier()?;
        Ok(parse_access_log(&log))
    }

    /// Total bytes the registry wrote answering blob GETs (status 200 and 206, i.e. full and
    /// ranged downloads) since it started. Take it before and after an operation and subtract.
    pub fn served_blob_bytes(&self) -> anyhow::Result<u64> {
        Ok(self
            .access_log()?
            .iter()
            .filter(|e| e.is_served_blob())
            .map(|e| e.bytes)
            .sum())
    }

    fn barrier(&self) -> anyhow::Result<String> {
        let addr = self.process.addr();
        self.process
            .barrier(|path| http::get(addr, path, &[]), &[200])
    }
}

fn config_yaml(storage: &Path, addr: &str, extra: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n\
         {extra}\n",
        storage.display()
    )
}

/// A port that was free a moment ago: bind port 0, read it, close. Another process may take it
/// before the registry binds it; [`Registry::start`] retries then.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn spawn(config: &Path, log_path: &Path) -> anyhow::Result<Child> {
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let result = Command::new("docker-registry")
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn();
    match result {
        Ok(child) => Ok(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(e).context(
            "docker-registry not found: install the Debian package docker-registry \
             (apt-get install docker-registry)",
        ),
        Err(e) => Err(e).context("spawning docker-registry"),
    }
}

fn wait_ready(
    child: &mut Child,
    addr: &str,
    log_path: &Path,
    ready: impl Fn(&str) -> bool,
    ready_what: &str,
) -> Result<(), StartError> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let listening = format!("listening on {addr}");
    loop {
        match child.try_wait() {
            Ok(Some(_)) if log_tail(log_path, 40).contains("address already in use") => {
                return Err(StartError::PortTaken);
            }
            Ok(Some(status)) => {
                return Err(StartError::Failed(anyhow::anyhow!(
                    "docker-registry exited at start with {status}; its log:\n{}",
                    log_tail(log_path, 40)
                )));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(StartError::Failed(
                    anyhow::Error::new(e).context("waiting for docker-registry"),
                ));
            }
        }
        let log = fs::read_to_string(log_path).unwrap_or_default();
        if log.contains(&listening) && ready(addr) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StartError::Failed(anyhow::anyhow!(
                "docker-registry on {addr} was not ready ({ready_what}) within \
                 {STARTUP_TIMEOUT:?}; its log:\n{}",
                log_tail(log_path, 40)
            )));
        }
        thread::sleep(POLL);
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; always reaps the child.
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) takes no pointers. The child has not been reaped yet (try_wait just
        // returned None), so its pid cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Parses the Apache combined lines of a registry log, skipping every other line.
pub fn parse_access_log(log: &str) -> Vec<AccessLogEntry> {
    log.lines().filter_map(parse_access_line).collect()
}

/// `127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/r/blobs/sha256:… HTTP/1.1" 206 1000 "" "ua"`
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let uri = request.next()?.to_owned();
    request.next()?.starts_with("HTTP/").then_some(())?;
    let mut fields = rest.split(' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = match fields.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    Some(AccessLogEntry {
        method,
        uri,
        status,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as distribution 2.8.2 writes them, from a registry served ranged GETs by curl.
    const LOG: &str = r#"time="2026-11-28T10:25:17.581115021Z" level=info msg="response completed" go.version=go1.19.8 http.request.host="127.0.0.1:45123" http.request.method=GET http.request.uri="/v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea" http.response.status=206 http.response.written=1000
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea HTTP/1.1" 206 1000 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea HTTP/1.1" 200 100000 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "HEAD /v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea HTTP/1.1" 200 0 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea HTTP/1.1" 416 33 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/test/repo/blobs/uploads/474a1caf-f1de-400f-834c-acf01a4ad168?_state=x HTTP/1.1" 204 0 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/test/repo/manifests/latest HTTP/1.1" 200 529 "" "skopeo/1.9.3"
127.0.0.1 - - [28/Nov/2026:10:25:13 +0000] "GET /v2/ HTTP/1.0" 200 2 "" ""
"#;

    #[test]
    fn parses_combined_lines_and_skips_logrus_lines() {
        let entries = parse_access_log(LOG);
        assert_eq!(entries.len(), 7);
        assert_eq!(
            entries[0],
            AccessLogEntry {
                method: "GET".into(),
                uri: "/v2/test/repo/blobs/sha256:6b2475aa04108b46a8b81ad51d25bd88d640124febb44410a8b62e4df48f02ea".into(),
                status: 206,
                bytes: 1000,
            }
        );
    }

    #[test]
    fn start_retries_when_the_port_is_taken() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut ports = vec![taken_port, taken_port];
        let registry = Registry::start_on_ports("", || match ports.pop() {
            Some(port) => Ok(port),
            None => free_port(),
        })
        .unwrap();
        assert_ne!(registry.addr(), format!("127.0.0.1:{taken_port}"));
        assert!(ports.is_empty());
        assert_eq!(
            http::get(&registry.addr(), "/v2/", &[]).unwrap().status,
            200
        );
    }

    #[test]
    fn counts_only_blob_gets_that_served_content() {
        let served: Vec<u64> = parse_access_log(LOG)
            .iter()
            .filter(|e| e.is_served_blob())
            .map(|e| e.bytes)
            .collect();
        assert_eq!(served, [1000, 100000]);
    }
}
