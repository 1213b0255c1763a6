//! `streamsnap node install | uninstall | run`: set up a node for the snapshotter.
//!
//! `install` patches containerd's config (see `streamsnap-node`) and restarts containerd when
//! the file changed; `uninstall` gives the original file back. Both run on the node itself, or
//! from a privileged container with `hostPID: true` and `--host-namespace` (containerd's version
//! and `systemctl` are then asked in the mount namespace of the host's PID 1).
//!
//! `run` is what the Kubernetes DaemonSet's container runs: it supervises the daemon and keeps
//! containerd's config following it. A pod needs a snapshotter to start, so a containerd that
//! points at a daemon that is not serving cannot start the daemon's own pod: the config is
//! patched only once the daemon's socket answers, given back when the pod stops (or the daemon
//! has been down for `--disarm-after`), and a boot guard restores it at boot (see
//! `streamsnap_node::guard`). A daemon that exits is started again inside the same container,
//! so a crash never needs a new container (which would need a snapshotter).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use streamsnap_node::host::{HOST_MOUNT_NAMESPACE, Host};
use streamsnap_node::version::{check_machine, machine};
use streamsnap_node::{ContainerdVersion, Installer, Outcome, Settings, guard};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

/// How often `run` looks at the daemon.
const TICK: Duration = Duration::from_millis(250);
/// Longest wait between two starts of a daemon that keeps exiting.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A daemon that ran this long before exiting is started again at once.
const STABLE_RUN: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Subcommand)]
pub enum Verb {
    /// Patch containerd's config to use the streamsnap snapshotter for CRI pulls (idempotent;
    /// the original is kept beside it) and restart containerd if the file changed.
    Install(InstallArgs),
    /// Restore containerd's original config exactly and restart containerd if it changed.
    Uninstall(UninstallArgs),
    /// Run and supervise the snapshotter daemon, installing the config while it serves and
    /// uninstalling it when stopped (the Kubernetes DaemonSet's entrypoint).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// containerd's config file.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/containerd/config.toml"
    )]
    containerd_config: PathBuf,
    /// Run `containerd --version` and `systemctl` in the mount namespace of PID 1 (from a
    /// privileged container with hostPID: true).
    #[arg(long)]
    host_namespace: bool,
    /// containerd's systemd unit.
    #[arg(long, value_name = "UNIT", default_value = "containerd")]
    containerd_unit: String,
    /// Change the config file only; print how to restart containerd.
    #[arg(long, conflicts_with = "restart_command")]
    no_restart: bool,
    /// Restart containerd with this shell command instead of `systemctl restart UNIT`, on a
    /// node without systemd (e.g. "service containerd restart", "rc-service containerd
    /// restart", "sv restart containerd"). It must return once containerd runs on the new
    /// config.
    #[arg(long, value_name = "COMMAND")]
    restart_command: Option<String>,
    /// The systemd drop-in `install --boot-guard` writes (and `uninstall` removes).
    #[arg(long, value_name = "PATH", default_value = guard::DEFAULT_DROPIN)]
    boot_guard_path: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Also write a systemd drop-in for containerd that starts it on the original config when
    /// the snapshotter's socket is absent (for a snapshotter running as a pod).
    #[arg(long)]
    boot_guard: bool,
}

#[derive(Debug, clap::Args)]
pub struct SettingsArgs {
    /// The snapshotter daemon's socket (its --address).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/streamsnap/snapshotter.sock"
    )]
    socket: PathBuf,
    /// The proxy plugin's name in containerd's config.
    #[arg(long, value_name = "NAME", default_value = "streamsnap")]
    plugin_name: String,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Restore the original even if the config was edited after install.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Write the boot guard drop-in while installed (see `install --boot-guard`).
    #[arg(long)]
    boot_guard: bool,
    /// Give the config back when the daemon has not served for this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    disarm_after: u64,
    /// How long the daemon may take to exit after SIGTERM or SIGINT before it gets SIGKILL.
    /// SIGTERM to `node run` is passed on as SIGTERM (the daemon hands its mounts to the FUSE
    /// holder for the next daemon), SIGINT as SIGINT (stopping for good: the holder exits too).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    stop_timeout: u64,
    /// The daemon's command line, e.g. -- streamsnap-snapshotterd --address SOCK ...
    #[arg(last = true, required = true, value_name = "DAEMON")]
    daemon: Vec<String>,
}

pub async fn run(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Install(args) => {
            let node = Node::check(&args.node, args.settings.settings())?;
            node.install(args.boot_guard)?;
            Ok(())
        }
        Verb::Uninstall(args) => {
            let node = Node::new(&args.node, Settings::default(), None);
            node.uninstall(args.force)
        }
        Verb::Run(args) => supervise(args).await,
    }
}

impl SettingsArgs {
    fn settings(&self) -> Settings {
        Settings {
            plugin: self.plugin_name.clone(),
            socket: self.socket.clone(),
        }
    }
}

/// How containerd is restarted after its config changed.
#[derive(Debug)]
enum Restart {
    /// `systemctl restart UNIT` (the default).
    Systemd,
    /// `sh -c COMMAND` (`--restart-command`).
    Command(String),
    /// Not at all: print how (`--no-restart`).
    No,
}

/// One node's containerd and what to do to it.
struct Node {
    installer: Installer,
    host: Host,
    unit: String,
    restart: Restart,
    guard_path: PathBuf,
    socket: PathBuf,
    containerd: Option<ContainerdVersion>,
}

impl Node {
    fn new(args: &NodeArgs, settings: Settings, containerd: Option<ContainerdVersion>) -> Self {
        let host = if args.host_namespace {
            Host::in_mount_namespace(Path::new(HOST_MOUNT_NAMESPACE))
        } else {
            Host::local()
        };
        Self {
            socket: settings.socket.clone(),
            installer: Installer::new(&args.containerd_config, settings, containerd),
            host,
            unit: args.containerd_unit.clone(),
            restart: match (&args.restart_command, args.no_restart) {
                (Some(command), _) => Restart::Command(command.clone()),
                (None, true) => Restart::No,
                (None, false) => Restart::Systemd,
            },
            guard_path: args.boot_guard_path.clone(),
            containerd,
        }
    }

    /// Refuses a machine other than amd64 and an unsupported containerd.
    fn check(args: &NodeArgs, settings: Settings) -> anyhow::Result<Self> {
        check_machine(&machine())?;
        let host = if args.host_namespace {
            Host::in_mount_namespace(Path::new(HOST_MOUNT_NAMESPACE))
        } else {
            Host::local()
        };
        let version = host
            .containerd_version()
            .context("cannot tell which containerd this node runs")?;
        version.check_supported()?;
        Ok(Self::new(args, settings, Some(version)))
    }

    fn config(&self) -> &Path {
        &self.installer.paths().config
    }

    /// Patches the config (and the boot guard); restarts containerd when the config changed.
    fn install(&self, boot_guard: bool) -> anyhow::Result<Outcome> {
        let outcome = self.installer.install()?;
        let guard_changed =
            boot_guard && guard::install(&self.guard_path, self.installer.paths(), &self.socket)?;
        let version = self
            .containerd
            .map(|v| format!(" for containerd {v}"))
            .unwrap_or_default();
        match outcome {
            Outcome::Changed => eprintln!(
                "patched {}{version} (original kept at {})",
                self.config().display(),
                self.installer.paths().backup.display()
            ),
            _ => eprintln!(
                "{} already uses the streamsnap snapshotter: nothing changed",
                self.config().display()
            ),
        }
        if guard_changed {
            eprintln!("wrote the boot guard {}", self.guard_path.display());
        }
        self.apply(outcome == Outcome::Changed, guard_changed)?;
        Ok(outcome)
    }

    /// Restores the original config, removes the boot guard; restarts containerd when the
    /// config changed.
    fn uninstall(&self, force: bool) -> anyhow::Result<()> {
        let outcome = self.installer.uninstall(force)?;
        let guard_removed = guard::uninstall(&self.guard_path)?;
        match outcome {
            Outcome::Changed => eprintln!("restored the original {}", self.config().display()),
            Outcome::Unchanged => eprintln!(
                "{} already was the original: removed the backup",
                self.config().display()
            ),
            Outcome::NotInstalled => eprintln!(
                "{} was not patched by `streamsnap node install`: nothing to restore",
                self.config().display()
            ),
        }
        if guard_removed {
            eprintln!("removed the boot guard {}", self.guard_path.display());
        }
        self.apply(outcome == Outcome::Changed, guard_removed)
    }

    /// Restarts containerd (after a daemon-reload if a unit drop-in changed), or says how.
    fn apply(&self, config_changed: bool, units_changed: bool) -> anyhow::Result<()> {
        if !config_changed && !units_changed {
            return Ok(());
        }
        match &self.restart {
            Restart::No => {
                if config_changed {
                    eprintln!(
                        "not restarting containerd (--no-restart): restart it to apply the \
                         change (systemctl restart {}, or however this node runs it)",
                        self.unit
                    );
                }
                Ok(())
            }
            Restart::Command(command) => {
                if config_changed {
                    self.host.run("sh", &["-c", command]).with_context(|| {
                        format!(
                            "the config changed but the restart command failed: restart \
                             containerd yourself ({command})"
                        )
                    })?;
                    eprintln!("restarted containerd ({command})");
                }
                Ok(())
            }
            Restart::Systemd if config_changed => {
                self.host
                    .restart_service(&self.unit, units_changed)
                    .with_context(|| {
                        format!(
                            "the config changed but containerd could not be restarted: restart \
                             it yourself (systemctl restart {}), or pass --restart-command on a \
                             node without systemd",
                            self.unit
                        )
                    })?;
                eprintln!("restarted {}", self.unit);
                Ok(())
            }
            Restart::Systemd => {
                self.host.run("systemctl", &["daemon-reload"])?;
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// node run

async fn supervise(args: RunArgs) -> anyhow::Result<()> {
    let node = Node::check(&args.node, args.settings.settings())?;
    let disarm_after = Duration::from_secs(args.disarm_after);
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut child: Option<(Child, Instant)> = None;
    let mut next_start = Instant::now();
    let mut backoff = Duration::from_secs(1);
    let mut armed = false;
    let mut down_since: Option<Instant> = Some(Instant::now());
    let mut ticker = tokio::time::interval(TICK);
    let stopped = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = ticker.tick() => {}
        }
        if let Some((running, started)) = &mut child
            && let Some(status) = running.try_wait().context("waiting for the daemon")?
        {
            let ran = started.elapsed();
            backoff = if ran >= STABLE_RUN {
                Duration::from_secs(1)
            } else {
                (backoff * 2).min(MAX_BACKOFF)
            };
            eprintln!(
                "the daemon exited ({}) after {:.1} s: starting it again in {} s",
                describe(status),
                ran.as_secs_f64(),
                backoff.as_secs()
            );
            child = None;
            next_start = Instant::now() + backoff;
        }
        if child.is_none() && Instant::now() >= next_start {
            child = Some((spawn(&args.daemon)?, Instant::now()));
        }
        let serving = child.is_some() && UnixStream::connect(&node.socket).is_ok();
        if serving {
            down_since = None;
            if !armed {
                if let Err(error) = node.install(args.boot_guard) {
                    stop(child.take(), Signal::SIGTERM, args.stop_timeout).await;
                    return Err(error.context("installing the snapshotter into containerd"));
                }
                armed = true;
                eprintln!("the daemon serves on {}", node.socket.display());
            }
        } else {
            let since = *down_since.get_or_insert_with(Instant::now);
            if armed && since.elapsed() >= disarm_after {
                eprintln!(
                    "the daemon has not served for {} s: giving containerd its original config \
                     until it does",
                    disarm_after.as_secs()
                );
                node.uninstall(true)?;
                armed = false;
            }
        }
    };
    // SIGTERM: the daemon hands its FUSE connections to the holder (a restart may follow);
    // SIGINT: stopping for good, the daemon tells the holder to exit too.
    let signal = if stopped == "SIGINT" {
        Signal::SIGINT
    } else {
        Signal::SIGTERM
    };
    eprintln!("{stopped}: stopping the daemon");
    stop(child.take(), signal, args.stop_timeout).await;
    if armed || node.installer.is_installed() {
        node.uninstall(true)?;
    } else {
        guard::uninstall(&node.guard_path)?;
    }
    Ok(())
}

fn spawn(command: &[String]) -> anyhow::Result<Child> {
    let Some((program, args)) = command.split_first() else {
        bail!("no daemon command line given after --");
    };
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting the daemon {program}"))
}

/// `signal` (SIGTERM or SIGINT), SIGKILL after `timeout_s`, reaped.
async fn stop(child: Option<(Child, Instant)>, signal: Signal, timeout_s: u64) {
    let Some((mut child, _)) = child else {
        return;
    };
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    let timeout = Duration::from_secs(timeout_s);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => eprintln!("the daemon exited ({})", describe(status)),
        Ok(Err(error)) => eprintln!("waiting for the daemon: {error}"),
        Err(_) => {
            eprintln!("the daemon did not exit within {timeout_s} s of {signal}: SIGKILL");
            let _ = child.kill().await;
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}
