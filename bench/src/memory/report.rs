//! The memory benchmark's figures, printed.

use std::time::Duration;

use super::Args;
use super::node::NodeReport;
use crate::stats::Summary;

const MIB: f64 = (1 << 20) as f64;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn seconds(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    let s = Summary::of(samples);
    format!(
        "{:.3} s [{:.3} .. {:.3}]",
        s.median.as_secs_f64(),
        s.min.as_secs_f64(),
        s.max.as_secs_f64()
    )
}

fn millis(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    let s = Summary::of(samples);
    format!(
        "{:.2} ms [{:.2} .. {:.2}]",
        s.median.as_secs_f64() * 1e3,
        s.min.as_secs_f64() * 1e3,
        s.max.as_secs_f64() * 1e3
    )
}

/// Bytes of RSS per mounted entry: growth from the daemon's start over all images' entries.
fn per_entry(node: &NodeReport, rss: u64) -> f64 {
    let entries = node.images as f64 * node.walked_entries as f64;
    rss.saturating_sub(node.rss_start) as f64 / entries.max(1.0)
}

/// `a`'s median over `b`'s, as "1.05x".
fn ratio(a: &[Duration], b: &[Duration]) -> String {
    if a.is_empty() || b.is_empty() {
        return "-".into();
    }
    let (a, b) = (Summary::of(a).median, Summary::of(b).median);
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

pub fn print(args: &Args, current: &NodeReport, baseline: Option<&NodeReport>, took: Duration) {
    let nodes: Vec<&NodeReport> = std::iter::once(current).chain(baseline).collect();
    println!(
        "memory: images of one layer of {} entries ({} found by each walk); this \
         build with [fuse] metadata_idle_seconds = {}; whole run {:.0} s",
        args.entries,
        current.walked_entries,
        args.idle_seconds,
        took.as_secs_f64()
    );
    println!();
    println!(
        "| daemon | images | VmRSS at start | after the last image | per entry | VmHWM | after idle ({} s) | per idle entry |",
        current.idle_wait.as_secs()
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for node in &nodes {
        println!(
            "| {} | {} | {} | {} | {:.1} B | {} | {} | {:.1} B |",
            node.label,
            node.images,
            mib(node.rss_start),
            mib(node.rss_all),
            per_entry(node, node.rss_all),
            mib(node.hwm),
            mib(node.rss_idle),
            per_entry(node, node.rss_idle),
        );
    }
    if let (Some(all), Some(idle)) = (current.metadata_all, current.metadata_idle) {
        println!();
        println!(
            "this build's streamsnap_fuse_metadata_bytes: {} after the last image, {} after idle",
            mib(all as u64),
            mib(idle as u64)
        );
    }
    println!();
    println!(
        "VmRSS after each image: pulled (mounted, nothing read) / walked (every entry stat'ed):"
    );
    println!();
    let header: Vec<String> = nodes.iter().map(|n| n.label.clone()).collect();
    println!("| images | {} |", header.join(" | "));
    println!("|---{}|", " | ---".repeat(nodes.len()));
    let most = nodes.iter().map(|n| n.samples.len()).max().unwrap_or(0);
    let step = (most / 10).max(1);
    for i in (0..most).filter(|i| (i + 1) % step == 0 || *i == 0 || i + 1 == most) {
        let cells: Vec<String> = nodes
            .iter()
            .map(|n| {
                n.samples.get(i).map_or("-".into(), |s| {
                    format!("{} / {}", mib(s.rss_pulled), mib(s.rss_walked))
                })
            })
            .collect();
        println!("| {} | {} |", i + 1, cells.join(" | "));
    }
    println!();
    println!(
        "lstat of every entry of a layer (its FUSE mount), {} rounds over the first {} layers, \
         the daemons in turn on each layer; cold: the kernel's caches dropped before the walk:",
        args.walk_rounds,
        current.cold.len() / args.walk_rounds.max(1)
    );
    println!();
    println!("| daemon | cold | hot | pull (CRI), all its images |");
    println!("| --- | --- | --- | --- |");
    for node in &nodes {
        let pulls: Vec<Duration> = node.samples.iter().map(|s| s.pull).collect();
        println!(
            "| {} | {} | {} | {} |",
            node.label,
            seconds(&node.cold),
            seconds(&node.hot),
            seconds(&pulls)
        );
    }
    if let Some(baseline) = baseline {
        println!(
            "| this build / baseline (medians) | {} | {} | |",
            ratio(&current.cold, &baseline.cold),
            ratio(&current.hot, &baseline.hot)
        );
    }
    println!();
    println!(
        "a lookup of a name the kernel has not cached, after the idle period (one request each):"
    );
    println!();
    println!(
        "| daemon | metadata dropped, index in the page cache | dropped, caches dropped | loaded |"
    );
    println!("| --- | --- | --- | --- |");
    for node in &nodes {
        println!(
            "| {} | {} | {} | {} |",
            node.label,
            millis(&node.lookup_after_idle),
            millis(&node.lookup_after_idle_cold),
            millis(&node.lookup_loaded)
        );
    }
    if let Some((count, sum)) = current.loads {
        println!();
        println!(
            "this build's metadata loads before the restarts: {count:.0}, {:.2} ms on average",
            sum / count * 1e3
        );
    }
    println!();
    println!("restart (SIGTERM, a new daemon on the same root until it accepts calls):");
    println!();
    println!(
        "| daemon | layers mounted | restart | restore (daemon's metric) | first lookup after | VmRSS after |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for node in &nodes {
        let restore: Vec<Duration> = node
            .restore_metric
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            node.label,
            node.images,
            seconds(&node.restarts),
            seconds(&restore),
            millis(&node.lookup_after_restart),
            mib(node.rss_after_restart)
        );
    }
}
