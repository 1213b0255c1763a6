//! Snapshotter resilience and observability (issue 4) against the real containerd, runc, FUSE and
//! docker-registry: a crash and restart, a registry outage, corrupted and truncated bodies,
//! resets and stalls under concurrent readers, Prometheus metrics, strict config.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use streamsnap_e2e::container::run_container_with;
use streamsnap_e2e::streaming_node::{FILE_SIZE, StreamingNode, metric};
use streamsnap_e2e::{Fault, SnapshotterdOptions, http, require_root_tools, workspace_bin};

#[test]
fn a_killed_daemon_comes_back_with_its_snapshots_and_cache() -> anyhow::Result<()> {
    // Without read-ahead: the reads of f1 would start a background fetch of f2's chunks that can
    // still run when the registry's count is taken below (CI saw it on a loaded machine), and
    // the count would then grow with bytes no read after the restart asked for.
    let options = SnapshotterdOptions {
        fetch_lines: "readahead_bytes = 0\n".into(),
        ..SnapshotterdOptions::default()
    };
    let mut node = StreamingNode::start(options.with_metrics())?;
    node.check_digests("before", &node.files[..2])?;
    // A container of the image keeps running while the daemon dies.
    streamsnap_e2e::run(&mut node.containerd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "streamsnap",
        &node.image,
        "long",
        "sleep",
        "600",
    ]))?;
    let served = node.registry.served_blob_bytes()?;
    let logged = node.registry.access_log()?.len();

    node.daemon.kill9()?;
    node.daemon.restart()?;

    // containerd reconnects to the restarted daemon within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match node.check_digests("after", &node.files[..2]) {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("retrying after restart: {error:#}");
                thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error),
        }
    }
    if node.registry.served_blob_bytes()? != served {
        let again: Vec<_> = node.registry.access_log()?[logged..]
            .iter()
            .filter(|e| e.is_served_blob())
            .cloned()
            .collect();
        bail!(
            "the registry served chunks again after the restart: the cache was not reused: \
             {again:#?}\ndaemon log:\n{}",
            node.daemon.log_tail(200)
        );
    }
    // The remote snapshot dirs are mounted again and readable.
    let snapshots = node.daemon.root().join("snapshots");
    let mut remote = 0;
    for entry in std::fs::read_dir(&snapshots)? {
        let dir = entry?.path();
        if dir.join("toc").exists() {
            remote += 1;
            std::fs::read_dir(dir.join("fs"))
                .with_context(|| format!("{} is not readable", dir.display()))?;
        }
    }
    ensure!(remote == 2, "{remote} remote snapshots, expected 2");
    let metrics = node.metrics()?;
    ensure!(
        metric(&metrics, "streamsnap_snapshotter_mounts_restored", &[]) == 2.0,
        "{metrics}"
    );
    let _ = node
        .containerd
        .ctr(&["tasks", "kill", "--signal", "SIGKILL", "long"])
        .status();
    Ok(())
}

#[test]
fn a_registry_outage_fails_reads_within_the_deadline_then_recovers() -> anyhow::Result<()> {
    let deadline_seconds = 4;
    let options = SnapshotterdOptions {
        fetch_deadline_seconds: deadline_seconds,
        ..Default::default()
    };
    let node = StreamingNode::start(options)?;
    for (outage, file) in [("refused", 2), ("stalled", 3)] {
        if outage == "refused" {
            node.proxy.set_refuse(true);
        } else {
            node.proxy.set_blackhole(true);
        }
        node.proxy.drop_connections();
        let started = Instant::now();
        let path = &node.files[file].0;
        let output = run_container_with(
            &node.containerd,
            &node.image,
            "streamsnap",
            &format!("outage-{outage}"),
            &["cat", path],
            &[],
            Duration::from_secs(60),
        )?;
        let waited = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "{outage}: reading {path} succeeded during the outage"
        );
        ensure!(
            stderr.contains("I/O error") || stderr.contains("Input/output error"),
            "{outage}: {stderr}"
        );
        ensure!(
            waited >= Duration::from_secs(deadline_seconds - 1)
                && waited <= Duration::from_secs(deadline_seconds + 10),
            "{outage}: the read failed after {waited:?}, the deadline is {deadline_seconds} s"
        );
        node.proxy.set_refuse(false);
        node.proxy.set_blackhole(false);
        node.check_digests(&format!("recovered-{outage}"), &node.files[file..=file])?;
    }
    Ok(())
}

#[test]
fn corrupt_and_truncated_bodies_are_detected_and_never_served() -> anyhow::Result<()> {
    let node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    node.proxy.set_fault(Some(Fault::Corrupt), 5);
    node.check_digests("corrupt", &node.files[..4])?;
    let corrupted = node.proxy.faults_injected();
    ensure!(corrupted > 0, "no corruption was injected");
    node.proxy.set_fault(Some(Fault::Truncate), 5);
    node.check_digests("truncated", &node.files[4..])?;
    ensure!(
        node.proxy.faults_injected() > corrupted,
        "no truncation was injected"
    );
    node.proxy.set_fault(None, 0);
    let metrics = node.metrics()?;
    ensure!(
        metric(&metrics, "streamsnap_cache_verify_failures_total", &[]) >= 1.0,
        "corruptions were not detected by verification:\n{metrics}"
    );
    Ok(())
}

/// Issue 18: an index artifact's spans are read from the original gzip layer; a corrupted span
/// (or window) fails its digest after inflating, is fetched again and never served.
#[test]
fn corrupt_gzip_spans_of_an_index_artifact_are_detected_and_never_served() -> anyhow::Result<()> {
    let node = StreamingNode::start_converted(
        SnapshotterdOptions::default().with_metrics(),
        &["--kind", "index", "--span-size", "1048576"],
    )?;
    node.proxy.set_fault(Some(Fault::Corrupt), 3);
    node.check_digests("corrupt-span", &node.files)?;
    ensure!(
        node.proxy.faults_injected() > 0,
        "no corruption was injected"
    );
    node.proxy.set_fault(None, 0);
    let metrics = node.metrics()?;
    ensure!(
        metric(&metrics, "streamsnap_cache_verify_failures_total", &[]) >= 1.0,
        "corrupt spans were not detected by verification:\n{metrics}"
    );
    Ok(())
}

#[test]
fn concurrent_readers_through_resets_and_stalls_read_correctly_fetching_each_chunk_once()
-> anyhow::Result<()> {
    let node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    node.proxy.set_fault(Some(Fault::Reset), 4);
    let readers = 8;
    let errors: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = (0..readers)
            .map(|i| {
                let node = &node;
                scope.spawn(move || node.check_digests(&format!("reader{i}"), &node.files))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("reader thread").err())
            .map(|e| format!("{e:#}"))
            .collect()
    });
    ensure!(errors.is_empty(), "readers failed: {errors:#?}");
    ensure!(node.proxy.faults_injected() > 0, "no reset was injected");
    node.proxy
        .set_fault(Some(Fault::Stall(Duration::from_millis(300))), 5);
    node.check_digests("stalled", &node.files)?;
    node.proxy.set_fault(None, 0);

    // Each chunk reached the cache once: chunks fetched from the registry (misses) equal the
    // chunks stored, however many readers asked and however many requests were retried.
    let metrics = node.metrics()?;
    let misses = metric(&metrics, "streamsnap_cache_misses_total", &[]);
    let stored = metric(&metrics, "streamsnap_cache_disk_chunks", &[]);
    let coalesced = metric(&metrics, "streamsnap_cache_coalesced_total", &[]);
    let retries = metric(&metrics, "streamsnap_registry_retries_total", &[]);
    ensure!(
        misses > 0.0 && misses == stored,
        "misses {misses} != chunks stored {stored}:\n{metrics}"
    );
    ensure!(
        coalesced > 0.0,
        "8 concurrent readers of one image never shared a fetch:\n{metrics}"
    );
    eprintln!("misses {misses}, stored {stored}, coalesced {coalesced}, retries {retries}");
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() -> anyhow::Result<()> {
    require_root_tools(&["promtool", "prometheus"])?;
    let node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    node.check_digests("metrics", &node.files[..1])?;
    // The check is the container's exit status: a wrong digest must fail it.
    let wrong = [(node.files[0].0.clone(), "0".repeat(64))];
    ensure!(
        node.check_digests("wrong-digest", &wrong).is_err(),
        "sha256_check passed a wrong digest"
    );
    let text = node.metrics()?;
    for name in [
        "streamsnap_snapshotter_snapshots",
        "streamsnap_snapshotter_rpc_duration_seconds",
        "streamsnap_snapshotter_remote_mounts_total",
        "streamsnap_registry_range_requests_total",
        "streamsnap_cache_misses_total",
        "streamsnap_fuse_op_duration_seconds",
    ] {
        ensure!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    promtool
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let health = http::get(
        node.daemon.metrics_address().context("metrics address")?,
        "/healthz",
        &[],
    )?;
    ensure!(health.status == 200, "/healthz answered {}", health.status);

    // A real Prometheus, private port and storage, scraping every second.
    let dir = tempfile::tempdir()?;
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: streamsnap\n    static_configs:\n      - targets: [\"{}\"]\n",
            node.daemon.metrics_address().context("metrics address")?
        ),
    )?;
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let query = "/api/v1/query?query=up%7Bjob%3D%22streamsnap%22%7D";
            if let Ok(response) = http::get(&listen, query, &[]) {
                let body = String::from_utf8_lossy(&response.body).into_owned();
                if response.status == 200 && body.contains("\"value\"") && body.contains("\"1\"]") {
                    let series = http::get(
                        &listen,
                        "/api/v1/query?query=streamsnap_snapshotter_remote_mounts_total",
                        &[],
                    )?;
                    let series = String::from_utf8_lossy(&series.body).into_owned();
                    ensure!(
                        series.contains("streamsnap_snapshotter_remote_mounts_total"),
                        "{series}"
                    );
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
                bail!("Prometheus did not scrape the daemon within 30 s; its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(250));
        }
    })();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    result
}

#[test]
fn background_fetch_brings_whole_layers_in_so_reads_survive_an_outage() -> anyhow::Result<()> {
    let options = SnapshotterdOptions {
        extra_config: "[background_fetch]\nenabled = true\n".into(),
        fetch_deadline_seconds: 5,
        ..SnapshotterdOptions::default().with_metrics()
    };
    let node = StreamingNode::start(options)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = node.metrics()?;
        if metric(
            &metrics,
            "streamsnap_snapshotter_background_fetch_layers_total",
            &[],
        ) >= 2.0
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "background fetch did not complete within 60 s:\n{metrics}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // Nothing of the data files was read by a container, yet with the registry gone they all
    // read correctly: background fetch brought every chunk in.
    node.proxy.set_refuse(true);
    node.proxy.drop_connections();
    node.check_digests("offline", &node.files)?;
    Ok(())
}

#[test]
fn background_fetch_is_off_by_default() -> anyhow::Result<()> {
    let node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    thread::sleep(Duration::from_secs(2));
    let metrics = node.metrics()?;
    ensure!(
        metric(
            &metrics,
            "streamsnap_snapshotter_background_fetch_bytes_total",
            &[]
        ) == 0.0,
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "streamsnap_cache_disk_bytes", &[]) < (FILE_SIZE as f64),
        "more than the warm-up was fetched without background fetch:\n{metrics}"
    );
    Ok(())
}

#[test]
fn an_unknown_config_key_fails_at_start_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[cache]\nmax_size_bytez = 1024\n")?;
    let output = Command::new(workspace_bin("streamsnap-snapshotterd")?)
        .arg("--address")
        .arg(dir.path().join("s.sock"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "the daemon started with a bad config"
    );
    ensure!(
        stderr.contains("max_size_bytez"),
        "the error does not name the key: {stderr}"
    );
    ensure!(!dir.path().join("s.sock").exists(), "it served anyway");
    Ok(())
}
