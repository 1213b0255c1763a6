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

fn walks(node: &NodeReport, images: usize) -> (Vec<Duration>, Vec<Duration>) {
    node.samples
        .iter()
        .take(images)
        .filter_map(|s| s.walk)
        .unzip()
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
    let compared = nodes.iter().map(|n| n.samples.len()).min().unwrap_or(0);
    println!(
        "lstat of every entry of an image's layer (its FUSE mount), per image, over the first {compared} images:"
    );
    println!();
    println!("| daemon | cold (caches dropped) | hot | pull (CRI) |");
    println!("| --- | --- | --- | --- |");
    for node in &nodes {
        let (cold, hot) = walks(node, compared);
        let pulls: Vec<Duration> = node.samples.iter().take(compared).map(|s| s.pull).collect();
        println!(
            "| {} | {} | {} | {} |",
            node.label,
            seconds(&cold),
            seconds(&hot),
            seconds(&pulls)
        );
    }
    if baseline.is_some() && current.samples.len() > compared {
        let (cold, hot) = walks(current, usize::MAX);
        println!(
            "| {} (all {} images) | {} | {} | |",
            current.label,
            current.samples.len(),
            seconds(&cold),
            seconds(&hot)
        );
    }
    println!();
    println!("first lookup of a file 3 names deep, caches dropped (5 images):");
    println!();
    println!("| daemon | after idle | metadata loaded |");
    println!("| --- | --- | --- |");
    for node in &nodes {
        println!(
            "| {} | {} | {} |",
            node.label,
            millis(&node.lookup_after_idle),
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
