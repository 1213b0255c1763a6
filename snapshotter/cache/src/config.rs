use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use streamsnap_format::MAX_CHUNK_SIZE;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Settings of a [`ChunkCache`](crate::ChunkCache).
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Where chunks are stored, as `<dir>/<2 hex>/<64 hex>` (uncompressed content, named by its
    /// sha256), written under a temporary name in `<dir>/tmp` then renamed into place. The
    /// directory belongs to one cache: files that are not chunks are deleted at open.
    pub dir: PathBuf,
    /// Disk cap. Usage never exceeds it by more than the chunk being written.
    pub capacity_bytes: u64,
    /// In-memory LRU of recently used decoded chunks, in front of the disk. 0 disables it.
    pub memory_bytes: u64,
    /// Largest merged range request. A single frame larger than this is still fetched whole.
    pub max_request_bytes: u64,
    /// Most decoded bytes in one merged range request (what verifying it produces: frames
    /// may inflate thousands of times). A single chunk is still fetched whole.
    pub max_request_decoded_bytes: u64,
    /// Most chunks in one merged range request.
    pub max_request_chunks: usize,
    /// Most decoded bytes one `get` may ask for (its distinct chunks' sizes summed), all of
    /// which it holds until it returns. A larger ask is refused, [`Error::TooLarge`]; a single
    /// chunk is always allowed. [`ChunkCache::warm`](crate::ChunkCache::warm) splits
    /// larger sets itself.
    pub max_get_bytes: u64,
    /// Most distinct chunks one `get` may ask for.
    pub max_get_chunks: usize,
    /// Decoded bytes all `get` calls together may hold at once: a call waits (within its
    /// deadline) until the bytes it asks for fit. Bounds the cache's memory however many reads
    /// run at once, whatever the chunks' compression ratio.
    pub max_decoded_in_flight: u64,
    /// Decoded bytes all [`warm`](crate::ChunkCache::warm) calls together (read-ahead,
    /// background fetch, prefetch) may hold at once, apart from `max_decoded_in_flight`: work
    /// ahead of the reads never takes their room.
    pub max_warm_in_flight: u64,
    /// Two missing frames are fetched in one request if at most this many bytes lie between them
    /// (those bytes are fetched and discarded). 0 merges only adjacent frames.
    pub max_gap_bytes: u64,
    /// Total time one read may spend fetching (all attempts and backoff) before it fails.
    pub fetch_deadline: Duration,
    /// Fetches of a chunk whose bytes fail verification before the read gives up.
    pub verify_attempts: u32,
    /// Where the cache counts hits, misses, fetches, failures and evictions, and publishes its
    /// size. `None`: handles registered nowhere (see [`Metrics::register`] to export them).
    pub metrics: Option<Arc<Metrics>>,
}

impl CacheConfig {
    pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
    pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 8 << 20;
    pub const DEFAULT_MAX_REQUEST_DECODED_BYTES: u64 = 16 << 20;
    pub const DEFAULT_MAX_REQUEST_CHUNKS: usize = 1024;
    pub const DEFAULT_MAX_GET_BYTES: u64 = 32 << 20;
    pub const DEFAULT_MAX_GET_CHUNKS: usize = 4096;
    pub const DEFAULT_MAX_DECODED_IN_FLIGHT: u64 = 128 << 20;
    pub const DEFAULT_MAX_WARM_IN_FLIGHT: u64 = 32 << 20;
    pub const DEFAULT_MAX_GAP_BYTES: u64 = 0;
    pub const DEFAULT_FETCH_DEADLINE: Duration = Duration::from_secs(60);
    pub const DEFAULT_VERIFY_ATTEMPTS: u32 = 3;

    /// A cache in `dir` holding at most `capacity_bytes` on disk, with the defaults for the rest.
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            capacity_bytes,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
            max_request_decoded_bytes: Self::DEFAULT_MAX_REQUEST_DECODED_BYTES,
            max_request_chunks: Self::DEFAULT_MAX_REQUEST_CHUNKS,
            max_get_bytes: Self::DEFAULT_MAX_GET_BYTES,
            max_get_chunks: Self::DEFAULT_MAX_GET_CHUNKS,
            max_decoded_in_flight: Self::DEFAULT_MAX_DECODED_IN_FLIGHT,
            max_warm_in_flight: Self::DEFAULT_MAX_WARM_IN_FLIGHT,
            max_gap_bytes: Self::DEFAULT_MAX_GAP_BYTES,
            fetch_deadline: Self::DEFAULT_FETCH_DEADLINE,
            verify_attempts: Self::DEFAULT_VERIFY_ATTEMPTS,
            metrics: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |field, reason| Err(Error::Config { field, reason });
        if self.dir.as_os_str().is_empty() {
            return invalid("dir", "must not be empty");
        }
        if self.max_request_bytes == 0 {
            return invalid("max_request_bytes", "must be at least 1");
        }
        if self.max_request_decoded_bytes == 0 || self.max_request_chunks == 0 {
            return invalid(
                "max_request_decoded_bytes",
                "must be at least 1, and so must max_request_chunks",
            );
        }
        if self.max_get_bytes == 0 || self.max_get_chunks == 0 {
            return invalid(
                "max_get_bytes",
                "must be at least 1, and so must max_get_chunks",
            );
        }
        if self.max_decoded_in_flight < u64::from(MAX_CHUNK_SIZE) {
            return invalid(
                "max_decoded_in_flight",
                "must hold at least one chunk of the largest size (16 MiB)",
            );
        }
        if self.max_warm_in_flight < u64::from(MAX_CHUNK_SIZE) {
            return invalid(
                "max_warm_in_flight",
                "must hold at least one chunk of the largest size (16 MiB)",
            );
        }
        if self.fetch_deadline.is_zero() {
            return invalid("fetch_deadline", "must be longer than zero");
        }
        if self.verify_attempts == 0 {
            return invalid("verify_attempts", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_nonsense_is_refused() {
        let config = CacheConfig::new("/var/cache/x", 1 << 30);
        assert_eq!(config.memory_bytes, 64 << 20);
        assert_eq!(config.max_request_bytes, 8 << 20);
        assert_eq!(config.max_gap_bytes, 0);
        assert_eq!(config.fetch_deadline, Duration::from_secs(60));
        assert_eq!(config.verify_attempts, 3);
        config.validate().unwrap();

        let mut bad = config.clone();
        bad.verify_attempts = 0;
        assert!(matches!(
            bad.validate(),
            Err(Error::Config {
                field: "verify_attempts",
                ..
            })
        ));
        let mut bad = config.clone();
        bad.max_request_bytes = 0;
        assert!(bad.validate().is_err());
        let mut bad = config.clone();
        bad.fetch_deadline = Duration::ZERO;
        assert!(bad.validate().is_err());
        let mut bad = config.clone();
        bad.max_decoded_in_flight = 1 << 20;
        assert!(bad.validate().is_err());
        let mut bad = config;
        bad.max_get_chunks = 0;
        assert!(bad.validate().is_err());
    }
}
