//! Start-up profiles on the node: recording which chunks the mounted layers' first reads touched
//! (served at `/debug/profile`, pushed with `streamsnap artifact-streaming profile`), and
//! fetching the chunks an image's profile lists as soon as its layers are mounted, node-wide in
//! the order the start first read them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamsnap_cache::{BlobSource, ChunkCache, ChunkRef, RunLimits, plan_runs};
use streamsnap_format::LayerProfile;
use streamsnap_fs::ChunkTable;

use super::source::chunk_ref;
use crate::metrics::Metrics;

/// How long after a layer is mounted its reads count as start-up.
pub const RECORD_WINDOW: Duration = Duration::from_secs(60);
/// Chunks further apart than this (compressed bytes in the blob) go in different batches;
/// closer ones in one, the gap included (batches are the cache's runs, `plan_runs`).
const MAX_GAP: u64 = 256 << 10;
/// Largest batch of chunks fetched in one go, in compressed bytes: a read waiting for a chunk
/// of a batch waits for the whole batch.
const MAX_BATCH: u64 = 2 << 20;
/// Largest batch in decoded bytes: what fetching a batch holds in memory, whatever its chunks'
/// compression ratio (a profile may list chunks of a few hundred bytes that inflate to
/// 16 MiB each). A single larger chunk is a batch of its own.
const MAX_BATCH_DECODED: u64 = 8 << 20;
/// Most chunks in one batch.
const MAX_BATCH_CHUNKS: usize = 1024;
/// The default of `[fetch] prefetch_in_flight_bytes`: compressed bytes of batches in flight
/// at once on the node. To keep a link full, what is in flight must cover the link's
/// bandwidth times its round trip (1 Gbit/s at 80 ms: 10 MB).
pub const DEFAULT_IN_FLIGHT: u64 = 16 << 20;
/// The most `[fetch] prefetch_in_flight_bytes` may be: each batch in flight holds up to
/// `MAX_BATCH` compressed and [`MAX_BATCH_DECODED`] decoded bytes.
pub const MAX_IN_FLIGHT: u64 = 256 << 20;
/// A layer's prefetch stops after this many failed batches (reads then fetch on demand).
const MAX_FAILURES: u32 = 3;

/// The chunks of one mounted layer read within [`RECORD_WINDOW`] of its mount, each with its
/// position in the node's order of first reads. Only the chunks read take room (not one slot
/// per chunk of the layer: a mounted layer keeps nothing the size of its chunk table).
#[derive(Debug)]
pub struct AccessLog {
    mounted: Instant,
    /// Shared by every layer of the daemon: ranks order first reads across layers.
    sequence: Arc<AtomicU64>,
    /// By chunk index: the rank of its first read.
    ranks: Mutex<HashMap<u32, u64>>,
}

impl AccessLog {
    /// A log of a layer mounted now.
    pub fn new(sequence: Arc<AtomicU64>) -> Self {
        Self {
            mounted: Instant::now(),
            sequence,
            ranks: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.ranks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a read of `chunks` (in the order the read needs them).
    pub fn record(&self, chunks: &[u32]) {
        if self.mounted.elapsed() > RECORD_WINDOW {
            return;
        }
        let mut ranks = self.lock();
        for &chunk in chunks {
            ranks
                .entry(chunk)
                .or_insert_with(|| self.sequence.fetch_add(1, Ordering::Relaxed));
        }
    }

    /// Folds this log into `ranks` (by chunk): each chunk keeps its earliest rank.
    pub fn merge_into(&self, ranks: &mut HashMap<u32, u64>) {
        for (&chunk, &rank) in self.lock().iter() {
            ranks
                .entry(chunk)
                .and_modify(|r| *r = (*r).min(rank))
                .or_insert(rank);
        }
    }

    /// The chunks read so far and their ranks, first read first.
    #[cfg(test)]
    fn entries(&self) -> Vec<(u32, u64)> {
        ranked(&self.lock())
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

/// The chunks that have a rank, with it, lowest rank first.
pub fn ranked(ranks: &HashMap<u32, u64>) -> Vec<(u32, u64)> {
    let mut ranked: Vec<(u32, u64)> = ranks.iter().map(|(&c, &r)| (c, r)).collect();
    ranked.sort_by_key(|&(chunk, rank)| (rank, chunk));
    ranked
}

/// Groups what the profile lists for a layer (indices outside the TOC are dropped) into
/// batches of nearby chunks in blob order, each with the lowest rank among its chunks, lowest
/// first. Stops adding chunks once `max_bytes` of decoded data are planned, taking the first
/// read first, so a profile cannot make the node fetch more than its cache can hold.
pub fn plan(
    table: &dyn ChunkTable,
    listed: &LayerProfile,
    max_bytes: u64,
) -> Vec<(u64, Vec<ChunkRef>)> {
    let mut ranked: Vec<(ChunkRef, u64)> = listed
        .ranked()
        .filter_map(|(index, rank)| Some((chunk_ref(table.chunk(index)?), rank)))
        .collect();
    ranked.sort_by_key(|&(_, rank)| rank);
    // A decoded profile lists each chunk of a layer once.
    let mut planned = 0u64;
    let mut kept = Vec::new();
    for (chunk, rank) in ranked {
        planned += u64::from(chunk.size);
        if planned > max_bytes {
            break;
        }
        kept.push((chunk, rank));
    }
    let limits = RunLimits {
        bytes: MAX_BATCH,
        decoded_bytes: MAX_BATCH_DECODED,
        chunks: MAX_BATCH_CHUNKS,
        gap: MAX_GAP,
    };
    let mut batches: Vec<(u64, Vec<ChunkRef>)> = plan_runs(kept, limits)
        .into_iter()
        .map(|run| {
            let rank = run.chunks.iter().map(|&(_, rank)| rank).min();
            let chunks = run.chunks.into_iter().map(|(chunk, _)| chunk).collect();
            (rank.expect("a run has a chunk"), chunks)
        })
        .collect();
    batches.sort_by_key(|(rank, _)| *rank);
    batches
}

/// One layer's share of the prefetch: where its chunks come from and go, and when to stop.
pub struct LayerJob {
    pub layer: String,
    pub source: Arc<dyn BlobSource>,
    pub cache: Arc<ChunkCache>,
    /// Set when the layer is unmounted.
    pub stop: Arc<AtomicBool>,
    failures: AtomicU32,
}

impl std::fmt::Debug for LayerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerJob")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl LayerJob {
    pub fn new(
        layer: String,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            layer,
            source,
            cache,
            stop,
            failures: AtomicU32::new(0),
        })
    }
}

/// A batch waiting in the queue, ordered by rank, then by arrival.
struct Pending {
    rank: u64,
    arrival: u64,
    batch: Vec<ChunkRef>,
    job: Arc<LayerJob>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.rank, self.arrival) == (other.rank, other.arrival)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.rank, self.arrival).cmp(&(other.rank, other.arrival))
    }
}

#[derive(Default)]
struct Queue {
    pending: BinaryHeap<Reverse<Pending>>,
    arrivals: u64,
    workers: usize,
}

/// The node's prefetch queue: batches of every layer being prefetched, as many at a time as
/// `[fetch] prefetch_in_flight_bytes` holds, lowest rank first, so the chunks the start needs
/// first arrive first whichever layer they are in. Chunks already cached are skipped; reads of
/// chunks being fetched join the fetch.
pub struct Prefetcher {
    queue: Mutex<Queue>,
    /// Batches fetched at once.
    workers: usize,
    metrics: Metrics,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher").finish_non_exhaustive()
    }
}

impl Prefetcher {
    /// A queue that keeps about `in_flight` compressed bytes of batches in flight (one batch
    /// at least; `in_flight` is capped at [`MAX_IN_FLIGHT`]).
    pub fn new(metrics: Metrics, in_flight: u64) -> Arc<Self> {
        let workers = in_flight.clamp(MAX_BATCH, MAX_IN_FLIGHT) / MAX_BATCH;
        Arc::new(Self {
            queue: Mutex::default(),
            workers: usize::try_from(workers).expect("at most 128"),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a layer's `batches` (from [`plan`]) and starts workers as needed. Runs inside the
    /// runtime (it spawns).
    pub fn submit(self: &Arc<Self>, job: &Arc<LayerJob>, batches: Vec<(u64, Vec<ChunkRef>)>) {
        let start = {
            let mut queue = self.lock();
            for (rank, batch) in batches {
                let arrival = queue.arrivals;
                queue.arrivals += 1;
                queue.pending.push(Reverse(Pending {
                    rank,
                    arrival,
                    batch,
                    job: job.clone(),
                }));
            }
            let start = self
                .workers
                .saturating_sub(queue.workers)
                .min(queue.pending.len());
            queue.workers += start;
            start
        };
        for _ in 0..start {
            let this = self.clone();
            tokio::spawn(async move { this.work().await });
        }
    }

    /// Takes batches until the queue is empty.
    async fn work(&self) {
        loop {
            let next = {
                let mut queue = self.lock();
                match queue.pending.pop() {
                    Some(Reverse(next)) => next,
                    None => {
                        queue.workers -= 1;
                        return;
                    }
                }
            };
            self.fetch(next).await;
        }
    }

    async fn fetch(&self, pending: Pending) {
        let job = &pending.job;
        if job.stop.load(Ordering::Relaxed) || job.failures.load(Ordering::Relaxed) >= MAX_FAILURES
        {
            return;
        }
        let missing: Vec<ChunkRef> = pending
            .batch
            .into_iter()
            .filter(|c| !job.cache.contains(&c.digest))
            .collect();
        if missing.is_empty() {
            return;
        }
        let bytes: u64 = missing.iter().map(|c| u64::from(c.compressed_size)).sum();
        match job.cache.warm(&job.source, &missing).await {
            Ok(_) => self.metrics.prefetch_bytes.inc_by(bytes),
            Err(error) => {
                let failures = job.failures.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(layer = job.layer, %error, "prefetching a batch of the start-up profile failed");
                if failures == MAX_FAILURES {
                    tracing::warn!(layer = job.layer, %error, "prefetch of the start-up profile gave up on this layer; its reads fetch on demand");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use streamsnap_cache::CacheConfig;
    use streamsnap_format::Digest;

    use super::super::fake::layer;
    use super::*;

    fn listed(chunks: &[u32], ranks: &[u64]) -> LayerProfile {
        LayerProfile {
            layer: Digest::sha256(b"x"),
            chunks: chunks.to_vec(),
            ranks: ranks.to_vec(),
        }
    }

    #[test]
    fn the_log_keeps_first_reads_once_with_node_wide_ranks() {
        let sequence = Arc::new(AtomicU64::new(0));
        let (a, b) = (
            AccessLog::new(sequence.clone()),
            AccessLog::new(sequence.clone()),
        );
        a.record(&[5, 6]);
        b.record(&[1]);
        a.record(&[2, 5]);
        assert_eq!(a.entries(), vec![(5, 0), (6, 1), (2, 3)]);
        assert_eq!(b.entries(), vec![(1, 2)]);
        // Two mounts of one layer: each chunk keeps its earliest rank.
        let mut merged = HashMap::new();
        a.merge_into(&mut merged);
        b.merge_into(&mut merged);
        assert_eq!(ranked(&merged), vec![(5, 0), (6, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn plan_merges_neighbours_and_ranks_batches_by_their_first_read() {
        // 64 chunks of about 4 KiB: all within MAX_GAP of each other.
        let (toc, _) = layer(64, 4096, true);
        let offset = |i: usize| toc.chunks()[i].offset;
        let batches = plan(
            &*toc,
            &listed(&[40, 3, 41, 2, 999], &[7, 9, 10, 11, 12]),
            u64::MAX,
        );
        let got: Vec<(u64, Vec<u64>)> = batches
            .iter()
            .map(|(rank, b)| (*rank, b.iter().map(|c| c.offset).collect()))
            .collect();
        assert_eq!(
            got,
            vec![(7, vec![offset(2), offset(3), offset(40), offset(41)])],
            "one batch in blob order; the index past the table is dropped"
        );
        // A cap of two chunks' worth keeps the first two read.
        let cap = u64::from(toc.chunks()[40].size + toc.chunks()[3].size);
        let batches = plan(&*toc, &listed(&[40, 3, 41, 2], &[]), cap);
        let offsets: Vec<u64> = batches
            .iter()
            .flat_map(|(_, b)| b.iter().map(|c| c.offset))
            .collect();
        assert_eq!(offsets, vec![offset(3), offset(40)]);
    }

    #[test]
    fn plan_bounds_batches_in_decoded_bytes_and_chunks() {
        // 1 MiB chunks of one repeated byte: a hostile profile can list thousands of frames of
        // a few hundred bytes that fit in one 2 MiB request.
        let (toc, _) = layer(64, 1 << 20, false);
        let all: Vec<u32> = (0..64).collect();
        let batches = plan(&*toc, &listed(&all, &[]), u64::MAX);
        let sizes: Vec<usize> = batches.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, vec![8; 8], "8 MiB decoded each");
        let (toc, _) = layer(3000, 16, false);
        let all: Vec<u32> = (0..3000).collect();
        let batches = plan(&*toc, &listed(&all, &[]), u64::MAX);
        assert!(batches.iter().all(|(_, b)| b.len() <= MAX_BATCH_CHUNKS));
        assert_eq!(batches.iter().map(|(_, b)| b.len()).sum::<usize>(), 3000);
    }

    #[test]
    fn plan_splits_far_chunks_and_puts_the_first_read_first() {
        // 1 MiB chunks of random data: far apart, one batch each.
        let (toc, _) = layer(12, 1 << 20, true);
        let batches = plan(&*toc, &listed(&[11, 0, 6], &[]), u64::MAX);
        let firsts: Vec<(u64, u64)> = batches.iter().map(|(r, b)| (*r, b[0].offset)).collect();
        let offset = |i: usize| toc.chunks()[i].offset;
        assert_eq!(
            firsts,
            vec![(0, offset(11)), (1, offset(0)), (2, offset(6))]
        );
    }

    #[tokio::test]
    async fn prefetch_brings_the_planned_chunks_in_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let (toc, blob) = layer(40, 4096, true);
        let source: Arc<dyn BlobSource> = blob.clone();
        let metrics = Metrics::new().unwrap();
        let prefetcher = Prefetcher::new(metrics.clone(), DEFAULT_IN_FLIGHT);
        let job = LayerJob::new("test".into(), source, cache.clone(), Arc::default());
        prefetcher.submit(&job, plan(&*toc, &listed(&[30, 1, 2, 31], &[]), u64::MAX));
        let cached = || -> Vec<usize> {
            (0..40)
                .filter(|&i| cache.contains(&chunk_ref(toc.chunk(i as u32).unwrap()).digest))
                .collect()
        };
        for _ in 0..400 {
            if prefetcher.lock().workers == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cached(), vec![1, 2, 30, 31]);
        assert!(metrics.prefetch_bytes.get() > 0);
    }

    #[test]
    fn in_flight_bytes_give_whole_batches_and_at_least_one() {
        let metrics = || Metrics::new().unwrap();
        assert_eq!(Prefetcher::new(metrics(), DEFAULT_IN_FLIGHT).workers, 8);
        assert_eq!(Prefetcher::new(metrics(), 1).workers, 1);
        assert_eq!(Prefetcher::new(metrics(), 5 << 20).workers, 2);
        assert_eq!(Prefetcher::new(metrics(), u64::MAX).workers, 128);
    }

    #[tokio::test]
    async fn the_queue_serves_the_lowest_rank_of_any_layer_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let prefetcher = Prefetcher::new(Metrics::new().unwrap(), DEFAULT_IN_FLIGHT);
        let (_, blob) = layer(1, 16, false);
        let source: Arc<dyn BlobSource> = blob;
        let (a, b) = (
            LayerJob::new("a".into(), source.clone(), cache.clone(), Arc::default()),
            LayerJob::new("b".into(), source, cache, Arc::default()),
        );
        // Queue directly, without starting workers, then look at the order they would take.
        for (job, rank) in [(&a, 5), (&b, 1), (&a, 3), (&b, 9)] {
            let mut queue = prefetcher.lock();
            let arrival = queue.arrivals;
            queue.arrivals += 1;
            queue.pending.push(Reverse(Pending {
                rank,
                arrival,
                batch: Vec::new(),
                job: job.clone(),
            }));
        }
        let mut order = Vec::new();
        while let Some(Reverse(p)) = prefetcher.lock().pending.pop() {
            order.push((p.job.layer.clone(), p.rank));
        }
        let want: Vec<(String, u64)> = [("b", 1), ("a", 3), ("a", 5), ("b", 9)]
            .iter()
            .map(|(l, r)| (l.to_string(), *r))
            .collect();
        assert_eq!(order, want);
    }
}
