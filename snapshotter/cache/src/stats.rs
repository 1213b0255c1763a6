use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the cache's counters (monotonic since open). Counted per distinct chunk of a
/// [`get`](crate::ChunkCache::get): a chunk asked twice in one call counts once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunks served from the in-memory LRU.
    pub hits_memory: u64,
    /// Chunks loaded (and verified) from disk.
    pub hits_disk: u64,
    /// Chunks fetched from a source.
    pub misses: u64,
    /// Chunks a call did not load itself because a concurrent call was already loading or
    /// fetching them (single-flight).
    pub coalesced: u64,
    /// Compressed bytes received from sources (all attempts, gap bytes included).
    pub fetched_bytes: u64,
    /// `read_range` calls made (all attempts).
    pub range_requests: u64,
    /// Frames from a source, or files on disk, that failed verification.
    pub verify_failures: u64,
    /// Chunk files deleted to stay under the disk cap.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Verified chunks that could not be written to disk (served anyway).
    pub store_failures: u64,
}

/// The live counters: plain atomics, relaxed (they are metrics, not synchronisation).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits_memory: AtomicU64,
    pub hits_disk: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub range_requests: AtomicU64,
    pub verify_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub store_failures: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            hits_memory: get(&self.hits_memory),
            hits_disk: get(&self.hits_disk),
            misses: get(&self.misses),
            coalesced: get(&self.coalesced),
            fetched_bytes: get(&self.fetched_bytes),
            range_requests: get(&self.range_requests),
            verify_failures: get(&self.verify_failures),
            evictions: get(&self.evictions),
            evicted_bytes: get(&self.evicted_bytes),
            store_failures: get(&self.store_failures),
        }
    }
}
