/// A snapshot of the cache's counters, read from its [`Metrics`](crate::Metrics) (monotonic
/// since they were created). Counted per distinct chunk of a [`get`](crate::ChunkCache::get): a
/// chunk asked twice in one call counts once.
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
    /// Frames from a source, or files on disk, that failed verification (both `where` labels of
    /// the metric).
    pub verify_failures: u64,
    /// Chunk files deleted to stay under the disk cap.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Verified chunks that could not be written to disk (served anyway).
    pub store_failures: u64,
}
