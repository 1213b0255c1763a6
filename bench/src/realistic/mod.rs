//! Time to ready on a realistic multi-GB image (Debian bookworm, python3, the scientific Python
//! stack from PyPI, a data layer of a given size) behind a shaped link, against a full pull with
//! containerd's overlayfs snapshotter and against the physical limit. See docs/benchmarks.md
//! and `bench/run.sh`.
//!
//! Per data size: a fresh registry, the image pushed and converted, a link-shaping proxy in
//! front of it; a trace round (full pull, then the start-up on a cold and a hot page cache, the
//! bytes it brought into the page cache, warm file-system figures, and an untimed streamsnap run
//! with the kernel's readahead off for the access trace); then `runs` rounds of the
//! four contenders one after another: overlayfs full pull + run, streamsnap with an empty chunk
//! cache and no profile, streamsnap with an empty chunk cache and the profile, streamsnap with
//! the chunk cache the cold run left. What the first cold run's daemon recorded is pushed as the
//! image's start-up profile before the first cold + profile run. Every run has a fresh
//! containerd (and a fresh daemon): only the chunk cache carries over, and only into the warm
//! run.

mod access;
mod doc;
mod fsbench;
mod image;
mod report;
pub(crate) mod runner;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::container::{pull, rpull};
use streamsnap_e2e::{
    Containerd, ContainerdOptions, LinkShape, Registry, STREAMING_NODE_TOOLS, ShapingProxy,
    Snapshotterd, SnapshotterdOptions, require_root_tools, skopeo_push, workspace_bin,
};

use self::image::{BuiltImage, ImageCache, LayerInfo, WORKLOAD};
use self::report::{Calibration, Figures, RunSample, SizePoint, Trace};
use self::runner::{Scrape, drop_caches, peak_rss, residency, run_until_ready};

const GIB: u64 = 1 << 30;
/// The streamsnap daemon's cache settings: its documented defaults.
const CACHE_MAX_BYTES: u64 = 10 * GIB;
const CACHE_MEMORY_BYTES: u64 = 64 << 20;
/// Round trips on the critical path of a lazy start that knows what it will read: TCP connect,
/// manifest, referrers, artifact manifest, TOCs (in parallel), the data (in parallel).
const CRITICAL_ROUND_TRIPS: u32 = 6;
/// Start-ups on a hot page cache for the local floor.
const HOT_RUNS: usize = 3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed runs of each contender per data size.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Data layer sizes in GiB (the growth series); sizes the disk cannot hold are skipped.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub sizes_gib: Vec<u64>,
    /// Link bandwidth in Mbit/s, each direction.
    #[arg(long, default_value_t = 1000.0)]
    pub mbit: f64,
    /// Round-trip time the link adds, in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    pub rtt_ms: f64,
    /// Where the rootfs, layer blobs and OCI layout are cached between invocations.
    #[arg(long, default_value = "/var/cache/streamsnap-bench")]
    pub cache_dir: PathBuf,
    /// Data layer blobs up to this size (GiB) stay cached; larger ones are written per run.
    #[arg(long, default_value_t = 1)]
    pub keep_data_gib: u64,
    /// Keep the registry's storage in a tmpfs (RAM) instead of on disk where memory allows: the
    /// disk then only has to hold containerd's copy of the image. Points whose registry does
    /// not fit in memory keep it on disk.
    #[arg(long)]
    pub registry_tmpfs: bool,
    /// The artifact kind the streamsnap contenders run from: chunked (the default) or index
    /// (over the original gzip layers; issue 18). Prints the artifact's share of the image.
    #[arg(long, default_value = "chunked", value_parser = ["chunked", "index"])]
    pub kind: String,
    /// Largest uncompressed chunk of the chunked kind (`create --chunk-size`; its default
    /// when unset): smaller chunks fetch fewer bytes the start never reads, in more requests.
    #[arg(long)]
    pub chunk_size: Option<u64>,
    /// Push the start-up profile recorded by the access-trace run (kernel readahead off: only
    /// the chunks the start touched) instead of the first cold run's (4 MiB of readahead: the
    /// neighbours readahead brought along too).
    #[arg(long)]
    pub profile_without_readahead: bool,
    /// Kernel readahead of the cold + profile runs' mounts, in bytes (the daemon's default
    /// when unset).
    #[arg(long)]
    pub profiled_readahead_bytes: Option<u64>,
    /// Skip the sequential read and stat figures.
    #[arg(long)]
    pub skip_fs: bool,
    /// Optional kernel FUSE features every daemon leaves off (`[fuse] kernel_features_off`,
    /// e.g. `passthrough,zero_message_opendir`), to compare with the default.
    #[arg(long, value_delimiter = ',')]
    pub kernel_features_off: Vec<String>,
    /// A `[fetch]` setting every daemon gets, as `key=value` in TOML (repeatable; e.g.
    /// `prefetch_in_flight_bytes=8388608`), to compare with the default.
    #[arg(long = "fetch-config", value_name = "KEY=VALUE")]
    pub fetch_config: Vec<String>,
    /// A `[fuse]` setting every daemon gets, as `key=value` in TOML (repeatable; e.g.
    /// `merge_layers=false`), to compare with the default.
    #[arg(long = "fuse-config", value_name = "KEY=VALUE")]
    pub fuse_config: Vec<String>,
    /// Full pulls per point (the first round always has one: it records the access trace);
    /// the streamsnap contenders still run `--runs` times. A 30 GiB full pull takes minutes.
    #[arg(long)]
    pub full_pull_runs: Option<usize>,
    /// Fill the data file with compressible bytes (512 random bytes per 4 KiB page, the rest
    /// zeros: about 7x smaller gzipped) instead of incompressible ones, so images of tens of
    /// GiB unpacked fit the registry and containerd's content store.
    #[arg(long)]
    pub compressible_data: bool,
    /// Write the results as JSON here (for bench/plot.py).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace the realistic start-up section of this Markdown file (docs/benchmarks.md).
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// The command line shown in the Markdown section.
    #[arg(long, default_value = "bash bench/run.sh")]
    pub command: String,
    /// The plot the Markdown section links to, relative to the Markdown file.
    #[arg(long)]
    pub plot: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root_tools(STREAMING_NODE_TOOLS)?;
    let streamsnap = workspace_bin("streamsnap")?;
    workspace_bin("streamsnap-snapshotterd")?;
    ensure!(args.runs >= 1, "--runs must be at least 1");
    let mut fuse_lines = toml_lines("--fuse-config", &args.fuse_config)?;
    if !args.kernel_features_off.is_empty() {
        let list: Vec<String> = args
            .kernel_features_off
            .iter()
            .map(|name| format!("{name:?}"))
            .collect();
        fuse_lines.push_str(&format!("kernel_features_off = [{}]\n", list.join(", ")));
    }
    let _ = FUSE_LINES.set(fuse_lines);
    let _ = FETCH_LINES.set(toml_lines("--fetch-config", &args.fetch_config)?);
    let shape = LinkShape::mbit(args.mbit, args.rtt_ms);
    let started = Instant::now();

    let cache = ImageCache::new(&args.cache_dir)?;
    let build = Instant::now();
    let mut software = cache.software_layers()?;
    software.push(cache.app_layer()?);
    eprintln!(
        "software layers ready in {:.0} s",
        build.elapsed().as_secs_f64()
    );

    let mut figures = Figures::new(&args, shape, software_summary(&software));
    for (n, &gib) in args.sizes_gib.iter().enumerate() {
        let fits = placement(
            &args.cache_dir,
            &software,
            gib,
            args.compressible_data,
            args.registry_tmpfs,
        )?;
        let point = match fits {
            Err(reason) => {
                eprintln!("skipping the {gib} GiB point: {reason}");
                SizePoint::skipped(gib, reason)
            }
            Ok(in_memory) => {
                let plan = PointPlan {
                    gib,
                    first: n == 0,
                    registry_in_memory: in_memory,
                };
                measure_size(&args, &cache, &software, plan, &streamsnap, shape)?
            }
        };
        figures.points.push(point);
        report::print_point(figures.points.last().expect("just pushed"));
    }
    figures.elapsed_s = started.elapsed().as_secs_f64();
    report::print_series(&figures);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.doc {
        doc::write_doc(path, &figures)?;
    }
    println!("{}", report::headline(&figures)?);
    Ok(())
}

fn software_summary(layers: &[LayerInfo]) -> Vec<(String, u64, u64, u64)> {
    layers
        .iter()
        .map(|l| (l.name.clone(), l.size, l.tar_size, l.files))
        .collect()
}

/// Where the point's registry storage goes: `Ok(true)` in a tmpfs (asked for with `tmpfs`, and
/// memory allows), `Ok(false)` on disk, `Err(why)` when the machine cannot hold the point. At
/// the peak (a full pull) the registry holds the image and its streaming form, containerd the
/// image compressed and unpacked; each about the data layer's size plus the software's.
fn placement(
    cache_dir: &Path,
    software: &[LayerInfo],
    gib: u64,
    compressible: bool,
    tmpfs: bool,
) -> anyhow::Result<Result<bool, String>> {
    let compressed: u64 = software.iter().map(|l| l.size).sum();
    let unpacked: u64 = software.iter().map(|l| l.tar_size).sum();
    let data = gib * GIB;
    let data_compressed = if compressible {
        data / 6
    } else {
        data + data / 32
    };
    let registry = 2 * compressed + 2 * data_compressed;
    let containerd = compressed + unpacked + data_compressed + data;
    let free = free_bytes(cache_dir)?.min(free_bytes(&std::env::temp_dir())?);
    let in_memory = tmpfs && mem_available()? >= registry + 4 * GIB;
    let disk_need = if in_memory {
        containerd + 3 * GIB / 2
    } else {
        containerd + registry + GIB
    };
    if free < disk_need {
        return Ok(Err(format!(
            "needs about {:.1} GB of free disk, {:.1} GB are free",
            disk_need as f64 / 1e9,
            free as f64 / 1e9
        )));
    }
    if tmpfs && !in_memory {
        eprintln!(
            "the {gib} GiB point's registry (about {:.1} GB) does not fit in memory: it stays on \
             disk",
            registry as f64 / 1e9
        );
    }
    Ok(Ok(in_memory))
}

fn mem_available() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// A tmpfs mounted on a dir; lazily unmounted on drop.
#[derive(Debug)]
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        streamsnap_e2e::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes}"))
                .arg("streamsnap-bench")
                .arg(dir),
        )?;
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = streamsnap_e2e::sys::unmount_detach(&self.0);
    }
}

fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("parsing df's output")
}

/// What one size point measures.
#[derive(Clone, Copy, Debug)]
struct PointPlan {
    gib: u64,
    /// The first point also calibrates the link and measures the file-system figures.
    first: bool,
    /// The registry's storage is a tmpfs (else the disk).
    registry_in_memory: bool,
}

fn measure_size(
    args: &Args,
    cache: &ImageCache,
    software: &[LayerInfo],
    plan: PointPlan,
    streamsnap: &Path,
    shape: LinkShape,
) -> anyhow::Result<SizePoint> {
    let PointPlan {
        gib,
        first,
        registry_in_memory,
    } = plan;
    let prepare = Instant::now();
    let data = cache.data_layer(gib * GIB, args.compressible_data)?;
    let tag = if args.compressible_data {
        format!("data-{gib}g-compressible")
    } else {
        format!("data-{gib}g")
    };
    let mut layers = software.to_vec();
    layers.push(data.clone());
    let image = cache.tag_image(&tag, layers)?;

    let registry = Registry::start()?;
    // Unmounted (lazily: the registry still runs) before the registry is dropped, which then
    // removes the empty dir.
    let storage = if registry_in_memory {
        Some(Tmpfs::mount(
            &registry.dir().join("storage"),
            2 * image.compressed_bytes() + GIB,
        )?)
    } else {
        None
    };
    let direct = format!("{}/bench/ml:{tag}", registry.addr());
    skopeo_push(&cache.layout(), &tag, &direct)?;
    if gib > args.keep_data_gib {
        cache.forget(&data);
    }
    let convert = Instant::now();
    let mut create = Command::new(streamsnap);
    create.args([
        "artifact-streaming",
        "create",
        "--image",
        &direct,
        "--kind",
        &args.kind,
    ]);
    if let Some(bytes) = args.chunk_size {
        create.arg("--chunk-size").arg(bytes.to_string());
    }
    let converted = streamsnap_e2e::run(&mut create)?;
    let convert_s = convert.elapsed().as_secs_f64();
    // The summary line says what the artifact costs the registry: "-> N streaming (KIND, P% of
    // the image)".
    eprintln!(
        "{gib} GiB point, {} kind: {}",
        args.kind,
        String::from_utf8_lossy(&converted.stdout)
            .lines()
            .next()
            .unwrap_or_default()
    );
    let proxy = ShapingProxy::start(&registry.addr(), shape)?;
    let reference = format!("{}/bench/ml:{tag}", proxy.addr());
    eprintln!(
        "{gib} GiB point: image {:.2} GB compressed, {:.2} GB unpacked, {} entries; pushed and \
         converted in {:.0} s (conversion {convert_s:.0} s)",
        image.compressed_bytes() as f64 / 1e9,
        image.unpacked_bytes() as f64 / 1e9,
        image.files(),
        prepare.elapsed().as_secs_f64()
    );
    let calibration = if first {
        Some(calibrate(&proxy, &image)?)
    } else {
        None
    };

    let mut point = SizePoint::new(gib, &image);
    point.calibration = calibration;
    point.registry_in_memory = registry_in_memory;
    let full_pulls = args.full_pull_runs.unwrap_or(args.runs).max(1);
    if full_pulls < args.runs {
        eprintln!(
            "{gib} GiB point: {full_pulls} full pull(s), {} runs of each streamsnap contender",
            args.runs
        );
    }
    let target = Target {
        args,
        proxy: &proxy,
        reference: &reference,
        direct: &direct,
        streamsnap,
        gib,
    };
    for round in 0..args.runs {
        let wall = Instant::now();
        if round >= full_pulls {
            streamsnap_rounds(&target, round, &mut point)?;
            continue;
        }
        let (overlay, containerd) = overlay_run(&proxy, &reference, &format!("o{gib}-{round}"))?;
        eprintln!(
            "  round {round}: overlayfs {:.2} s (with setup {:.0} s)",
            overlay.ready_s,
            secs(wall.elapsed())
        );
        point.overlay.push(overlay);
        if round == 0 {
            let mut trace = trace(&containerd, &reference, !args.skip_fs)?;
            trace.read_bytes = Some(access_trace_bytes(&target)?);
            point.trace = Some(trace);
            if first && !args.skip_fs {
                point.fs.overlay = Some(fsbench::overlay_side(&containerd, &reference)?);
            }
        }
        let teardown = Instant::now();
        drop(containerd);
        eprintln!(
            "  round {round}: overlayfs teardown {:.0} s",
            secs(teardown.elapsed())
        );
        streamsnap_rounds(&target, round, &mut point)?;
    }
    if first && !args.skip_fs {
        point.fs.streamsnap = Some(fsbench::streamsnap_side(&reference, &image)?);
    }
    point.derive(shape);
    point.elapsed_s = prepare.elapsed().as_secs_f64();
    eprintln!("{gib} GiB point took {:.0} s", point.elapsed_s);
    drop(proxy);
    drop(storage);
    drop(registry);
    Ok(point)
}

/// What the runs of one point go to.
struct Target<'a> {
    args: &'a Args,
    proxy: &'a ShapingProxy,
    /// The image through the shaped link, and in the registry itself.
    reference: &'a str,
    direct: &'a str,
    streamsnap: &'a Path,
    gib: u64,
}

/// One round of the three streamsnap contenders: cold (its first round records the profile and
/// pushes it, unless the access-trace run did), cold + profile, warm.
fn streamsnap_rounds(target: &Target, round: usize, point: &mut SizePoint) -> anyhow::Result<()> {
    let Target {
        args,
        proxy,
        reference,
        direct,
        streamsnap,
        gib,
    } = *target;
    let seed = tempfile::Builder::new()
        .prefix("ss-seed-")
        .tempdir_in("/tmp")?;
    // The first cold run's daemon records what the start read: pushed as the image's
    // start-up profile, it is what the cold + profile runs prefetch.
    let profile = (round == 0 && !args.profile_without_readahead)
        .then(profile_file)
        .transpose()?;
    let cold = streamsnap_run_with(
        proxy,
        reference,
        &format!("c{gib}-{round}"),
        None,
        Some(seed.path()),
        &SnapshotterdOptions {
            prefetch_profile: false,
            ..daemon_options()
        },
        profile.as_ref().map(|p| p.path()),
    )?;
    if let Some(profile) = &profile {
        push_profile(streamsnap, direct, profile.path())?;
    }
    eprintln!(
        "  round {round}: streamsnap cold {:.2} s ({:.1} MB fetched)",
        cold.ready_s,
        cold.bytes as f64 / 1e6
    );
    point.cold.push(cold);
    let mut options = SnapshotterdOptions {
        prefetch_profile: true,
        ..daemon_options()
    };
    if let Some(bytes) = args.profiled_readahead_bytes {
        options.extra_config = fuse_config(&format!("readahead_bytes = {bytes}\n"));
    }
    let profiled = streamsnap_run_with(
        proxy,
        reference,
        &format!("p{gib}-{round}"),
        None,
        None,
        &options,
        None,
    )?;
    eprintln!(
        "  round {round}: streamsnap cold with the profile {:.2} s ({:.1} MB fetched)",
        profiled.ready_s,
        profiled.bytes as f64 / 1e6
    );
    point.profiled.push(profiled);
    let warm = streamsnap_run(
        proxy,
        reference,
        &format!("w{gib}-{round}"),
        Some(seed.path()),
        None,
        false,
    )?;
    eprintln!("  round {round}: streamsnap warm {:.2} s", warm.ready_s);
    point.warm.push(warm);
    Ok(())
}

/// Checks the link: a request on a new connection, and a 64 MiB range of a layer blob.
fn calibrate(proxy: &ShapingProxy, image: &BuiltImage) -> anyhow::Result<Calibration> {
    let mut trips = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = streamsnap_e2e::http::get(&proxy.addr(), "/v2/", &[])?;
        ensure!(r.status == 200, "GET /v2/ through the proxy: {}", r.status);
        trips.push(t.elapsed().as_secs_f64());
    }
    trips.sort_by(f64::total_cmp);
    let blob = image.layers.last().context("no layers")?;
    let len = 64u64 << 20;
    let t = Instant::now();
    let r = streamsnap_e2e::http::get(
        &proxy.addr(),
        &format!("/v2/bench/ml/blobs/{}", blob.digest),
        &[("Range", &format!("bytes=0-{}", len - 1))],
    )?;
    let took = t.elapsed().as_secs_f64();
    ensure!(
        r.body.len() as u64 == len,
        "range read through the proxy got {} bytes",
        r.body.len()
    );
    Ok(Calibration {
        new_connection_request_s: trips[trips.len() / 2],
        bulk_mbit: len as f64 * 8.0 / 1e6 / took,
    })
}

/// On a containerd that pulled the image on overlayfs: with `from_disk`, the start-up on a
/// dropped page cache (and its page-cache footprint afterwards); then on a hot page cache (the
/// local floor). Dropping the caches first writes back the unpacked image, which takes long:
/// the quick configuration leaves it out.
fn trace(containerd: &Containerd, reference: &str, from_disk: bool) -> anyhow::Result<Trace> {
    let (mut cold_local_s, mut footprint) = (f64::NAN, runner::Residency::default());
    if from_disk {
        drop_caches()?;
        let t = Instant::now();
        let ready = run_until_ready(containerd, reference, "overlayfs", "trace-cold", WORKLOAD)?;
        cold_local_s = ready.duration_since(t).as_secs_f64();
        let snapshots = containerd
            .root()
            .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
        footprint = residency(&[&snapshots])?;
    }
    let mut hot = Vec::new();
    for i in 0..HOT_RUNS {
        let t = Instant::now();
        let ready = run_until_ready(
            containerd,
            reference,
            "overlayfs",
            &format!("trace-hot{i}"),
            WORKLOAD,
        )?;
        hot.push(ready.duration_since(t).as_secs_f64());
    }
    let trace = Trace {
        footprint_bytes: footprint.bytes,
        footprint_files: footprint.files,
        cold_local_s,
        hot_local_s: hot,
        critical_round_trips: CRITICAL_ROUND_TRIPS,
        read_bytes: None,
    };
    eprintln!(
        "  local start-up: {:.2} s from disk, {:.2} s from memory; page-cache footprint {:.1} MB \
         in {} files",
        cold_local_s,
        report::median(&trace.hot_local_s),
        trace.footprint_bytes as f64 / 1e6,
        trace.footprint_files,
    );
    Ok(trace)
}

/// A full pull and the start-up; also returns the containerd (with the image pulled).
fn overlay_run(
    proxy: &ShapingProxy,
    reference: &str,
    id: &str,
) -> anyhow::Result<(RunSample, Containerd)> {
    let containerd = Containerd::start(ContainerdOptions::default())?;
    let before = proxy.downstream_bytes();
    let requests = proxy.responses();
    let t0 = Instant::now();
    pull(&containerd, reference, "overlayfs", true)?;
    let pulled = t0.elapsed();
    let ready = run_until_ready(&containerd, reference, "overlayfs", id, WORKLOAD)?;
    let mut sample = RunSample::timed(t0, pulled, ready);
    sample.bytes = proxy.downstream_bytes() - before;
    sample.requests = proxy.responses() - requests;
    sample.containerd_rss = peak_rss(containerd.pid()).unwrap_or(0);
    Ok((sample, containerd))
}

/// The bytes the start-up reads through FUSE when the kernel reads only the pages asked for: a
/// cold streamsnap run (untimed) with `[fuse] readahead_bytes = 0`.
fn access_trace_bytes(target: &Target) -> anyhow::Result<u64> {
    let profile = target
        .args
        .profile_without_readahead
        .then(profile_file)
        .transpose()?;
    let run = streamsnap_run_with(
        target.proxy,
        target.reference,
        &format!("t{}", target.gib),
        None,
        None,
        &SnapshotterdOptions {
            extra_config: fuse_config("readahead_bytes = 0\n"),
            prefetch_profile: false,
            ..daemon_options()
        },
        profile.as_ref().map(|p| p.path()),
    )?;
    let bytes = run
        .daemon
        .as_ref()
        .map(|d| d.fuse_read_bytes as u64)
        .context("the trace run has no daemon figures")?;
    eprintln!(
        "  access trace: the start-up read {:.1} MB through FUSE with the kernel's readahead off \
         ({:.1} MB fetched)",
        bytes as f64 / 1e6,
        run.bytes as f64 / 1e6
    );
    if let Some(profile) = &profile {
        push_profile(target.streamsnap, target.direct, profile.path())?;
    }
    Ok(bytes)
}

/// A temporary file for the start-up profile a run records.
fn profile_file() -> anyhow::Result<tempfile::NamedTempFile> {
    Ok(tempfile::Builder::new()
        .prefix("ss-profile-")
        .tempfile_in("/tmp")?)
}

/// Pushes the start-up profile a run saved (`profile`) for the image (`direct`: in the registry
/// itself, not through the shaped link), as a user would after a first start.
fn push_profile(streamsnap: &Path, direct: &str, profile: &Path) -> anyhow::Result<()> {
    let pushed = streamsnap_e2e::run(Command::new(streamsnap).args([
        "artifact-streaming",
        "profile",
        "--image",
        direct,
        "--file",
        profile.to_str().context("temp path")?,
    ]))?;
    eprintln!("  {}", String::from_utf8_lossy(&pushed.stdout).trim());
    Ok(())
}

/// A streamsnap run with a fresh daemon; with `seed`, its chunk cache starts as a hard-linked
/// copy of that dir; with `keep`, the chunk cache is hard-linked there afterwards. `prefetch`:
/// the daemon fetches what the image's start-up profile lists as it mounts the layers.
fn streamsnap_run(
    proxy: &ShapingProxy,
    reference: &str,
    id: &str,
    seed: Option<&Path>,
    keep: Option<&Path>,
    prefetch: bool,
) -> anyhow::Result<RunSample> {
    let options = SnapshotterdOptions {
        prefetch_profile: prefetch,
        ..daemon_options()
    };
    streamsnap_run_with(proxy, reference, id, seed, keep, &options, None)
}

/// The daemon of the measured runs: the documented defaults (the harness's own cache sizes are
/// for tests), metrics on.
pub(super) fn daemon_options() -> SnapshotterdOptions {
    SnapshotterdOptions {
        cache_max_bytes: CACHE_MAX_BYTES,
        cache_memory_bytes: CACHE_MEMORY_BYTES,
        extra_config: fuse_config(""),
        fetch_lines: FETCH_LINES.get().cloned().unwrap_or_default(),
        ..SnapshotterdOptions::default()
    }
    .with_metrics()
}

/// `key = value` lines of a config section from `settings` given as `KEY=VALUE` to `flag`.
fn toml_lines(flag: &str, settings: &[String]) -> anyhow::Result<String> {
    let mut lines = String::new();
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("{flag} {setting:?}: expected KEY=VALUE"))?;
        lines.push_str(&format!("{} = {}\n", key.trim(), value.trim()));
    }
    Ok(lines)
}

/// `[fuse]` lines every daemon of this invocation gets (`--fuse-config`,
/// `--kernel-features-off`).
static FUSE_LINES: OnceLock<String> = OnceLock::new();

/// `[fetch]` lines every daemon of this invocation gets (`--fetch-config`).
static FETCH_LINES: OnceLock<String> = OnceLock::new();

/// The daemon's `[fuse]` section: this invocation's lines and `lines`.
fn fuse_config(lines: &str) -> String {
    let common = FUSE_LINES.get().map_or("", String::as_str);
    format!("[fuse]\n{common}{lines}")
}

/// [`streamsnap_run`] with a given daemon config; with `save_profile`, what the daemon recorded
/// of the start-up (`/debug/profile`) is written there.
fn streamsnap_run_with(
    proxy: &ShapingProxy,
    reference: &str,
    id: &str,
    seed: Option<&Path>,
    keep: Option<&Path>,
    options: &SnapshotterdOptions,
    save_profile: Option<&Path>,
) -> anyhow::Result<RunSample> {
    let setup = Instant::now();
    let mut daemon = Snapshotterd::start(options.clone())?;
    if let Some(seed) = seed {
        // The cache is read when the daemon starts: stop it, fill the cache, start it again.
        daemon.kill9()?;
        copy_tree_linked(seed, &daemon.cache_dir())?;
        daemon.restart()?;
    }
    let containerd = Containerd::start(
        ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
    )?;
    let metrics = daemon
        .metrics_address()
        .context("metrics are on")?
        .to_owned();
    let before = proxy.downstream_bytes();
    let requests = proxy.responses();
    proxy.take_requests();
    proxy.set_request_log(true);
    let t0 = Instant::now();
    rpull(&containerd, reference, "streamsnap", true)?;
    let pulled = t0.elapsed();
    let ready = run_until_ready(&containerd, reference, "streamsnap", id, WORKLOAD)?;
    proxy.set_request_log(false);
    let mut sample = RunSample::timed(t0, pulled, ready);
    sample.access = Some(access::AccessTrace::of(&proxy.take_requests()));
    sample.bytes = proxy.downstream_bytes() - before;
    sample.requests = proxy.responses() - requests;
    sample.daemon_rss = Some(peak_rss(daemon.pid())?);
    sample.containerd_rss = peak_rss(containerd.pid()).unwrap_or(0);
    sample.daemon = Some(report::DaemonFigures::from_scrape(&Scrape::fetch(
        &metrics,
    )?));
    if let Some(path) = save_profile {
        std::fs::write(path, daemon.get("/debug/profile")?)?;
    }
    let teardown = Instant::now();
    drop(containerd);
    if let Some(keep) = keep {
        copy_tree_linked(&daemon.cache_dir(), keep)?;
    }
    drop(daemon);
    eprintln!(
        "  {id}: setup {:.1} s, teardown {:.1} s",
        secs(t0.duration_since(setup)),
        secs(teardown.elapsed())
    );
    Ok(sample)
}

/// `cp -al FROM/. TO/`: the same files under another dir (same file system).
fn copy_tree_linked(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    streamsnap_e2e::run(
        Command::new("cp")
            .arg("-al")
            .arg(format!("{}/.", from.display()))
            .arg(format!("{}/", to.display())),
    )?;
    Ok(())
}

/// Seconds of a duration, for the figures.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
