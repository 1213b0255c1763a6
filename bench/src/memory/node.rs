//! One contender's node: its daemon and containerd, the pulls and walks, idle, restarts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::{
    Containerd, ContainerdOptions, Registry, Snapshotterd, SnapshotterdOptions, workspace_bin,
};

use crate::realistic::runner::{Scrape, drop_caches, stat_tree};

/// A daemon build to measure.
#[derive(Clone, Debug)]
pub struct Contender {
    pub label: String,
    /// Another build's binary (`None`: this workspace's).
    pub binary: Option<PathBuf>,
    /// `[fuse] metadata_idle_seconds` (`None`: not set, for builds that do not know it).
    pub idle_seconds: Option<u64>,
}

/// What one image cost and how fast its layer was walked.
#[derive(Clone, Copy, Debug)]
pub struct ImageSample {
    /// VmRSS after the pull (the layer mounted, nothing read yet).
    pub rss_pulled: u64,
    /// VmRSS after the walks (every entry looked up and stat'ed).
    pub rss_walked: u64,
    pub pull: Duration,
    /// lstat of every entry after dropping the kernel's caches, then again.
    pub walk: Option<(Duration, Duration)>,
}

#[derive(Debug, Default)]
pub struct NodeReport {
    pub label: String,
    pub images: usize,
    /// Entries walked in each layer (the generated entries and the layer root).
    pub walked_entries: u64,
    pub rss_start: u64,
    pub samples: Vec<ImageSample>,
    pub rss_all: u64,
    pub hwm: u64,
    pub metadata_all: Option<f64>,
    pub idle_wait: Duration,
    pub rss_idle: u64,
    pub metadata_idle: Option<f64>,
    /// First lookup of a file (3 names deep) after the caches were dropped: with the layer's
    /// metadata dropped for idleness (a reload), and again with it loaded.
    pub lookup_after_idle: Vec<Duration>,
    pub lookup_loaded: Vec<Duration>,
    /// From SIGTERM's end to the new daemon accepting calls, all layers served again.
    pub restarts: Vec<Duration>,
    /// The daemon's own count of the same (its `mounts_restore_duration` metric), when it has it.
    pub restore_metric: Vec<f64>,
    /// The first lookup through a layer after each restart (caches dropped).
    pub lookup_after_restart: Vec<Duration>,
    pub rss_after_restart: u64,
    /// `streamsnap_fuse_metadata_load_duration_seconds`: (count, sum) before the restarts.
    pub loads: Option<(f64, f64)>,
}

/// A `kB` field of /proc/PID/status, in bytes.
fn status_bytes(pid: i32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// The streamsnap FUSE mounts under `root`, by mount point.
fn layer_mounts(root: &Path) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let target = PathBuf::from(left.split(' ').nth(4)?);
            let fstype = right.split(' ').next()?;
            (fstype == "fuse.streamsnap" && target.starts_with(root)).then_some(target)
        })
        .collect())
}

/// Pulls `image` through the CRI image service, as the kubelet does.
fn cri_pull(containerd: &Containerd, image: &str) -> anyhow::Result<Duration> {
    let socket = containerd.address().to_string_lossy().into_owned();
    let started = Instant::now();
    let output = Command::new(workspace_bin("streamsnap")?)
        .args(["pull", "--containerd-socket", &socket, image])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "streamsnap pull {image} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(started.elapsed())
}

fn scrape(daemon: &Snapshotterd) -> Option<Scrape> {
    Scrape::fetch(daemon.metrics_address()?).ok()
}

/// `streamsnap_fuse_metadata_bytes`, for builds that have it.
fn metadata_bytes(contender: &Contender, daemon: &Snapshotterd) -> Option<f64> {
    contender.binary.is_none().then_some(())?;
    Some(scrape(daemon)?.sum("streamsnap_fuse_metadata_bytes", &[]))
}

/// Time of a first lookup of a file three names deep in `mount`, the kernel's caches dropped.
fn first_lookup(mount: &Path) -> anyhow::Result<Duration> {
    drop_caches()?;
    let path = mount.join("app/d0000/file000000.py");
    let started = Instant::now();
    std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
    Ok(started.elapsed())
}

pub fn run_node(
    contender: &Contender,
    registry: &Registry,
    images: &[String],
    entries: usize,
    walk_every: usize,
    restarts: usize,
) -> anyhow::Result<NodeReport> {
    let mut options = SnapshotterdOptions::default().with_metrics();
    if let Some(idle) = contender.idle_seconds {
        options.extra_config = format!("[fuse]\nmetadata_idle_seconds = {idle}\n");
    }
    let mut daemon = Snapshotterd::start(options)?;
    if let Some(binary) = &contender.binary {
        daemon.terminate(Duration::from_secs(10))?;
        daemon.set_binary(binary);
        daemon.restart()?;
    }
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_proxy_snapshotter(SNAPSHOTTER, daemon.socket())
            .with_cri(SNAPSHOTTER)
            .with_plain_http(&registry.addr()),
    )?;
    eprintln!("memory: {}: {} images", contender.label, images.len());
    let root = daemon.root();
    let mut report = NodeReport {
        label: contender.label.clone(),
        images: images.len(),
        rss_start: status_bytes(daemon.pid(), "VmRSS")?,
        ..NodeReport::default()
    };
    let mut mounts = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let before = layer_mounts(&root)?;
        let pull = cri_pull(&containerd, image)?;
        let new: Vec<PathBuf> = layer_mounts(&root)?.difference(&before).cloned().collect();
        ensure!(
            new.len() == 1,
            "pulling {image} mounted {} layers, not 1 (did it fall back to a normal pull?); \
             daemon log:\n{}",
            new.len(),
            daemon.log_tail(20)
        );
        let mount = new.into_iter().next().expect("one");
        let rss_pulled = status_bytes(daemon.pid(), "VmRSS")?;
        let walk = if i % walk_every.max(1) == 0 {
            drop_caches()?;
            let (count, cold) = stat_tree(&mount)?;
            let (_, hot) = stat_tree(&mount)?;
            report.walked_entries = count;
            Some((cold, hot))
        } else {
            None
        };
        report.samples.push(ImageSample {
            rss_pulled,
            rss_walked: status_bytes(daemon.pid(), "VmRSS")?,
            pull,
            walk,
        });
        mounts.push(mount);
        if (i + 1) % 10 == 0 || i + 1 == images.len() {
            eprintln!(
                "memory: {}: {} images, VmRSS {:.1} MiB",
                contender.label,
                i + 1,
                report.samples[i].rss_walked as f64 / (1 << 20) as f64
            );
        }
    }
    ensure!(
        report.walked_entries as usize >= entries.saturating_sub(1),
        "walked {} entries of {entries}",
        report.walked_entries
    );
    report.rss_all = status_bytes(daemon.pid(), "VmRSS")?;
    report.hwm = status_bytes(daemon.pid(), "VmHWM")?;
    report.metadata_all = metadata_bytes(contender, &daemon);

    // Idle: the idle period, then a sweep (every quarter of it, at least every second).
    let idle = contender.idle_seconds.unwrap_or(20);
    report.idle_wait = Duration::from_secs(idle + (idle / 4).max(1) + 2);
    std::thread::sleep(report.idle_wait);
    report.rss_idle = status_bytes(daemon.pid(), "VmRSS")?;
    report.metadata_idle = metadata_bytes(contender, &daemon);

    for mount in mounts.iter().take(5) {
        report.lookup_after_idle.push(first_lookup(mount)?);
        report.lookup_loaded.push(first_lookup(mount)?);
    }
    if let Some(scrape) = scrape(&daemon) {
        let count = scrape.sum("streamsnap_fuse_metadata_load_duration_seconds_count", &[]);
        let sum = scrape.sum("streamsnap_fuse_metadata_load_duration_seconds_sum", &[]);
        report.loads = (count > 0.0).then_some((count, sum));
    }

    for _ in 0..restarts {
        daemon.terminate(Duration::from_secs(60))?;
        let started = Instant::now();
        daemon.restart()?;
        report.restarts.push(started.elapsed());
        if let Some(scrape) = scrape(&daemon) {
            let value = scrape.sum(
                "streamsnap_snapshotter_mounts_restore_duration_seconds",
                &[],
            );
            if value > 0.0 {
                report.restore_metric.push(value);
            }
        }
        report
            .lookup_after_restart
            .push(first_lookup(mounts.last().expect("an image"))?);
    }
    report.rss_after_restart = status_bytes(daemon.pid(), "VmRSS")?;
    drop(containerd);
    drop(daemon);
    Ok(report)
}
