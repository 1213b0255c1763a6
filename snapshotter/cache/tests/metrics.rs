//! The cache's metrics, read from a registry's text exposition after real reads against a fake
//! source: misses then hits by tier, evictions, gauges against the files on disk, failures and
//! verification failures by reason.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamsnap_cache::Error;
use tokio::sync::Semaphore;

use common::{
    Blob, FakeSource, Fault, chunk_path, config, disk_usage, metric, open, registered_metrics,
};

fn value(registry: &prometheus::Registry, name: &str) -> f64 {
    metric(registry, name, &[])
}

fn hits(registry: &prometheus::Registry, tier: &str) -> f64 {
    metric(registry, "streamsnap_cache_hits_total", &[("tier", tier)])
}

fn failures(registry: &prometheus::Registry, reason: &str) -> f64 {
    metric(
        registry,
        "streamsnap_cache_fetch_failures_total",
        &[("reason", reason)],
    )
}

fn verify_failures(registry: &prometheus::Registry, place: &str) -> f64 {
    metric(
        registry,
        "streamsnap_cache_verify_failures_total",
        &[("where", place)],
    )
}

#[tokio::test]
async fn a_miss_then_a_memory_hit_then_a_disk_hit_with_gauges_matching_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(4, 10_000);
    let source = FakeSource::new(&blob);
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.metrics = Some(metrics);
    let cache = open(cfg);
    assert_eq!(
        value(&registry, "streamsnap_cache_capacity_bytes"),
        1048576.0
    );
    assert_eq!(value(&registry, "streamsnap_cache_disk_bytes"), 0.0);

    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(value(&registry, "streamsnap_cache_misses_total"), 4.0);
    assert_eq!(hits(&registry, "memory") + hits(&registry, "disk"), 0.0);
    assert_eq!(
        value(&registry, "streamsnap_cache_range_requests_total"),
        1.0
    );
    assert_eq!(
        value(&registry, "streamsnap_cache_fetched_bytes_total"),
        blob.data.len() as f64
    );
    let (bytes, files) = disk_usage(dir.path());
    assert_eq!(
        value(&registry, "streamsnap_cache_disk_bytes"),
        bytes as f64
    );
    assert_eq!(
        value(&registry, "streamsnap_cache_disk_chunks"),
        files as f64
    );
    assert_eq!((bytes, files), (40_000, 4));
    assert_eq!(value(&registry, "streamsnap_cache_memory_bytes"), 40_000.0);

    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(hits(&registry, "memory"), 4.0);
    assert_eq!(value(&registry, "streamsnap_cache_misses_total"), 4.0);
    assert_eq!(source.calls(), 1);
    drop(cache);

    // Reopened with fresh metrics and no memory tier: disk hits, and the gauges start from
    // what is on disk.
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 0;
    cfg.metrics = Some(metrics);
    let cache = open(cfg);
    assert_eq!(value(&registry, "streamsnap_cache_disk_chunks"), 4.0);
    assert_eq!(value(&registry, "streamsnap_cache_disk_bytes"), 40_000.0);
    cache
        .get(&source.dyn_source(), &blob.chunks[1..3])
        .await
        .unwrap();
    assert_eq!(hits(&registry, "disk"), 2.0);
    assert_eq!(hits(&registry, "memory"), 0.0);
    assert_eq!(value(&registry, "streamsnap_cache_misses_total"), 0.0);
    assert_eq!(value(&registry, "streamsnap_cache_memory_bytes"), 0.0);
    // stats() reads the same counters.
    assert_eq!(cache.stats().hits_disk, 2);
}

#[tokio::test]
async fn evictions_count_files_and_bytes_and_the_gauges_follow() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(5, 1_000);
    let source = FakeSource::new(&blob);
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 3_000);
    cfg.memory_bytes = 0;
    cfg.metrics = Some(metrics);
    let cache = open(cfg);
    for chunk in &blob.chunks {
        cache.get(&source.dyn_source(), &[*chunk]).await.unwrap();
    }
    assert_eq!(value(&registry, "streamsnap_cache_evictions_total"), 2.0);
    assert_eq!(
        value(&registry, "streamsnap_cache_evicted_bytes_total"),
        2_000.0
    );
    assert!(!chunk_path(dir.path(), &blob.chunks[0].digest).exists());
    let (bytes, files) = disk_usage(dir.path());
    assert_eq!((bytes, files), (3_000, 3));
    assert_eq!(value(&registry, "streamsnap_cache_disk_bytes"), 3_000.0);
    assert_eq!(value(&registry, "streamsnap_cache_disk_chunks"), 3.0);
    drop(cache);

    // Reopening with a smaller cap evicts at open, counted too.
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1_000);
    cfg.metrics = Some(metrics);
    let _cache = open(cfg);
    assert_eq!(value(&registry, "streamsnap_cache_evictions_total"), 2.0);
    assert_eq!(value(&registry, "streamsnap_cache_disk_chunks"), 1.0);
    assert_eq!(value(&registry, "streamsnap_cache_capacity_bytes"), 1_000.0);
    assert_eq!(disk_usage(dir.path()), (1_000, 1));
}

#[tokio::test]
async fn concurrent_misses_of_one_chunk_count_as_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, gate.clone());
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.metrics = Some(metrics);
    let cache = Arc::new(open(cfg));
    let reads: Vec<_> = (0..3)
        .map(|_| {
            let (cache, source, chunks) = (cache.clone(), source.dyn_source(), blob.chunks.clone());
            tokio::spawn(async move { cache.get(&source, &chunks).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while value(&registry, "streamsnap_cache_coalesced_total") < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads did not coalesce"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.add_permits(1);
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap(), blob.contents);
    }
    assert_eq!(value(&registry, "streamsnap_cache_coalesced_total"), 2.0);
    assert_eq!(value(&registry, "streamsnap_cache_misses_total"), 1.0);
    assert_eq!(
        value(&registry, "streamsnap_cache_range_requests_total"),
        1.0
    );
}

#[tokio::test]
async fn failures_count_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 1_000);
    let source = FakeSource::new(&blob);
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.metrics = Some(metrics);
    cfg.fetch_deadline = Duration::from_millis(300);
    let cache = open(cfg);

    source.fail_next(&[Fault::Permanent]);
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Source { .. }), "{err}");
    assert_eq!(failures(&registry, "source"), 1.0);

    source.fail_next(&[Fault::Stall]);
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Deadline { .. }), "{err}");
    assert_eq!(failures(&registry, "deadline"), 1.0);

    // Wrong bytes on every attempt (3 by default): 3 verification failures, one corrupt fetch.
    source.fail_always(Some(Fault::Flip));
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(verify_failures(&registry, "fetched"), 3.0);
    assert_eq!(failures(&registry, "corrupt"), 1.0);
    assert_eq!(failures(&registry, "source"), 1.0);
    assert_eq!(failures(&registry, "deadline"), 1.0);
    assert_eq!(verify_failures(&registry, "disk"), 0.0);
    assert_eq!(value(&registry, "streamsnap_cache_disk_chunks"), 0.0);
}

#[tokio::test]
async fn a_corrupt_file_on_disk_is_a_disk_verify_failure() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 3_000);
    let source = FakeSource::new(&blob);
    let (metrics, registry) = registered_metrics();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 0;
    cfg.metrics = Some(metrics);
    let cache = open(cfg);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    let path = chunk_path(dir.path(), &blob.chunks[0].digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    assert_eq!(
        cache.get(&source.dyn_source(), &blob.chunks).await.unwrap(),
        blob.contents
    );
    assert_eq!(verify_failures(&registry, "disk"), 1.0);
    assert_eq!(verify_failures(&registry, "fetched"), 0.0);
    assert_eq!(hits(&registry, "disk"), 0.0);
    assert_eq!(value(&registry, "streamsnap_cache_misses_total"), 2.0);
    assert_eq!(value(&registry, "streamsnap_cache_disk_chunks"), 1.0);
}
