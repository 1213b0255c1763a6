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

/// What one image cost.
#[derive(Clone, Copy, Debug)]
pub struct ImageSample {
    /// VmRSS after the pull (the layer mounted, nothing read yet).
    pub rss_pulled: u64,
    /// VmRSS after the walks (every entry looked up and stat'ed).
    pub rss_walked: u64,
    pub pull: Duration,
}

#[derive(Debug, Default)]
pub struct NodeReport {
    pub label: String,
    pub images: usize,
    /// Entries found by a walk of one layer.
    pub walked_entries: u64,
    pub rss_start: u64,
    pub samples: Vec<ImageSample>,
    pub rss_all: u64,
    pub hwm: u64,
    pub metadata_all: Option<f64>,
    /// lstat of every entry of a layer, the kernel's caches dropped, then again (hot).
    pub cold: Vec<Duration>,
    pub hot: Vec<Duration>,
    pub idle_wait: Duration,
    pub rss_idle: u64,
    pub metadata_idle: Option<f64>,
    /// A lookup of a name the kernel has not cached, in a layer whose metadata was dropped for
    /// idleness: with the index file in the page cache, and with the caches dropped; and in a
    /// layer whose metadata is loaded.
    pub lookup_after_idle: Vec<Duration>,
    pub lookup_after_idle_cold: Vec<Duration>,
    pub lookup_loaded: Vec<Duration>,
    /// `streamsnap_fuse_metadata_load_duration_seconds`: (count, sum) before the restarts.
    pub loads: Option<(f64, f64)>,
    /// From SIGTERM's end to the new daemon accepting calls, all layers served again.
    pub restarts: Vec<Duration>,
    /// The daemon's own count of the same (its `mounts_restore_duration` metric), when it has it.
    pub restore_metric: Vec<f64>,
    /// The first lookup through a layer after each restart (a name not cached).
    pub lookup_after_restart: Vec<Duration>,
    pub rss_after_restart: u64,
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

/// Time of a lookup of `name` (not cached by the kernel: it does not exist) in `mount`'s
/// directory `app`: one request to the daemon.
fn lookup(mount: &Path, name: &str) -> Duration {
    let path = mount.join("app").join(name);
    let started = Instant::now();
    let missing = std::fs::symlink_metadata(&path).is_err();
    let took = started.elapsed();
    debug_assert!(missing);
    took
}

/// A contender's daemon and containerd, and the layers it mounted.
pub struct Node {
    contender: Contender,
    daemon: Snapshotterd,
    containerd: Containerd,
    mounts: Vec<PathBuf>,
    lookups: usize,
    pub report: NodeReport,
}

impl Node {
    pub fn start(contender: &Contender, registry: &Registry) -> anyhow::Result<Self> {
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
        let report = NodeReport {
            label: contender.label.clone(),
            rss_start: status_bytes(daemon.pid(), "VmRSS")?,
            ..NodeReport::default()
        };
        Ok(Self {
            contender: contender.clone(),
            daemon,
            containerd,
            mounts: Vec::new(),
            lookups: 0,
            report,
        })
    }

    fn rss(&self) -> anyhow::Result<u64> {
        status_bytes(self.daemon.pid(), "VmRSS")
    }

    fn scrape(&self) -> Option<Scrape> {
        Scrape::fetch(self.daemon.metrics_address()?).ok()
    }

    /// `streamsnap_fuse_metadata_bytes`, for builds that have it.
    fn metadata_bytes(&self) -> Option<f64> {
        self.contender.binary.is_none().then_some(())?;
        Some(self.scrape()?.sum("streamsnap_fuse_metadata_bytes", &[]))
    }

    /// Pulls each image, then walks its layer once (cold, then hot), reading VmRSS after each.
    pub fn pull_all(&mut self, images: &[String], entries: usize) -> anyhow::Result<()> {
        eprintln!("memory: {}: {} images", self.contender.label, images.len());
        let root = self.daemon.root();
        for (i, image) in images.iter().enumerate() {
            let before = layer_mounts(&root)?;
            let pull = cri_pull(&self.containerd, image)?;
            let new: Vec<PathBuf> = layer_mounts(&root)?.difference(&before).cloned().collect();
            ensure!(
                new.len() == 1,
                "pulling {image} mounted {} layers, not 1 (did it fall back to a normal pull?); \
                 daemon log:\n{}",
                new.len(),
                self.daemon.log_tail(20)
            );
            self.mounts.extend(new);
            let rss_pulled = self.rss()?;
            self.walk(i)?;
            self.report.samples.push(ImageSample {
                rss_pulled,
                rss_walked: self.rss()?,
                pull,
            });
            if (i + 1) % 10 == 0 || i + 1 == images.len() {
                eprintln!(
                    "memory: {}: {} images, VmRSS {:.1} MiB",
                    self.contender.label,
                    i + 1,
                    self.rss()? as f64 / (1 << 20) as f64
                );
            }
        }
        ensure!(
            self.report.walked_entries as usize >= entries.saturating_sub(1),
            "walked {} entries of {entries}",
            self.report.walked_entries
        );
        self.report.images = images.len();
        self.report.rss_all = self.rss()?;
        self.report.hwm = status_bytes(self.daemon.pid(), "VmHWM")?;
        self.report.metadata_all = self.metadata_bytes();
        Ok(())
    }

    /// lstat of every entry of layer `i`, the kernel's caches dropped, then again.
    pub fn walk(&mut self, i: usize) -> anyhow::Result<()> {
        drop_caches()?;
        let (count, cold) = stat_tree(&self.mounts[i])?;
        let (_, hot) = stat_tree(&self.mounts[i])?;
        self.report.walked_entries = count;
        self.report.cold.push(cold);
        self.report.hot.push(hot);
        Ok(())
    }

    /// Forgets the walks so far (those of the pulls), keeping the ones to come.
    pub fn clear_walks(&mut self) {
        self.report.cold.clear();
        self.report.hot.clear();
    }

    fn next_lookup(&mut self, mount: usize) -> Duration {
        self.lookups += 1;
        lookup(&self.mounts[mount], &format!("absent-{}", self.lookups))
    }

    /// Waits `wait`, reads VmRSS, then times lookups in `probes` layers whose metadata was
    /// dropped meanwhile (half with the index files in the page cache, half after dropping the
    /// caches) and again with it loaded.
    pub fn idle(&mut self, wait: Duration, probes: usize) -> anyhow::Result<()> {
        self.report.idle_wait = wait;
        self.report.rss_idle = self.rss()?;
        self.report.metadata_idle = self.metadata_bytes();
        let probes = probes.min(self.mounts.len());
        let half = probes / 2;
        for i in 0..half {
            let took = self.next_lookup(i);
            self.report.lookup_after_idle.push(took);
        }
        drop_caches()?;
        for i in half..probes {
            let took = self.next_lookup(i);
            self.report.lookup_after_idle_cold.push(took);
        }
        for i in 0..probes {
            let took = self.next_lookup(i);
            self.report.lookup_loaded.push(took);
        }
        if let Some(scrape) = self.scrape() {
            let count = scrape.sum("streamsnap_fuse_metadata_load_duration_seconds_count", &[]);
            let sum = scrape.sum("streamsnap_fuse_metadata_load_duration_seconds_sum", &[]);
            self.report.loads = (count > 0.0).then_some((count, sum));
        }
        Ok(())
    }

    /// Restarts the daemon `count` times (SIGTERM, a new daemon on the same root).
    pub fn restarts(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            self.daemon.terminate(Duration::from_secs(60))?;
            let started = Instant::now();
            self.daemon.restart()?;
            self.report.restarts.push(started.elapsed());
            if let Some(scrape) = self.scrape() {
                let value = scrape.sum(
                    "streamsnap_snapshotter_mounts_restore_duration_seconds",
                    &[],
                );
                if value > 0.0 {
                    self.report.restore_metric.push(value);
                }
            }
            let last = self.mounts.len() - 1;
            let took = self.next_lookup(last);
            self.report.lookup_after_restart.push(took);
        }
        self.report.rss_after_restart = self.rss()?;
        Ok(())
    }
}
