//! Warm file-system figures on the image's rootfs, mounted on the host: a sequential read of the
//! data file and an lstat of every entry, on overlayfs (after a full pull) and on streamsnap
//! (after the chunks were fetched once).

use std::path::Path;

use anyhow::Context;
use streamsnap_e2e::container::rpull;
use streamsnap_e2e::{
    Containerd, ContainerdOptions, Snapshotterd, chain_id, mount_rootfs, mount_view,
};
use streamsnap_format::Digest;

use super::image::{BuiltImage, DATA_PATH};
use super::report::FsSide;
use super::runner::{drop_caches, fadvise_dontneed, read_file, stat_tree};

/// Repetitions of each file-system figure.
const REPEATS: usize = 3;

/// On a containerd that pulled `reference` on overlayfs.
pub fn overlay_side(containerd: &Containerd, reference: &str) -> anyhow::Result<FsSide> {
    let rootfs = mount_rootfs(containerd, reference, "overlayfs", "fsbench")?;
    measure(rootfs.path(), None, None)
}

/// With a fresh daemon and containerd: the image pulled lazily, its rootfs mounted as a view.
pub fn streamsnap_side(reference: &str, image: &BuiltImage) -> anyhow::Result<FsSide> {
    let daemon = Snapshotterd::start(super::daemon_options())?;
    let containerd = Containerd::start(
        ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
    )?;
    rpull(&containerd, reference, "streamsnap", true)?;
    let diff_ids = image
        .layers
        .iter()
        .map(|l| l.diff_id.parse::<Digest>())
        .collect::<Result<Vec<_>, _>>()?;
    let top = chain_id(&diff_ids).context("the image has no layers")?;
    let view = mount_view(&containerd, "streamsnap", &top, "fsbench")?;
    let file = view.path().join(DATA_PATH);
    // The first read fetches every chunk of the file over the link into the chunk cache.
    let (_, cold) = read_file(&file)?;
    // The next open finds the file whole on the node and starts its copy for passthrough
    // (docs/snapshotter.md, "Passthrough"); the figures are those of the reads after it.
    read_file(&file)?;
    wait_for_copies(&daemon)?;
    let copies = daemon.root().join("passthrough");
    measure(view.path(), Some(cold.as_secs_f64()), Some(&copies))
}

/// Waits (up to a minute) until the daemon has no passthrough copy being written; returns at
/// once when passthrough is off or the kernel has none.
fn wait_for_copies(daemon: &Snapshotterd) -> anyhow::Result<()> {
    let dir = daemon.root().join("passthrough");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let writing = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false);
        if !writing {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a passthrough copy took over a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `copies`: where the daemon keeps passthrough copies, whose pages are the file's pages when
/// the kernel reads the file passed through.
fn measure(
    root: &Path,
    network_read_s: Option<f64>,
    copies: Option<&Path>,
) -> anyhow::Result<FsSide> {
    let file = root.join(DATA_PATH);
    let mut side = FsSide {
        file_bytes: std::fs::metadata(&file)?.len(),
        network_read_s,
        ..FsSide::default()
    };
    for _ in 0..REPEATS {
        drop_caches()?;
        side.disk_read_s.push(read_file(&file)?.1.as_secs_f64());
    }
    // The file's bytes are now in memory (for streamsnap: its chunk files in the host's page
    // cache); drop only the pages of the file itself, then read it again.
    for _ in 0..REPEATS {
        fadvise_dontneed(&file)?;
        for copy in copies
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .into_iter()
            .flatten()
        {
            fadvise_dontneed(&copy?.path())?;
        }
        side.memory_read_s.push(read_file(&file)?.1.as_secs_f64());
    }
    for _ in 0..REPEATS {
        side.page_cache_read_s
            .push(read_file(&file)?.1.as_secs_f64());
    }
    for _ in 0..REPEATS {
        drop_caches()?;
        let (entries, took) = stat_tree(root)?;
        side.entries = entries;
        side.stat_cold_s.push(took.as_secs_f64());
    }
    for _ in 0..REPEATS {
        side.stat_hot_s.push(stat_tree(root)?.1.as_secs_f64());
    }
    Ok(side)
}
