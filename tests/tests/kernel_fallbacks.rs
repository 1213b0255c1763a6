//! Every optional kernel FUSE feature has a fallback that works (issue 14): with each of
//! READDIRPLUS, zero-message opens, RESEND, passthrough and zero-message opendirs turned off by `[fuse]
//! kernel_features_off` (and all at once), a converted image is pulled lazily, a container lists
//! and checks its files, two more check them again (the files are whole on the node by then, so
//! they are copied for passthrough and the last container's opens are passed through), and the
//! daemon is killed (SIGKILL) while a fourth container reads and restarted. The request counts
//! by op show the feature really was off: plain `readdir` instead of `readdirplus`, an `open` per
//! opened file and an `opendir` per listed directory instead of none, no copy and no passthrough open, and after the crash a fresh
//! mount of every layer instead of a takeover with the kernel resending. Passthrough needs the
//! opens, so zero-message opens are used only with passthrough off. A run with nothing off
//! validates the test itself.

use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::SnapshotterdOptions;
use streamsnap_e2e::container::run_container;
use streamsnap_e2e::streaming_node::{FILES, StreamingNode, metric};

/// Seconds the reader container reads during the crash.
const READ_SECONDS: u64 = 5;

/// What a lazy start and a crash showed with some features off.
#[derive(Debug)]
struct Observed {
    /// FUSE requests by op over the start and the first container (before the crash).
    readdir: f64,
    readdirplus: f64,
    /// FUSE opens of files and of directories made by the listing container alone.
    opens_by_lister: f64,
    opendirs_by_lister: f64,
    /// Files copied for passthrough, and opens of the last checking container passed through.
    passthrough_copies: f64,
    passthrough_opens: f64,
    /// Passes the reader checked right, and passes (or errors) it saw fail, across the crash.
    reader_passes: usize,
    reader_failed: bool,
    /// The restarted daemon's takeover: layers taken over with a resend, layers mounted afresh.
    crash_takeovers: f64,
    remounts: f64,
    resends: f64,
    resend_supported: f64,
}

fn op_count(metrics: &str, op: &str) -> f64 {
    metric(
        metrics,
        "streamsnap_fuse_op_duration_seconds_count",
        &[&format!("op=\"{op}\"")],
    )
}

/// A container checking every data file's digest in a loop for [`READ_SECONDS`], with the
/// page cache dropped before each pass so its reads reach FUSE.
fn start_reader(node: &StreamingNode) -> anyhow::Result<Child> {
    let script = format!(
        "end=$(( $(cut -d. -f1 /proc/uptime) + {READ_SECONDS} )); \
         while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do \
           if sha256sum -c -s /data/sums; then echo ok; else echo FAIL; fi; \
         done"
    );
    node.containerd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "streamsnap",
            &node.image,
            "reader",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the reader container")
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// Pulls the node's image lazily with `off` turned off, runs a container that lists and checks
/// the image's files, then kills the daemon while another container reads, restarts it and
/// checks the files from a new container.
fn lazy_start_with_off(off: &[&str]) -> anyhow::Result<Observed> {
    let started = Instant::now();
    let list = off
        .iter()
        .map(|name| format!("{name:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let options = SnapshotterdOptions {
        // The data files (3 MiB) are large enough to be copied for passthrough.
        extra_config: format!(
            "[fuse]\nkernel_features_off = [{list}]\npassthrough_min_file_bytes = 1048576\n"
        ),
        ..SnapshotterdOptions::default().with_metrics()
    };
    let mut node = StreamingNode::start(options)?;
    let before = node.metrics()?;
    // Directories of both layers listed, every data file opened and checked.
    let out = run_container(
        &node.containerd,
        &node.image,
        "streamsnap",
        "lister",
        &[
            "sh",
            "-c",
            "ls -la / /bin /etc /data > /dev/null && sha256sum -c /data/sums",
        ],
    )?;
    for (path, _) in &node.files {
        ensure!(
            out.contains(&format!("{path}: OK")),
            "{path} did not check out:\n{out}"
        );
    }
    let after = node.metrics()?;
    let opens_by_lister = op_count(&after, "open") - op_count(&before, "open");
    let opendirs_by_lister = op_count(&after, "opendir") - op_count(&before, "opendir");
    let (passthrough_copies, passthrough_opens) =
        check_twice_more(&node, !off.contains(&"passthrough"))?;

    // A crash while a container reads.
    let reader = start_reader(&node)?;
    thread::sleep(Duration::from_millis(1500));
    drop_caches();
    node.daemon.kill9()?;
    thread::sleep(Duration::from_millis(200));
    node.daemon.restart()?;
    drop_caches();
    let output = reader.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reader_passes = stdout.lines().filter(|l| *l == "ok").count();
    let reader_failed = stdout.contains("FAIL") || !stderr.trim().is_empty();
    if reader_failed {
        eprintln!(
            "{off:?}: the reader saw failures after the crash:\n{stdout}\n{}",
            stderr.trim()
        );
    }
    // A new container reads right bytes (containerd reconnects to the daemon within seconds).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match node.check_digests("after-crash", &node.files) {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("{off:?}: retrying: {error:#}");
                thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error),
        }
    }
    let restarted = node.metrics()?;
    let observed = Observed {
        readdir: op_count(&after, "readdir"),
        readdirplus: op_count(&after, "readdirplus"),
        opens_by_lister,
        opendirs_by_lister,
        passthrough_copies,
        passthrough_opens,
        reader_passes,
        reader_failed,
        crash_takeovers: metric(
            &restarted,
            "streamsnap_snapshotter_handovers_total",
            &["crash"],
        ),
        remounts: metric(
            &restarted,
            "streamsnap_snapshotter_handovers_total",
            &["remount"],
        ),
        resends: metric(&restarted, "streamsnap_snapshotter_fuse_resends_total", &[]),
        resend_supported: metric(
            &restarted,
            "streamsnap_snapshotter_fuse_resend_supported",
            &[],
        ),
    };
    eprintln!(
        "{off:?} off: {observed:?}, lookups {}, in {:.1} s",
        op_count(&after, "lookup"),
        started.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(node.daemon.log_path()).unwrap_or_default();
    for name in off {
        ensure!(
            log.contains(&format!("{name}: off (config)")),
            "the daemon did not log {name} as off:\n{}",
            node.daemon.log_tail(40)
        );
    }
    Ok(observed)
}

/// Checks every file from a container, and the sums as a container prints them.
fn check_files(node: &StreamingNode, name: &str) -> anyhow::Result<()> {
    let out = run_container(
        &node.containerd,
        &node.image,
        "streamsnap",
        name,
        &["sha256sum", "-c", "/data/sums"],
    )?;
    for (path, _) in &node.files {
        ensure!(
            out.contains(&format!("{path}: OK")),
            "{path} did not check out:\n{out}"
        );
    }
    Ok(())
}

/// Checks the files twice more: the first container's opens find them whole on the node and
/// start their copies (waited for when passthrough is `on`), the second's may pass through.
/// Returns the copies made and the second container's passthrough opens.
fn check_twice_more(node: &StreamingNode, on: bool) -> anyhow::Result<(f64, f64)> {
    const COPIES: &str = "streamsnap_fuse_passthrough_copies_total";
    const OPENS: &str = "streamsnap_fuse_passthrough_opens_total";
    check_files(node, "copier")?;
    if on {
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(&node.metrics()?, COPIES, &[]) < FILES as f64 {
            ensure!(
                Instant::now() < deadline,
                "the files were not copied for passthrough within 30 s:\n{}",
                node.daemon.log_tail(20)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
    let before = node.metrics()?;
    check_files(node, "passer")?;
    let after = node.metrics()?;
    Ok((
        metric(&after, COPIES, &[]),
        metric(&after, OPENS, &[]) - metric(&before, OPENS, &[]),
    ))
}

/// Passthrough on (this kernel has it): every data file was copied and every open of one by the
/// last checking container passed through.
fn check_passthrough_used(o: &Observed) -> anyhow::Result<()> {
    if !kernel_at_least(6, 9) {
        eprintln!("this kernel has no FUSE passthrough (Linux 6.9+ has): only its fallback");
        return check_passthrough_off(o);
    }
    ensure!(
        o.passthrough_copies >= FILES as f64 && o.passthrough_opens >= FILES as f64,
        "{o:?}"
    );
    Ok(())
}

fn check_passthrough_off(o: &Observed) -> anyhow::Result<()> {
    ensure!(
        o.passthrough_copies == 0.0 && o.passthrough_opens == 0.0,
        "{o:?}"
    );
    Ok(())
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b))) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// READDIRPLUS on: listings come with attributes, never as plain readdir.
fn check_readdirplus_used(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.readdirplus > 0.0 && o.readdir == 0.0, "{o:?}");
    Ok(())
}

fn check_readdirplus_off(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.readdir > 0.0 && o.readdirplus == 0.0, "{o:?}");
    Ok(())
}

/// Zero-message opens on: the kernel stopped sending opens after the first per layer (the
/// warm-up container's), so checking every file takes at most one per layer more.
fn check_zero_message_open_used(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.opens_by_lister <= 2.0, "{o:?}");
    Ok(())
}

/// Zero-message opendirs on: the kernel stopped sending opendirs after the first per layer.
fn check_zero_message_opendir_used(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.opendirs_by_lister <= 2.0, "{o:?}");
    Ok(())
}

/// Off: an opendir per directory listed (/, /bin, /etc and /data, in the layers holding them).
fn check_zero_message_opendir_off(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.opendirs_by_lister >= 4.0, "{o:?}");
    Ok(())
}

/// Off: an open per file opened (the sums and every data file at least).
fn check_zero_message_open_off(o: &Observed) -> anyhow::Result<()> {
    ensure!(o.opens_by_lister >= (FILES + 1) as f64, "{o:?}");
    Ok(())
}

/// RESEND on (this kernel has it): the layers were taken over with a resend and the reader
/// never saw an error.
fn check_resend_used(o: &Observed) -> anyhow::Result<()> {
    if o.resend_supported == 0.0 && o.resends == 0.0 {
        eprintln!("this kernel has no RESEND (Linux 6.9+ has): only its fallback can be checked");
        return check_resend_off(o);
    }
    ensure!(
        o.resend_supported == 1.0 && o.resends >= 2.0 && o.crash_takeovers >= 2.0,
        "{o:?}"
    );
    ensure!(
        o.remounts == 0.0 && !o.reader_failed && o.reader_passes >= 1,
        "{o:?}"
    );
    Ok(())
}

/// Off: no resend, every layer mounted afresh as on a kernel without RESEND (a container
/// reading through the crash may see errors; new ones read right, checked above).
fn check_resend_off(o: &Observed) -> anyhow::Result<()> {
    ensure!(
        o.resend_supported == 0.0 && o.resends == 0.0 && o.crash_takeovers == 0.0,
        "{o:?}"
    );
    ensure!(o.remounts >= 2.0, "{o:?}");
    Ok(())
}

#[test]
fn with_every_feature_on_each_is_used() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&[])?;
    check_readdirplus_used(&o)?;
    check_zero_message_opendir_used(&o)?;
    // Passthrough needs the opens.
    check_zero_message_open_off(&o)?;
    check_passthrough_used(&o)?;
    check_resend_used(&o)
}

#[test]
fn without_readdirplus_listings_are_plain_readdir() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&["readdirplus"])?;
    check_readdirplus_off(&o)?;
    check_passthrough_used(&o)?;
    check_resend_used(&o)
}

#[test]
fn without_passthrough_every_read_is_a_request_and_opens_take_none() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&["passthrough"])?;
    check_readdirplus_used(&o)?;
    check_passthrough_off(&o)?;
    check_zero_message_open_used(&o)?;
    check_resend_used(&o)
}

#[test]
fn without_passthrough_and_zero_message_opens_every_open_is_a_request() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&["passthrough", "zero_message_open"])?;
    check_readdirplus_used(&o)?;
    check_passthrough_off(&o)?;
    check_zero_message_open_off(&o)?;
    check_resend_used(&o)
}

#[test]
fn without_resend_a_crash_mounts_the_layers_afresh() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&["resend"])?;
    check_readdirplus_used(&o)?;
    check_passthrough_used(&o)?;
    check_resend_off(&o)
}

#[test]
fn with_every_feature_off_the_lazy_start_works() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&[
        "readdirplus",
        "zero_message_open",
        "resend",
        "passthrough",
        "zero_message_opendir",
    ])?;
    check_readdirplus_off(&o)?;
    check_zero_message_opendir_off(&o)?;
    check_zero_message_open_off(&o)?;
    check_passthrough_off(&o)?;
    check_resend_off(&o)
}

#[test]
fn without_zero_message_opendirs_every_listing_opens_with_a_request() -> anyhow::Result<()> {
    let o = lazy_start_with_off(&["zero_message_opendir"])?;
    check_readdirplus_used(&o)?;
    check_zero_message_opendir_off(&o)?;
    check_passthrough_used(&o)?;
    check_resend_used(&o)
}
