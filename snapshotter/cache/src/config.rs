use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
        let mut bad = config;
        bad.fetch_deadline = Duration::ZERO;
        assert!(bad.validate().is_err());
    }
}
