//! A private `streamsnap-snapshotterd` (the workspace's remote snapshotter daemon): its socket,
//! root, config and log in a temp dir under `/tmp` (short: a unix socket path must stay under 108
//! bytes), so any number can run at once. Register it in a [`crate::Containerd`] with
//! `ContainerdOptions::default().with_proxy_snapshotter("streamsnap", snapshotterd.socket())`.
//!
//! Layout: `DIR/s.sock` (the gRPC socket), `DIR/root` (`--root`; the chunk cache is
//! `DIR/root/cache`), `DIR/config.toml`, `DIR/snapshotterd.log` (stdout and stderr, at
//! `STREAMSNAP_LOG=debug`).
//!
//! Drop: SIGTERM, SIGKILL after 10 s, then detach every mount still below the dir (the FUSE
//! mounts of a daemon that did not unmount them), kill any process still naming the dir, and
//! remove the dir. `STREAMSNAP_E2E_KEEP=1` keeps it; the log's tail is printed when the thread
//! panics (tests returning `Err` print it with [`Snapshotterd::log_tail`]).

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use streamsnap_format::Digest;
use tempfile::TempDir;

use crate::bins::{run, workspace_bin};
use crate::containerd::Containerd;
use crate::registry::KEEP_ENV;
use crate::sys;

/// The daemon's binary, as `cargo build --workspace --bins` puts it in `target/<profile>/`.
pub const BINARY: &str = "streamsnap-snapshotterd";
/// The name tests register the daemon under in containerd (`[proxy_plugins.streamsnap]`).
pub const SNAPSHOTTER: &str = "streamsnap";
/// How long the daemon may take until its socket accepts a connection.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a SIGTERM'd daemon may take to exit before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// Lines of the log printed when a test panics.
const LOG_TAIL_LINES: usize = 60;
/// How long [`run_container_in`] lets a container run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `ctr run` may take to exit after its task got SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// Attempts at creating a view before containerd's garbage collector leaves it alone.
const VIEW_ATTEMPTS: u32 = 5;
/// Longest unix socket path `sun_path` holds (108 bytes with the NUL), with a margin.
const MAX_SOCKET_PATH: usize = 100;

/// How to configure a [`Snapshotterd`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotterdOptions {
    /// `[cache] max_size_bytes`: the disk cap of the chunk cache.
    pub cache_max_bytes: u64,
    /// `[cache] memory_bytes`: the in-memory decoded-chunk LRU.
    pub cache_memory_bytes: u64,
    /// `[fetch] deadline_seconds`: how long a read waits for an unreachable registry.
    pub fetch_deadline_seconds: u64,
    /// `[fetch] timeout_seconds`: how long a request waits for an answer (the daemon's
    /// default when `None`).
    pub fetch_timeout_seconds: Option<u64>,
    /// `[registry] plain_http`: registries (`HOST:PORT`) reached over plain HTTP; loopback
    /// always is.
    pub plain_http: Vec<String>,
    /// More TOML appended to the generated file (new sections only: the generated ones are
    /// `[cache]`, `[fetch]` and `[registry]`).
    pub extra_config: String,
    /// Serve `/metrics` and `/healthz` on a free loopback port (see [`Snapshotterd::metrics_url`]).
    pub metrics: bool,
    /// `[fetch] prefetch_profile`: fetch what an image's start-up profile lists on mount.
    pub prefetch_profile: bool,
    /// More `key = value` lines in the generated `[fetch]` section.
    pub fetch_lines: String,
    /// More command-line flags, after `--address`, `--root` and `--config`.
    pub extra_args: Vec<String>,
    /// Environment variables set for the daemon (`PATH`, `SSL_CERT_FILE`, `DOCKER_CONFIG`, ...),
    /// on top of the test's own.
    pub env: Vec<(String, String)>,
}

impl Default for SnapshotterdOptions {
    fn default() -> Self {
        Self {
            cache_max_bytes: 1 << 30,
            cache_memory_bytes: 16 << 20,
            fetch_deadline_seconds: 60,
            fetch_timeout_seconds: None,
            plain_http: Vec::new(),
            extra_config: String::new(),
            metrics: false,
            prefetch_profile: true,
            fetch_lines: String::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl SnapshotterdOptions {
    /// Sets the disk cap of the chunk cache.
    pub fn with_cache_max_bytes(mut self, bytes: u64) -> Self {
        self.cache_max_bytes = bytes;
        self
    }

    /// Serves metrics on a free port.
    pub fn with_metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// The config file's text.
    pub fn config_toml(&self) -> String {
        let plain_http = self
            .plain_http
            .iter()
            .map(|h| format!("{h:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let timeout = self
            .fetch_timeout_seconds
            .map(|s| format!("timeout_seconds = {s}\n"))
            .unwrap_or_default();
        let mut toml = format!(
            "[cache]\nmax_size_bytes = {}\nmemory_bytes = {}\n\n[fetch]\n{timeout}deadline_seconds = \
             {}\nprefetch_profile = {}\n{}\n[registry]\nplain_http = [{plain_http}]\n",
            self.cache_max_bytes,
            self.cache_memory_bytes,
            self.fetch_deadline_seconds,
            self.prefetch_profile,
            self.fetch_lines
        );
        // With metrics on, tests and the bench read /debug/profile too; a node keeps it off
        // unless its config turns it on.
        if self.metrics {
            toml.push_str("\n[debug]\nprofile = true\n");
        }
        if !self.extra_config.is_empty() {
            toml.push('\n');
            toml.push_str(&self.extra_config);
            if !toml.ends_with('\n') {
                toml.push('\n');
            }
        }
        toml
    }
}

/// Starts the daemon, appending its output to `log_path`.
fn spawn(
    binary: &Path,
    socket: &Path,
    root: &Path,
    config: &Path,
    log_path: &Path,
    opts: &SnapshotterdOptions,
) -> anyhow::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    Command::new(binary)
        .arg("--address")
        .arg(socket)
        .arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .args(&opts.extra_args)
        .env("STREAMSNAP_LOG", "debug")
        .env_remove("RUST_LOG")
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// A free `127.0.0.1:PORT` (bound, read, released).
fn free_loopback_port() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

/// A running `streamsnap-snapshotterd`. See the module doc.
#[derive(Debug)]
pub struct Snapshotterd {
    child: Child,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    socket: PathBuf,
    log_path: PathBuf,
    binary: PathBuf,
    config: PathBuf,
    metrics_address: Option<String>,
    opts: SnapshotterdOptions,
}

impl Snapshotterd {
    /// Writes the config and starts the daemon; returns once its socket accepts a connection.
    /// Fails with "build it first" when the binary has not been built.
    pub fn start(opts: SnapshotterdOptions) -> anyhow::Result<Self> {
        let binary = workspace_bin(BINARY)?;
        let dir = tempfile::Builder::new()
            .prefix("ss-")
            .tempdir_in(short_temp_base())
            .context("creating the snapshotter daemon's temp dir")?;
        let dir_path = dir.path().to_owned();
        let socket = dir_path.join("s.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the daemon's socket path {} is too long for a unix socket: set TMPDIR to a \
                 short dir",
                socket.display()
            );
        }
        let root = dir_path.join("root");
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        let config = dir_path.join("config.toml");
        let metrics_address = if opts.metrics {
            Some(free_loopback_port()?)
        } else {
            None
        };
        let mut text = String::new();
        if let Some(address) = &metrics_address {
            text.push_str(&format!("metrics_address = {address:?}\n\n"));
        }
        text.push_str(&opts.config_toml());
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir_path.join("snapshotterd.log");
        let child = spawn(&binary, &socket, &root, &config, &log_path, &opts)?;
        let daemon = Self {
            child,
            dir: Some(dir),
            dir_path,
            socket,
            log_path,
            binary,
            config,
            metrics_address,
            opts,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// `http://127.0.0.1:PORT` of `/metrics` and `/healthz`, if started with metrics.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_address.as_ref().map(|a| format!("http://{a}"))
    }

    /// `GET path` on the metrics address (`/metrics`, `/debug/profile`): the body of a 200
    /// answer; another status is an error naming it. Needs a daemon started with metrics.
    pub fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let address = self
            .metrics_address()
            .context("the daemon was started without metrics")?;
        let response = crate::http::get(address, path, &[])?;
        ensure!(
            response.status == 200,
            "{path} answered {}",
            response.status
        );
        Ok(response.body)
    }

    /// `127.0.0.1:PORT` of the metrics endpoint, if started with metrics.
    pub fn metrics_address(&self) -> Option<&str> {
        self.metrics_address.as_deref()
    }

    /// Kills the daemon with SIGKILL, as a crash would: its FUSE mounts go stale, nothing is
    /// cleaned up.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .context("killing the snapshotter daemon")?;
        self.child
            .wait()
            .context("reaping the snapshotter daemon")?;
        Ok(())
    }

    /// Stops the daemon with SIGTERM (a graceful stop: it hands its mounts over) and waits for
    /// it to exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        sys::signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while matches!(self.child.try_wait(), Ok(None)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the daemon did not exit within {timeout:?} of SIGTERM"
            );
            thread::sleep(POLL);
        }
        Ok(())
    }

    /// Runs another copy of the daemon binary at the next [`Self::restart`] (an upgrade).
    pub fn set_binary(&mut self, binary: &Path) {
        self.binary = binary.to_owned();
    }

    /// The binary the daemon runs from.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Process ids of the FUSE holder serving this daemon's root, if one runs.
    pub fn holder_pids(&self) -> Vec<i32> {
        let needle = format!("{}", self.root().join("fuse-holder.sock").display());
        sys::processes_mentioning(&needle)
            .iter()
            .filter(|p| p.pid != self.pid())
            .map(|p| p.pid)
            .collect()
    }

    /// Starts the daemon again on the same root, config and socket (after [`Self::kill9`] or a
    /// crash); returns once its socket accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.is_running(), "the daemon still runs; kill it first");
        self.child = spawn(
            &self.binary,
            &self.socket,
            &self.root(),
            &self.config,
            &self.log_path,
            &self.opts,
        )?;
        self.wait_ready()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if !sys::is_alive(self.pid()) {
                bail!(
                    "{BINARY} exited at start; its log:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{BINARY} did not accept connections on {} within {STARTUP_TIMEOUT:?}; its \
                     log:\n{}",
                    self.socket.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The gRPC socket (`--address`), for `[proxy_plugins.NAME] address`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `--root`.
    pub fn root(&self) -> PathBuf {
        self.dir_path.join("root")
    }

    /// The temp dir holding socket, root, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The daemon's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// The chunk cache's dir: `ROOT/cache`.
    pub fn cache_dir(&self) -> PathBuf {
        self.root().join("cache")
    }

    /// Sum of the sizes of the regular files below [`Self::cache_dir`] now (0 if it does not
    /// exist). Files removed while the walk runs are skipped, so it can be sampled while the
    /// daemon evicts.
    pub fn cache_disk_bytes(&self) -> u64 {
        tree_file_bytes(&self.cache_dir())
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// Whether the daemon still runs.
    pub fn is_running(&self) -> bool {
        sys::is_alive(self.pid())
    }

    /// Stops the daemon and cleans up what it left; see the module doc. Idempotent.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // The child is not reaped yet (try_wait returned None), so its pid is still ours.
            sys::signal(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(POLL);
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!(
                    "warning: {BINARY} {} did not exit within {STOP_TIMEOUT:?} of SIGTERM: \
                     SIGKILL",
                    self.dir_path.display()
                );
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let needle = format!("{}/", self.dir_path.display());
        let left: Vec<i32> = sys::processes_mentioning(&needle)
            .iter()
            .map(|p| p.pid)
            .collect();
        if !left.is_empty() {
            let survivors = sys::kill_and_wait(&sys::with_descendants(&left), STOP_TIMEOUT);
            if !survivors.is_empty() {
                eprintln!("warning: processes naming {needle} survived SIGKILL: {survivors:?}");
            }
        }
        for (path, e) in sys::unmount_all_under(&self.dir_path) {
            eprintln!("warning: cannot unmount {}: {e}", path.display());
        }
    }
}

impl Drop for Snapshotterd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- last lines of the snapshotter daemon log {} ---\n{}",
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.stop();
        if let Some(dir) = self.dir.take() {
            let path = dir.keep();
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("keeping snapshotter daemon dir {}", path.display());
            } else if let Err(e) = sys::remove_tree(&path) {
                eprintln!("warning: removing the snapshotter daemon's temp dir: {e:#}");
            }
        }
    }
}

/// The chain ID of a stack of layers with these diff IDs (bottom first), as containerd names
/// the committed snapshot of the top layer: `ChainID(L0) = DiffID(L0)`, `ChainID(L0..Ln) =
/// sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`.
pub fn chain_id(diff_ids: &[Digest]) -> Option<Digest> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(*first, |chain, diff_id| {
        Digest::sha256(format!("{chain} {diff_id}").as_bytes())
    }))
}

/// A read-only view snapshot mounted at `<containerd dir>/mnt/<key>`; unmounted and removed
/// on drop.
#[derive(Debug)]
pub struct ViewGuard<'a> {
    containerd: &'a Containerd,
    snapshotter: String,
    target: PathBuf,
    /// The mounts the snapshotter gave for the view: (type, options).
    mounts: Vec<(String, Vec<String>)>,
}

impl ViewGuard<'_> {
    /// The mounts the snapshotter gave for the view, as (type, options), in order.
    pub fn mounts(&self) -> &[(String, Vec<String>)] {
        &self.mounts
    }

    /// Where the view is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for ViewGuard<'_> {
    fn drop(&mut self) {
        for (path, e) in sys::unmount_all_under(&self.target) {
            eprintln!("warning: cannot unmount {}: {e}", path.display());
        }
        let key = self.target.to_string_lossy().into_owned();
        let removed = run(&mut self.containerd.ctr(&[
            "snapshots",
            "--snapshotter",
            &self.snapshotter,
            "rm",
            &key,
        ]));
        if let Err(e) = removed {
            eprintln!("warning: {e:#}");
        }
        let _ = fs::remove_dir(&self.target);
    }
}

/// Mounts a read-only view of the committed snapshot `parent` (an image's top chain ID, see
/// [`chain_id`]) of `snapshotter` at `<containerd dir>/mnt/<key>`: `ctr snapshots view
/// --mounts` creates the view (labelled `containerd.io/gc.root` so containerd's garbage
/// collector keeps it) and prints its mounts, which are mounted with `mount(8)`.
///
/// This, not [`crate::mount_rootfs`], is how to see an image's rootfs on a proxy snapshotter:
/// `ctr images mount` of containerd 1.6 ignores its `--snapshotter` flag (it reads a global
/// flag that does not exist) and always unpacks and mounts on overlayfs.
pub fn mount_view<'a>(
    containerd: &'a Containerd,
    snapshotter: &str,
    parent: &Digest,
    key: &str,
) -> anyhow::Result<ViewGuard<'a>> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        bail!("mount key {key:?} must be a plain file name");
    }
    let target = containerd.mount_dir().join(key);
    fs::create_dir(&target).with_context(|| format!("creating {}", target.display()))?;
    let mut guard = ViewGuard {
        containerd,
        snapshotter: snapshotter.to_owned(),
        target,
        mounts: Vec::new(),
    };
    let name = guard.target.to_string_lossy().into_owned();
    let parent = parent.to_string();
    let snapshots = |args: &[&str]| {
        let mut all = vec!["snapshots", "--snapshotter", snapshotter];
        all.extend_from_slice(args);
        run(&mut containerd.ctr(&all))
    };
    // containerd's garbage collector removes snapshots nothing refers to, and `ctr snapshots
    // view` takes no lease: a collection (e.g. the one after a pull's lease ends) can remove
    // the view before the label protects it. Then try again.
    let mut attempt = 0;
    let view = loop {
        attempt += 1;
        let view = snapshots(&["view", "--mounts", &name, &parent])
            .with_context(|| format!("creating a view of {parent} on {snapshotter}"))?;
        match snapshots(&["label", &name, "containerd.io/gc.root=streamsnap-e2e"]) {
            Ok(_) => break view,
            Err(e) if attempt < VIEW_ATTEMPTS && format!("{e:#}").contains("not found") => {}
            Err(e) => return Err(e.context(format!("protecting view {name} from collection"))),
        }
    };
    let mounts: Vec<serde_json::Value> =
        serde_json::from_slice(&view.stdout).with_context(|| {
            format!(
                "`ctr snapshots view --mounts` printed no mount list: {}",
                String::from_utf8_lossy(&view.stdout)
            )
        })?;
    if mounts.is_empty() {
        bail!("the view of {parent} on {snapshotter} has no mounts");
    }
    for m in &mounts {
        // ctr prints Go's mount.Mount: {"Type", "Source", "Options"}.
        let field = |name: &str| {
            m.get(name)
                .or_else(|| m.get(name.to_lowercase()))
                .cloned()
                .unwrap_or_default()
        };
        let kind = field("Type").as_str().unwrap_or_default().to_owned();
        let source = field("Source").as_str().unwrap_or_default().to_owned();
        let options: Vec<String> = field("Options")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut cmd = Command::new("mount");
        cmd.arg("-t").arg(&kind);
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        cmd.arg(&source).arg(&guard.target);
        run(&mut cmd).with_context(|| format!("mounting the view of {parent} ({m})"))?;
        guard.mounts.push((kind, options));
    }
    Ok(guard)
}

/// `ctr -n NAMESPACE run --rm --snapshotter S IMAGE ID ARGS...`, bounded by [`RUN_TIMEOUT`];
/// returns stdout. A non-zero exit or a timeout is an error quoting both outputs. Unlike
/// [`crate::run_container`] it takes the namespace, so it runs images pulled through the CRI
/// plugin ([`crate::CRI_NAMESPACE`]); IDs there are shared by every containerd of the machine
/// (`/run/containerd/runc/k8s.io/ID`), so make them unique.
pub fn run_container_in(
    containerd: &Containerd,
    namespace: &str,
    snapshotter: &str,
    image: &str,
    id: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut ctr_args = vec!["run", "--rm", "--snapshotter", snapshotter, image, id];
    ctr_args.extend_from_slice(args);
    let mut child = containerd
        .ctr_in(namespace, &ctr_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting ctr run {id}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        let quiet = |args: &[&str]| {
            let _ = containerd
                .ctr_in(namespace, args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
        let grace = Instant::now() + KILL_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
            thread::sleep(Duration::from_millis(10));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
            quiet(&["tasks", "delete", "--force", id]);
            quiet(&["containers", "delete", id]);
        }
        bail!(
            "container {id} of {image} on {snapshotter} ({args:?}) did not finish within \
             {RUN_TIMEOUT:?}: killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout.join().unwrap_or_default()).trim_end(),
            String::from_utf8_lossy(&stderr.join().unwrap_or_default()).trim_end()
        );
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    ensure!(
        status.success(),
        "container {id} of {image} on {snapshotter} ({args:?}) exited with {status}\n--- stdout \
         ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&stdout).trim_end(),
        String::from_utf8_lossy(&stderr).trim_end()
    );
    String::from_utf8(stdout).context("the container's stdout is not UTF-8")
}

/// Sum of regular file sizes below `dir`, tolerant of entries vanishing during the walk.
fn tree_file_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.filter_map(Result::ok) {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            total += tree_file_bytes(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

/// `$TMPDIR` if socket paths below it stay short, `/tmp` otherwise.
fn short_temp_base() -> PathBuf {
    let base = std::env::temp_dir();
    if base.as_os_str().len() <= 40 {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_three_sections_and_the_extra() {
        let opts = SnapshotterdOptions {
            plain_http: vec!["127.0.0.1:5000".into()],
            extra_config: "[metrics]\naddress = \"\"".into(),
            ..SnapshotterdOptions::default().with_cache_max_bytes(8 << 20)
        };
        assert_eq!(
            opts.config_toml(),
            "[cache]\nmax_size_bytes = 8388608\nmemory_bytes = 16777216\n\n[fetch]\n\
             deadline_seconds = 60\nprefetch_profile = true\n\n[registry]\nplain_http = [\"127.0.0.1:5000\"]\n\n\
             [metrics]\naddress = \"\"\n"
        );
    }

    #[test]
    fn chain_ids_are_containerds() {
        assert_eq!(chain_id(&[]), None);
        let a = Digest::sha256(b"a");
        let b = Digest::sha256(b"b");
        assert_eq!(chain_id(&[a]), Some(a));
        assert_eq!(
            chain_id(&[a, b]),
            Some(Digest::sha256(format!("{a} {b}").as_bytes()))
        );
    }

    #[test]
    fn file_bytes_sum_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tree_file_bytes(&dir.path().join("missing")), 0);
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("x"), vec![0; 10]).unwrap();
        fs::write(dir.path().join("a/b/y"), vec![0; 1000]).unwrap();
        std::os::unix::fs::symlink("x", dir.path().join("a/link")).unwrap();
        assert_eq!(tree_file_bytes(dir.path()), 1010);
    }

    #[test]
    fn start_without_the_binary_says_build_it_first() {
        if workspace_bin(BINARY).is_ok() {
            return;
        }
        let err = Snapshotterd::start(SnapshotterdOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("build it first"), "{err}");
    }
}
