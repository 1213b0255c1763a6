//! Start-up profiles on the node: recording which chunks a layer's first reads touched (served
//! at `/debug/profile`, pushed with `streamsnap artifact-streaming profile`), and fetching the
//! chunks an image's profile lists as soon as its layers are mounted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use streamsnap_cache::{BlobSource, ChunkCache, ChunkRef};
use streamsnap_format::Toc;

use crate::metrics::Metrics;

/// How long after a layer is mounted its reads count as start-up.
pub const RECORD_WINDOW: Duration = Duration::from_secs(60);
/// Chunks further apart than this (compressed bytes in the blob) are fetched in different
/// requests; closer ones in one, the gap included.
const MAX_GAP: u64 = 256 << 10;
/// Largest batch of chunks fetched in one go, in compressed bytes: a read waiting for a chunk
/// of a batch waits for the whole batch.
const MAX_BATCH: u64 = 4 << 20;
/// Batches of one layer in flight at once.
const BATCHES_IN_FLIGHT: usize = 2;
/// A layer's prefetch stops after this many failed batches (reads then fetch on demand).
const MAX_FAILURES: u32 = 3;

/// The chunks of one mounted layer read within [`RECORD_WINDOW`] of its mount, first read
/// first. Memory is bounded by the layer's chunk count.
#[derive(Debug)]
pub struct AccessLog {
    mounted: Instant,
    state: Mutex<(HashSet<u32>, Vec<u32>)>,
}

impl AccessLog {
    pub fn new() -> Self {
        Self {
            mounted: Instant::now(),
            state: Mutex::default(),
        }
    }

    /// Notes a read of `chunks` (in the order the read needs them).
    pub fn record(&self, chunks: &[u32]) {
        if self.mounted.elapsed() > RECORD_WINDOW {
            return;
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (seen, order) = &mut *state;
        for &chunk in chunks {
            if seen.insert(chunk) {
                order.push(chunk);
            }
        }
    }

    /// The chunks read so far, first read first.
    pub fn chunks(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Groups the profile's `chunks` (first read first; indices outside the TOC are dropped) into
/// batches of nearby chunks in blob order, ordered by the first read of any of their chunks.
/// Stops adding chunks once `max_bytes` of decoded data are planned, so a profile cannot make
/// the node fetch more than its cache can hold.
pub fn plan(toc: &Toc, chunks: &[u32], max_bytes: u64) -> Vec<Vec<ChunkRef>> {
    let table = toc.chunks();
    let mut ranked: Vec<(usize, u32)> = Vec::new();
    let mut seen = HashSet::new();
    let mut planned = 0u64;
    for (rank, &index) in chunks.iter().enumerate() {
        let Some(chunk) = table.get(index as usize) else {
            continue;
        };
        if !seen.insert(index) {
            continue;
        }
        planned += u64::from(chunk.size);
        if planned > max_bytes {
            break;
        }
        ranked.push((rank, index));
    }
    ranked.sort_by_key(|&(_, index)| table[index as usize].offset);
    let mut batches: Vec<(usize, Vec<ChunkRef>)> = Vec::new();
    let mut span: Option<(u64, u64)> = None; // start and end of the current batch in the blob
    for (rank, index) in ranked {
        let chunk = ChunkRef::from_toc(&table[index as usize]);
        let end = chunk.offset + u64::from(chunk.compressed_size);
        match (&mut span, batches.last_mut()) {
            (Some((start, last_end)), Some((first_rank, batch)))
                if chunk.offset.saturating_sub(*last_end) <= MAX_GAP
                    && end - *start <= MAX_BATCH =>
            {
                *last_end = end;
                *first_rank = (*first_rank).min(rank);
                batch.push(chunk);
            }
            _ => {
                span = Some((chunk.offset, end));
                batches.push((rank, vec![chunk]));
            }
        }
    }
    batches.sort_by_key(|(rank, _)| *rank);
    batches.into_iter().map(|(_, batch)| batch).collect()
}

/// Fetches `batches` into the cache in the background, [`BATCHES_IN_FLIGHT`] at a time, skipping
/// chunks already cached. Reads of those chunks meanwhile join the fetches in flight. `stop`
/// (the layer is unmounted) ends it early.
pub fn start(
    layer: String,
    batches: Vec<Vec<ChunkRef>>,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
) {
    if batches.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let started = Instant::now();
        let failures = std::sync::atomic::AtomicU32::new(0);
        let fetched = std::sync::atomic::AtomicU64::new(0);
        futures_util::stream::iter(batches)
            .for_each_concurrent(BATCHES_IN_FLIGHT, |batch| {
                let (source, cache, stop, metrics) = (&source, &cache, &stop, &metrics);
                let (failures, fetched, layer) = (&failures, &fetched, &layer);
                async move {
                    if stop.load(Ordering::Relaxed)
                        || failures.load(Ordering::Relaxed) >= MAX_FAILURES
                    {
                        return;
                    }
                    let missing: Vec<ChunkRef> = batch
                        .into_iter()
                        .filter(|c| !cache.contains(&c.digest))
                        .collect();
                    if missing.is_empty() {
                        return;
                    }
                    let bytes: u64 = missing.iter().map(|c| u64::from(c.compressed_size)).sum();
                    match cache.get(source, &missing).await {
                        Ok(_) => {
                            metrics.prefetch_bytes.inc_by(bytes);
                            fetched.fetch_add(bytes, Ordering::Relaxed);
                        }
                        Err(error) => {
                            let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                            tracing::debug!(%layer, %error, "prefetching a batch of the start-up profile failed");
                            if n == MAX_FAILURES {
                                tracing::warn!(%layer, %error, "prefetch of the start-up profile gave up; reads fetch on demand");
                            }
                        }
                    }
                }
            })
            .await;
        tracing::debug!(
            %layer,
            bytes = fetched.load(Ordering::Relaxed),
            seconds = started.elapsed().as_secs_f64(),
            "start-up profile prefetched"
        );
    });
}

#[cfg(test)]
mod tests {
    use streamsnap_cache::CacheConfig;

    use super::super::fake::layer;
    use super::*;

    #[test]
    fn the_log_keeps_first_reads_in_order_once() {
        let log = AccessLog::new();
        log.record(&[5, 6]);
        log.record(&[2, 5]);
        log.record(&[9]);
        assert_eq!(log.chunks(), vec![5, 6, 2, 9]);
    }

    #[test]
    fn plan_merges_neighbours_and_orders_batches_by_first_read() {
        // 64 chunks of about 4 KiB: all within MAX_GAP of each other.
        let (toc, _) = layer(64, 4096, true);
        let batches = plan(&toc, &[40, 3, 41, 2, 999], u64::MAX);
        let indices: Vec<Vec<u64>> = batches
            .iter()
            .map(|b| b.iter().map(|c| c.offset).collect())
            .collect();
        let offset = |i: usize| toc.chunks()[i].offset;
        assert_eq!(
            indices,
            vec![vec![offset(2), offset(3), offset(40), offset(41)]],
            "one batch in blob order; the index past the table is dropped"
        );
        // A cap of two chunks' worth keeps the first two read.
        let cap = u64::from(toc.chunks()[40].size + toc.chunks()[3].size);
        let batches = plan(&toc, &[40, 3, 41, 2], cap);
        let offsets: Vec<u64> = batches.concat().iter().map(|c| c.offset).collect();
        assert_eq!(offsets, vec![offset(3), offset(40)]);
    }

    #[test]
    fn plan_splits_far_chunks_and_puts_the_first_read_first() {
        // 1 MiB chunks of random data: each is its own batch beyond MAX_BATCH/MAX_GAP limits.
        let (toc, _) = layer(12, 1 << 20, true);
        let batches = plan(&toc, &[11, 0, 6], u64::MAX);
        let firsts: Vec<u64> = batches.iter().map(|b| b[0].offset).collect();
        let offset = |i: usize| toc.chunks()[i].offset;
        assert_eq!(firsts, vec![offset(11), offset(0), offset(6)]);
    }

    #[tokio::test]
    async fn prefetch_brings_the_planned_chunks_in_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let (toc, blob) = layer(40, 4096, true);
        let source: Arc<dyn BlobSource> = blob.clone();
        let batches = plan(&toc, &[30, 1, 2, 31], u64::MAX);
        let metrics = Metrics::new().unwrap();
        start(
            "test".into(),
            batches,
            source,
            cache.clone(),
            Arc::default(),
            metrics.clone(),
        );
        let cached = || -> Vec<usize> {
            (0..40)
                .filter(|&i| cache.contains(&ChunkRef::from_toc(&toc.chunks()[i]).digest))
                .collect()
        };
        for _ in 0..400 {
            if cached().len() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cached(), vec![1, 2, 30, 31]);
        assert!(metrics.prefetch_bytes.get() > 0);
    }
}
