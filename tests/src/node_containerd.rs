//! A containerd that runs from a config file the test owns, the way a node's containerd runs
//! from `/etc/containerd/config.toml`: for `streamsnap node install | uninstall | run`, which
//! edit that file, after which containerd is restarted on it.
//!
//! [`NodeContainerd::prepare`] makes a temp dir under `/tmp` and writes the config a stock
//! Kubernetes node would have before streamsnap: version 2, the CRI plugin on overlayfs with
//! its default snapshot annotations (off), registry hosts in `hosts.d`, and every path (root,
//! state, sockets) below the dir, so it runs beside the node's own containerd and other tests'.
//! [`NodeContainerd::start`] and [`NodeContainerd::restart`] run `containerd --config FILE` on
//! whatever the file holds then. No containers run on it here, only pulls.
//!
//! Drop: SIGTERM (SIGKILL after 5 s), kill every process naming the dir, detach every mount
//! below it, remove it (`STREAMSNAP_E2E_KEEP=1` keeps it).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::registry::KEEP_ENV;
use crate::sys;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// A containerd on a config file of its own. See the module doc.
#[derive(Debug)]
pub struct NodeContainerd {
    child: Option<Child>,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    config: PathBuf,
    address: PathBuf,
    log_path: PathBuf,
}

impl NodeContainerd {
    /// Makes the dir and writes the stock config; containerd does not run yet.
    pub fn prepare() -> anyhow::Result<Self> {
        let base = if std::env::temp_dir().as_os_str().len() <= 40 {
            std::env::temp_dir()
        } else {
            PathBuf::from("/tmp")
        };
        let dir = tempfile::Builder::new()
            .prefix("ssn-")
            .tempdir_in(base)
            .context("creating a temp dir for containerd")?;
        let dir_path = dir.path().to_owned();
        for sub in ["root", "state", "hosts.d", "cni/bin", "cni/conf", "opt"] {
            fs::create_dir_all(dir_path.join(sub))
                .with_context(|| format!("creating {}/{sub}", dir_path.display()))?;
        }
        let address = dir_path.join("c.sock");
        let config = dir_path.join("config.toml");
        fs::write(&config, stock_config(&dir_path, &address))
            .with_context(|| format!("writing {}", config.display()))?;
        Ok(Self {
            child: None,
            log_path: dir_path.join("containerd.log"),
            dir: Some(dir),
            dir_path,
            config,
            address,
        })
    }

    /// The config file containerd reads at each start.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// containerd's output, over every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Lets the CRI plugin reach `host` over plain HTTP (`hosts.d/HOST/hosts.toml`).
    pub fn allow_plain_http(&self, host: &str) -> anyhow::Result<()> {
        let dir = self.dir_path.join("hosts.d").join(host);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = \
                 [\"pull\", \"resolve\"]\n"
            ),
        )
        .context("writing hosts.toml")
    }

    /// Starts containerd on the config file; returns once `ctr version` answers.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "containerd already runs");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (Debian package containerd)")?;
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if !sys::is_alive(pid) {
                bail!(
                    "containerd exited at start; its log:\n{}",
                    self.log_tail(40)
                );
            }
            let answered = self
                .ctr_in("default", &["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.log_tail(40)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Stops containerd (SIGTERM, as systemd does with `KillMode=process`) and starts it again
    /// on the config file as it is now.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop_daemon();
        self.start()
    }

    /// `ctr --address SOCK --namespace NS ARGS...`.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
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
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(&self.log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // Not reaped yet (try_wait returned None): the pid is still our child's.
            sys::signal(
                i32::try_from(child.id()).expect("pids fit in i32"),
                libc::SIGTERM,
            );
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
}

impl Drop for NodeContainerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- last lines of the containerd log {} ---\n{}",
                self.log_path.display(),
                self.log_tail(40)
            );
        }
        self.stop_daemon();
        let needle = format!("{}/", self.dir_path.display());
        let left: Vec<i32> = sys::processes_mentioning(&needle)
            .iter()
            .map(|p| p.pid)
            .collect();
        if !left.is_empty() {
            sys::kill_and_wait(&sys::with_descendants(&left), STOP_TIMEOUT);
        }
        for (path, e) in sys::unmount_all_under(&self.dir_path) {
            eprintln!("warning: cannot unmount {}: {e}", path.display());
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.keep();
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("keeping containerd dir {}", path.display());
            } else if let Err(e) = sys::remove_tree(&path) {
                eprintln!("warning: removing containerd's temp dir: {e:#}");
            }
        }
    }
}

/// A stock node's config before streamsnap, every path below `dir`.
fn stock_config(dir: &Path, address: &Path) -> String {
    let d = dir.display();
    let a = address.display();
    format!(
        r#"# containerd config of a test node (streamsnap e2e); a stock node's, paths moved to {d}
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{a}"

[ttrpc]
  address = "{a}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "127.0.0.1:1/streamsnap-e2e/no-pause:none"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_tcp_service = true
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"   # the stock snapshotter
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d}/cni/bin"
      conf_dir = "{d}/cni/conf"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{d}/hosts.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"#
    )
}
