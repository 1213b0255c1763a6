//! The plain-node recipe without systemd (`deploy/plain-node.sh`, docs/deploy.md "A plain node")
//! run as written, with every path private: install the binaries and the sample config, start
//! the daemon under `streamsnap node run` (which patches containerd's config and restarts
//! containerd with `RESTART_CONTAINERD`), pull a converted image lazily through the CRI path,
//! stop, uninstall. containerd runs from its config file under a shell loop standing in for an
//! init system (runit, OpenRC): the restart command kills it and waits for the loop to start it
//! again on the edited file.
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::k8s_tools::workspace_root;
use streamsnap_e2e::node_containerd::NodeContainerd;
use streamsnap_e2e::{
    ImageSpec, LayerBlob, OciLayout, Registry, TarGen, require_root, require_root_tools,
    skopeo_push, sys, workspace_bin,
};

const WAIT: Duration = Duration::from_secs(60);

/// The environment of every `plain-node.sh` call: all paths under `dir`.
struct Recipe {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Recipe {
    fn new(dir: &Path, containerd: &NodeContainerd, restart: &Path) -> anyhow::Result<Self> {
        let bin_dir = workspace_bin("streamsnap")?
            .parent()
            .context("no bin dir")?
            .to_owned();
        let p = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
        Ok(Self {
            dir: dir.to_owned(),
            env: vec![
                ("BIN_DIR", bin_dir.to_string_lossy().into_owned()),
                ("PREFIX", p("prefix")),
                ("CONFIG_DIR", p("etc")),
                ("STATE_DIR", p("state")),
                ("RUN_DIR", p("run")),
                ("LOG_FILE", p("log/snapshotterd.log")),
                ("METRICS_ADDRESS", "127.0.0.1:0".into()),
                (
                    "CONTAINERD_CONFIG",
                    containerd.config_path().to_string_lossy().into_owned(),
                ),
                ("RESTART_CONTAINERD", format!("sh {}", restart.display())),
            ],
        })
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("deploy/plain-node.sh"))
            .args(args)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let output = cmd.output().context("running plain-node.sh")?;
        ensure!(
            output.status.success(),
            "plain-node.sh {} failed with {}:\n{}{}\n--- log ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            fs::read_to_string(self.dir.join("log/snapshotterd.log")).unwrap_or_default()
        );
        Ok(output)
    }
}

/// containerd under a restart loop, as an init system would run it: the loop writes each
/// containerd's pid to `pid` and starts it again when it exits, until `stop` exists.
fn supervise_containerd(containerd: &NodeContainerd) -> anyhow::Result<(Child, PathBuf)> {
    let dir = containerd.dir();
    let loop_script = dir.join("init.sh");
    let restart = dir.join("restart.sh");
    let (pid, stop, config, log, sock) = (
        dir.join("containerd.pid"),
        dir.join("stop"),
        containerd.config_path(),
        containerd.log_path(),
        containerd.address(),
    );
    fs::write(
        &loop_script,
        format!(
            "while [ ! -e {stop} ]; do containerd --config {config} >>{log} 2>&1 & echo $! > \
             {pid}; wait $!; done\n",
            stop = stop.display(),
            config = config.display(),
            log = log.display(),
            pid = pid.display()
        ),
    )?;
    // `sv restart`: kill it, wait for the loop to start a new one that answers.
    fs::write(
        &restart,
        format!(
            "old=$(cat {pid}); kill $old; while kill -0 $old 2>/dev/null; do sleep 0.1; done\n\
             for i in $(seq 1 200); do\n  [ \"$(cat {pid})\" != \"$old\" ] && ctr --address \
             {sock} version >/dev/null 2>&1 && exit 0\n  sleep 0.1\ndone\nexit 1\n",
            pid = pid.display(),
            sock = sock.display()
        ),
    )?;
    let child = Command::new("sh")
        .arg(&loop_script)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the containerd loop")?;
    let deadline = Instant::now() + WAIT;
    while !containerd
        .ctr_in("default", &["version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        ensure!(Instant::now() < deadline, "containerd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, restart))
}

#[test]
fn the_plain_node_recipe_installs_streams_and_uninstalls_without_systemd() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&["containerd", "ctr", "docker-registry", "skopeo"])?;
    let containerd = NodeContainerd::prepare()?;
    let original = fs::read(containerd.config_path())?;
    let (mut init, restart) = supervise_containerd(&containerd)?;
    let dir = tempfile::Builder::new().prefix("ssp-").tempdir_in("/tmp")?;
    let recipe = Recipe::new(dir.path(), &containerd, &restart)?;
    let result = (|| -> anyhow::Result<()> {
        // A converted image in a private registry, reached over plain HTTP by the CRI plugin.
        let registry = Registry::start()?;
        containerd.allow_plain_http(&registry.addr())?;
        let mut tar = TarGen::new();
        tar.dir("app", 0o755)
            .file("app/data", 0o644, &vec![7u8; 4 << 20]);
        let spec = ImageSpec::busybox(vec![LayerBlob::gzip(tar.finish())])?;
        let mut layout = OciLayout::new()?;
        let written = layout.write_image(&spec, "v1")?;
        let image = format!("{}/plain/app:v1", registry.addr());
        skopeo_push(layout.path(), "v1", &image)?;

        recipe.run(&["install"])?;
        let prefix = dir.path().join("prefix/bin");
        for b in [
            "streamsnap",
            "streamsnap-snapshotterd",
            "streamsnap-fuse-holder",
        ] {
            ensure!(prefix.join(b).is_file(), "{b} not installed");
        }
        let sample = fs::read_to_string(workspace_root().join("deploy/image/config.toml"))?;
        ensure!(fs::read_to_string(dir.path().join("etc/config.toml"))? == sample);
        streamsnap_e2e::run(Command::new(prefix.join("streamsnap")).args([
            "artifact-streaming",
            "create",
            "--image",
            &image,
        ]))?;

        recipe.run(&["start"])?;
        ensure!(
            fs::read(containerd.config_path())? != original,
            "containerd's config was not patched"
        );
        let status = String::from_utf8(recipe.run(&["status"])?.stdout)?;
        ensure!(
            status.contains("running") && status.contains("uses streamsnap"),
            "{status}"
        );
        // Starting again is harmless.
        recipe.run(&["start"])?;

        let log_before = registry.access_log()?.len();
        let socket = containerd.address().to_string_lossy().into_owned();
        streamsnap_e2e::run(Command::new(prefix.join("streamsnap")).args([
            "pull",
            "--containerd-socket",
            &socket,
            &image,
        ]))?;
        let log = registry.access_log()?.split_off(log_before);
        let layers: Vec<String> = written
            .layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect();
        let downloaded: Vec<_> = log
            .iter()
            .filter(|e| e.is_served_blob())
            .filter(|e| {
                e.blob_get_digest()
                    .is_some_and(|d| layers.iter().any(|l| l == d))
            })
            .collect();
        ensure!(
            downloaded.is_empty(),
            "the pull downloaded layer blobs: {downloaded:?}"
        );
        let mounts = sys::mounts_under(&dir.path().join("state"))?;
        ensure!(
            mounts.len() >= 2,
            "the layers are not mounted from the daemon: {mounts:?}"
        );

        recipe.run(&["uninstall"])?;
        ensure!(
            fs::read(containerd.config_path())? == original,
            "containerd's original config is not back byte for byte"
        );
        ensure!(!prefix.join("streamsnap").exists(), "binaries left behind");
        let left = sys::processes_mentioning(&dir.path().to_string_lossy());
        ensure!(left.is_empty(), "processes left behind: {left:?}");
        let status = String::from_utf8(recipe.run(&["status"])?.stdout)?;
        ensure!(status.contains("not running"), "{status}");
        Ok(())
    })();
    let _ = fs::write(containerd.dir().join("stop"), "");
    for p in sys::processes_mentioning(&dir.path().to_string_lossy()) {
        sys::signal(p.pid, libc::SIGKILL);
    }
    sys::unmount_all_under(dir.path());
    let _ = init.kill();
    let _ = init.wait();
    drop(containerd);
    result
}
