//! The figures of the realistic start-up benchmark: what is measured, the derived limits and
//! ratios, and how they are printed, written as JSON and as the Markdown section of
//! docs/benchmarks.md.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use streamsnap_e2e::LinkShape;

use super::access::AccessTrace;
use super::image::BuiltImage;
use super::runner::Scrape;
use super::{Args, secs};

/// Everything one invocation measured.
#[derive(Debug, Serialize)]
pub struct Figures {
    pub date: String,
    pub machine: String,
    pub command: String,
    pub runs: usize,
    /// Full pulls per point (`--full-pull-runs`; the runs otherwise).
    pub full_pull_runs: usize,
    /// The data file was compressible (`--compressible-data`).
    pub compressible_data: bool,
    pub link_mbit: f64,
    pub rtt_ms: f64,
    /// name, compressed bytes, unpacked (tar) bytes, entries of each software layer.
    pub software_layers: Vec<(String, u64, u64, u64)>,
    pub points: Vec<SizePoint>,
    pub plot: Option<String>,
    pub elapsed_s: f64,
}

impl Figures {
    pub fn new(args: &Args, shape: LinkShape, software: Vec<(String, u64, u64, u64)>) -> Self {
        Self {
            date: today(),
            machine: machine(),
            command: args.command.clone(),
            runs: args.runs,
            full_pull_runs: args.full_pull_runs.unwrap_or(args.runs).clamp(1, args.runs),
            compressible_data: args.compressible_data,
            link_mbit: shape.bytes_per_second as f64 * 8.0 / 1e6,
            rtt_ms: shape.rtt.as_secs_f64() * 1e3,
            software_layers: software,
            points: Vec::new(),
            plot: args.plot.clone(),
            elapsed_s: 0.0,
        }
    }
}

/// One data size of the growth series.
#[derive(Debug, Default, Serialize)]
pub struct SizePoint {
    pub data_gib: u64,
    pub skipped: Option<String>,
    pub compressed_bytes: u64,
    pub unpacked_bytes: u64,
    pub entries: u64,
    /// The registry's storage was a tmpfs (else the disk).
    pub registry_in_memory: bool,
    pub calibration: Option<Calibration>,
    pub trace: Option<Trace>,
    pub limit: Option<Limit>,
    pub overlay: Vec<RunSample>,
    pub cold: Vec<RunSample>,
    /// Cold cache, with the start-up profile the trace run recorded pushed to the registry.
    pub profiled: Vec<RunSample>,
    pub warm: Vec<RunSample>,
    pub fs: FsFigures,
    /// Wall time of the whole point (image, push, conversion, every run).
    pub elapsed_s: f64,
}

impl SizePoint {
    pub fn new(gib: u64, image: &BuiltImage) -> Self {
        Self {
            data_gib: gib,
            compressed_bytes: image.compressed_bytes(),
            unpacked_bytes: image.unpacked_bytes(),
            entries: image.files(),
            ..Self::default()
        }
    }

    pub fn skipped(gib: u64, reason: String) -> Self {
        Self {
            data_gib: gib,
            skipped: Some(reason),
            ..Self::default()
        }
    }

    pub(super) fn measured(&self) -> bool {
        self.skipped.is_none() && !self.cold.is_empty()
    }

    /// Fills [`Self::limit`] from the runs and the trace.
    pub fn derive(&mut self, shape: LinkShape) {
        let Some(trace) = &self.trace else { return };
        let read_bytes = trace.read_bytes.map_or_else(
            || daemon_field(&self.cold, |d| d.fuse_read_bytes),
            |b| b as f64,
        );
        if !read_bytes.is_finite() {
            return;
        }
        let network_s = secs(shape.transfer_time(read_bytes as u64))
            + secs(shape.rtt) * f64::from(trace.critical_round_trips);
        let local_s = median(&trace.hot_local_s);
        self.limit = Some(Limit {
            read_bytes: read_bytes as u64,
            network_s,
            local_s,
            limit_s: network_s.max(local_s),
            full_pull_s: secs(shape.transfer_time(self.compressed_bytes)),
        });
    }

    pub(super) fn limit_s(&self) -> f64 {
        self.limit.as_ref().map_or(f64::NAN, |l| l.limit_s)
    }
}

/// The physical limit of time to ready, and what it is made of.
#[derive(Debug, Serialize)]
pub struct Limit {
    /// What the start-up read through FUSE: from the trace run with the kernel's readahead off
    /// (older results: the median over the cold runs, readahead included).
    pub read_bytes: u64,
    /// `read_bytes` at the link's bandwidth, plus the round trips on the critical path.
    pub network_s: f64,
    /// The start-up with the image local and in the page cache.
    pub local_s: f64,
    /// Neither floor can be beaten, and a perfect prefetch overlaps them: their maximum.
    pub limit_s: f64,
    /// The full pull's floor: every compressed byte at the link's bandwidth.
    pub full_pull_s: f64,
}

/// What the link measured like.
#[derive(Debug, Serialize)]
pub struct Calibration {
    /// `GET /v2/` on a new connection (2 round trips expected).
    pub new_connection_request_s: f64,
    /// A 64 MiB range read.
    pub bulk_mbit: f64,
}

/// The start-up with the image local (after a full pull on overlayfs).
#[derive(Debug, Serialize)]
pub struct Trace {
    /// Bytes of the image's files in the page cache after the start-up ran on a dropped cache
    /// (inflated by the block device's readahead).
    pub footprint_bytes: u64,
    pub footprint_files: u64,
    /// Time to ready with the image on local disk, page cache dropped (NaN when not measured).
    pub cold_local_s: f64,
    /// Time to ready with the image local and in the page cache.
    pub hot_local_s: Vec<f64>,
    pub critical_round_trips: u32,
    /// Bytes the start-up read through FUSE in a streamsnap run with the kernel's readahead
    /// off (only the pages asked for): the access trace the network floor counts.
    pub read_bytes: Option<u64>,
}

/// One timed run of a contender.
#[derive(Debug, Default, Serialize)]
pub struct RunSample {
    /// Pull start to the container printing "ready".
    pub ready_s: f64,
    /// Pull start to the pull command's exit.
    pub pull_s: f64,
    /// Bytes the link delivered to the node (headers included).
    pub bytes: u64,
    /// HTTP responses the link delivered.
    pub requests: u64,
    pub daemon_rss: Option<u64>,
    pub containerd_rss: u64,
    pub daemon: Option<DaemonFigures>,
    /// streamsnap: the requests the link carried.
    pub access: Option<AccessTrace>,
}

impl RunSample {
    pub fn timed(t0: Instant, pulled: Duration, ready: Instant) -> Self {
        Self {
            ready_s: secs(ready.duration_since(t0)),
            pull_s: secs(pulled),
            ..Self::default()
        }
    }
}

/// The daemon's own account of a run (its metrics at the end).
#[derive(Debug, Default, Serialize)]
pub struct DaemonFigures {
    pub fuse_read_bytes: f64,
    pub fuse_reads: f64,
    /// Sum of the read requests' durations.
    pub fuse_read_s: f64,
    /// Every FUSE request (lookups, getattr, ...).
    pub fuse_ops: f64,
    pub fuse_ops_s: f64,
    pub range_requests: f64,
    /// Sum of the range reads' durations.
    pub range_s: f64,
    pub fetched_bytes: f64,
    pub chunk_misses: f64,
    pub chunk_hits_memory: f64,
    pub chunk_hits_disk: f64,
    pub prepare_calls: f64,
    pub prepare_s: f64,
    pub manifest_requests: f64,
    pub blob_requests: f64,
    pub referrers_requests: f64,
    pub background_bytes: f64,
    /// Compressed bytes the start-up profile prefetch fetched.
    pub prefetch_bytes: f64,
    /// FUSE requests by kind, and the lookups answered ENOENT.
    pub fuse_ops_by_kind: std::collections::BTreeMap<String, f64>,
    pub lookups_not_found: f64,
}

impl DaemonFigures {
    /// `lookup 6000, getattr 300, ...`: the FUSE requests by kind, most first.
    pub fn ops_breakdown(&self) -> String {
        let mut ops: Vec<(&String, &f64)> = self
            .fuse_ops_by_kind
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .collect();
        ops.sort_by(|a, b| b.1.total_cmp(a.1));
        ops.iter()
            .map(|(op, n)| format!("{op} {n:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn from_scrape(s: &Scrape) -> Self {
        let read = ["op=\"read\""];
        let prepare = ["method=\"prepare\""];
        Self {
            fuse_read_bytes: s.sum("streamsnap_fuse_read_bytes_total", &[]),
            fuse_reads: s.sum("streamsnap_fuse_op_duration_seconds_count", &read),
            fuse_read_s: s.sum("streamsnap_fuse_op_duration_seconds_sum", &read),
            fuse_ops: s.sum("streamsnap_fuse_op_duration_seconds_count", &[]),
            fuse_ops_s: s.sum("streamsnap_fuse_op_duration_seconds_sum", &[]),
            range_requests: s.sum("streamsnap_cache_range_requests_total", &[]),
            range_s: s.sum("streamsnap_registry_range_duration_seconds_sum", &[]),
            fetched_bytes: s.sum("streamsnap_cache_fetched_bytes_total", &[]),
            chunk_misses: s.sum("streamsnap_cache_misses_total", &[]),
            chunk_hits_memory: s.sum("streamsnap_cache_hits_total", &["tier=\"memory\""]),
            chunk_hits_disk: s.sum("streamsnap_cache_hits_total", &["tier=\"disk\""]),
            prepare_calls: s.sum(
                "streamsnap_snapshotter_rpc_duration_seconds_count",
                &prepare,
            ),
            prepare_s: s.sum("streamsnap_snapshotter_rpc_duration_seconds_sum", &prepare),
            manifest_requests: s.sum("streamsnap_registry_requests_total", &["kind=\"manifest\""]),
            blob_requests: s.sum("streamsnap_registry_requests_total", &["kind=\"blob\""]),
            referrers_requests: s.sum(
                "streamsnap_registry_requests_total",
                &["kind=\"referrers\""],
            ),
            background_bytes: s.sum("streamsnap_snapshotter_background_fetch_bytes_total", &[]),
            prefetch_bytes: s.sum("streamsnap_snapshotter_prefetch_bytes_total", &[]),
            fuse_ops_by_kind: s.by_label("streamsnap_fuse_op_duration_seconds_count", "op"),
            lookups_not_found: s.sum(
                "streamsnap_fuse_op_errors_total",
                &["op=\"lookup\"", "errno=\"ENOENT\""],
            ),
        }
    }
}

/// File-system figures of both sides.
#[derive(Debug, Default, Serialize)]
pub struct FsFigures {
    pub overlay: Option<FsSide>,
    pub streamsnap: Option<FsSide>,
}

/// Sequential read of the data file and lstat of every entry, on one side.
#[derive(Debug, Default, Serialize)]
pub struct FsSide {
    pub file_bytes: u64,
    /// streamsnap: the first read, every chunk over the link.
    pub network_read_s: Option<f64>,
    /// Page cache dropped: from the local disk (streamsnap: its chunk cache files).
    pub disk_read_s: Vec<f64>,
    /// The bytes in memory but not in the file's own page cache (streamsnap: chunk files in the
    /// host page cache, FUSE pages dropped; overlayfs: the same as a page-cache read).
    pub memory_read_s: Vec<f64>,
    /// The file's own pages in the page cache.
    pub page_cache_read_s: Vec<f64>,
    pub entries: u64,
    pub stat_cold_s: Vec<f64>,
    pub stat_hot_s: Vec<f64>,
}

/// Median of a non-empty set (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(super) fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

pub(super) fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

pub(super) fn ready(samples: &[RunSample]) -> Vec<f64> {
    samples.iter().map(|s| s.ready_s).collect()
}

pub(super) fn field(samples: &[RunSample], f: impl Fn(&RunSample) -> f64) -> f64 {
    median(&samples.iter().map(f).collect::<Vec<_>>())
}

pub(super) fn daemon_field(samples: &[RunSample], f: impl Fn(&DaemonFigures) -> f64) -> f64 {
    median(
        &samples
            .iter()
            .filter_map(|s| s.daemon.as_ref().map(&f))
            .collect::<Vec<_>>(),
    )
}

pub(super) fn access_field(samples: &[RunSample], f: impl Fn(&AccessTrace) -> f64) -> f64 {
    median(
        &samples
            .iter()
            .filter_map(|s| s.access.as_ref().map(&f))
            .collect::<Vec<_>>(),
    )
}

/// What the link carried in the cold runs, and what read-ahead or a profile would have made of
/// it (medians over the cold runs).
pub(super) fn access_summary(cold: &[RunSample]) -> Option<String> {
    let first = cold.iter().find_map(|s| s.access.as_ref())?;
    let mut text = format!(
        "the link carried {:.0} requests, {:.0} of them range reads of {} over {:.0} data blobs \
         and {:.0} connection(s), spread over {:.2} s (median {:.1} ms between successive range \
         requests); {:.0} ranges started within 1 MiB after a range fetched before.",
        access_field(cold, |a| a.requests as f64),
        access_field(cold, |a| a.range_requests as f64),
        mb(access_field(cold, |a| a.range_bytes as f64)),
        access_field(cold, |a| a.blobs as f64),
        access_field(cold, |a| a.connections as f64),
        access_field(cold, |a| a.span_s),
        access_field(cold, |a| a.median_gap_ms),
        access_field(cold, |a| a.near_previous as f64),
    );
    for (i, (window, _, _)) in first.readahead.iter().enumerate() {
        text.push_str(&format!(
            " Read-ahead of {window} MiB per miss: {:.0} requests, {}.",
            access_field(cold, |a| a
                .readahead
                .get(i)
                .map_or(f64::NAN, |r| r.1 as f64)),
            mb(access_field(cold, |a| a
                .readahead
                .get(i)
                .map_or(f64::NAN, |r| r.2 as f64)))
        ));
    }
    text.push_str(&format!(
        " The same ranges fetched up front (a start-up profile, merged up to 8 MiB): {:.0} \
         requests, {}.",
        access_field(cold, |a| a.profile.0 as f64),
        mb(access_field(cold, |a| a.profile.1 as f64))
    ));
    Some(text)
}

pub(super) fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// Rows of the contender table: label, samples.
pub(super) fn contenders(point: &SizePoint) -> [(&'static str, &[RunSample]); 4] {
    [
        ("overlayfs: full pull + run", &point.overlay),
        ("streamsnap, cold cache", &point.cold),
        ("streamsnap, cold + profile", &point.profiled),
        ("streamsnap, warm cache", &point.warm),
    ]
}

/// The runs the headline reports: cold with the start-up profile (older results: cold).
pub(super) fn headline_runs(point: &SizePoint) -> &[RunSample] {
    if point.profiled.is_empty() {
        &point.cold
    } else {
        &point.profiled
    }
}

/// One contender's figures at a size point, as both the stdout table and the doc show them.
pub(super) struct ContenderRow {
    pub label: &'static str,
    pub ready_median_s: f64,
    pub ready_min_s: f64,
    pub ready_max_s: f64,
    pub pull_s: f64,
    /// Bytes from the registry, formatted.
    pub fetched: String,
    /// The daemon's peak RSS, formatted; `-` without a daemon.
    pub daemon_rss: String,
    /// Full pull's median time to ready over this one's.
    pub speedup: f64,
    /// This one's median over the physical limit (NaN when there is none).
    pub vs_limit: f64,
}

/// The contender rows of `point` (those without runs left out).
pub(super) fn contender_rows(point: &SizePoint) -> Vec<ContenderRow> {
    let limit = point.limit_s();
    let overlay_median = median(&ready(&point.overlay));
    contenders(point)
        .into_iter()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(label, samples)| {
            let r = ready(samples);
            let rss: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.daemon_rss)
                .map(|b| b as f64)
                .collect();
            ContenderRow {
                label,
                ready_median_s: median(&r),
                ready_min_s: min(&r),
                ready_max_s: max(&r),
                pull_s: field(samples, |s| s.pull_s),
                fetched: mb(field(samples, |s| s.bytes as f64)),
                daemon_rss: if rss.is_empty() {
                    "-".to_owned()
                } else {
                    mb(median(&rss))
                },
                speedup: overlay_median / median(&r),
                vs_limit: median(&r) / limit,
            }
        })
        .collect()
}

/// The per-point figures on stdout.
pub fn print_point(point: &SizePoint) {
    println!();
    if let Some(reason) = &point.skipped {
        println!("== data layer {} GiB: skipped ({reason})", point.data_gib);
        return;
    }
    println!(
        "== data layer {} GiB: image {:.2} GB compressed, {:.2} GB unpacked, {} entries",
        point.data_gib,
        point.compressed_bytes as f64 / 1e9,
        point.unpacked_bytes as f64 / 1e9,
        point.entries
    );
    if let Some(c) = &point.calibration {
        println!(
            "link: {:.0} Mbit/s measured on a 64 MiB range read; a request on a new connection \
             {:.1} ms",
            c.bulk_mbit,
            c.new_connection_request_s * 1e3
        );
    }
    println!(
        "{:<28} {:>8} {:>17} {:>8} {:>11} {:>10} {:>9} {:>9}",
        "contender",
        "ready",
        "[min .. max]",
        "pull",
        "fetched",
        "daemon RSS",
        "vs full",
        "vs limit"
    );
    for row in contender_rows(point) {
        println!(
            "{:<28} {:>6.2} s [{:>5.2} .. {:>5.2}] {:>6.2} s {:>11} {:>10} {:>8.1}x {:>8.2}x",
            row.label,
            row.ready_median_s,
            row.ready_min_s,
            row.ready_max_s,
            row.pull_s,
            row.fetched,
            row.daemon_rss,
            row.speedup,
            row.vs_limit,
        );
    }
    if let (Some(trace), Some(l)) = (&point.trace, &point.limit) {
        let from_disk = if trace.cold_local_s.is_finite() {
            format!(
                " From local disk with a dropped page cache: {:.2} s (page-cache footprint {} in \
                 {} files).",
                trace.cold_local_s,
                mb(trace.footprint_bytes as f64),
                trace.footprint_files
            )
        } else {
            String::new()
        };
        println!(
            "physical limit {:.2} s = max(network floor {:.2} s: the {} the start-up read \
             through FUSE (kernel readahead off) at the link's rate + {} round trips; local floor {:.2} s: the same \
             start-up with the image local and in memory).{from_disk} Full pull floor: {:.2} s.",
            l.limit_s,
            l.network_s,
            mb(l.read_bytes as f64),
            trace.critical_round_trips,
            l.local_s,
            l.full_pull_s
        );
    }
    let cold = &point.cold;
    let warm = &point.warm;
    println!(
        "where streamsnap's cold time goes (medians): pull {:.2} s ({} prepares, {:.2} s in them), \
         pull end to ready {:.2} s (warm cache: {:.2} s); {:.0} FUSE reads of {} taking {:.2} s \
         summed, {:.0} FUSE requests in all taking {:.2} s; {:.0} range requests ({:.2} s summed) \
         fetching {} compressed for {:.0} chunks; peak daemon RSS {}",
        field(cold, |s| s.pull_s),
        daemon_field(cold, |d| d.prepare_calls),
        daemon_field(cold, |d| d.prepare_s),
        field(cold, |s| s.ready_s - s.pull_s),
        field(warm, |s| s.ready_s - s.pull_s),
        daemon_field(cold, |d| d.fuse_reads),
        mb(daemon_field(cold, |d| d.fuse_read_bytes)),
        daemon_field(cold, |d| d.fuse_read_s),
        daemon_field(cold, |d| d.fuse_ops),
        daemon_field(cold, |d| d.fuse_ops_s),
        daemon_field(cold, |d| d.range_requests),
        daemon_field(cold, |d| d.range_s),
        mb(daemon_field(cold, |d| d.fetched_bytes)),
        daemon_field(cold, |d| d.chunk_misses),
        mb(field(cold, |s| s.daemon_rss.unwrap_or(0) as f64)),
    );
    for (name, runs) in [("cold", cold), ("warm", warm)] {
        if let Some(d) = runs.last().and_then(|r| r.daemon.as_ref()) {
            println!(
                "FUSE requests of the last {name} run: {} ({:.0} lookups answered ENOENT)",
                d.ops_breakdown(),
                d.lookups_not_found
            );
        }
    }
    if let Some(d) = point.profiled.last().and_then(|r| r.daemon.as_ref()) {
        println!(
            "the last cold + profile run prefetched {} and made {:.0} range requests in all",
            mb(d.prefetch_bytes),
            d.range_requests
        );
    }
    if let Some(text) = access_summary(&point.cold) {
        println!("registry side of the cold runs: {text}");
    }
    print_fs(&point.fs);
}

fn print_fs(fs: &FsFigures) {
    let (Some(o), Some(s)) = (&fs.overlay, &fs.streamsnap) else {
        return;
    };
    let rate = |bytes: u64, t: &[f64]| bytes as f64 / 1e6 / median(t);
    for (label, ov, ss) in fs_rows(o, s) {
        println!(
            "{label:<58} overlayfs {:>7.0} MB/s, streamsnap {:>7.0} MB/s: {:.2}x",
            rate(o.file_bytes, ov),
            rate(s.file_bytes, ss),
            median(ov) / median(ss)
        );
    }
    if let Some(net) = s.network_read_s {
        println!(
            "{:<58} streamsnap {:>7.0} MB/s",
            "sequential read, first (every chunk over the link)",
            s.file_bytes as f64 / 1e6 / net
        );
    }
    println!(
        "lstat of all {} entries, caches dropped: overlayfs {:.2} s, streamsnap {:.2} s ({:.2}x); \
         hot: {:.3} s, {:.3} s",
        s.entries,
        median(&o.stat_cold_s),
        median(&s.stat_cold_s),
        median(&o.stat_cold_s) / median(&s.stat_cold_s),
        median(&o.stat_hot_s),
        median(&s.stat_hot_s)
    );
}

pub(super) fn fs_rows<'a>(
    o: &'a FsSide,
    s: &'a FsSide,
) -> [(&'static str, &'a [f64], &'a [f64]); 3] {
    [
        (
            "sequential read, page cache dropped (from disk)",
            &o.disk_read_s,
            &s.disk_read_s,
        ),
        (
            "sequential read, data in memory, file's pages dropped",
            &o.memory_read_s,
            &s.memory_read_s,
        ),
        (
            "sequential read, file in the page cache",
            &o.page_cache_read_s,
            &s.page_cache_read_s,
        ),
    ]
}

/// The growth series on stdout.
pub fn print_series(figures: &Figures) {
    println!();
    println!("== growth series (medians of {} runs)", figures.runs);
    println!(
        "{:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>15} {:>15} {:>21}",
        "data", "full pull", "cold", "+ profile", "warm", "limit", "speedup", "vs limit", "fetched"
    );
    for p in figures.points.iter().filter(|p| p.measured()) {
        let o = median(&ready(&p.overlay));
        let c = median(&ready(&p.cold));
        let h = median(&ready(headline_runs(p)));
        let w = median(&ready(&p.warm));
        let l = p.limit_s();
        println!(
            "{:>5} GiB {:>8.2} s {:>8.2} s {:>8.2} s {:>8.2} s {:>8.2} s {:>6.1}x / {:>5.1}x \
             {:>6.2}x / {:>5.2}x {:>21}",
            p.data_gib,
            o,
            c,
            h,
            w,
            l,
            o / c,
            o / h,
            c / l,
            h / l,
            format!(
                "{} / {}",
                mb(field(&p.cold, |s| s.bytes as f64)),
                mb(field(headline_runs(p), |s| s.bytes as f64))
            )
        );
    }
    println!("benchmark took {:.0} s", figures.elapsed_s);
}

/// The last line of `bench/run.sh`: at the 4 GiB point if measured, else the largest.
pub fn headline(figures: &Figures) -> anyhow::Result<String> {
    let measured: Vec<&SizePoint> = figures.points.iter().filter(|p| p.measured()).collect();
    let point = measured
        .iter()
        .find(|p| p.data_gib == 4)
        .or_else(|| measured.iter().max_by_key(|p| p.data_gib))
        .with_context(|| {
            let reasons: Vec<String> = figures
                .points
                .iter()
                .filter_map(|p| Some(format!("{} GiB: {}", p.data_gib, p.skipped.as_ref()?)))
                .collect();
            format!("no data size was measured ({})", reasons.join("; "))
        })?;
    let cold = median(&ready(headline_runs(point)));
    let limit = point
        .limit
        .as_ref()
        .context("no physical limit was measured")?
        .limit_s;
    Ok(format!(
        "time-to-ready speedup vs full pull: {:.1}x; vs physical limit: {:.1}x",
        median(&ready(&point.overlay)) / cold,
        cold / limit
    ))
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Cores, memory, OS and kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores, {mem_gib:.0} GiB, {os}, Linux {}, loopback network",
        kernel.trim()
    )
}
