//! Daemon memory as images pile up on a node: N generated images of E small files each are
//! pushed and converted, then pulled one after another through containerd's CRI image service
//! (as the kubelet pulls) by a streamsnap daemon, and each image's layer is walked once
//! (an lstat of every entry, cold then hot: what a start-up's metadata lookups cost). The
//! daemon's resident memory (VmRSS) is read after each image, after an idle period, and after
//! restarts; the same is done for another build of the daemon (`--baseline-daemon`, e.g. the
//! previous commit) on a node of its own, in the same run, with the same images.

mod node;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use streamsnap_e2e::{
    ImageSpec, LayerBlob, OciLayout, Registry, STREAMING_NODE_TOOLS, TarGen, require_root_tools,
    skopeo_push, workspace_bin,
};

use self::node::{Contender, Node};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images pulled by the daemon under test.
    #[arg(long, default_value_t = 100)]
    images: usize,
    /// Entries (directories and small files) in each image's one layer.
    #[arg(long, default_value_t = 40_000)]
    entries: usize,
    /// `[fuse] metadata_idle_seconds` of the daemon under test (its default is 300): how long
    /// a layer keeps its metadata after its last request. The idle figures are read after it.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// The daemon binary of another build to compare with (its `streamsnap-fuse-holder` next
    /// to it), e.g. built from the previous commit in a worktree of its own.
    #[arg(long, value_name = "PATH")]
    baseline_daemon: Option<PathBuf>,
    /// Images the baseline daemon pulls (its memory grows with each: keep it within RAM).
    #[arg(long, default_value_t = 10)]
    baseline_images: usize,
    /// Restarts (SIGTERM, then a new daemon on the same root) timed with all images mounted.
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// Rounds of lstat walks over the layers both daemons have, one daemon's walk of a layer
    /// right after the other's (paired, so both see the same noise on a shared machine).
    #[arg(long, default_value_t = 3)]
    walk_rounds: usize,
}

/// Files per directory of a generated layer.
const FILES_PER_DIR: usize = 200;

/// Image `index`'s layer: `app/dNNN/` directories of [`FILES_PER_DIR`] small files each, `entries`
/// tar entries in all. File names are unique within the layer, contents unique to the image.
fn layer_tar(index: usize, entries: usize) -> Vec<u8> {
    let mut tar = TarGen::new();
    tar.dir("app", 0o755);
    let mut written = 1;
    let mut dir = 0;
    'dirs: while written < entries {
        let path = format!("app/d{dir:04}");
        tar.dir(&path, 0o755);
        written += 1;
        for f in 0..FILES_PER_DIR {
            if written >= entries {
                break 'dirs;
            }
            let name = format!("{path}/file{:06}.py", dir * FILES_PER_DIR + f);
            tar.file(
                &name,
                0o644,
                format!("# image {index} file {name}\n").as_bytes(),
            );
            written += 1;
        }
        dir += 1;
    }
    tar.finish()
}

/// Pushes and converts `count` images; returns their references.
fn push_images(registry: &Registry, count: usize, entries: usize) -> anyhow::Result<Vec<String>> {
    let streamsnap = workspace_bin("streamsnap")?;
    let started = Instant::now();
    let mut images = Vec::with_capacity(count);
    for i in 0..count {
        let spec = ImageSpec::linux_amd64(vec![LayerBlob::gzip(layer_tar(i, entries))]);
        let mut layout = OciLayout::new()?;
        layout.write_image(&spec, "v1")?;
        let image = format!("{}/bench/mem{i:03}:v1", registry.addr());
        skopeo_push(layout.path(), "v1", &image)?;
        streamsnap_e2e::run(std::process::Command::new(&streamsnap).args([
            "artifact-streaming",
            "create",
            "--image",
            &image,
        ]))
        .with_context(|| format!("converting {image}"))?;
        images.push(image);
        if (i + 1) % 10 == 0 || i + 1 == count {
            eprintln!(
                "memory: {} images of {entries} entries pushed and converted ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(images)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root_tools(STREAMING_NODE_TOOLS)?;
    workspace_bin("streamsnap-snapshotterd")?;
    let started = Instant::now();
    let registry = Registry::start()?;
    let count = args.images.max(args.baseline_images);
    let images = push_images(&registry, count, args.entries)?;
    let mut current = Node::start(
        &Contender {
            label: "streamsnap (this build)".into(),
            binary: None,
            idle_seconds: Some(args.idle_seconds),
        },
        &registry,
    )?;
    current.pull_all(&images[..args.images], args.entries)?;
    let mut baseline = match &args.baseline_daemon {
        Some(binary) => {
            let mut node = Node::start(
                &Contender {
                    label: format!("baseline ({})", binary.display()),
                    binary: Some(binary.clone()),
                    idle_seconds: None,
                },
                &registry,
            )?;
            node.pull_all(&images[..args.baseline_images], args.entries)?;
            Some(node)
        }
        None => None,
    };

    // The lstat figures: both daemons walk the same layers in turn, the first `compared` ones.
    // Those of this build were pulled first and went past its metadata budget long ago, so its
    // first walk of each includes loading the layer's index again.
    let compared = match &baseline {
        Some(_) => args.images.min(args.baseline_images),
        None => args.images,
    };
    current.clear_walks();
    if let Some(node) = baseline.as_mut() {
        node.clear_walks();
    }
    eprintln!(
        "memory: {} rounds of walks over {compared} layers",
        args.walk_rounds
    );
    for _ in 0..args.walk_rounds {
        for i in 0..compared {
            current.walk(i)?;
            if let Some(node) = baseline.as_mut() {
                node.walk(i)?;
            }
        }
    }

    // Idle: this build's idle period, then its sweep (every quarter of it, at least every
    // second), for both (the baseline keeps everything whatever the wait).
    let wait = Duration::from_secs(args.idle_seconds + (args.idle_seconds / 4).max(1) + 2);
    eprintln!("memory: idle for {} s", wait.as_secs());
    std::thread::sleep(wait);
    current.idle(wait, 10)?;
    if let Some(node) = baseline.as_mut() {
        node.idle(wait, 10)?;
    }
    current.restarts(args.restarts)?;
    if let Some(node) = baseline.as_mut() {
        node.restarts(args.restarts)?;
    }
    let current = current.report;
    let baseline = baseline.map(|node| node.report);
    report::print(&args, &current, baseline.as_ref(), started.elapsed());
    Ok(())
}
