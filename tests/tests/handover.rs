//! Zero-downtime restarts (issue 8) against the real containerd, runc, FUSE and docker-registry:
//! a container keeps reading a streamed image's files, checking their digests, while
//! streamsnap-snapshotterd is killed and restarted, or upgraded, over and over. The FUSE
//! connections live in the holder process; the next daemon takes them over (asking the kernel to
//! resend what a killed daemon had taken), so the container never sees an error or a wrong byte.

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::streaming_node::{StreamingNode, metric};
use streamsnap_e2e::{SnapshotterdOptions, workspace_bin};

/// Restarts per test, as the issue asks.
const CYCLES: usize = 20;

/// A container of the node's image that checks every data file's digest in a loop for
/// `seconds`, printing `ok <uptime>` per pass and `FAIL` for a failed one. Returns its output.
fn start_reader(
    node: &StreamingNode,
    id: &str,
    seconds: u64,
) -> anyhow::Result<std::process::Child> {
    let script = format!(
        "end=$(( $(cut -d. -f1 /proc/uptime) + {seconds} )); \
         while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do \
           if sha256sum -c -s /data/sums; then echo ok $(cut -d' ' -f1 /proc/uptime); else echo FAIL; fi; \
         done"
    );
    node.containerd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "streamsnap",
            &node.image,
            id,
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the reader container")
}

/// Drops the kernel's page cache every `period` until `stop`, so the reader's reads reach FUSE
/// (the daemon) instead of being answered from memory.
fn drop_caches_until(stop: &std::sync::atomic::AtomicBool, period: Duration) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/vm/drop_caches")
        {
            let _ = f.write_all(b"3\n");
        }
        thread::sleep(period);
    }
}

/// The reader's verdict: passes, failures, and the longest gap between two passes.
struct Verdict {
    passes: usize,
    failures: usize,
    longest_gap: f64,
    median_gap: f64,
    stderr: String,
}

fn verdict(output: std::process::Output) -> Verdict {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut times = Vec::new();
    let mut failures = 0;
    for line in stdout.lines() {
        if let Some(t) = line.strip_prefix("ok ") {
            times.push(t.trim().parse::<f64>().unwrap_or(0.0));
        } else if line.contains("FAIL") {
            failures += 1;
        }
    }
    let mut gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    let longest_gap = gaps.last().copied().unwrap_or(0.0);
    let median_gap = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
    Verdict {
        passes: times.len(),
        failures,
        longest_gap,
        median_gap,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a reader for the whole of `cycle` being called `CYCLES` times, with caches dropped all
/// along; returns the reader's verdict and the longest restart.
fn read_through(
    node: &mut StreamingNode,
    id: &str,
    mut cycle: impl FnMut(&mut StreamingNode, usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<(Verdict, Duration)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut slowest_restart = Duration::ZERO;
    let result = thread::scope(|scope| -> anyhow::Result<Verdict> {
        scope.spawn(|| drop_caches_until(&stop, Duration::from_millis(50)));
        let reader = start_reader(node, id, 45)?;
        // Let it read a few passes before the first restart.
        thread::sleep(Duration::from_secs(2));
        let cycles = (|| -> anyhow::Result<()> {
            for i in 0..CYCLES {
                slowest_restart = slowest_restart.max(cycle(node, i)?);
                thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        })();
        let output = reader.wait_with_output()?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        cycles?;
        Ok(verdict(output))
    })?;
    Ok((result, slowest_restart))
}

fn check(verdict: &Verdict, what: &str) -> anyhow::Result<()> {
    eprintln!(
        "{what}: {} passes, {} failures, gap between passes: median {:.2} s, longest {:.2} s \
         (the worst stall is at most longest - median)",
        verdict.passes, verdict.failures, verdict.median_gap, verdict.longest_gap
    );
    ensure!(
        verdict.failures == 0,
        "{what}: {} passes read wrong or no bytes\n{}",
        verdict.failures,
        verdict.stderr
    );
    ensure!(
        verdict.stderr.trim().is_empty(),
        "{what}: the reader saw errors:\n{}",
        verdict.stderr
    );
    ensure!(
        verdict.passes >= CYCLES,
        "{what}: only {} passes",
        verdict.passes
    );
    Ok(())
}

#[test]
fn a_reading_container_survives_twenty_kills_of_the_daemon() -> anyhow::Result<()> {
    let mut node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    let (verdict, slowest) = read_through(&mut node, "crash-reader", |node, _| {
        let started = Instant::now();
        node.daemon.kill9()?;
        node.daemon.restart()?;
        Ok(started.elapsed())
    })?;
    eprintln!(
        "slowest restart (kill to serving) {:.2} s",
        slowest.as_secs_f64()
    );
    check(&verdict, "20 x SIGKILL")?;
    let metrics = node.metrics()?;
    ensure!(
        metric(&metrics, "streamsnap_snapshotter_fuse_holder", &[]) == 1.0,
        "{metrics}"
    );
    // Only the last daemon's counters are visible: its takeover of both layers after a crash.
    ensure!(
        metric(
            &metrics,
            "streamsnap_snapshotter_handovers_total",
            &["crash"]
        ) >= 2.0,
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "streamsnap_snapshotter_fuse_resends_total", &[]) >= 2.0,
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_reading_container_survives_twenty_upgrades_of_the_daemon() -> anyhow::Result<()> {
    let mut node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    // The "new version": a second copy of the binary (and its holder next to it).
    let original = workspace_bin("streamsnap-snapshotterd")?;
    let upgrade_dir = node.daemon.dir().join("v2");
    std::fs::create_dir_all(&upgrade_dir)?;
    let upgraded = upgrade_dir.join("streamsnap-snapshotterd");
    std::fs::copy(&original, &upgraded)?;
    std::fs::copy(
        workspace_bin("streamsnap-fuse-holder")?,
        upgrade_dir.join("streamsnap-fuse-holder"),
    )?;
    let (verdict, slowest) = read_through(&mut node, "upgrade-reader", |node, i| {
        let started = Instant::now();
        node.daemon.terminate(Duration::from_secs(30))?;
        node.daemon
            .set_binary(if i % 2 == 0 { &upgraded } else { &original });
        node.daemon.restart()?;
        Ok(started.elapsed())
    })?;
    eprintln!(
        "slowest upgrade (SIGTERM to serving) {:.2} s",
        slowest.as_secs_f64()
    );
    check(&verdict, "20 x graceful upgrade")?;
    let metrics = node.metrics()?;
    ensure!(
        metric(
            &metrics,
            "streamsnap_snapshotter_handovers_total",
            &["graceful"]
        ) >= 2.0,
        "{metrics}"
    );
    ensure!(
        metric(
            &metrics,
            "streamsnap_snapshotter_handovers_total",
            &["remount"]
        ) == 0.0,
        "{metrics}"
    );
    Ok(())
}

#[test]
fn mounts_outlive_the_holder_and_a_full_crash_falls_back_to_remounting() -> anyhow::Result<()> {
    let mut node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    let holders = node.daemon.holder_pids();
    ensure!(holders.len() == 1, "expected one holder, found {holders:?}");
    // The holder dies; the daemon's own descriptors keep the mounts working.
    Command::new("kill")
        .args(["-9", &holders[0].to_string()])
        .status()?;
    thread::sleep(Duration::from_millis(200));
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")?;
    node.check_digests("holder-gone", &node.files)?;
    // Then the daemon dies too: nothing kept the connections. The next daemon starts a holder,
    // mounts the layers afresh, and new containers run.
    node.daemon.kill9()?;
    node.daemon.restart()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match node.check_digests("after-full-crash", &node.files) {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("retrying: {error:#}");
                thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error),
        }
    }
    let metrics = node.metrics()?;
    ensure!(
        metric(
            &metrics,
            "streamsnap_snapshotter_handovers_total",
            &["remount"]
        ) >= 2.0,
        "{metrics}"
    );
    ensure!(
        node.daemon.holder_pids().len() == 1,
        "the restarted daemon did not start a holder"
    );
    Ok(())
}
