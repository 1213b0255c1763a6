//! The seams between the pieces: the registry as the cache's `BlobSource`, the cache as the
//! filesystem's `ChunkReader`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, ChunkCache, ChunkRef, SourceError};
use streamsnap_format::{Digest, Toc};
use streamsnap_fs::{ChunkReader, ReadError};
use streamsnap_registry::{Client, Repository};

use super::background::OnDemandRead;

/// A data blob in a registry, read by range: from its mirrors first (in order), then from the
/// registry itself. Every byte is verified by the cache, so a mirror can fail or lag, never lie.
pub struct RegistryBlob {
    client: Client,
    /// The repository on each mirror, then on the origin registry (last).
    endpoints: Vec<Repository>,
    digest: Digest,
}

impl RegistryBlob {
    pub fn new(client: Client, origin: Repository, mirrors: &[String], digest: Digest) -> Self {
        let mut endpoints: Vec<Repository> = mirrors
            .iter()
            .map(|m| Repository::new(m.clone(), origin.name.clone()))
            .collect();
        endpoints.push(origin);
        Self {
            client,
            endpoints,
            digest,
        }
    }
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let (origin, mirrors) = self
                .endpoints
                .split_last()
                .expect("the origin is always last");
            for mirror in mirrors {
                match self
                    .client
                    .read_range(mirror, &self.digest, offset, len)
                    .await
                {
                    Ok(bytes) => return Ok(bytes),
                    Err(error) => {
                        tracing::debug!(%mirror, %error, "mirror failed; trying the next source");
                    }
                }
            }
            self.client
                .read_range(origin, &self.digest, offset, len)
                .await
                .map_err(|error| SourceError {
                    message: error.to_string(),
                    retryable: error.is_transient(),
                    source: Some(Box::new(error)),
                })
        })
    }

    fn describe(&self) -> String {
        let origin = self.endpoints.last().expect("the origin is always last");
        format!("{origin}@{}", self.digest)
    }
}

/// A layer's chunks, through the shared chunk cache.
pub struct CacheReader {
    cache: Arc<ChunkCache>,
    source: Arc<dyn BlobSource>,
    toc: Arc<Toc>,
    /// On-demand reads in flight, which background fetch yields to.
    on_demand: Arc<AtomicUsize>,
}

impl CacheReader {
    pub fn new(
        cache: Arc<ChunkCache>,
        source: Arc<dyn BlobSource>,
        toc: Arc<Toc>,
        on_demand: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            cache,
            source,
            toc,
            on_demand,
        }
    }
}

impl ChunkReader for CacheReader {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let refs: Vec<ChunkRef> = chunks
            .iter()
            .map(|&i| ChunkRef::from_toc(&self.toc.chunks()[i as usize]))
            .collect();
        Box::pin(async move {
            let _reading = OnDemandRead::begin(&self.on_demand);
            self.cache.get(&self.source, &refs).await.map_err(|error| {
                tracing::debug!(blob = self.source.describe(), %error, "chunk read failed");
                ReadError::new(error.to_string())
            })
        })
    }
}
