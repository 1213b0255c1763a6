//! The disk side of the cache: the byte cap under load, LRU order across reopen, cleanup at open.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamsnap_cache::ChunkCache;

use common::{Blob, FakeSource, chunk_path, config, disk_usage, open};

const CHUNK: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_usage_stays_under_the_cap_while_reading_ten_times_it() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 1 << 20; // 16 chunks
    let blob = Blob::random(160, CHUNK);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), cap);
    cfg.memory_bytes = 4 * CHUNK as u64;
    let cache = Arc::new(open(cfg));

    // Four readers over different stretches of the blob, in batches of 1 to 5 chunks, while a
    // watcher walks the directory.
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (cache, source, blob) = (Arc::clone(&cache), source.dyn_source(), blob.clone());
            tokio::spawn(async move {
                let mut i = r * 40;
                let end = i + 40;
                while i < end {
                    let n = (i % 5 + 1).min(end - i);
                    let got = cache.get(&source, &blob.chunks[i..i + n]).await.unwrap();
                    assert_eq!(got, blob.contents[i..i + n]);
                    i += n;
                }
            })
        })
        .collect();
    let watcher = {
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut max = 0;
            for _ in 0..200 {
                max = max.max(disk_usage(&path).0);
                std::thread::sleep(Duration::from_millis(1));
            }
            max
        })
    };
    for reader in readers {
        reader.await.unwrap();
    }
    let max_seen = watcher.await.unwrap();
    assert!(
        max_seen <= cap + CHUNK as u64,
        "{max_seen} bytes on disk, cap {cap}"
    );

    let (bytes, files) = disk_usage(dir.path());
    assert!(
        bytes <= cap + CHUNK as u64,
        "{bytes} bytes on disk, cap {cap}"
    );
    let usage = cache.usage();
    assert_eq!(
        (usage.disk_bytes, usage.disk_chunks),
        (bytes, files),
        "index matches the disk"
    );
    assert!(usage.disk_bytes <= cap);
    assert!(usage.memory_bytes <= 4 * CHUNK as u64);
    let stats = cache.stats();
    assert_eq!(stats.misses, 160);
    assert!(stats.evictions >= 160 - 16, "{stats:?}");
    assert_eq!(stats.evicted_bytes, stats.evictions * CHUNK as u64);
    assert_eq!(stats.store_failures, 0);

    // Reopening finds exactly what is on disk.
    drop(cache);
    let cache = open(config(dir.path(), cap));
    assert_eq!(cache.usage().disk_bytes, bytes);
}

#[tokio::test]
async fn sequential_reads_evict_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(5, 1_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 3_000);
    cfg.memory_bytes = 0;
    let cache = open(cfg);
    for chunk in &blob.chunks[..3] {
        cache.get(&source.dyn_source(), &[*chunk]).await.unwrap();
    }
    cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap(); // 0 is now recent
    cache
        .get(&source.dyn_source(), &blob.chunks[3..4])
        .await
        .unwrap(); // evicts 1
    let present: Vec<bool> = blob
        .chunks
        .iter()
        .map(|c| cache.contains(&c.digest))
        .collect();
    assert_eq!(present, [true, false, true, true, false]);
    assert!(!chunk_path(dir.path(), &blob.chunks[1].digest).exists());
    assert_eq!(cache.stats().evictions, 1);
}

#[tokio::test]
async fn reopening_with_a_smaller_cap_keeps_the_most_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(4, 1_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 0;
    let cache = open(cfg.clone());
    for chunk in &blob.chunks {
        cache.get(&source.dyn_source(), &[*chunk]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A disk hit on chunk 0 marks its file used.
    cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap();
    assert_eq!(cache.stats().hits_disk, 1);
    drop(cache);

    cfg.capacity_bytes = 2_000;
    let cache = open(cfg);
    let present: Vec<bool> = blob
        .chunks
        .iter()
        .map(|c| cache.contains(&c.digest))
        .collect();
    assert_eq!(present, [true, false, false, true]);
    assert_eq!(cache.stats().evictions, 2);
    assert_eq!(disk_usage(dir.path()), (2_000, 2));
}

#[tokio::test]
async fn open_removes_leftovers_and_indexes_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 1_000);
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("tmp/.tmpABC123"), vec![0; 5_000]).unwrap();
    // Chunk 0 put in place by hand, correctly; chunk 1's file holds garbage of the right size.
    for (i, data) in [blob.contents[0].to_vec(), vec![7; 1_000]]
        .iter()
        .enumerate()
    {
        let path = chunk_path(dir.path(), &blob.chunks[i].digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
    let junk = chunk_path(dir.path(), &blob.chunks[0].digest).with_file_name("partial.download");
    std::fs::write(&junk, b"junk").unwrap();

    let cache = open(config(dir.path(), 1 << 20));
    assert!(!junk.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        cache.usage().disk_chunks,
        2,
        "indexed by name, content not read"
    );
    assert_eq!(disk_usage(dir.path()), (2_000, 2));

    // The garbage is found out on first use, deleted and refetched.
    let source = FakeSource::new(&blob);
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(source.requests(), vec![blob.range(1, 1)]);
    assert_eq!(cache.stats().verify_failures, 1);
    let path = chunk_path(dir.path(), &blob.chunks[1].digest);
    assert_eq!(std::fs::read(path).unwrap(), blob.contents[1]);
}

#[tokio::test]
async fn a_chunk_larger_than_the_cap_is_served_but_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 4_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 3_000);
    cfg.memory_bytes = 0;
    let cache = open(cfg);
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(cache.usage(), Default::default());
    assert_eq!(disk_usage(dir.path()), (0, 0));
    assert!(!cache.contains(&blob.chunks[0].digest));
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(source.calls(), 2, "not stored, so fetched again");
}

#[tokio::test]
async fn the_memory_lru_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(6, 1_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 2_500;
    let cache = open(cfg);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(cache.usage().memory_bytes, 2_000);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    let stats = cache.stats();
    assert_eq!(stats.hits_memory + stats.hits_disk, 6);
    assert!(stats.hits_disk >= 4, "{stats:?}");
}

#[test]
fn invalid_config_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.verify_attempts = 0;
    let err = ChunkCache::open(cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid cache configuration: verify_attempts: must be at least 1"
    );
}
