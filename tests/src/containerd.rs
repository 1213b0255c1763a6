//! A private containerd (Debian package `containerd`, 1.6): its own root, state, config, log and
//! unix socket in a temp dir under `/tmp` (short paths: a unix socket path must stay under 108
//! bytes), and a namespace of its own, so any number can run at once, next to the node's own
//! containerd, in one test process or several.
//!
//! Things containerd 1.6 keeps outside its root and state even so, which the unique namespace
//! keeps apart and the drop removes: runc state in `/run/containerd/runc/<namespace>`, shim
//! sockets in `/run/containerd/s/`, cgroups `/<namespace>/<id>` (`ctr run`'s default path).
//!
//! Drop: SIGTERM containerd (SIGKILL after 5 s), SIGKILL every process whose command line names
//! the temp dir (shims: `containerd-shim-runc-v2 -namespace NS -id ID -address SOCK`, a hung
//! `ctr`) and their descendants (the containers), detach every mount below the temp dir (the
//! snapshots that containers and `ctr images mount` mounted), then remove what is left.
//! `STREAMSNAP_E2E_KEEP=1` keeps the temp dir; the log's tail is printed when a test panics.
//!
//! The CRI plugin (`ContainerdOptions::cri`) always works in the namespace `k8s.io`
//! ([`CRI_NAMESPACE`]); it reaches registries through `hosts.toml` files in
//! [`Containerd::hosts_dir`], written by [`Containerd::allow_plain_http`].

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::registry::KEEP_ENV;
use crate::sys;

/// How long containerd may take until `ctr version` answers.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a SIGTERM'd containerd may take to exit before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);
/// The namespace the CRI plugin puts its images, containers and snapshots in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Longest unix socket path `sun_path` holds (108 bytes with the NUL), with a margin.
const MAX_SOCKET_PATH: usize = 100;
const RUNC_ROOT: &str = "/run/containerd/runc";
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const TASK_STATE: &str = "io.containerd.runtime.v2.task";

static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// How to configure a [`Containerd`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdOptions {
    /// A proxy snapshotter `(name, socket)`: `[proxy_plugins.NAME] type = "snapshot"`.
    pub proxy_snapshotter: Option<(String, PathBuf)>,
    /// Enables the CRI plugin (disabled otherwise: it is slow to start and not needed by `ctr`).
    pub cri: bool,
    /// The CRI plugin's snapshotter (`containerd.snapshotter`), e.g. `overlayfs` or the name of
    /// the proxy snapshotter. Snapshot annotations are always enabled
    /// (`disable_snapshot_annotations = false`) so a remote snapshotter sees the `cri.*` labels.
    pub cri_snapshotter: String,
    /// Registries (`127.0.0.1:PORT`) the CRI plugin reaches over plain HTTP from the start; more
    /// can be added at any time with [`Containerd::allow_plain_http`].
    pub plain_http_registries: Vec<String>,
    /// Logs at debug level instead of info.
    pub debug_log: bool,
    /// Credentials the CRI plugin uses for a registry when a pull brings none:
    /// `(HOST:PORT, user, password)` as `[...cri.registry.configs."HOST:PORT".auth]`, the node's
    /// own registry login.
    pub registry_auths: Vec<(String, String, String)>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            proxy_snapshotter: None,
            cri: false,
            cri_snapshotter: "overlayfs".to_owned(),
            plain_http_registries: Vec::new(),
            debug_log: false,
            registry_auths: Vec::new(),
        }
    }
}

impl ContainerdOptions {
    /// Registers the proxy snapshotter `name` served on `socket`.
    pub fn with_proxy_snapshotter(mut self, name: &str, socket: &Path) -> Self {
        self.proxy_snapshotter = Some((name.to_owned(), socket.to_owned()));
        self
    }

    /// Lets the CRI plugin reach `host` (`127.0.0.1:PORT`) over plain HTTP.
    pub fn with_plain_http(mut self, host: &str) -> Self {
        self.plain_http_registries.push(host.to_owned());
        self
    }

    /// Gives the CRI plugin `user` and `password` for registry `host` (`127.0.0.1:PORT`), used
    /// for pulls that bring no credentials of their own.
    pub fn with_registry_auth(mut self, host: &str, user: &str, password: &str) -> Self {
        self.registry_auths
            .push((host.to_owned(), user.to_owned(), password.to_owned()));
        self
    }

    /// Enables the CRI plugin with `snapshotter`.
    pub fn with_cri(mut self, snapshotter: &str) -> Self {
        self.cri = true;
        snapshotter.clone_into(&mut self.cri_snapshotter);
        self
    }
}

/// A running private containerd. See the module doc.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    address: PathBuf,
    namespace: String,
    log_path: PathBuf,
}

impl Containerd {
    /// Writes the config and starts containerd; returns once `ctr version` gets an answer.
    pub fn start(opts: ContainerdOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ss-")
            .tempdir_in(short_temp_base())
            .context("creating a temp dir for containerd")?;
        let dir_path = dir.path().to_owned();
        let address = dir_path.join("c.sock");
        if address.as_os_str().len() + ".ttrpc".len() > MAX_SOCKET_PATH {
            bail!(
                "containerd's socket path {} is too long for a unix socket: set TMPDIR to a \
                 short dir",
                address.display()
            );
        }
        for sub in [
            "root", "state", "opt", "hosts.d", "cni/bin", "cni/conf", "mnt",
        ] {
            fs::create_dir_all(dir_path.join(sub))
                .with_context(|| format!("creating {}/{sub}", dir_path.display()))?;
        }
        let seq = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let namespace = format!("e2e-{}-{seq}", std::process::id());
        let config_path = dir_path.join("config.toml");
        fs::write(&config_path, config_toml(&dir_path, &address, &opts))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = dir_path.join("containerd.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .arg("--root")
            .arg(dir_path.join("root"))
            .arg("--state")
            .arg(dir_path.join("state"))
            .arg("--address")
            .arg(&address)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| spawn_error("containerd", e))?;
        let containerd = Self {
            child,
            dir: Some(dir),
            dir_path,
            address,
            namespace,
            log_path,
        };
        for host in &opts.plain_http_registries {
            containerd.allow_plain_http(host)?;
        }
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let pid = self.pid();
        loop {
            if !sys::is_alive(pid) {
                bail!(
                    "containerd exited at start; its log:\n{}",
                    log_tail(&self.log_path, 40)
                );
            }
            if self.address.exists() {
                let version = self
                    .ctr(&["version"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if version.is_ok_and(|s| s.success()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer `ctr version` on {} within {STARTUP_TIMEOUT:?}; \
                     its log:\n{}",
                    self.address.display(),
                    log_tail(&self.log_path, 40)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The namespace of this instance, unique across instances and processes; [`Self::ctr`]
    /// uses it.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The temp dir holding config, log, socket, root, state and mount points.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// containerd's `--root`.
    pub fn root(&self) -> PathBuf {
        self.dir_path.join("root")
    }

    /// containerd's `--state`.
    pub fn state(&self) -> PathBuf {
        self.dir_path.join("state")
    }

    /// containerd's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The CRI plugin's `registry.config_path`: one `HOST/hosts.toml` per registry.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir_path.join("hosts.d")
    }

    /// A dir for mount points below the temp dir (the drop detaches whatever is mounted there).
    pub fn mount_dir(&self) -> PathBuf {
        self.dir_path.join("mnt")
    }

    /// containerd's process ID.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// Makes the CRI plugin reach registry `host` (`127.0.0.1:PORT`) over plain HTTP: writes
    /// `hosts.d/HOST/hosts.toml` with `server = "http://HOST"`. containerd reads these files on
    /// every pull, so this works after start too. `ctr` does not read them: it takes
    /// `--plain-http`.
    pub fn allow_plain_http(&self, host: &str) -> anyhow::Result<()> {
        let dir = self.hosts_dir().join(host);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let toml = format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \
             \"resolve\"]\n"
        );
        let path = dir.join("hosts.toml");
        fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))
    }

    /// `ctr --address SOCK --namespace NS ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        self.client("ctr", &self.namespace, args)
    }

    /// [`Self::ctr`] in another namespace, e.g. [`CRI_NAMESPACE`].
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Command {
        self.client("ctr", namespace, args)
    }

    /// `ctr-remote --address SOCK --namespace NS ARGS...` (Debian package stargz-snapshotter).
    pub fn ctr_remote(&self, args: &[&str]) -> Command {
        self.client("ctr-remote", &self.namespace, args)
    }

    fn client(&self, program: &str, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        for var in [
            "CONTAINERD_ADDRESS",
            "CONTAINERD_NAMESPACE",
            "CONTAINERD_SNAPSHOTTER",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args);
        cmd
    }

    /// Stops containerd and everything it started; see the module doc. Idempotent.
    fn stop(&mut self) {
        stop_child(&mut self.child);
        let task_dirs = task_state_dirs(&self.state());
        let needle = self.dir_path.to_string_lossy().into_owned();
        let roots: Vec<i32> = sys::processes_mentioning(&needle)
            .iter()
            .map(|p| p.pid)
            .collect();
        if !roots.is_empty() {
            let left = sys::kill_and_wait(&sys::with_descendants(&roots), STOP_TIMEOUT);
            if !left.is_empty() {
                eprintln!("warning: processes of containerd {needle} survived SIGKILL: {left:?}");
            }
        }
        for (path, e) in sys::unmount_all_under(&self.dir_path) {
            eprintln!("warning: cannot unmount {}: {e}", path.display());
        }
        for task_dir in task_dirs {
            remove_shim_socket(&task_dir);
        }
        remove_if_exists(&Path::new(RUNC_ROOT).join(&self.namespace));
        remove_cgroups(&self.namespace);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- last lines of the containerd log {} ---\n{}",
                self.log_path.display(),
                log_tail(&self.log_path, 40)
            );
        }
        self.stop();
        if let Some(dir) = self.dir.take() {
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("keeping containerd dir {}", dir.keep().display());
            } else {
                let path = dir.keep();
                if let Err(e) = sys::remove_tree(&path) {
                    eprintln!("warning: removing containerd's temp dir: {e:#}");
                }
            }
        }
    }
}

/// The config file. Plugins that need what a test machine lacks (btrfs, zfs, devmapper, aufs)
/// or that only slow the start (tracing) are disabled; the CRI plugin unless asked for.
fn config_toml(dir: &Path, address: &Path, opts: &ContainerdOptions) -> String {
    let d = dir.display();
    let a = address.display();
    let mut disabled = vec![
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
    ];
    if !opts.cri {
        disabled.push("io.containerd.grpc.v1.cri");
    }
    let disabled = disabled
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let level = if opts.debug_log { "debug" } else { "info" };
    let mut toml = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{a}"

[ttrpc]
  address = "{a}.ttrpc"

[debug]
  address = ""
  level = "{level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    );
    if opts.cri {
        toml.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:1/streamsnap-e2e/no-pause:none"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  disable_apparmor = true
  enable_selinux = false

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{d}/hosts.d"
"#,
            snapshotter = opts.cri_snapshotter
        ));
        for (host, user, password) in &opts.registry_auths {
            toml.push_str(&format!(
                "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{host:?}.auth]\n  \
                 username = {user:?}\n  password = {password:?}\n"
            ));
        }
    }
    if let Some((name, socket)) = &opts.proxy_snapshotter {
        toml.push_str(&format!(
            "\n[proxy_plugins.\"{name}\"]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            socket.display()
        ));
    }
    toml
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

fn spawn_error(program: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        let package = crate::debian_package(program).unwrap_or(program);
        anyhow::Error::new(e).context(format!(
            "{program} not found: install the Debian package {package}"
        ))
    } else {
        anyhow::Error::new(e).context(format!("spawning {program}"))
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; always reaps the child.
fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        // The child is not reaped yet (try_wait returned None), so its pid is still ours.
        sys::signal(pid, libc::SIGTERM);
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

/// `state/io.containerd.runtime.v2.task/<ns>/<id>` of every task containerd knew.
fn task_state_dirs(state: &Path) -> Vec<PathBuf> {
    let subdirs = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    subdirs(&state.join(TASK_STATE))
        .iter()
        .flat_map(|ns| subdirs(ns))
        .collect()
}

/// A shim killed before it cleaned up leaves its socket in `/run/containerd/s/`; the task's
/// state dir names it in the file `address` (`unix:///run/containerd/s/<hash>`).
fn remove_shim_socket(task_dir: &Path) {
    let Ok(address) = fs::read_to_string(task_dir.join("address")) else {
        return;
    };
    let socket = Path::new(address.trim().trim_start_matches("unix://"));
    if socket.parent() == Some(Path::new(SHIM_SOCKET_DIR)) {
        let _ = fs::remove_file(socket);
    }
}

fn remove_if_exists(path: &Path) {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("warning: removing {}: {e}", path.display()),
    }
}

/// Removes the (empty) cgroups `/<namespace>/...` of every hierarchy, children first.
fn remove_cgroups(namespace: &str) {
    fn rmdir_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&entry.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    let mut candidates = vec![Path::new(CGROUP_ROOT).join(namespace)];
    if let Ok(entries) = fs::read_dir(CGROUP_ROOT) {
        candidates.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join(namespace)),
        );
    }
    for dir in candidates.iter().filter(|d| d.is_dir()) {
        rmdir_tree(dir);
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
    fn config_disables_cri_unless_asked_and_registers_the_proxy() {
        let dir = Path::new("/tmp/ss-x");
        let sock = dir.join("c.sock");
        let plain = config_toml(dir, &sock, &ContainerdOptions::default());
        let disabled = |toml: &str| {
            toml.lines()
                .find(|l| l.starts_with("disabled_plugins"))
                .unwrap()
                .to_owned()
        };
        assert!(disabled(&plain).contains("grpc.v1.cri"), "{plain}");
        assert!(!plain.contains("proxy_plugins"), "{plain}");
        let opts = ContainerdOptions::default()
            .with_cri("streamsnap")
            .with_proxy_snapshotter("streamsnap", Path::new("/run/s.sock"));
        let cri = config_toml(dir, &sock, &opts);
        assert!(!disabled(&cri).contains("grpc.v1.cri"), "{cri}");
        assert!(cri.contains("snapshotter = \"streamsnap\""), "{cri}");
        assert!(
            cri.contains("disable_snapshot_annotations = false"),
            "{cri}"
        );
        assert!(cri.contains("config_path = \"/tmp/ss-x/hosts.d\""), "{cri}");
        assert!(
            cri.contains(
                "[proxy_plugins.\"streamsnap\"]\n  type = \"snapshot\"\n  address = \"/run/s.sock\""
            ),
            "{cri}"
        );
    }
}
