//! The chunk cache of the node daemon.
//!
//! This layer sits between the image filesystem and the network. Given the chunk refs of one
//! data blob (from a validated TOC), it returns their verified, uncompressed content: from a small
//! in-memory LRU, else from local disk (re-verified by sha256 on every load), else fetched from
//! the blob with as few HTTP range requests as possible (adjacent missing frames merged into one
//! request, concurrent misses of the same chunk sharing one fetch). Chunks are keyed by the
//! sha256 of their content, so a chunk shared by several layers or images is fetched and stored
//! once. The disk copy is bounded by a byte cap with LRU eviction. Hits, misses, fetches,
//! failures, evictions and sizes are counted in [`Metrics`].
//!
//! What it must not know: the registry client, HTTP, tonic, FUSE or containerd. The network is
//! seen only through [`BlobSource`], the filesystem above it only calls [`ChunkCache::get`]. It
//! never returns bytes that were not checked against the chunk's digest.

mod cache;
mod config;
mod disk;
mod error;
mod fetch;
mod index;
mod memory;
mod metrics;
mod stats;

use std::future::Future;
use std::pin::Pin;

use streamsnap_format::{Digest, api};

pub use cache::{ChunkCache, Usage};
pub use config::CacheConfig;
pub use error::{Error, Result};
pub use fetch::{Run, RunLimits, decode_zstd, plan_runs};
pub use metrics::Metrics;
pub use stats::Stats;

/// A boxed future, as returned by [`BlobSource::read_range`] (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A blob readable by range: the only thing the cache sees of the network.
pub trait BlobSource: Send + Sync + 'static {
    /// Exactly `len` bytes at `offset` of the blob. An implementation returning another length
    /// is a bug the cache catches (the bytes are not trusted), it is not relied upon.
    fn read_range(&self, offset: u64, len: u64)
    -> BoxFuture<'_, Result<bytes::Bytes, SourceError>>;

    /// For logs and errors, e.g. `127.0.0.1:5000/repo@sha256:...`. Never contains credentials.
    fn describe(&self) -> String;

    /// Turns the frame of `chunk` read from this blob into its content, checked against
    /// `chunk.digest` and `chunk.size` before it is returned (a source that overrides this must
    /// verify as strictly: the cache serves what it returns). The default: an independent zstd
    /// frame (the chunked format), decoded and verified by `streamsnap_format::decode_chunk` on
    /// the blocking pool. Sources of another encoding (the index kind's gzip spans) override
    /// it. Returns why the frame is bad otherwise; the cache then fetches it again.
    fn decode(
        &self,
        chunk: ChunkRef,
        frame: bytes::Bytes,
    ) -> BoxFuture<'_, Result<bytes::Bytes, String>> {
        Box::pin(fetch::decode_zstd(chunk, frame))
    }
}

/// Why a [`BlobSource`] could not deliver a range.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub message: String,
    /// Whether trying again later may succeed (connection reset, 5xx, 429). The cache retries
    /// these with exponential backoff until the fetch deadline; other errors fail at once.
    pub retryable: bool,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SourceError {
    /// An error the cache retries until its fetch deadline.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// An error that fails the read at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
}

/// Where one chunk is in its data blob and what it must hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// sha256 of the uncompressed content: the chunk's identity and cache key.
    pub digest: Digest,
    /// Offset of the chunk's zstd frame in the data blob.
    pub offset: u64,
    /// Length of the frame.
    pub compressed_size: u32,
    /// Length of the uncompressed content.
    pub size: u32,
}

impl ChunkRef {
    /// The ref of a chunk of a validated TOC.
    ///
    /// # Panics
    /// If the chunk's digest is not 32 bytes, which TOC validation refuses.
    pub fn from_toc(chunk: &api::Chunk) -> Self {
        let digest =
            Digest::from_slice(&chunk.sha256).expect("chunk digest of a validated TOC is 32 bytes");
        Self {
            digest,
            offset: chunk.offset,
            compressed_size: chunk.compressed_size,
            size: chunk.size,
        }
    }

    /// The chunk table entry `decode_chunk` checks a frame against.
    pub(crate) fn to_toc(self) -> api::Chunk {
        api::Chunk {
            offset: self.offset,
            compressed_size: self.compressed_size,
            size: self.size,
            sha256: self.digest.as_bytes().to_vec(),
        }
    }

    /// End of the frame in the blob.
    pub(crate) fn end(&self) -> u64 {
        self.offset + u64::from(self.compressed_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ref_round_trips_through_the_toc_type() {
        let chunk = api::Chunk {
            offset: 10,
            compressed_size: 20,
            size: 30,
            sha256: Digest::sha256(b"x").as_bytes().to_vec(),
        };
        let r = ChunkRef::from_toc(&chunk);
        assert_eq!(r.digest, Digest::sha256(b"x"));
        assert_eq!(r.end(), 30);
        assert_eq!(r.to_toc(), chunk);
    }
}
