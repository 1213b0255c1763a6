//! Fleet starts (issue 16): N nodes, each its own `streamsnap-snapshotterd` (own root and chunk
//! cache) and its own containerd, start the same image at the same instant. The origin registry
//! sits behind a shaped link (1 Gbit/s, 80 ms RTT by default: the registry's egress, shared by
//! every node and by the mirror); the zone's pull-through mirror (the Debian `docker-registry`
//! in proxy mode, whose upstream is the origin through that same link) behind a fast local link.
//!
//! Variants, each with and without the image's start-up profile: one node alone (the "one
//! node's egress" the others are compared with), the fleet without a mirror, the fleet through a
//! cold mirror (fresh, empty), the same with `[fetch] mirror_max_skip_bytes = 0` (never read
//! through the mirror's whole-blob answer), the fleet through a warmed mirror (fresh, then
//! warmed the way a deployment can: a one-byte range GET per data blob, e.g. from the push
//! webhook, and a wait until the mirror stored them; what the warm-up cost the origin is
//! reported on its own), the fleet through a cold range-caching mirror instead (nginx's slice
//! cache, `streamsnap_e2e::nginx`: 1 MiB slices fetched on demand, concurrent misses of a slice
//! go upstream once; its upstream is the origin through the same shaped link, the nodes reach
//! it on the same fast local link as the registry mirror).
//! Every run has fresh nodes and a fresh mirror; rounds interleave the variants.
//!
//! Figures: time to ready per node (from the common start to the container's "ready", the lazy
//! pull included), median and worst over the nodes; registry egress (bytes the origin's link
//! carried to its clients, nodes and mirror; for the cold mirror until it stored what it was
//! asked for); the mirror hit ratio (chunk bytes the mirror served as `206` over all chunk bytes
//! the nodes received as `206`, from the registries' access logs); the machine's CPU busy share
//! during the start (the nodes share its cores). Then a model on paper for a large fleet, fed
//! with the measured figures. Results: docs/benchmarks.md.

mod mirror;
mod node;
mod report;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, ensure};
use streamsnap_e2e::demo_image::{DemoShape, demo_image};
use streamsnap_e2e::image::OciLayout;
use streamsnap_e2e::nginx::SliceCacheOptions;
use streamsnap_e2e::{
    LinkShape, Registry, STREAMING_NODE_TOOLS, ShapingProxy, SnapshotterdOptions,
    require_root_tools, skopeo_push, workspace_bin,
};

use self::mirror::{Mirror, SliceMirror, access_log, chunk_bytes, data_blobs, slice_chunk_bytes};
use self::node::{start_nodes, start_together, teardown};
use self::report::{FleetRun, Results};

const REPO: &str = "bench/fleet";
const TAG: &str = "v1";
/// The daemon's cache settings: its documented defaults.
const CACHE_MAX_BYTES: u64 = 10 << 30;
const CACHE_MEMORY_BYTES: u64 = 64 << 20;
/// The image: busybox and an application layer of 3,000 Python-like modules and four 64 MiB
/// incompressible model files.
const SHAPE: DemoShape = DemoShape {
    source_files: 3000,
    large_files: 4,
    large_file_size: 64 << 20,
};
/// The start: its config, the modules of eight packages (800 files, one after another) and
/// parts of two model files, then "ready".
const WORKLOAD: &[&str] = &[
    "sh",
    "-c",
    "cat /app/config/settings.ini /app/lib/pkg00[0-7]/*.py > /dev/null && head -c 16777216 \
     /app/models/weights-0.bin > /dev/null && head -c 8388608 /app/models/weights-2.bin > \
     /dev/null && echo ready",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes starting the image at once.
    #[arg(long, default_value_t = 8)]
    pub nodes: usize,
    /// Rounds of every variant.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The origin's link: bandwidth in Mbit/s (each direction, shared by all its clients).
    #[arg(long, default_value_t = 1000.0)]
    pub mbit: f64,
    /// The origin's link: round-trip time in milliseconds.
    #[arg(long, default_value_t = 80.0)]
    pub rtt_ms: f64,
    /// The mirror's local link: bandwidth in Mbit/s.
    #[arg(long, default_value_t = 10000.0)]
    pub mirror_mbit: f64,
    /// The mirror's local link: round-trip time in milliseconds.
    #[arg(long, default_value_t = 0.5)]
    pub mirror_rtt_ms: f64,
    /// The slice cache's slice size (nginx syntax: `1m`, `256k`, `4m`).
    #[arg(long, default_value = "1m")]
    pub slice: String,
    /// Which start-up profile settings to measure: `with`, `without` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "with,without")]
    pub profiles: Vec<ProfileSetting>,
    /// Variants to measure (comma-separated); `single` is the baseline the ratios need.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,none,cold,cold-skip0,warm,slice"
    )]
    pub variants: Vec<Variant>,
    /// The paper model: nodes, and zones (one mirror each).
    #[arg(long, default_value_t = 1000)]
    pub model_nodes: u64,
    #[arg(long, default_value_t = 10)]
    pub model_zones: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ProfileSetting {
    With,
    Without,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Variant {
    /// One node, no mirror.
    Single,
    /// The fleet, no mirror.
    None,
    /// The fleet through a fresh (cold) mirror.
    Cold,
    /// The same with `[fetch] mirror_max_skip_bytes = 0`: a node never reads through a
    /// whole-blob answer of the mirror, it goes to the origin at once.
    ColdSkip0,
    /// The fleet through a fresh mirror warmed before the start.
    Warm,
    /// The fleet through a fresh (cold) range-caching mirror: nginx's slice cache.
    Slice,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Self::Single => "one node, no mirror",
            Self::None => "fleet, no mirror",
            Self::Cold => "fleet, cold mirror",
            Self::ColdSkip0 => "fleet, cold mirror, skip 0",
            Self::Warm => "fleet, warmed mirror",
            Self::Slice => "fleet, slice-cache mirror (nginx)",
        }
    }

    fn mirrored(self) -> bool {
        self.registry_mirror() || self == Self::Slice
    }

    /// Through the proxy-mode docker-registry.
    fn registry_mirror(self) -> bool {
        matches!(self, Self::Cold | Self::ColdSkip0 | Self::Warm)
    }
}

/// What every run shares: the origin, its link, the image.
struct Rig {
    /// Field order is drop order: the link before the registry behind it.
    link: ShapingProxy,
    origin: Registry,
    /// `LINK/bench/fleet:v1`: the reference nodes pull.
    image: String,
    blobs: BTreeSet<String>,
    mirror_shape: LinkShape,
    nodes: usize,
    slice: SliceCacheOptions,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut tools = [STREAMING_NODE_TOOLS, &["busybox"]].concat();
    if args.variants.contains(&Variant::Slice) {
        tools.push("nginx");
    }
    require_root_tools(&tools)?;
    let streamsnap = workspace_bin("streamsnap")?;
    workspace_bin("streamsnap-snapshotterd")?;
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.nodes >= 2, "--nodes must be at least 2");
    let started = Instant::now();
    let shape = LinkShape::mbit(args.mbit, args.rtt_ms);
    let mirror_shape = LinkShape::mbit(args.mirror_mbit, args.mirror_rtt_ms);

    let origin = Registry::start()?;
    let spec = demo_image(SHAPE)?;
    let mut layout = OciLayout::new()?;
    let written = layout.write_image(&spec, TAG)?;
    let direct = format!("{}/{REPO}:{TAG}", origin.addr());
    skopeo_push(layout.path(), TAG, &direct)?;
    streamsnap_e2e::run(Command::new(&streamsnap).args([
        "artifact-streaming",
        "create",
        "--image",
        &direct,
    ]))?;
    let manifest = written.manifest.digest.to_string();
    let blobs = data_blobs(&origin.addr(), REPO, &manifest)?;
    let compressed: u64 = written.layers.iter().map(|l| l.size).sum();
    let data_bytes = blob_sizes(&origin.addr(), &blobs)?;
    eprintln!(
        "image: {:.0} MB compressed, {} data blobs of {:.0} MB; built, pushed and converted in \
         {:.0} s",
        compressed as f64 / 1e6,
        blobs.len(),
        data_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    if args.profiles.contains(&ProfileSetting::With) {
        record_profile(&streamsnap, &direct)?;
    }

    let link = ShapingProxy::start(&origin.addr(), shape)?;
    let rig = Rig {
        image: format!("{}/{REPO}:{TAG}", link.addr()),
        link,
        origin,
        blobs,
        mirror_shape,
        nodes: args.nodes,
        slice: SliceCacheOptions {
            slice: args.slice.clone(),
            ..SliceCacheOptions::default()
        },
    };
    let mut results = Results::new(&args, compressed, data_bytes);
    for round in 0..args.runs {
        for &profile in &args.profiles {
            for &variant in &args.variants {
                let t = Instant::now();
                let run = fleet_run(&rig, variant, profile, round)
                    .with_context(|| format!("{} ({profile:?} profile)", variant.label()))?;
                eprintln!(
                    "round {round}, {:?} profile, {}: {} (run took {:.0} s)",
                    profile,
                    variant.label(),
                    run.one_line(),
                    t.elapsed().as_secs_f64()
                );
                results.push(profile, variant, run);
            }
        }
    }
    results.elapsed_s = started.elapsed().as_secs_f64();
    results.print();
    Ok(())
}

/// The compressed bytes of the data blobs (HEAD of each at the origin).
fn blob_sizes(addr: &str, blobs: &BTreeSet<String>) -> anyhow::Result<u64> {
    let mut total = 0;
    for digest in blobs {
        let r = streamsnap_e2e::http::request(
            addr,
            "HEAD",
            &format!("/v2/{REPO}/blobs/{digest}"),
            &[],
        )?;
        total += r
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no Content-Length for {digest}"))?;
    }
    Ok(total)
}

/// The daemon config of the measured nodes: the documented defaults, metrics on, the profile's
/// prefetch on or off, `mirror` as the origin's mirror.
fn daemon_options(origin: &str, mirror: Option<&str>, prefetch: bool) -> SnapshotterdOptions {
    SnapshotterdOptions {
        cache_max_bytes: CACHE_MAX_BYTES,
        cache_memory_bytes: CACHE_MEMORY_BYTES,
        prefetch_profile: prefetch,
        extra_config: mirror
            .map(|m| format!("[registry.hosts.\"{origin}\"]\nmirrors = [\"{m}\"]\n"))
            .unwrap_or_default(),
        ..SnapshotterdOptions::default()
    }
    .with_metrics()
}

/// Runs the start once on a node of its own against the origin directly and pushes what its
/// daemon recorded as the image's start-up profile (as a user would after a first start).
fn record_profile(streamsnap: &std::path::Path, direct: &str) -> anyhow::Result<()> {
    let host = direct.split('/').next().context("a host")?;
    let nodes = start_nodes(1, &daemon_options(host, None, false), None)?;
    start_together(&nodes, direct, WORKLOAD, "profile")?;
    let profile = tempfile::Builder::new()
        .prefix("ss-fleet-profile-")
        .tempfile_in("/tmp")?;
    std::fs::write(profile.path(), nodes[0].daemon.get("/debug/profile")?)?;
    teardown(nodes);
    let pushed = streamsnap_e2e::run(Command::new(streamsnap).args([
        "artifact-streaming",
        "profile",
        "--image",
        direct,
        "--file",
        profile.path().to_str().context("temp path")?,
    ]))?;
    eprintln!("{}", String::from_utf8_lossy(&pushed.stdout).trim());
    Ok(())
}

/// One start of the variant: fresh nodes (and a fresh mirror), measured, torn down.
fn fleet_run(
    rig: &Rig,
    variant: Variant,
    profile: ProfileSetting,
    round: usize,
) -> anyhow::Result<FleetRun> {
    let n = if variant == Variant::Single {
        1
    } else {
        rig.nodes
    };
    let mut run = FleetRun::default();
    let mirror = if variant.registry_mirror() {
        Some(Mirror::start(
            &format!("http://{}", rig.link.addr()),
            rig.mirror_shape,
        )?)
    } else {
        None
    };
    let slice = if variant == Variant::Slice {
        Some(SliceMirror::start(
            &rig.link.addr(),
            &rig.slice,
            rig.mirror_shape,
        )?)
    } else {
        None
    };
    if let (Variant::Warm, Some(mirror)) = (variant, &mirror) {
        let before = rig.link.downstream_bytes();
        let t = Instant::now();
        mirror.prefill(REPO, &rig.blobs)?;
        run.warmup_s = t.elapsed().as_secs_f64();
        run.warmup_egress = rig.link.downstream_bytes() - before;
    }
    let mirror_addr = match (&mirror, &slice) {
        (Some(m), _) => Some(m.link.addr()),
        (None, Some(s)) => Some(s.link.addr()),
        (None, None) => None,
    };
    let options = daemon_options(
        &rig.link.addr(),
        mirror_addr.as_deref(),
        profile == ProfileSetting::With,
    );
    let fetch = (variant == Variant::ColdSkip0).then_some("mirror_max_skip_bytes = 0");
    let nodes = start_nodes(n, &options, fetch)?;
    let origin_mark = access_log(&rig.origin)?.len();
    let mirror_mark = match (&mirror, &slice) {
        (Some(m), _) => access_log(&m.registry)?.len(),
        (None, Some(s)) => s.cache.access_log()?.len(),
        (None, None) => 0,
    };
    let egress0 = rig.link.downstream_bytes();
    let mirror0 = match (&mirror, &slice) {
        (Some(m), _) => m.link.downstream_bytes(),
        (None, Some(s)) => s.link.downstream_bytes(),
        (None, None) => 0,
    };
    let id = format!("r{round}-{variant:?}-{profile:?}").to_lowercase();
    run.load = load_average()?;
    let cpu0 = cpu_times()?;
    let starts = start_together(&nodes, &rig.image, WORKLOAD, &id);
    let cpu1 = cpu_times()?;
    run.cpu_busy = (cpu1.0 - cpu0.0) as f64 / (cpu1.1 - cpu0.1).max(1) as f64;
    let starts = match starts {
        Ok(s) => s,
        Err(e) => {
            for (i, node) in nodes.iter().enumerate() {
                eprintln!(
                    "--- node {i} daemon log tail ---\n{}",
                    node.daemon.log_tail(30)
                );
            }
            return Err(e);
        }
    };
    run.egress_start = rig.link.downstream_bytes() - egress0;
    if let Some(m) = &mirror {
        run.mirror_link_bytes = m.link.downstream_bytes() - mirror0;
        // The fill the start set off runs on: it is part of what the start cost the origin.
        let asked: BTreeSet<String> = access_log(&m.registry)?
            .iter()
            .filter_map(|e| e.uri.rsplit_once("/blobs/").map(|(_, d)| d.to_owned()))
            .filter(|d| rig.blobs.contains(d))
            .collect();
        let t = Instant::now();
        for digest in &asked {
            m.wait_stored(REPO, digest)?;
        }
        run.fill_wait_s = t.elapsed().as_secs_f64();
    }
    // The slice cache fetches what it is asked for while it answers: nothing runs on.
    if let Some(s) = &slice {
        run.mirror_link_bytes = s.link.downstream_bytes() - mirror0;
    }
    run.egress_total = rig.link.downstream_bytes() - egress0;
    let origin_log = access_log(&rig.origin)?;
    run.origin = chunk_bytes(&origin_log[origin_mark.min(origin_log.len())..], &rig.blobs);
    if let Some(m) = &mirror {
        let log = access_log(&m.registry)?;
        run.mirror = chunk_bytes(&log[mirror_mark.min(log.len())..], &rig.blobs);
    }
    if let Some(s) = &slice {
        let log = s.cache.access_log()?;
        (run.mirror, run.cache_hit_bytes) =
            slice_chunk_bytes(&log[mirror_mark.min(log.len())..], &rig.blobs);
    }
    run.nodes = starts;
    teardown(nodes);
    drop(mirror);
    drop(slice);
    Ok(run)
}

/// The machine's 1-minute load average (other programs on the machine count too).
fn load_average() -> anyhow::Result<f64> {
    std::fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("parsing /proc/loadavg")
}

/// The machine's (busy, total) CPU time so far, in clock ticks over all cores.
fn cpu_times() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(fields.len() >= 5, "short cpu line in /proc/stat");
    let total: u64 = fields.iter().sum();
    // idle and iowait
    Ok((total - fields[3] - fields[4], total))
}
