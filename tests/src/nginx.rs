//! A private nginx as a range-caching mirror of a registry (issue 16): a caching reverse proxy
//! with the slice module, for `GET`/`HEAD /v2/<repository>/blobs/sha256:<hex>` only (blobs are
//! immutable by digest; every other path is answered `404`, other methods `403`). Debian
//! package `nginx` (`nginx-light` is a transitional package that installs it; both build
//! `--with-http_slice_module`).
//!
//! How it caches: a request is cut into aligned slices of [`SliceCacheOptions::slice`] (1 MiB);
//! each slice is a cache entry keyed by `$uri$slice_range` and fetched from the upstream with
//! `Range: <that slice>` when missing, so a range GET on a cold cache costs the upstream the
//! slices covering the range, not the blob, and is answered `206` with exactly the bytes asked.
//! With `proxy_cache_lock on`, concurrent misses of one slice go upstream once; the others wait
//! for it (nginx polls a held lock every 500 ms) and are answered from the cache.
//!
//! The instance runs as root with its own prefix, config, logs, temp paths and cache under a
//! temp dir (`nginx -p DIR -c nginx.conf -e error.log -g 'daemon off;'`), on a free 127.0.0.1
//! port; stopped by PID (SIGTERM, then SIGKILL to its process group) and removed on drop, its
//! error log printed when a test panics. No global state: any number can run at once.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::http;
use crate::registry::KEEP_ENV;

/// How long nginx may take to answer after it is spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM'd nginx may take to exit before its process group gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Spawn attempts when another process takes the chosen port before nginx binds it.
const PORT_ATTEMPTS: usize = 5;
/// How long to wait for a barrier request to show up in the access log.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// The path the harness uses for readiness probes and log barriers (answered `204`).
const BARRIER_PATH: &str = "/streamsnap-e2e-barrier";
/// The User-Agent of the cache's requests to the upstream: the origin's log tells them from the
/// nodes' (`streamsnap/...`).
pub const UPSTREAM_AGENT: &str = "nginx-slice-cache";

/// What the cache does; the defaults are the documented config (docs/snapshotter.md, "Mirrors").
#[derive(Clone, Debug)]
pub struct SliceCacheOptions {
    /// The slice size, in nginx's syntax (`1m`, `256k`).
    pub slice: String,
    /// `proxy_cache_lock`: concurrent misses of one slice go upstream once.
    pub lock: bool,
}

impl Default for SliceCacheOptions {
    fn default() -> Self {
        Self {
            slice: "1m".into(),
            lock: true,
        }
    }
}

/// A running nginx slice cache. See the module doc.
#[derive(Debug)]
pub struct SliceCache {
    child: Child,
    addr: String,
    dir: Option<TempDir>,
    barriers: AtomicU64,
}

/// One line of the cache's access log (requests from clients; the slices it fetched from the
/// upstream are subrequests and not logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheAccess {
    pub method: String,
    /// The request URI as sent, query included.
    pub uri: String,
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// `$upstream_cache_status` of the first slice: `HIT`, `MISS`, `-` (not cached), ...
    pub cache: String,
    /// The request's `Range` header, `-` when it had none.
    pub range: String,
    pub agent: String,
}

impl CacheAccess {
    /// The digest of a `GET /v2/<name>/blobs/<digest>` request, `None` for anything else.
    pub fn blob_get_digest(&self) -> Option<&str> {
        if self.method != "GET" {
            return None;
        }
        let path = self.uri.split('?').next().unwrap_or_default();
        let (repo, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
        (!repo.is_empty() && digest.starts_with("sha256:")).then_some(digest)
    }
}

/// The nginx config of a slice cache in `dir`, listening on `listen` (`127.0.0.1:PORT`), with
/// `upstream` (`HOST:PORT`, plain HTTP) as the registry it caches.
pub fn slice_cache_config(
    dir: &Path,
    listen: &str,
    upstream: &str,
    options: &SliceCacheOptions,
) -> String {
    let d = dir.display();
    let lock = if options.lock { "on" } else { "off" };
    let mut conf = String::new();
    // The process, its files under the prefix (the package's defaults are under /var and /run).
    let _ = write!(
        conf,
        "user root;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log notice;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 log_format blobs '$request_method\\t$request_uri\\t$status\\t$body_bytes_sent\\t\
         $upstream_cache_status\\t$http_range\\t$http_user_agent';\n\
         \x20 access_log {d}/access.log blobs;\n\
         \x20 client_body_temp_path {d}/tmp/body;\n\
         \x20 proxy_temp_path {d}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {d}/tmp/scgi;\n"
    );
    // The cache: what docs/snapshotter.md documents, paths and ports aside.
    let _ = write!(
        conf,
        "\x20 proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:16m max_size=20g \
         inactive=30d use_temp_path=off;\n\
         \x20 upstream registry {{\n\
         \x20   server {upstream};\n\
         \x20   keepalive 32;\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {listen};\n\
         \x20   location ~ \"^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$\" {{\n\
         \x20     limit_except GET {{ deny all; }}\n\
         \x20     slice {slice};\n\
         \x20     proxy_cache blobs;\n\
         \x20     proxy_cache_key $uri$slice_range;\n\
         \x20     proxy_set_header Range $slice_range;\n\
         \x20     proxy_cache_valid 200 206 30d;\n\
         \x20     proxy_cache_lock {lock};\n\
         \x20     proxy_cache_lock_timeout 30s;\n\
         \x20     proxy_cache_lock_age 30s;\n\
         \x20     proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Authorization \"\";\n\
         \x20     proxy_set_header User-Agent {UPSTREAM_AGENT};\n\
         \x20     proxy_pass http://registry;\n\
         \x20   }}\n\
         \x20   location = {BARRIER_PATH} {{ return 204; }}\n\
         \x20   location / {{ return 404; }}\n\
         \x20 }}\n\
         }}\n",
        slice = options.slice,
    );
    conf
}

impl SliceCache {
    /// A cold slice cache of `upstream` (`127.0.0.1:PORT`) with the documented settings.
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        Self::start_with(upstream, &SliceCacheOptions::default())
    }

    pub fn start_with(upstream: &str, options: &SliceCacheOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-nginx.")
            .tempdir()
            .context("creating a temp dir for nginx")?;
        for sub in ["cache", "tmp"] {
            fs::create_dir(dir.path().join(sub))?;
        }
        let conf = dir.path().join("nginx.conf");
        for _ in 0..PORT_ATTEMPTS {
            let addr = format!("127.0.0.1:{}", free_port()?);
            fs::write(
                &conf,
                slice_cache_config(dir.path(), &addr, upstream, options),
            )
            .with_context(|| format!("writing {}", conf.display()))?;
            let mut child = spawn(dir.path())?;
            match wait_ready(&mut child, dir.path(), &addr) {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        addr,
                        dir: Some(dir),
                        barriers: AtomicU64::new(0),
                    });
                }
                Err(e) => {
                    stop(&mut child);
                    if !tail(&dir.path().join("error.log"), 20).contains("Address already in use") {
                        return Err(e);
                    }
                }
            }
        }
        bail!("nginx could not bind a free port in {PORT_ATTEMPTS} attempts")
    }

    /// `127.0.0.1:PORT`: the mirror's address for `mirrors = [...]`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The prefix: nginx.conf, access.log, error.log, cache/.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir is only taken on drop").path()
    }

    /// The config nginx runs with.
    pub fn config(&self) -> anyhow::Result<String> {
        let path = self.dir().join("nginx.conf");
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The master's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir().join("access.log")
    }

    /// Every access log line so far. Requests that completed (from the client's point of view)
    /// before this call are included: it sends a barrier request first and waits for it in the
    /// log (one worker: it logged every earlier request before it took the barrier's).
    pub fn access_log(&self) -> anyhow::Result<Vec<CacheAccess>> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{BARRIER_PATH}?n={n}");
        let r = http::get(&self.addr, &marker, &[])?;
        if r.status != 204 {
            bail!("nginx answered the barrier request with {}", r.status);
        }
        let path = self.access_log_path();
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        loop {
            let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let text = String::from_utf8_lossy(&text);
            let lines = parse_access_log(&text);
            if lines.iter().any(|l| l.uri == marker) {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not log {marker:?} within {BARRIER_TIMEOUT:?}; see {}",
                    path.display()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Bytes on disk in the cache dir (the slices stored).
    pub fn cache_bytes(&self) -> u64 {
        dir_bytes(&self.dir().join("cache"))
    }
}

impl Drop for SliceCache {
    fn drop(&mut self) {
        stop(&mut self.child);
        let Some(dir) = self.dir.take() else { return };
        if thread::panicking() {
            eprintln!(
                "--- last lines of the nginx error log ---\n{}",
                tail(&dir.path().join("error.log"), 40)
            );
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("keeping nginx dir {}", dir.keep().display());
        } else if let Err(e) = dir.close() {
            eprintln!("warning: removing nginx's temp dir: {e}");
        }
    }
}

/// Parses the cache's access log lines (`log_format blobs`, tab-separated).
pub fn parse_access_log(text: &str) -> Vec<CacheAccess> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let [method, uri, status, bytes, cache, range, agent] = f[..] else {
                return None;
            };
            Some(CacheAccess {
                method: method.to_owned(),
                uri: uri.to_owned(),
                status: status.parse().ok()?,
                bytes: bytes.parse().ok()?,
                cache: cache.to_owned(),
                range: range.to_owned(),
                agent: agent.to_owned(),
            })
        })
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn spawn(dir: &Path) -> anyhow::Result<Child> {
    let out = File::create(dir.join("nginx.out"))?;
    let result = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: the workers can be killed with the master.
        .process_group(0)
        .spawn();
    match result {
        Ok(child) => Ok(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(e)
            .context("nginx not found: install the Debian package nginx (apt-get install nginx)"),
        Err(e) => Err(e).context("spawning nginx"),
    }
}

/// Ready when the master wrote its PID file (it has bound the port: the listener is ours) and
/// the barrier path answers.
fn wait_ready(child: &mut Child, dir: &Path, addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let pid = child.id().to_string();
    loop {
        if let Some(status) = child.try_wait().context("waiting for nginx")? {
            bail!(
                "nginx exited at start with {status}; its error log:\n{}\n{}",
                tail(&dir.join("error.log"), 20),
                tail(&dir.join("nginx.out"), 20)
            );
        }
        let pid_file = fs::read_to_string(dir.join("nginx.pid")).unwrap_or_default();
        if pid_file.trim() == pid
            && http::get(addr, &format!("{BARRIER_PATH}?ready"), &[]).is_ok_and(|r| r.status == 204)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nginx on {addr} was not ready within {STARTUP_TIMEOUT:?}; its error log:\n{}",
                tail(&dir.join("error.log"), 20)
            );
        }
        thread::sleep(POLL);
    }
}

/// SIGTERM to the master (it stops its workers), then SIGKILL to the process group after
/// [`STOP_TIMEOUT`]; always reaps the child.
fn stop(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) takes no pointers. The child has not been reaped yet (try_wait just
        // returned None), so its pid cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: as above; the group is the one the child leads (spawned with
            // process_group(0)), and the unreaped child keeps its ID from being reused.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
    let _ = child.wait();
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_access_log() {
        let text = "GET\t/v2/r/blobs/sha256:ab\t206\t1000\tMISS\tbytes=0-999\tstreamsnap/0.1.0\n\
                    GET\t/streamsnap-e2e-barrier?n=0\t204\t0\t-\t-\t-\n";
        let lines = parse_access_log(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].blob_get_digest(), Some("sha256:ab"));
        assert_eq!((lines[0].status, lines[0].bytes), (206, 1000));
        assert_eq!(lines[0].cache, "MISS");
        assert_eq!(lines[1].blob_get_digest(), None);
    }

    #[test]
    fn the_config_passes_nginx_t() {
        if crate::find_on_path("nginx").is_none() {
            eprintln!("skipped: no nginx (Debian package nginx)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("cache")).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        let conf = dir.path().join("nginx.conf");
        let text = slice_cache_config(
            dir.path(),
            "127.0.0.1:1",
            "127.0.0.1:2",
            &SliceCacheOptions::default(),
        );
        fs::write(&conf, text).unwrap();
        let out = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
