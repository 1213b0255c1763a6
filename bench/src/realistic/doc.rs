//! The realistic start-up section of docs/benchmarks.md, written from the figures.

use std::path::Path;

use anyhow::Context;

use super::report::{
    Figures, access_summary, contender_rows, daemon_field, field, fs_rows, headline_runs, max, mb,
    median, min, ready,
};

const DOC_BEGIN: &str = "<!-- BEGIN realistic-startup: written by `streamsnap-bench realistic --doc`, do not edit by hand -->";
const DOC_END: &str = "<!-- END realistic-startup -->";

/// Replaces the section between the markers in the Markdown file (appends it when absent).
pub fn write_doc(path: &Path, figures: &Figures) -> anyhow::Result<()> {
    let old =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let section = markdown(figures);
    let new = match (old.find(DOC_BEGIN), old.find(DOC_END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{DOC_BEGIN}\n{section}{DOC_END}{}",
            &old[..b],
            &old[e + DOC_END.len()..]
        ),
        _ => format!("{}\n{DOC_BEGIN}\n{section}{DOC_END}\n", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn range(v: &[f64]) -> String {
    format!("{:.2} .. {:.2}", min(v), max(v))
}

fn markdown(f: &Figures) -> String {
    use std::fmt::Write as _;
    let mut m = String::new();
    let software: u64 = f.software_layers.iter().map(|l| l.2).sum();
    let _ = writeln!(
        m,
        "## Time to ready on a realistic image\n\n```sh\n{}\n```\n",
        f.command
    );
    let _ = writeln!(
        m,
        "Measured {} on {}; {} runs of each contender per size, alternating; the whole invocation \
         took {:.0} min. Link: {:.0} Mbit/s each way, shared by all connections, plus {:.1} ms \
         of round trip (`tests/src/shaper.rs`).\n",
        f.date,
        f.machine,
        f.runs,
        f.elapsed_s / 60.0,
        f.link_mbit,
        f.rtt_ms
    );
    let _ = writeln!(
        m,
        "The image: Debian bookworm (debootstrap minbase), python3 with a C toolchain (apt), the \
         scientific stack from PyPI (numpy, pandas, scipy, scikit-learn, matplotlib, pyarrow, \
         sympy, statsmodels, numba, polars, jupyterlab), an app layer, and a data layer of one \
         incompressible file whose size is the parameter. Software layers, {:.2} GB unpacked:\n",
        software as f64 / 1e9
    );
    let _ = writeln!(
        m,
        "| layer | compressed | unpacked | entries |\n| --- | --- | --- | --- |"
    );
    for (name, size, tar, files) in &f.software_layers {
        let _ = writeln!(
            m,
            "| {name} | {} | {} | {files} |",
            mb(*size as f64),
            mb(*tar as f64)
        );
    }
    let _ = writeln!(
        m,
        "\nThe start-up (`python3 /app/start.py`) imports numpy, pandas, scipy and scikit-learn, \
         reads its config and the first 64 KiB of the data file, and prints `ready`. Time to \
         ready runs from the start of the pull (`ctr images pull` for overlayfs, `ctr-remote \
         images rpull` for streamsnap) to the line `ready` on the container's stdout. Each run \
         has a fresh containerd and, for streamsnap, a fresh daemon (its documented defaults: \
         10 GiB disk cache, 64 MiB memory cache, 4 MiB of kernel readahead, no background \
         fetch); the warm run's daemon \
         starts with the chunk cache the cold run before it left. *Cold + profile* is a cold \
         run (empty chunk cache) of an image that has a start-up profile: the first cold run's \
         daemon recorded what the start-up read (its `/debug/profile`) and `streamsnap \
         artifact-streaming profile` pushed it, so the daemon fetches those chunks as it mounts \
         the layers (docs/snapshotter.md, *Start-up profiles*). *Cold* runs with the profile \
         prefetch turned off, as for an image without a profile. The headline uses cold + \
         profile.\n"
    );
    for p in &f.points {
        if let Some(reason) = &p.skipped {
            let _ = writeln!(
                m,
                "Data layer {} GiB: not measured ({reason}).\n",
                p.data_gib
            );
            continue;
        }
        if !p.measured() {
            continue;
        }
        let _ = writeln!(
            m,
            "### Data layer {} GiB (image {:.2} GB compressed, {:.2} GB unpacked; registry storage \
             {})\n",
            p.data_gib,
            p.compressed_bytes as f64 / 1e9,
            p.unpacked_bytes as f64 / 1e9,
            if p.registry_in_memory {
                "in a tmpfs"
            } else {
                "on disk: it does not fit in memory next to the rest"
            }
        );
        let _ = writeln!(
            m,
            "| contender | time to ready, median | min .. max | pull | fetched | daemon peak RSS | speedup vs full pull | ratio to the physical limit |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for row in contender_rows(p) {
            let _ = writeln!(
                m,
                "| {} | {:.2} s | {:.2} .. {:.2} | {:.2} s | {} | {} | {:.1}x | {:.2}x |",
                row.label,
                row.ready_median_s,
                row.ready_min_s,
                row.ready_max_s,
                row.pull_s,
                row.fetched,
                row.daemon_rss,
                row.speedup,
                row.vs_limit
            );
        }
        if let (Some(t), Some(l)) = (&p.trace, &p.limit) {
            let _ = writeln!(
                m,
                "\nPhysical limit **{:.2} s** = max(network floor {:.2} s, local floor {:.2} s). \
                 Network floor: the {} the start-up read through FUSE (the access trace: \
                 `streamsnap_fuse_read_bytes_total` in a cold run with the kernel's readahead \
                 off, so only the pages the start-up touched) at {:.0} Mbit/s \
                 plus {} round trips (connect, manifest, referrers, artifact, TOCs, data). Local \
                 floor: the same start-up with the image local and in the page cache ({} s); from \
                 local disk with a dropped page cache it takes {:.2} s. The full pull cannot beat \
                 {:.2} s (the compressed image at the link's rate).\n",
                l.limit_s,
                l.network_s,
                l.local_s,
                mb(l.read_bytes as f64),
                f.link_mbit,
                t.critical_round_trips,
                range(&t.hot_local_s),
                t.cold_local_s,
                l.full_pull_s
            );
            let cold = &p.cold;
            let _ = writeln!(
                m,
                "streamsnap cold, medians from the daemon's metrics: the pull took {:.2} s \
                 ({:.0} Prepare calls, {:.2} s inside them: manifest, referrers, artifact and one \
                 TOC per layer), pull end to ready {:.2} s (warm cache: {:.2} s). {:.0} FUSE reads \
                 returned {} and took {:.2} s summed; {:.0} range requests ({:.2} s summed) \
                 fetched {} compressed for {:.0} chunks.\n",
                field(cold, |s| s.pull_s),
                daemon_field(cold, |d| d.prepare_calls),
                daemon_field(cold, |d| d.prepare_s),
                field(cold, |s| s.ready_s - s.pull_s),
                field(&p.warm, |s| s.ready_s - s.pull_s),
                daemon_field(cold, |d| d.fuse_reads),
                mb(daemon_field(cold, |d| d.fuse_read_bytes)),
                daemon_field(cold, |d| d.fuse_read_s),
                daemon_field(cold, |d| d.range_requests),
                daemon_field(cold, |d| d.range_s),
                mb(daemon_field(cold, |d| d.fetched_bytes)),
                daemon_field(cold, |d| d.chunk_misses),
            );
            if let Some(text) = access_summary(cold) {
                let _ = writeln!(
                    m,
                    "On the registry side (the shaping proxy's request log), {text}\n"
                );
            }
        }
        if let (Some(o), Some(s)) = (&p.fs.overlay, &p.fs.streamsnap) {
            let rate = |bytes: u64, t: &[f64]| bytes as f64 / 1e6 / median(t);
            let _ = writeln!(
                m,
                "Warm file-system figures on the rootfs mounted on the host (medians of 3; the \
                 data file is {}):\n\n| measurement | overlayfs | streamsnap | streamsnap / overlayfs |\n| --- | --- | --- | --- |",
                mb(s.file_bytes as f64)
            );
            for (label, ov, ss) in fs_rows(o, s) {
                let _ = writeln!(
                    m,
                    "| {label} | {:.0} MB/s | {:.0} MB/s | {:.2}x |",
                    rate(o.file_bytes, ov),
                    rate(s.file_bytes, ss),
                    median(ov) / median(ss)
                );
            }
            if let Some(net) = s.network_read_s {
                let _ = writeln!(
                    m,
                    "| sequential read, first (every chunk over the link) | - | {:.0} MB/s | - |",
                    s.file_bytes as f64 / 1e6 / net
                );
            }
            let _ = writeln!(
                m,
                "| lstat of all {} entries, caches dropped | {:.2} s | {:.2} s | {:.2}x |\n| lstat of all entries, hot | {:.3} s | {:.3} s | {:.2}x |\n",
                s.entries,
                median(&o.stat_cold_s),
                median(&s.stat_cold_s),
                median(&o.stat_cold_s) / median(&s.stat_cold_s),
                median(&o.stat_hot_s),
                median(&s.stat_hot_s),
                median(&o.stat_hot_s) / median(&s.stat_hot_s),
            );
        }
    }
    let _ = writeln!(
        m,
        "### Growth series\n\nCold and cold + profile: speedup over the full pull, ratio to the \
         physical limit and bytes fetched are given as `cold / cold + profile`.\n\n| data layer | \
         image (compressed) | full pull + run | streamsnap cold | cold + profile | streamsnap warm | \
         physical limit | speedup | vs limit | fetched |\n| --- | --- | --- | --- | --- | --- | --- \
         | --- | --- | --- |"
    );
    for p in f.points.iter().filter(|p| p.measured()) {
        let o = ready(&p.overlay);
        let c = ready(&p.cold);
        let h = ready(headline_runs(p));
        let w = ready(&p.warm);
        let l = p.limit_s();
        let _ = writeln!(
            m,
            "| {} GiB | {:.2} GB | {:.2} s ({}) | {:.2} s ({}) | {:.2} s ({}) | {:.2} s ({}) | \
             {l:.2} s | {:.1}x / {:.1}x | {:.2}x / {:.2}x | {} / {} |",
            p.data_gib,
            p.compressed_bytes as f64 / 1e9,
            median(&o),
            range(&o),
            median(&c),
            range(&c),
            median(&h),
            range(&h),
            median(&w),
            range(&w),
            median(&o) / median(&c),
            median(&o) / median(&h),
            median(&c) / l,
            median(&h) / l,
            mb(field(&p.cold, |s| s.bytes as f64)),
            mb(field(headline_runs(p), |s| s.bytes as f64))
        );
    }
    if let Some(plot) = &f.plot {
        let _ = writeln!(m, "\n![time to ready against the data layer size]({plot})");
    }
    m.push('\n');
    m
}
