//! Container start-up: time from "pull" to "the container has read what it needs and exited",
//! lazily with streamsnap-snapshotterd against a full pull with containerd's overlayfs
//! snapshotter (the baseline users know), same image, same workload, same run. The registry sits
//! behind a counting proxy that adds latency, so bytes and round trips cost what they would on a
//! network.

use std::time::{Duration, Instant};

use anyhow::ensure;
use streamsnap_e2e::container::{pull, rpull, run_container};
use streamsnap_e2e::demo_image::{DemoShape, demo_image};
use streamsnap_e2e::image::OciLayout;
use streamsnap_e2e::{
    Containerd, ContainerdOptions, CountingProxy, Registry, STREAMING_NODE_TOOLS, Snapshotterd,
    SnapshotterdOptions, require_root_tools, skopeo_push, workspace_bin,
};

use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed runs of each mode (each with a cold cache and a fresh containerd).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Latency the proxy adds per connection and per 64 KiB forwarded, in milliseconds.
    #[arg(long, default_value_t = 1)]
    latency_ms: u64,
    /// Number of 64 MiB model files in the image.
    #[arg(long, default_value_t = 6)]
    models: usize,
}

/// What the container reads at start: its config, the modules of three packages and the first
/// 16 MiB of one model file.
const WORKLOAD: &str = "cat /app/config/settings.ini /app/lib/pkg000/*.py /app/lib/pkg001/*.py \
    /app/lib/pkg002/*.py > /dev/null && head -c 16777216 /app/models/weights-0.bin > /dev/null && echo ready";

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root_tools(&[STREAMING_NODE_TOOLS, &["busybox"]].concat())?;
    let streamsnap = workspace_bin("streamsnap")?;
    workspace_bin("streamsnap-snapshotterd")?;
    let runs = args.runs.max(1);

    let registry = Registry::start()?;
    let shape = DemoShape {
        large_files: args.models,
        ..DemoShape::default()
    };
    let spec = demo_image(shape)?;
    let workload_bytes = workload_bytes(&spec.layers[1].tar)?;
    let mut layout = OciLayout::new()?;
    let written = layout.write_image(&spec, "v1")?;
    let direct = format!("{}/bench/app:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &direct)?;
    streamsnap_e2e::run(std::process::Command::new(&streamsnap).args([
        "artifact-streaming",
        "create",
        "--image",
        &direct,
    ]))?;
    let compressed: u64 = written.layers.iter().map(|l| l.size).sum();

    let proxy = CountingProxy::start(&registry.addr())?;
    let latency = Duration::from_millis(args.latency_ms);
    proxy.set_latency(latency);
    let image = format!("{}/bench/app:v1", proxy.addr());
    println!(
        "image: {:.1} MB compressed; workload reads {:.1} MB; proxy latency {} ms per connection and per 64 KiB; {runs} runs each, cold",
        compressed as f64 / 1e6,
        workload_bytes as f64 / 1e6,
        args.latency_ms
    );

    let mut full = Vec::new();
    let mut full_bytes = Vec::new();
    for i in 0..runs {
        let containerd = Containerd::start(ContainerdOptions::default())?;
        let before = proxy.downstream_bytes();
        let started = Instant::now();
        pull(&containerd, &image, "overlayfs", true)?;
        let out = run_container(
            &containerd,
            &image,
            "overlayfs",
            &format!("full{i}"),
            &["sh", "-c", WORKLOAD],
        )?;
        full.push(started.elapsed());
        full_bytes.push(proxy.downstream_bytes() - before);
        ensure!(out.trim() == "ready", "workload output {out:?}");
    }

    let mut lazy = Vec::new();
    let mut lazy_bytes = Vec::new();
    for i in 0..runs {
        let daemon = Snapshotterd::start(SnapshotterdOptions::default())?;
        let containerd = Containerd::start(
            ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
        )?;
        let before = proxy.downstream_bytes();
        let started = Instant::now();
        rpull(&containerd, &image, "streamsnap", true)?;
        let out = run_container(
            &containerd,
            &image,
            "streamsnap",
            &format!("lazy{i}"),
            &["sh", "-c", WORKLOAD],
        )?;
        lazy.push(started.elapsed());
        lazy_bytes.push(proxy.downstream_bytes() - before);
        ensure!(out.trim() == "ready", "workload output {out:?}");
        drop(containerd);
        drop(daemon);
    }

    let full_s = Summary::of(&full);
    let lazy_s = Summary::of(&lazy);
    let median_bytes = |v: &mut Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let (fb, lb) = (median_bytes(&mut full_bytes), median_bytes(&mut lazy_bytes));
    println!(
        "{:<44} {:>8} {:>18} {:>12}",
        "mode", "median", "[min .. max]", "fetched"
    );
    for (label, s, bytes) in [
        ("overlayfs, full pull + run", full_s, fb),
        ("streamsnap, lazy pull + run", lazy_s, lb),
    ] {
        println!(
            "{label:<44} {:>6.2} s [{:.2} .. {:.2}] {:>9.1} MB",
            s.median.as_secs_f64(),
            s.min.as_secs_f64(),
            s.max.as_secs_f64(),
            bytes as f64 / 1e6
        );
    }
    println!();
    println!(
        "streamsnap starts {:.1}x faster (medians) and fetches {:.1}% of what the full pull fetches",
        full_s.median.as_secs_f64() / lazy_s.median.as_secs_f64(),
        100.0 * lb as f64 / fb as f64
    );
    // The proxy forwards at most 64 KiB per latency period in each direction.
    let throughput = 65536.0 / latency.as_secs_f64().max(1e-6);
    println!(
        "full pull floor: {:.2} s (all {:.1} MB at the proxy's {:.0} MB/s); lazy floor: {:.2} s (the {:.1} MB the workload reads, uncompressed, at that rate, plus round trips)",
        compressed as f64 / throughput,
        compressed as f64 / 1e6,
        throughput / 1e6,
        workload_bytes as f64 / throughput,
        workload_bytes as f64 / 1e6
    );
    Ok(())
}

/// Bytes of the app layer the workload reads.
fn workload_bytes(tar: &[u8]) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in tar::Archive::new(tar).entries()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let size = entry.header().size()?;
        if path == "app/config/settings.ini"
            || (path.ends_with(".py")
                && ["pkg000/", "pkg001/", "pkg002/"]
                    .iter()
                    .any(|p| path.contains(p)))
        {
            total += size;
        } else if path == "app/models/weights-0.bin" {
            total += size.min(16 << 20);
        }
    }
    Ok(total)
}
