//! `ChunkCache::get` against a fake source: hits, merging, single-flight, retries, deadline,
//! verification.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamsnap_cache::{ChunkCache, Error};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use common::{Blob, FakeSource, Fault, chunk_path, config, open};

#[tokio::test]
async fn misses_then_memory_hits_then_disk_hits_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(4, 10_000);
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 20));

    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.range_requests), (4, 1));
    assert_eq!(stats.fetched_bytes, blob.data.len() as u64);
    assert!(blob.chunks.iter().all(|c| cache.contains(&c.digest)));
    assert_eq!(cache.usage().disk_bytes, 40_000);
    assert_eq!(cache.usage().disk_chunks, 4);
    assert_eq!(cache.usage().memory_bytes, 40_000);

    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(cache.stats().hits_memory, 4);
    assert_eq!(source.calls(), 1);
    drop(cache);

    // A new cache on the same directory serves everything from disk; the source is down.
    let dead = FakeSource::new(&blob);
    dead.fail_always(Some(Fault::Permanent));
    let cache = open(config(dir.path(), 1 << 20));
    assert_eq!(cache.usage().disk_chunks, 4);
    assert!(cache.contains(&blob.chunks[2].digest));
    let got = cache.get(&dead.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(cache.stats().hits_disk, 4);
    assert_eq!(dead.calls(), 0);
}

#[tokio::test]
async fn without_memory_every_repeat_read_is_a_verified_disk_hit() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 5_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 0;
    let cache = open(cfg);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits_memory, stats.hits_disk, stats.misses),
        (0, 2, 2)
    );
    assert_eq!(cache.usage().memory_bytes, 0);
}

#[tokio::test]
async fn chunks_come_back_in_the_order_asked_with_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(4, 3_000);
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 20));
    let asked = [
        blob.chunks[3],
        blob.chunks[0],
        blob.chunks[3],
        blob.chunks[1],
    ];
    let got = cache.get(&source.dyn_source(), &asked).await.unwrap();
    let expected = [3, 0, 3, 1].map(|i| blob.contents[i].clone());
    assert_eq!(got, expected);
    assert_eq!(cache.stats().misses, 3, "a repeated chunk is fetched once");
    // 3 and the 0..=1 run are not adjacent: two requests.
    assert_eq!(source.requests(), vec![blob.range(0, 1), blob.range(3, 3)]);
    assert!(
        cache
            .get(&source.dyn_source(), &[])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn adjacent_misses_merge_around_cached_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(6, 4_000);
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 20));
    cache
        .get(&source.dyn_source(), &blob.chunks[2..3])
        .await
        .unwrap();
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(
        source.requests(),
        vec![blob.range(2, 2), blob.range(0, 1), blob.range(3, 5)]
    );
}

#[tokio::test]
async fn max_request_bytes_splits_long_runs() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(5, 4_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    // Room for two frames (they are all about the same size), not three.
    cfg.max_request_bytes = blob.range(0, 1).1.max(blob.range(2, 3).1) + 10;
    assert!(cfg.max_request_bytes < blob.range(0, 2).1);
    let cache = open(cfg);
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    let mut requests = source.requests();
    requests.sort();
    assert_eq!(
        requests,
        vec![blob.range(0, 1), blob.range(2, 3), blob.range(4, 4)]
    );
}

#[tokio::test]
async fn a_frame_larger_than_max_request_bytes_is_fetched_whole() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 4_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.max_request_bytes = 100;
    let cache = open(cfg);
    assert_eq!(
        cache.get(&source.dyn_source(), &blob.chunks).await.unwrap(),
        blob.contents
    );
    let mut requests = source.requests();
    requests.sort();
    assert_eq!(requests, vec![blob.range(0, 0), blob.range(1, 1)]);
}

#[tokio::test]
async fn max_gap_merges_misses_across_a_cached_chunk() {
    let blob = Blob::random(3, 4_000);
    let gap = u64::from(blob.chunks[1].compressed_size);
    for (max_gap, expected) in [
        (gap, vec![blob.range(0, 2)]),
        (gap - 1, vec![blob.range(0, 0), blob.range(2, 2)]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let source = FakeSource::new(&blob);
        let mut cfg = config(dir.path(), 1 << 20);
        cfg.max_gap_bytes = max_gap;
        let cache = open(cfg);
        cache
            .get(&source.dyn_source(), &blob.chunks[1..2])
            .await
            .unwrap();
        let before = cache.stats().fetched_bytes;
        let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
        assert_eq!(got, blob.contents);
        let mut requests = source.requests().split_off(1);
        requests.sort();
        assert_eq!(requests, expected, "max_gap {max_gap}");
        let fetched: u64 = expected.iter().map(|(_, len)| len).sum();
        assert_eq!(
            cache.stats().fetched_bytes - before,
            fetched,
            "gap bytes are counted"
        );
        assert_eq!(cache.stats().misses, 3);
    }
}

/// Polls until `cond` holds (other tasks need to reach their await points).
async fn until(mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition never became true"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_the_same_chunks_share_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 50_000);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, Arc::clone(&gate));
    let cache = Arc::new(open(config(dir.path(), 1 << 20)));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (cache, source) = (Arc::clone(&cache), source.dyn_source());
            let chunks = blob.chunks.clone();
            tokio::spawn(async move { cache.get(&source, &chunks).await })
        })
        .collect();
    // One call started the fetch; the 19 others wait for it (each counts its first chunk when
    // it starts waiting, its second after the first arrived).
    until(|| source.calls() >= 1 && cache.stats().coalesced >= 19).await;
    gate.add_permits(100);
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), blob.contents);
    }
    let stats = cache.stats();
    assert_eq!(source.calls(), 1, "requests: {:?}", source.requests());
    assert_eq!((stats.misses, stats.coalesced), (2, 38), "{stats:?}");
    assert_eq!(stats.hits_memory + stats.hits_disk, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_reads_fetch_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(8, 20_000);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, Arc::clone(&gate));
    let cache = Arc::new(open(config(dir.path(), 1 << 20)));
    // Windows of 3 chunks at every offset, all in flight at once.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (cache, source) = (Arc::clone(&cache), source.dyn_source());
            let chunks = blob.chunks[i..i + 3].to_vec();
            tokio::spawn(async move { cache.get(&source, &chunks).await })
        })
        .collect();
    until(|| cache.stats().misses + cache.stats().coalesced >= 8).await;
    gate.add_permits(100);
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), blob.contents[i..i + 3]);
    }
    assert_eq!(cache.stats().misses, 8, "every chunk fetched exactly once");
    let fetched: u64 = source.requests().iter().map(|(_, len)| len).sum();
    assert_eq!(fetched, blob.data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_get_the_leaders_error_without_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, Arc::clone(&gate));
    source.fail_always(Some(Fault::Permanent));
    let cache = Arc::new(open(config(dir.path(), 1 << 20)));
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (cache, source, chunks) =
                (Arc::clone(&cache), source.dyn_source(), blob.chunks.clone());
            tokio::spawn(async move { cache.get(&source, &chunks).await })
        })
        .collect();
    until(|| source.calls() == 1 && cache.stats().coalesced == 4).await;
    gate.add_permits(100);
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Source { .. }), "{err}");
        assert!(!err.is_transient());
    }
    assert_eq!(source.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_does_not_strand_its_followers() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, Arc::clone(&gate));
    let cache = Arc::new(open(config(dir.path(), 1 << 20)));
    let spawn = || {
        let (cache, source, chunks) =
            (Arc::clone(&cache), source.dyn_source(), blob.chunks.clone());
        tokio::spawn(async move { cache.get(&source, &chunks).await })
    };
    let leader = spawn();
    until(|| source.calls() == 1).await;
    let follower = spawn();
    until(|| cache.stats().coalesced == 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // The follower takes over with its own request (the leader's is still parked at the gate).
    until(|| source.calls() == 2).await;
    gate.add_permits(100);
    assert_eq!(follower.await.unwrap().unwrap(), blob.contents);
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_with_backoff_until_success() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 1_000);
    let source = FakeSource::new(&blob);
    source.fail_next(&[Fault::Retryable, Fault::Retryable, Fault::Retryable]);
    let cache = open(config(dir.path(), 1 << 20));
    let start = Instant::now();
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(source.calls(), 4);
    assert_eq!(source.requests(), vec![blob.range(0, 1); 4]);
    // 100 + 200 + 400 ms of backoff.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(800),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_is_capped_at_two_seconds_and_the_deadline_ends_retries() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let source = FakeSource::new(&blob);
    source.fail_always(Some(Fault::Retryable));
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.fetch_deadline = Duration::from_secs(10);
    let cache = open(cfg);
    let start = Instant::now();
    let err = cache
        .get(&source.dyn_source(), &blob.chunks)
        .await
        .unwrap_err();
    let waited = start.elapsed();
    let Error::Deadline { last, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(last.as_deref(), Some("503 service unavailable"));
    assert!(err.is_transient());
    // Attempts at 0, .1, .3, .7, 1.5, 3.1, 5.1, 7.1, 9.1 s; the next would start past 10 s.
    assert_eq!(source.calls(), 9);
    assert!(waited <= Duration::from_secs(10), "{waited:?}");
    assert!(!cache.contains(&blob.chunks[0].digest));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_source_fails_with_deadline_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(3, 1_000);
    let source = FakeSource::new(&blob);
    source.fail_always(Some(Fault::Stall));
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.fetch_deadline = Duration::from_secs(5);
    let cache = open(cfg);
    let start = Instant::now();
    let err = cache
        .get(&source.dyn_source(), &blob.chunks)
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(err, Error::Deadline { last: None, .. }), "{err}");
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5_050),
        "{waited:?}"
    );
    assert!(err.to_string().contains("fake.registry/repo"), "{err}");
}

#[tokio::test]
async fn a_stalled_source_fails_with_deadline_in_real_time_too() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let source = FakeSource::new(&blob);
    source.fail_always(Some(Fault::Stall));
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.fetch_deadline = Duration::from_millis(300);
    let cache = open(cfg);
    let start = std::time::Instant::now();
    let err = cache
        .get(&source.dyn_source(), &blob.chunks)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Deadline { .. }), "{err}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_permanent_error_fails_at_once_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 1_000);
    let source = FakeSource::new(&blob);
    source.fail_next(&[Fault::Permanent]);
    let cache = open(config(dir.path(), 1 << 20));
    let err = cache
        .get(&source.dyn_source(), &blob.chunks)
        .await
        .unwrap_err();
    let Error::Source {
        blob: name,
        source: cause,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(name, "fake.registry/repo@sha256:0000");
    assert_eq!(cause.message, "404 blob unknown");
    assert_eq!(source.calls(), 1);
    assert!(!cache.contains(&blob.chunks[0].digest));
    // The source recovered: the next read works.
    assert_eq!(
        cache.get(&source.dyn_source(), &blob.chunks).await.unwrap(),
        blob.contents
    );
}

#[tokio::test]
async fn wrong_bytes_are_refetched_frame_by_frame_then_served() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(3, 2_000);
    let source = FakeSource::new(&blob);
    source.fail_next(&[Fault::Flip]);
    let cache = open(config(dir.path(), 1 << 20));
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    let mut requests = source.requests();
    assert_eq!(requests.remove(0), blob.range(0, 2));
    requests.sort();
    assert_eq!(
        requests,
        vec![blob.range(0, 0), blob.range(1, 1), blob.range(2, 2)]
    );
    assert_eq!(cache.stats().verify_failures, 3);
}

#[tokio::test]
async fn persistently_wrong_bytes_fail_with_corrupt_and_nothing_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 2_000);
    let source = FakeSource::new(&blob);
    source.fail_always(Some(Fault::Flip));
    let cache = open(config(dir.path(), 1 << 20));
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap_err();
    let Error::Corrupt {
        digest, attempts, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!((*digest, *attempts), (blob.chunks[0].digest, 3));
    assert!(!err.is_transient());
    assert_eq!(source.calls(), 3);
    assert!(!cache.contains(&blob.chunks[0].digest));
    assert_eq!(cache.usage(), Default::default());
    assert_eq!(common::disk_usage(dir.path()), (0, 0));
}

#[tokio::test]
async fn a_short_body_is_caught_and_only_the_missing_frame_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 2_000);
    let source = FakeSource::new(&blob);
    source.fail_next(&[Fault::Short(1)]);
    let cache = open(config(dir.path(), 1 << 20));
    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    assert_eq!(source.requests(), vec![blob.range(0, 1), blob.range(1, 1)]);

    // Always short: never served.
    let dir = tempfile::tempdir().unwrap();
    source.fail_always(Some(Fault::Short(1)));
    let cache = open(config(dir.path(), 1 << 20));
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..1])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("short body")),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupted_file_on_disk_is_detected_deleted_and_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(2, 3_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.memory_bytes = 0;
    let cache = open(cfg);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    let path = chunk_path(dir.path(), &blob.chunks[1].digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let got = cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(got, blob.contents);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits_disk, stats.verify_failures, stats.misses),
        (1, 1, 3)
    );
    assert_eq!(source.requests().last(), Some(&blob.range(1, 1)));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        blob.contents[1],
        "good copy stored again"
    );
}

#[test]
fn get_futures_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 10);
    let cache: ChunkCache = open(config(dir.path(), 1 << 20));
    let source = FakeSource::new(&blob).dyn_source();
    let future = cache.get(&source, &blob.chunks);
    assert_send(&future);
    fn assert_shared<T: Send + Sync>() {}
    assert_shared::<ChunkCache>();
}

#[tokio::test]
async fn a_ref_with_the_wrong_size_is_refused_without_harming_the_cached_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 2_000);
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 20));
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    let mut wrong = blob.chunks[0];
    wrong.size += 1;
    let err = cache.get(&source.dyn_source(), &[wrong]).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(chunk_path(dir.path(), &wrong.digest).exists());
    let calls = source.calls();
    assert_eq!(
        cache.get(&source.dyn_source(), &blob.chunks).await.unwrap(),
        blob.contents
    );
    assert_eq!(source.calls(), calls);
}
