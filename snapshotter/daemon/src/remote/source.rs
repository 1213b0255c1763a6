//! The seams between the pieces: the registry as the cache's `BlobSource`, the cache as the
//! filesystem's `ChunkReader`.

use std::sync::Arc;

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, ChunkCache, ChunkRef, SourceError};
use streamsnap_format::{Digest, Toc};
use streamsnap_fs::{ChunkReader, ReadError};
use streamsnap_registry::{Client, Repository};

/// A data blob in a registry, read by range.
pub struct RegistryBlob {
    client: Client,
    repo: Repository,
    digest: Digest,
}

impl RegistryBlob {
    pub fn new(client: Client, repo: Repository, digest: Digest) -> Self {
        Self {
            client,
            repo,
            digest,
        }
    }
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.client
                .read_range(&self.repo, &self.digest, offset, len)
                .await
                .map_err(|error| SourceError {
                    message: error.to_string(),
                    retryable: error.is_transient(),
                    source: Some(Box::new(error)),
                })
        })
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.repo, self.digest)
    }
}

/// A layer's chunks, through the shared chunk cache.
pub struct CacheReader {
    cache: Arc<ChunkCache>,
    source: Arc<dyn BlobSource>,
    toc: Arc<Toc>,
}

impl CacheReader {
    pub fn new(cache: Arc<ChunkCache>, source: Arc<dyn BlobSource>, toc: Arc<Toc>) -> Self {
        Self { cache, source, toc }
    }
}

impl ChunkReader for CacheReader {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let refs: Vec<ChunkRef> = chunks
            .iter()
            .map(|&i| ChunkRef::from_toc(&self.toc.chunks()[i as usize]))
            .collect();
        Box::pin(async move {
            self.cache.get(&self.source, &refs).await.map_err(|error| {
                tracing::debug!(blob = self.source.describe(), %error, "chunk read failed");
                ReadError::new(error.to_string())
            })
        })
    }
}
