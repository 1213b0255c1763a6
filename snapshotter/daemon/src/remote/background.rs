//! Background fetch: after a layer is mounted, bring the rest of its chunks into the cache at
//! low priority, so later reads are local. Off by default. One layer at a time across the node,
//! paused while any on-demand read waits for the network, stopped when the layer is unmounted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use streamsnap_cache::{BlobSource, ChunkCache, ChunkRef};
use streamsnap_format::Digest;
use streamsnap_fs::{ChunkTable, Layer};

use super::source::chunk_ref;
use crate::metrics::Metrics;

/// Pause between checks while on-demand reads are in flight.
const YIELD: Duration = Duration::from_millis(20);
/// Give up on a layer after this many failed batches in a row.
const MAX_FAILURES: u32 = 5;
/// Most decoded bytes in one batch, whatever `batch_bytes` (compressed) allows: what a batch
/// holds in memory while it is fetched, however much its chunks inflate. A single larger
/// chunk is a batch of its own.
const MAX_BATCH_DECODED: u64 = 16 << 20;
/// Most chunks in one batch.
const MAX_BATCH_CHUNKS: usize = 1024;

#[derive(Clone, Debug)]
pub struct BackgroundConfig {
    pub enabled: bool,
    pub batch_bytes: u64,
    /// Layers with a data blob larger than this are not fetched in the background.
    pub max_layer_bytes: u64,
}

/// Shared by every mounted layer of the daemon.
#[derive(Debug)]
pub struct Background {
    config: BackgroundConfig,
    /// On-demand reads in flight; background fetch waits while there are any.
    pub on_demand: Arc<AtomicUsize>,
    one_at_a_time: Arc<tokio::sync::Semaphore>,
}

impl Background {
    pub fn new(config: BackgroundConfig) -> Self {
        Self {
            config,
            on_demand: Arc::default(),
            one_at_a_time: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Starts fetching the chunks of `layer` (its data blob of `data_size` bytes) if enabled
    /// and the layer fits; `stop` ends it early. The layer's chunk table is read from its index
    /// when the layer's turn comes.
    pub fn start(
        &self,
        layer: Arc<Layer>,
        data_size: u64,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        stop: Arc<AtomicBool>,
        metrics: Metrics,
    ) {
        if !self.config.enabled {
            return;
        }
        let digest: Digest = layer.digest();
        if data_size > self.config.max_layer_bytes {
            tracing::info!(
                layer = %digest,
                size = data_size,
                limit = self.config.max_layer_bytes,
                "layer too large for background fetch within the cache cap; fetching on demand only"
            );
            return;
        }
        let on_demand = self.on_demand.clone();
        let gate = self.one_at_a_time.clone();
        let batch_bytes = self.config.batch_bytes;
        tokio::spawn(async move {
            let Ok(_permit) = gate.acquire_owned().await else {
                return;
            };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Loading an index reads a file (or rebuilds it from the TOC): off the runtime.
            let batches = tokio::task::spawn_blocking(move || {
                layer.index().map(|index| batches(&*index, batch_bytes))
            })
            .await;
            let batches = match batches {
                Ok(Ok(batches)) => batches,
                Ok(Err(error)) => {
                    tracing::warn!(layer = %digest, %error, "background fetch cannot read the layer's chunk table");
                    return;
                }
                Err(_) => return,
            };
            let mut failures = 0;
            for batch in batches {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if on_demand.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    tokio::time::sleep(YIELD).await;
                }
                let missing: Vec<ChunkRef> = batch
                    .into_iter()
                    .filter(|c| !cache.contains(&c.digest))
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                let bytes: u64 = missing.iter().map(|c| u64::from(c.compressed_size)).sum();
                match cache.warm(&source, &missing).await {
                    Ok(_) => {
                        failures = 0;
                        metrics.background_bytes.inc_by(bytes);
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::debug!(layer = %digest, %error, "background fetch batch failed");
                        if failures >= MAX_FAILURES {
                            tracing::warn!(layer = %digest, %error, "background fetch gave up; reads fetch on demand");
                            return;
                        }
                        tokio::time::sleep(YIELD * 50).await;
                    }
                }
            }
            metrics.background_layers.inc();
            tracing::debug!(layer = %digest, "background fetch complete");
        });
    }
}

/// The layer's chunks in blob order, in groups of about `batch_bytes` compressed, and at most
/// [`MAX_BATCH_DECODED`] decoded bytes and [`MAX_BATCH_CHUNKS`] chunks.
fn batches(table: &dyn ChunkTable, batch_bytes: u64) -> Vec<Vec<ChunkRef>> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let (mut size, mut decoded) = (0u64, 0u64);
    for chunk in (0..).map_while(|i| table.chunk(i)) {
        let full = size + u64::from(chunk.compressed_size) > batch_bytes
            || decoded + u64::from(chunk.size) > MAX_BATCH_DECODED
            || current.len() >= MAX_BATCH_CHUNKS;
        if !current.is_empty() && full {
            batches.push(std::mem::take(&mut current));
            (size, decoded) = (0, 0);
        }
        size += u64::from(chunk.compressed_size);
        decoded += u64::from(chunk.size);
        current.push(chunk_ref(chunk));
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Counts an on-demand read while alive.
pub struct OnDemandRead(Arc<AtomicUsize>);

impl OnDemandRead {
    pub fn begin(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for OnDemandRead {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use streamsnap_cache::CacheConfig;

    use super::super::fake::{layer, resident};
    use super::*;

    #[test]
    fn batches_are_bounded_in_decoded_bytes_and_chunks_not_only_compressed_bytes() {
        // 64 chunks of 1 MiB that compress to a few hundred bytes: all of them fit in 8 MiB
        // compressed.
        let (toc, _) = layer(64, 1 << 20, false);
        let sizes: Vec<usize> = batches(&*toc, 8 << 20).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![16, 16, 16, 16]);
        let (toc, _) = layer(3000, 16, false);
        let sizes: Vec<usize> = batches(&*toc, 8 << 20).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1024, 1024, 952]);
        // Compressed bytes still split incompressible chunks.
        let (toc, _) = layer(4, 4096, true);
        assert_eq!(batches(&*toc, 5000).len(), 4);
    }

    #[tokio::test]
    async fn background_fetch_waits_for_on_demand_reads_then_fetches_everything() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let (toc, blob) = layer(10, 4096, false);
        let background = Background::new(BackgroundConfig {
            enabled: true,
            batch_bytes: 1,
            max_layer_bytes: 1 << 30,
        });
        let reading = OnDemandRead::begin(&background.on_demand);
        let metrics = Metrics::new().unwrap();
        let source: Arc<dyn BlobSource> = blob.clone();
        background.start(
            resident(&toc),
            toc.data_size(),
            source,
            cache.clone(),
            Arc::default(),
            metrics.clone(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            blob.requests.load(Ordering::SeqCst),
            0,
            "it must wait while a read is in flight"
        );
        drop(reading);
        for _ in 0..100 {
            if metrics.background_layers.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.background_layers.get(), 1);
        assert!(
            toc.chunks()
                .iter()
                .all(|c| cache.contains(&ChunkRef::from_toc(c).digest))
        );
    }

    #[tokio::test]
    async fn background_fetch_stops_when_the_layer_is_unmounted_and_is_off_when_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let (toc, blob) = layer(10, 4096, false);
        let metrics = Metrics::new().unwrap();
        let off = Background::new(BackgroundConfig {
            enabled: false,
            batch_bytes: 1,
            max_layer_bytes: 1 << 30,
        });
        off.start(
            resident(&toc),
            toc.data_size(),
            blob.clone(),
            cache.clone(),
            Arc::default(),
            metrics.clone(),
        );
        let on = Background::new(BackgroundConfig {
            enabled: true,
            batch_bytes: 1,
            max_layer_bytes: 1 << 30,
        });
        let stop = Arc::new(AtomicBool::new(true));
        on.start(
            resident(&toc),
            toc.data_size(),
            blob.clone(),
            cache,
            stop,
            metrics.clone(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(blob.requests.load(Ordering::SeqCst), 0);
        assert_eq!(metrics.background_layers.get(), 0);
    }
}
