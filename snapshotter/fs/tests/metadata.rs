//! A mounted layer whose metadata is dropped and loaded again, through the kernel: requests
//! after a drop load the saved index (or rebuild it from the TOC) and answer as before, reads
//! in flight keep theirs, and the metrics count it all.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::testutil::LayerBuilder;
use common::{fuse_available, metric, mount_options, runtime};
use streamsnap_format::{Digest, encode_toc};
use streamsnap_fs::{
    FsOptions, IndexFile, Layer, LayerIndex, MetadataCache, MetadataConfig, Metrics, MountOptions,
    save_index,
};

/// Every path under `root` with its size, mode and target, sorted.
fn listing(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            use std::os::unix::fs::MetadataExt;
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            out.push(format!("{relative} {:o} {}", meta.mode(), meta.len()));
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let content = std::fs::read(&path).unwrap();
                out.push(format!("  {}", String::from_utf8_lossy(&content)));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_dropped_index_is_loaded_again_by_the_next_request_through_the_kernel() {
    if !fuse_available() {
        return;
    }
    let mut b = LayerBuilder::new(4096);
    for d in 0..5 {
        b.dir(&format!("d{d}"), 0o750);
        for f in 0..40 {
            b.file(&format!("d{d}/f{f}"), 0o644, format!("{d}/{f}").as_bytes());
        }
    }
    b.symlink("link", "d0/f0");
    let (toc, reader) = b.build();
    let blob = encode_toc(toc.raw());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("toc"), &blob).unwrap();
    let file = IndexFile::in_dir(dir.path(), Digest::sha256(&blob));
    let index = LayerIndex::build(&toc, file.toc_digest, &FsOptions::default()).unwrap();
    save_index(&index, &file.index).unwrap();

    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let config = MetadataConfig {
        idle: Some(Duration::ZERO),
        max_bytes: 0,
    };
    let cache = MetadataCache::new(config, metrics.clone());
    let layer = Arc::new(
        Layer::open(
            toc.layer_digest(),
            file.clone(),
            reader,
            FsOptions::default(),
            &cache,
        )
        .with_index(index),
    );
    let rt = runtime();
    let mountpoint = tempfile::tempdir().unwrap();
    // No kernel caching: every stat reaches the daemon.
    let options = MountOptions {
        ttl: Duration::ZERO,
        metrics: Some(Arc::new(metrics)),
        ..mount_options()
    };
    let mounted = streamsnap_fs::mount(
        layer.clone(),
        mountpoint.path(),
        rt.handle().clone(),
        &options,
    )
    .unwrap();
    let root = mountpoint.path().canonicalize().unwrap();
    let before = listing(&root);
    assert_eq!(before.len(), 5 + 5 * 40 * 2 + 1);
    let loads = |source| {
        metric(
            &registry,
            "streamsnap_fuse_metadata_loads_total",
            &[("source", source)],
        )
    };
    assert_eq!(loads("index"), 0.0, "the layer started with its index");

    assert_eq!(cache.sweep(), 1);
    assert!(!layer.is_loaded());
    assert_eq!(
        metric(&registry, "streamsnap_fuse_metadata_bytes", &[]),
        0.0
    );
    assert_eq!(listing(&root), before, "answers as before the drop");
    assert_eq!(loads("index"), 1.0);
    assert!(metric(&registry, "streamsnap_fuse_metadata_bytes", &[]) > 0.0);

    // The saved index is gone: the TOC rebuilds it.
    cache.sweep();
    std::fs::remove_file(&file.index).unwrap();
    assert_eq!(listing(&root), before);
    assert_eq!(loads("toc"), 1.0);
    assert!(file.index.exists(), "the rebuilt index is saved");

    // Neither can be used: the request fails with EIO, and the layer recovers once they can.
    cache.sweep();
    std::fs::remove_file(&file.index).unwrap();
    std::fs::write(dir.path().join("toc"), b"damaged").unwrap();
    let error = std::fs::symlink_metadata(root.join("d1/f1")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    // Each request that needed it (the kernel revalidates the path's parents too) failed.
    assert!(
        metric(
            &registry,
            "streamsnap_fuse_metadata_load_failures_total",
            &[]
        ) >= 1.0
    );
    std::fs::write(dir.path().join("toc"), &blob).unwrap();
    assert_eq!(listing(&root), before);
    assert_eq!(
        metric(
            &registry,
            "streamsnap_fuse_metadata_evictions_total",
            &[("reason", "idle")]
        ),
        3.0
    );
    mounted.unmount().unwrap();
    drop(layer);
    assert_eq!(cache.resident_bytes(), 0);
}
