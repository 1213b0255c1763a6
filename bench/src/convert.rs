//! Conversion throughput: a generated layer of at least 1 GB (uncompressed) converted by
//! `streamsnap artifact-streaming create`, and by the peer tool
//! `ctr-remote image convert --estargz --oci` (stargz-snapshotter) against a containerd this
//! program starts, in the same run. Figures are MB/s of uncompressed layer data.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use streamsnap_convert::{ConvertOptions, LayerSource, convert_layer};
use streamsnap_e2e::demo_image::{DemoShape, app_layer};
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::{
    Containerd, ContainerdOptions, Registry, require_root_tools, skopeo_push, workspace_bin,
};
use streamsnap_format::media::LayerCompression;
use streamsnap_format::{Digest, DigestHasher};

use streamsnap_e2e::bins::run as run_command;
use streamsnap_e2e::skopeo::skopeo;

use crate::stats::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Approximate uncompressed size of the generated layer, in MB.
    #[arg(long, default_value_t = 1100)]
    size_mb: usize,
    /// Timed runs of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Skip the ctr-remote comparison.
    #[arg(long)]
    no_peer: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "containerd",
        "ctr",
        "ctr-remote",
    ])?;
    let streamsnap = workspace_bin("streamsnap")?;
    let runs = args.runs.max(1);

    // About 40% small text files (~21 KB average, compressible), 60% large incompressible files.
    let target = args.size_mb as u64 * 1_000_000;
    let large_file_size = 64 << 20;
    let shape = DemoShape {
        source_files: (target * 4 / 10 / 21_000) as usize,
        large_files: (target * 6 / 10 / large_file_size as u64).max(1) as usize,
        large_file_size,
    };
    eprintln!("generating a layer: {shape:?}");
    let tar = app_layer(shape);
    let uncompressed = tar.len() as u64;
    let blob = LayerBlob::new(tar, Compression::Gzip);
    let compressed = blob.compressed()?;
    let source = LayerSource {
        digest: Digest::sha256(&compressed),
        compression: LayerCompression::Gzip,
        diff_id: blob.diff_id(),
    };
    println!(
        "layer: {:.1} MB uncompressed, {:.1} MB gzip (level 6); {} runs each; {} cores",
        uncompressed as f64 / 1e6,
        compressed.len() as f64 / 1e6,
        runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<48} {:>9} {:>20}  {:>9}",
        "measurement", "median", "[min .. max]", "throughput (uncompressed)"
    );

    // The floor of any converter: decompress and hash the input once.
    let floor = timed(runs, || {
        let mut decoder = flate2::read::MultiGzDecoder::new(compressed.as_slice());
        let mut hasher = DigestHasher::new();
        std::io::copy(&mut decoder, &mut hasher)?;
        ensure!(hasher.finish() == source.diff_id);
        Ok(())
    })?;
    let floor = report(
        "gunzip + sha256 only (one core; ceiling)",
        &floor,
        uncompressed,
    );

    let local = timed(runs, || {
        let out = tempfile::tempfile()?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        convert_layer(
            compressed.as_slice(),
            &source,
            &ConvertOptions::default(),
            &mut out,
            &|_| {},
        )?;
        out.flush()?;
        Ok(())
    })?;
    let local = report(
        "streamsnap convert_layer (local, in-process)",
        &local,
        uncompressed,
    );

    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    layout.write_image(&ImageSpec::linux_amd64(vec![blob]), "v1")?;
    let src = format!("{}/bench/src:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &src)?;

    let mut create = Vec::new();
    for i in 0..runs {
        // A fresh repository each run, so the artifact's blobs are uploaded every time.
        let image = format!("{}/bench/run{i}:v1", registry.addr());
        skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{src}"),
            &format!("docker://{image}"),
        ])?;
        let started = Instant::now();
        run_command(Command::new(&streamsnap).args([
            "artifact-streaming",
            "create",
            "--image",
            &image,
            "--output",
            "json",
        ]))?;
        create.push(started.elapsed());
    }
    let create = report(
        "streamsnap create (pull + convert + push, loopback)",
        &create,
        uncompressed,
    );

    if args.no_peer {
        return Ok(());
    }
    let containerd = Containerd::start(ContainerdOptions::default())?;
    run_command(
        containerd
            .ctr(&["images", "pull", "--plain-http", &src])
            .stdout(std::process::Stdio::null()),
    )?;
    let mut peer_convert = Vec::new();
    let mut peer_push = Vec::new();
    for i in 0..runs {
        let target = format!("{}/bench/esgz{i}:v1", registry.addr());
        let started = Instant::now();
        run_command(&mut containerd.ctr_remote(&[
            "image",
            "convert",
            "--estargz",
            "--oci",
            &src,
            &target,
        ]))?;
        peer_convert.push(started.elapsed());
        let started = Instant::now();
        run_command(
            containerd
                .ctr(&["images", "push", "--plain-http", &target])
                .stdout(std::process::Stdio::null()),
        )?;
        peer_push.push(peer_convert[i] + started.elapsed());
    }
    let peer_convert = report(
        "ctr-remote image convert --estargz --oci (local)",
        &peer_convert,
        uncompressed,
    );
    let peer_total = report(
        "ctr-remote convert + ctr push (loopback)",
        &peer_push,
        uncompressed,
    );

    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!();
    println!(
        "streamsnap local convert vs ctr-remote convert:   {:.1}x faster (medians)",
        ratio(local.median, peer_convert.median)
    );
    println!(
        "streamsnap create vs ctr-remote convert + push:   {:.1}x faster (medians)",
        ratio(create.median, peer_total.median)
    );
    println!(
        "streamsnap local convert vs gunzip+sha256 floor:  {:.0}% of the ceiling",
        100.0 * floor.median.as_secs_f64() / local.median.as_secs_f64()
    );
    drop(containerd);
    Ok(())
}

fn timed(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            f()?;
            Ok(started.elapsed())
        })
        .collect()
}
