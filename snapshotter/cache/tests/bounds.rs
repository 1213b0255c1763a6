//! What one `get` may hold, and what all of them together may: asks over the limits are
//! refused, refs no TOC can hold are refused before any fetch, `warm` takes any number of
//! chunks in bounded groups, and calls wait for the decoded-bytes budget.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamsnap_cache::{ChunkRef, Error};
use streamsnap_format::{Digest, compress_chunk};
use tokio::sync::Semaphore;

use common::{Blob, FakeSource, config, open};

/// `count` chunks of `size` bytes, each one byte value repeated: frames of a few hundred bytes
/// at most that inflate to `size`.
fn inflating(count: usize, size: usize) -> Blob {
    Blob::new((0..count).map(|i| vec![i as u8 + 1; size]).collect())
}

#[tokio::test]
async fn an_ask_over_the_limits_is_refused_but_one_large_chunk_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(4, 4_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.max_get_bytes = 10_000;
    cfg.max_get_chunks = 3;
    let cache = open(cfg);
    let err = cache
        .get(&source.dyn_source(), &blob.chunks[..3])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                chunks: 3,
                bytes: 12_000,
                max_bytes: 10_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("ask for fewer chunks at a time"),
        "{err}"
    );
    let err = cache
        .get(&source.dyn_source(), &blob.chunks)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { chunks: 4, .. }), "{err}");
    assert_eq!(source.calls(), 0, "nothing fetched for a refused ask");
    // Repeats of one chunk count once; one chunk over the byte limit is fine alone.
    let twice = [blob.chunks[0], blob.chunks[0], blob.chunks[1]];
    cache.get(&source.dyn_source(), &twice).await.unwrap();
    let big = Blob::random(1, 50_000);
    let big_source = FakeSource::new(&big);
    let got = cache
        .get(&big_source.dyn_source(), &big.chunks)
        .await
        .unwrap();
    assert_eq!(got, big.contents);
}

#[tokio::test]
async fn a_ref_no_toc_can_hold_is_refused_before_any_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::random(1, 1_000);
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 20));
    let claims = |size, compressed_size| ChunkRef {
        size,
        compressed_size,
        ..blob.chunks[0]
    };
    for (bad, why) in [
        (claims(16 << 20, 100), "cannot compress"),
        (claims(u32::MAX, u32::MAX), "outside"),
        (claims(0, 10), "outside"),
    ] {
        let err = cache.get(&source.dyn_source(), &[bad]).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRef { reason, .. } if reason.contains(why)),
            "{err}"
        );
    }
    assert_eq!(source.calls(), 0);
}

#[tokio::test]
async fn a_frame_declaring_more_than_its_ref_is_refused_without_decoding_it() {
    let dir = tempfile::tempdir().unwrap();
    // The blob holds a frame of 1 MiB; the ref says 1,000 bytes (of other content).
    let frame = compress_chunk(&vec![7u8; 1 << 20], 3).unwrap();
    let blob = Blob::new(vec![vec![7u8; 1 << 20]]);
    assert_eq!(blob.data.len(), frame.len());
    let source = FakeSource::new(&blob);
    let cache = open(config(dir.path(), 1 << 30));
    let small = ChunkRef {
        digest: Digest::sha256(&[7u8; 1000]),
        size: 1000,
        ..blob.chunks[0]
    };
    let err = cache.get(&source.dyn_source(), &[small]).await.unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("declares 1048576 bytes")),
        "{err}"
    );
    assert!(!cache.contains(&small.digest));
}

#[tokio::test]
async fn warm_takes_any_number_of_chunks_in_bounded_groups() {
    let dir = tempfile::tempdir().unwrap();
    let blob = inflating(40, 100_000);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.max_request_decoded_bytes = 400_000;
    cfg.max_get_chunks = 3;
    let cache = open(cfg);
    // Far more than one get may ask for, in any order, with repeats.
    let mut asked: Vec<ChunkRef> = blob.chunks.iter().rev().copied().collect();
    asked.extend_from_slice(&blob.chunks[..5]);
    cache.warm(&source.dyn_source(), &asked).await.unwrap();
    assert!(blob.chunks.iter().all(|c| cache.contains(&c.digest)));
    // Groups of three (the chunk count), in blob order, each one range request.
    let requests = source.requests();
    assert_eq!(requests.len(), 14, "{requests:?}");
    assert_eq!(requests[0], blob.range(0, 2));
    assert_eq!(requests[13], blob.range(39, 39));
}

#[tokio::test]
async fn a_run_is_bounded_in_decoded_bytes_however_small_its_frames() {
    let dir = tempfile::tempdir().unwrap();
    let blob = inflating(8, 1 << 20);
    let source = FakeSource::new(&blob);
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.max_request_decoded_bytes = 2 << 20;
    let cache = open(cfg);
    cache.get(&source.dyn_source(), &blob.chunks).await.unwrap();
    assert_eq!(source.calls(), 4, "{:?}", source.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_until_their_decoded_bytes_fit_in_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let blob = inflating(2, 12 << 20);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, gate.clone());
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.max_decoded_in_flight = 16 << 20;
    let cache = Arc::new(open(cfg));
    let get = |i: usize| {
        let (cache, source, chunk) = (cache.clone(), source.dyn_source(), blob.chunks[i]);
        tokio::spawn(async move { cache.get(&source, &[chunk]).await })
    };
    let first = get(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = get(1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        source.calls(),
        1,
        "the second call waits for the first one's bytes"
    );
    gate.add_permits(2);
    assert_eq!(
        first.await.unwrap().unwrap(),
        vec![blob.contents[0].clone()]
    );
    assert_eq!(
        second.await.unwrap().unwrap(),
        vec![blob.contents[1].clone()]
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_budget_counts_against_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let blob = inflating(2, 12 << 20);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, gate.clone());
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.max_decoded_in_flight = 16 << 20;
    cfg.fetch_deadline = Duration::from_millis(500);
    let cache = Arc::new(open(cfg));
    let (c, s, chunk) = (cache.clone(), source.dyn_source(), blob.chunks[0]);
    let holder =
        tokio::spawn(async move { c.get_within(&s, &[chunk], Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = cache
        .get(&source.dyn_source(), &[blob.chunks[1]])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Deadline { last: Some(l), .. } if l.contains("waiting for memory")),
        "{err}"
    );
    gate.add_permits(1);
    let _ = holder.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_ahead_of_the_reads_has_a_budget_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let blob = inflating(3, 12 << 20);
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource::gated(&blob, gate.clone());
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.max_decoded_in_flight = 16 << 20;
    cfg.max_warm_in_flight = 16 << 20;
    let cache = Arc::new(open(cfg));
    let warm = |i: usize| {
        let (cache, source, chunk) = (cache.clone(), source.dyn_source(), blob.chunks[i]);
        tokio::spawn(async move { cache.warm(&source, &[chunk]).await })
    };
    let (first, second) = (warm(0), warm(1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        source.calls(),
        1,
        "the second warm waits for the first one's bytes"
    );
    // A read is not held up by them.
    let (c, s, chunk) = (cache.clone(), source.dyn_source(), blob.chunks[2]);
    let read = tokio::spawn(async move { c.get(&s, &[chunk]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(source.calls(), 2);
    gate.add_permits(3);
    assert_eq!(read.await.unwrap().unwrap(), vec![blob.contents[2].clone()]);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert!(blob.chunks.iter().all(|c| cache.contains(&c.digest)));
}
