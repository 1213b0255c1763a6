//! Deployment end to end (issue 7's acceptance): `streamsnap node install | uninstall | run`
//! against a real containerd 1.6 running from the config file they edit; the Grafana dashboard
//! and the alerts querying only metrics the real daemon serves; the node image built by
//! deploy/image/build.sh running under containerd with `ctr run`; the systemd unit. The
//! Kubernetes manifests and the Helm chart are checked in chart.rs.
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::k8s_tools::{render_chart, workspace_root, yaml_documents};
use streamsnap_e2e::node_containerd::NodeContainerd;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, ImageSpec, OciLayout, Registry, Snapshotterd,
    SnapshotterdOptions, http, require_root, require_root_tools, run, skopeo_push, sys,
    workspace_bin,
};

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "containerd",
    "ctr",
    "runc",
    "containerd-shim-runc-v2",
];
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn preflight() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(TOOLS)?;
    ensure!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the snapshotter mounts layers through FUSE (modprobe fuse)"
    );
    Ok(())
}

fn streamsnap(args: &[&str]) -> anyhow::Result<Output> {
    let bin = workspace_bin("streamsnap")?;
    Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// Runs `streamsnap ARGS`, fails on a non-zero exit; returns stderr (where node verbs report).
fn streamsnap_ok(args: &[&str]) -> anyhow::Result<String> {
    let output = streamsnap(args)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "`streamsnap {}` failed with {}: {stderr}",
        args.join(" "),
        output.status
    );
    Ok(stderr)
}

fn wait_for(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done()? {
        ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        thread::sleep(POLL);
    }
    Ok(())
}

/// `ctr plugins ls` has a snapshotter `name` whose status is `ok`.
fn snapshotter_plugin_ok(node: &NodeContainerd, name: &str) -> anyhow::Result<bool> {
    let listed = run(&mut node.ctr_in("default", &["plugins", "ls"]))?;
    Ok(String::from_utf8_lossy(&listed.stdout).lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.first() == Some(&"io.containerd.snapshotter.v1")
            && words.get(1) == Some(&name)
            && words.last() == Some(&"ok")
    }))
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (n, v) = line.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

fn get_metrics(daemon: &Snapshotterd) -> anyhow::Result<String> {
    let address = daemon
        .metrics_address()
        .context("the daemon serves no metrics")?;
    let response = http::get(address, "/metrics", &[])?;
    ensure!(
        response.status == 200,
        "/metrics answered {}",
        response.status
    );
    Ok(String::from_utf8(response.body)?)
}

// ---------------------------------------------------------------------------------------------
// The installer

/// Acceptance 1: install on a real containerd's config, containerd restarted on it: `ctr plugins
/// ls` lists streamsnap ok and a CRI pull streams; installing again changes no byte; uninstall
/// gives back the original bytes.
#[test]
fn installer_configures_a_real_containerd_and_restores_it_exactly() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    layout.write_image(&ImageSpec::busybox(Vec::new())?, "v1")?;
    let image = format!("{}/e2e/node:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &image)?;
    let written_layers: BTreeSet<String> = {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(layout.path().join("index.json"))?)?;
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .context("index without manifest")?;
        let manifest: serde_json::Value = serde_json::from_slice(&fs::read(
            layout
                .path()
                .join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )?)?;
        manifest["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .filter_map(|l| l["digest"].as_str().map(str::to_owned))
            .collect()
    };
    streamsnap_ok(&["artifact-streaming", "create", "--image", &image])?;

    let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
    let mut node = NodeContainerd::prepare()?;
    node.allow_plain_http(&registry.addr())?;
    let config = node.config_path().to_owned();
    let config_arg = config.to_string_lossy().into_owned();
    let socket_arg = daemon.socket().to_string_lossy().into_owned();
    let original = fs::read(&config)?;
    node.start()?;
    ensure!(
        !snapshotter_plugin_ok(&node, SNAPSHOTTER)?,
        "streamsnap is listed before the install"
    );

    let install = [
        "node",
        "install",
        "--containerd-config",
        &config_arg,
        "--socket",
        &socket_arg,
        "--no-restart",
    ];
    let said = streamsnap_ok(&install)?;
    ensure!(
        said.contains("patched")
            && said.contains("for containerd 1.")
            && said.contains("--no-restart"),
        "{said}"
    );
    let patched = fs::read(&config)?;
    ensure!(patched != original, "install did not change the config");
    let backup = PathBuf::from(format!("{config_arg}.streamsnap-original"));
    ensure!(
        fs::read(&backup)? == original,
        "the backup is not the original"
    );
    let text = String::from_utf8(patched.clone())?;
    ensure!(
        text.starts_with("# containerd config of a test node")
            && text.contains("snapshotter = \"streamsnap\"   # the stock snapshotter")
            && text.contains("disable_snapshot_annotations = false")
            && text.contains(&format!("address = \"{socket_arg}\"")),
        "the patched config:\n{text}"
    );

    node.restart()?;
    ensure!(
        snapshotter_plugin_ok(&node, SNAPSHOTTER)?,
        "after the install and a restart, `ctr plugins ls` does not list streamsnap ok:\n{}",
        String::from_utf8_lossy(&run(&mut node.ctr_in("default", &["plugins", "ls"]))?.stdout)
    );

    // A CRI pull (what the kubelet does) streams: no layer blob downloaded, remote snapshots.
    let log_start = registry.access_log()?.len();
    let address = node.address().to_string_lossy().into_owned();
    let pulled = streamsnap(&[
        "pull",
        "--containerd-socket",
        &address,
        "--timeout",
        "120",
        &image,
    ])?;
    ensure!(
        pulled.status.success(),
        "the CRI pull failed: {}\n--- daemon ---\n{}\n--- containerd ---\n{}",
        String::from_utf8_lossy(&pulled.stderr),
        daemon.log_tail(30),
        node.log_tail(30)
    );
    let downloaded: Vec<String> = registry.access_log()?[log_start..]
        .iter()
        .filter(|e| {
            e.is_served_blob()
                && e.blob_get_digest()
                    .is_some_and(|d| written_layers.contains(d))
        })
        .map(|e| format!("{} {} {}", e.method, e.uri, e.status))
        .collect();
    ensure!(
        downloaded.is_empty(),
        "layers were downloaded, not streamed: {downloaded:?}"
    );
    // What docs/deploy.md tells an operator to look at: FUSE mounts of the layers under the
    // daemon's root, the daemon's log, its metrics.
    let root = daemon.root().to_string_lossy().into_owned();
    let fuse_mounts: Vec<String> = fs::read_to_string("/proc/self/mounts")?
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            fields.len() > 2 && fields[1].starts_with(&root) && fields[2].starts_with("fuse")
        })
        .map(str::to_owned)
        .collect();
    eprintln!("layer mounts: {fuse_mounts:#?}");
    ensure!(
        fuse_mounts.iter().any(|m| m.starts_with("streamsnap ")),
        "no streamsnap FUSE mount under {root}"
    );
    ensure!(
        fs::read_to_string(daemon.log_path())?.contains("layer mounted remotely"),
        "the daemon did not log a remote mount"
    );
    let metrics = get_metrics(&daemon)?;
    let mounts = sample(&metrics, "streamsnap_snapshotter_remote_mounts_total").unwrap_or(0.0);
    ensure!(mounts >= 1.0, "remote mounts: {mounts}");

    // Again: nothing changes.
    let said = streamsnap_ok(&install)?;
    ensure!(said.contains("nothing changed"), "{said}");
    ensure!(
        fs::read(&config)? == patched,
        "a second install changed the config"
    );

    // Uninstall: the original bytes, no backup or marker left.
    let said = streamsnap_ok(&[
        "node",
        "uninstall",
        "--containerd-config",
        &config_arg,
        "--no-restart",
    ])?;
    ensure!(said.contains("restored the original"), "{said}");
    ensure!(
        fs::read(&config)? == original,
        "uninstall did not give back the original bytes"
    );
    ensure!(
        !backup.exists() && !Path::new(&format!("{config_arg}.streamsnap-installed")).exists(),
        "uninstall left its backup or marker"
    );
    node.restart()?;
    ensure!(
        !snapshotter_plugin_ok(&node, SNAPSHOTTER)?,
        "streamsnap is still listed after the uninstall"
    );
    Ok(())
}

/// The installer refuses what it cannot handle, without touching the file.
#[test]
fn installer_refuses_unsupported_configs_unchanged() -> anyhow::Result<()> {
    require_root_tools(&["containerd"])?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    let config_arg = config.to_string_lossy().into_owned();
    // A version 1 config (no `version` key); a version 3 one on containerd 1.6.
    for (text, expected) in [
        ("root = \"/var/lib/containerd\"\n", "version 1"),
        ("version = 3\n", "needs containerd 2.0"),
    ] {
        fs::write(&config, text)?;
        let output = streamsnap(&[
            "node",
            "install",
            "--containerd-config",
            &config_arg,
            "--no-restart",
        ])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains(expected),
            "{text:?}: {output:?}"
        );
        ensure!(fs::read_to_string(&config)? == text, "the file changed");
    }
    Ok(())
}

/// `streamsnap node run`, the DaemonSet's entrypoint: the config is patched once the daemon
/// serves, a killed daemon is started again in place (config kept), and SIGTERM stops the daemon
/// and gives the original config back.
#[test]
fn node_run_supervises_the_daemon_and_the_config_follows_it() -> anyhow::Result<()> {
    preflight()?;
    let node = NodeContainerd::prepare()?;
    let config = node.config_path().to_owned();
    let original = fs::read(&config)?;
    let marker = PathBuf::from(format!("{}.streamsnap-installed", config.display()));
    let socket = node.dir().join("s.sock");
    let root = node.dir().join("ssroot");
    let log_path = node.dir().join("run.log");
    let mut supervisor = Command::new(workspace_bin("streamsnap")?)
        .args(["node", "run", "--no-restart", "--containerd-config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--")
        .arg(workspace_bin("streamsnap-snapshotterd")?)
        .arg("--address")
        .arg(&socket)
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log_path)?)
        .stderr(fs::File::create(node.dir().join("run.err"))?)
        .spawn()?;
    let supervisor_pid = i32::try_from(supervisor.id())?;
    let result = (|| {
        let daemon_pid = || -> Option<i32> {
            sys::processes()
                .into_iter()
                .find(|p| p.ppid == supervisor_pid && p.cmdline.contains("streamsnap-snapshotterd"))
                .map(|p| p.pid)
        };
        wait_for("the config patched once the daemon serves", || {
            Ok(marker.exists() && fs::read(&config)? != original)
        })?;
        ensure!(
            UnixStream::connect(&socket).is_ok(),
            "the daemon does not serve"
        );
        let patched = fs::read(&config)?;
        let first = daemon_pid().context("no daemon below the supervisor")?;
        sys::signal(first, libc::SIGKILL);
        wait_for("a new daemon serving", || {
            Ok(daemon_pid().is_some_and(|p| p != first) && UnixStream::connect(&socket).is_ok())
        })?;
        ensure!(
            fs::read(&config)? == patched,
            "the config changed while the daemon was restarted in place"
        );
        let second = daemon_pid().context("no daemon after the restart")?;
        sys::signal(supervisor_pid, libc::SIGTERM);
        wait_for("the supervisor exiting after SIGTERM", || {
            Ok(supervisor.try_wait()?.is_some())
        })?;
        let status = supervisor.wait()?;
        ensure!(status.success(), "node run exited with {status}");
        ensure!(!sys::is_alive(second), "the daemon outlived its supervisor");
        ensure!(
            fs::read(&config)? == original,
            "the original config is not back after the pod stopped"
        );
        ensure!(!marker.exists(), "the marker is left");
        Ok(())
    })();
    if result.is_err() {
        let _ = supervisor.kill();
        eprintln!(
            "--- streamsnap node run ---\n{}",
            fs::read_to_string(node.dir().join("run.err")).unwrap_or_default()
        );
    }
    let _ = supervisor.wait();
    result
}

// ---------------------------------------------------------------------------------------------
// Metrics the dashboard and the alerts use

/// `streamsnap_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("streamsnap_") {
        let start = &rest[at..];
        let end = start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(start.len());
        let preceded_by_name_char = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded_by_name_char && end > "streamsnap_".len() {
            names.insert(start[..end].to_owned());
        }
        rest = &start[end.max(1)..];
    }
    names
}

/// Every `expr` string below `value`.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Acceptance 3: every metric the Grafana dashboard, the alerts and the ServiceMonitor name is
/// in the real daemon's /metrics.
#[test]
fn dashboard_and_alerts_query_only_metrics_the_daemon_serves() -> anyhow::Result<()> {
    preflight()?;
    // A node that pulled one image without a streaming artifact: the daemon has answered
    // snapshot calls, holds snapshots and fell back once, so every family has its series (some
    // labelled ones appear only once used).
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    layout.write_image(&ImageSpec::busybox(Vec::new())?, "plain")?;
    let image = format!("{}/e2e/plain:v1", registry.addr());
    skopeo_push(layout.path(), "plain", &image)?;
    let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_proxy_snapshotter(SNAPSHOTTER, daemon.socket())
            .with_cri(SNAPSHOTTER)
            .with_plain_http(&registry.addr()),
    )?;
    let address = containerd.address().to_string_lossy().into_owned();
    streamsnap_ok(&["pull", "--containerd-socket", &address, &image])?;
    let listed = run(&mut containerd.ctr_in(CRI_NAMESPACE, &["images", "ls", "-q"]))?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains(&image),
        "the pull left no image"
    );
    let exposition = get_metrics(&daemon)?;
    let served: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    ensure!(
        served.contains("streamsnap_fuse_op_duration_seconds_bucket"),
        "{exposition}"
    );

    let dashboard_path = workspace_root().join("helm/streamsnap/dashboards/streamsnap.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&fs::read(&dashboard_path)?)?;
    let titles: Vec<String> = dashboard["panels"]
        .as_array()
        .context("no panels")?
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for topic in [
        "first read",
        "bytes fetched",
        "hit ratio",
        "fallbacks",
        "fuse",
    ] {
        ensure!(
            titles.iter().any(|t| t.contains(topic)),
            "no dashboard panel about {topic}: {titles:?}"
        );
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let rendered = render_chart(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
    ])?;
    let mut monitoring = 0;
    for doc in yaml_documents(&rendered)? {
        if doc["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("monitoring.coreos.com"))
        {
            monitoring += 1;
            exprs(&doc, &mut queries);
            // The ServiceMonitor's relabelling names no metric; anything else named is checked.
            queries.push(serde_json::to_string(&doc["spec"])?);
        }
    }
    ensure!(
        monitoring == 2,
        "expected a ServiceMonitor and a PrometheusRule"
    );
    let mut checked = BTreeSet::new();
    for query in &queries {
        let names = metric_names(query);
        if query.starts_with('{') {
            checked.extend(names);
            continue;
        }
        ensure!(
            !names.is_empty(),
            "the query {query:?} names no streamsnap metric"
        );
        checked.extend(names);
    }
    let missing: Vec<&String> = checked.iter().filter(|n| !served.contains(*n)).collect();
    ensure!(
        missing.is_empty(),
        "queried but not served by the daemon: {missing:?}"
    );
    // The check can fail.
    ensure!(!served.contains("streamsnap_no_such_metric_total"));
    eprintln!(
        "{} queries name {} metrics, all served: {checked:?}",
        queries.len(),
        checked.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The image

/// A free `127.0.0.1:PORT`.
fn free_port() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

/// Acceptance 4: the image deploy/image/build.sh makes (no Docker) runs under containerd (`ctr
/// run`, privileged, host network) and answers on its metrics port.
#[test]
fn daemon_image_runs_under_containerd_and_answers_on_its_metrics_port() -> anyhow::Result<()> {
    preflight()?;
    require_root_tools(&["tar"])?;
    let bin_dir = workspace_bin("streamsnap-snapshotterd")?
        .parent()
        .context("no bin dir")?
        .to_owned();
    let layout = tempfile::tempdir()?;
    let out = layout.path().join("oci");
    let started = Instant::now();
    run(Command::new("bash")
        .arg(workspace_root().join("deploy/image/build.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--tag", "e2e"])
        .arg(&out))
    .context("building the image")?;
    eprintln!("image built in {:.1} s", started.elapsed().as_secs_f64());
    let registry = Registry::start()?;
    let image = format!("{}/streamsnap/streamsnap:e2e", registry.addr());
    skopeo_push(&out, "e2e", &image)?;

    let containerd = Containerd::start(ContainerdOptions::default())?;
    run(&mut containerd.ctr(&["images", "pull", "--plain-http", &image]))?;
    let id = format!("ss-image-{}", std::process::id());
    let version = run(&mut containerd.ctr(&[
        "run",
        "--rm",
        &image,
        &format!("{id}-cli"),
        "/usr/local/bin/streamsnap",
        "--version",
    ]))?;
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    ensure!(version.starts_with("streamsnap "), "{version:?}");

    let root = containerd.mount_dir().join("root");
    let run_dir = containerd.mount_dir().join("run");
    fs::create_dir_all(&root)?;
    fs::create_dir_all(&run_dir)?;
    let metrics = free_port()?;
    let bind = |src: &Path, dst: &str| {
        format!("type=bind,src={},dst={dst},options=rbind:rw", src.display())
    };
    run(&mut containerd.ctr(&[
        "run",
        "--detach",
        "--privileged",
        "--net-host",
        "--mount",
        &bind(&root, "/var/lib/streamsnap"),
        "--mount",
        &bind(&run_dir, "/run/streamsnap"),
        &image,
        &id,
        "/usr/local/bin/streamsnap-snapshotterd",
        "--address",
        "/run/streamsnap/snapshotter.sock",
        "--root",
        "/var/lib/streamsnap",
        "--config",
        "/etc/streamsnap/config.toml",
        "--metrics-address",
        &metrics,
    ]))?;
    let result = (|| {
        wait_for("the containerised daemon answering /healthz", || {
            Ok(http::get(&metrics, "/healthz", &[]).is_ok_and(|r| r.status == 200))
        })?;
        let response = http::get(&metrics, "/metrics", &[])?;
        let body = String::from_utf8_lossy(&response.body);
        ensure!(
            response.status == 200 && body.contains("streamsnap_cache_capacity_bytes"),
            "/metrics: {} {body}",
            response.status
        );
        ensure!(
            run_dir.join("snapshotter.sock").exists(),
            "the daemon's socket is not on the host side of the mount"
        );
        Ok(())
    })();
    let _ = containerd
        .ctr(&["tasks", "kill", "--signal", "SIGTERM", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = wait_for("the daemon's task stopping", || {
        let tasks = run(&mut containerd.ctr(&["tasks", "ls"]))?;
        Ok(!String::from_utf8_lossy(&tasks.stdout)
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING")))
    });
    let _ = run(&mut containerd.ctr(&["tasks", "delete", "--force", &id]));
    let _ = run(&mut containerd.ctr(&["containers", "delete", &id]));
    result
}

// ---------------------------------------------------------------------------------------------
// The systemd unit

/// deploy/systemd's unit passes `systemd-analyze verify` (with the binary path pointed at the
/// workspace build) and stops only the daemon on a restart (`KillMode=process`).
#[test]
fn systemd_unit_verifies_and_keeps_what_the_daemon_started() -> anyhow::Result<()> {
    require_root_tools(&["systemd-analyze"])?;
    let unit = fs::read_to_string(
        workspace_root().join("deploy/systemd/streamsnap-snapshotterd.service"),
    )?;
    ensure!(unit.contains("\nKillMode=process\n"), "{unit}");
    ensure!(unit.contains("\nBefore=containerd.service\n"), "{unit}");
    ensure!(
        !unit.contains("RequiredBy=") && !unit.contains("Requires="),
        "{unit}"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("streamsnap-snapshotterd.service");
    let daemon = workspace_bin("streamsnap-snapshotterd")?;
    fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/streamsnap-snapshotterd",
            &daemon.to_string_lossy(),
        ),
    )?;
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .stdin(Stdio::null())
        .output()?;
    let said = String::from_utf8_lossy(&output.stderr);
    // containerd.service is not installed on every machine running the tests: only that may be
    // missing.
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("containerd.service"))
        .collect();
    ensure!(
        output.status.success() || complaints.is_empty(),
        "systemd-analyze verify: {said}"
    );
    ensure!(complaints.is_empty(), "systemd-analyze verify: {said}");
    Ok(())
}
