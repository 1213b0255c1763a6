//! [`ChunkCache`]: memory, then disk, then the source, for the chunks of one `get`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::join_all;
use streamsnap_format::Digest;

use crate::config::CacheConfig;
use crate::disk::{Layout, Load, lock};
use crate::error::{Error, Result};
use crate::fetch::{self, Deadline, Flights, Lead, Outcome, Role, RunLimits};
use crate::index::Index;
use crate::memory::Memory;
use crate::metrics::{self, FailureReason, Metrics};
use crate::stats::Stats;
use crate::{BlobSource, ChunkRef};

/// Verified chunks on local disk, bounded by a byte cap, with a small memory LRU in front and
/// single-flight fetching behind. `Send + Sync`: share one through an `Arc` for all layers.
/// One cache per directory: two caches on the same directory would delete each other's files.
#[derive(Debug)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: CacheConfig,
    layout: Layout,
    index: Mutex<Index>,
    memory: Mutex<Memory>,
    flights: Flights,
    metrics: Arc<Metrics>,
    /// The decoded bytes reads may hold at once.
    reads: Budget,
    /// The decoded bytes `warm` calls may hold at once.
    warming: Budget,
}

/// A budget of decoded bytes, in units of [`BUDGET_UNIT`] bytes.
#[derive(Debug)]
struct Budget {
    semaphore: tokio::sync::Semaphore,
    units: u64,
}

/// Granularity of the decoded-bytes budgets.
const BUDGET_UNIT: u64 = 4096;

impl Budget {
    fn new(bytes: u64) -> Self {
        let units = (bytes / BUDGET_UNIT)
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64)
            .min(u64::from(u32::MAX));
        Self {
            semaphore: tokio::sync::Semaphore::new(units as usize),
            units,
        }
    }
}

/// How much the cache holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the sizes of the chunk files in the index.
    pub disk_bytes: u64,
    pub disk_chunks: u64,
    pub memory_bytes: u64,
}

impl ChunkCache {
    /// Opens the cache in `config.dir`: creates the directories, deletes leftovers of
    /// interrupted writes and files that are not chunks, indexes the chunk files (LRU order from
    /// their modification and access times, contents are not read), then evicts down to the
    /// capacity. Blocking file system work: in async code, call it from `spawn_blocking`.
    /// Counts into `config.metrics` (evictions at open included).
    pub fn open(config: CacheConfig) -> Result<Self> {
        config.validate()?;
        let metrics = config.metrics.clone().unwrap_or_default();
        let layout = Layout::new(&config.dir);
        let mut index = Index::new(config.capacity_bytes)
            .observed(metrics.disk_bytes.clone(), metrics.disk_chunks.clone());
        for found in layout.open()? {
            index.insert_existing(found.digest, found.size);
        }
        metrics::set(&metrics.capacity_bytes, config.capacity_bytes);
        let victims = index.evict_over_capacity();
        let bytes: u64 = victims.iter().map(|(_, size)| size).sum();
        for (digest, _) in &victims {
            layout.remove(digest);
        }
        index.deleted(bytes);
        metrics.evictions.inc_by(victims.len() as u64);
        metrics.evicted_bytes.inc_by(bytes);
        tracing::debug!(
            dir = %config.dir.display(),
            chunks = index.len(),
            bytes = index.stored_bytes(),
            evicted = victims.len(),
            "opened chunk cache"
        );
        let (reads, warming) = (
            Budget::new(config.max_decoded_in_flight),
            Budget::new(config.max_warm_in_flight),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                memory: Mutex::new(
                    Memory::new(config.memory_bytes).observed(metrics.memory_bytes.clone()),
                ),
                index: Mutex::new(index),
                layout,
                config,
                flights: Flights::default(),
                metrics,
                reads,
                warming,
            }),
        })
    }

    /// The verified, uncompressed content of each chunk, in the order asked (chunks may
    /// repeat). Hits come from memory, then disk (re-verified). Misses are fetched from `source`
    /// in merged range requests, concurrently, shared with concurrent calls missing the same
    /// chunks; bad frames are refetched alone up to `verify_attempts` times; retryable source
    /// errors are retried until `fetch_deadline`. Never returns bytes that fail verification.
    ///
    /// Memory is bounded whatever the chunks claim: an ask over `max_get_bytes` decoded bytes
    /// or `max_get_chunks` distinct chunks is refused ([`Error::TooLarge`]; one chunk alone is
    /// always allowed), a ref no valid TOC holds is refused ([`Error::InvalidRef`]), and the
    /// call first waits (within the deadline) until its decoded bytes fit in
    /// `max_decoded_in_flight` with those of the other calls running.
    pub async fn get(
        &self,
        source: &Arc<dyn BlobSource>,
        chunks: &[ChunkRef],
    ) -> Result<Vec<Bytes>> {
        self.get_within(source, chunks, self.inner.config.fetch_deadline)
            .await
    }

    /// [`get`](Self::get) with another deadline than the configured one (a shorter one while
    /// the source is known to be down).
    pub async fn get_within(
        &self,
        source: &Arc<dyn BlobSource>,
        chunks: &[ChunkRef],
        deadline: std::time::Duration,
    ) -> Result<Vec<Bytes>> {
        self.get_from(source, chunks, deadline, &self.inner.reads)
            .await
    }

    /// [`get_within`](Self::get_within), counting the decoded bytes against `budget`.
    async fn get_from(
        &self,
        source: &Arc<dyn BlobSource>,
        chunks: &[ChunkRef],
        deadline: std::time::Duration,
        budget: &Budget,
    ) -> Result<Vec<Bytes>> {
        let source: &dyn BlobSource = source.as_ref();
        let deadline = Deadline::after(deadline);
        let metrics = &self.inner.metrics;
        let mut seen = HashSet::with_capacity(chunks.len());
        let mut wanted: Vec<ChunkRef> = chunks
            .iter()
            .filter(|chunk| seen.insert(chunk.digest))
            .copied()
            .collect();
        let decoded = self.check_ask(&wanted)?;
        let _budget = self.reserve(budget, decoded, source, &deadline).await?;
        let mut found: HashMap<Digest, Bytes> = HashMap::with_capacity(wanted.len());

        while !wanted.is_empty() {
            let mut leads = Vec::new();
            let mut follows = Vec::new();
            for chunk in wanted.drain(..) {
                if let Some(data) = self.memory_get(&chunk) {
                    metrics.hits_memory.inc();
                    found.insert(chunk.digest, data);
                    continue;
                }
                match self.inner.flights.join(chunk.digest) {
                    Role::Lead(lead) => leads.push((chunk, lead)),
                    Role::Follow(follow) => follows.push((chunk, follow)),
                }
            }
            for (digest, outcome) in self.lead(source, leads, &deadline).await {
                found.insert(digest, outcome?);
            }
            let mut first_error = None;
            for (chunk, follow) in follows {
                metrics.coalesced.inc();
                match tokio::time::timeout_at(deadline.at, follow.wait()).await {
                    Ok(Some(Ok(data))) if data.len() == chunk.size as usize => {
                        found.insert(chunk.digest, data);
                    }
                    // Same digest, other size: this ref (its TOC) is wrong.
                    Ok(Some(Ok(data))) => {
                        metrics.fetch_failure(FailureReason::Corrupt);
                        first_error.get_or_insert(Error::Corrupt {
                            blob: source.describe(),
                            digest: chunk.digest,
                            attempts: 1,
                            reason: format!(
                                "the chunk has {} bytes, the TOC says {}",
                                data.len(),
                                chunk.size
                            ),
                        });
                    }
                    Ok(Some(Err(e))) => {
                        first_error.get_or_insert(e);
                    }
                    // The leading call was cancelled: try again.
                    Ok(None) => wanted.push(chunk),
                    Err(_elapsed) => {
                        metrics.fetch_failure(FailureReason::Deadline);
                        let last = "waiting for a concurrent read of the same chunk".to_string();
                        first_error.get_or_insert(deadline.exceeded(source, Some(last)));
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(chunks.iter().map(|c| found[&c.digest].clone()).collect())
    }

    /// Brings the chunks into the cache (memory, as far as it holds them, and disk) without
    /// returning them: for read-ahead, background fetch and prefetch, whose sets can be any
    /// size. Distinct chunks go in blob order, in groups of at most `max_request_decoded_bytes`
    /// decoded bytes and `max_get_chunks` chunks, one group at a time, so what is decoded at
    /// once stays bounded however many chunks are asked for and however much they inflate.
    /// The groups of all `warm` calls share `max_warm_in_flight`, apart from the reads' budget,
    /// so work ahead of the reads never takes their room. Stops at the first group that fails.
    pub async fn warm(&self, source: &Arc<dyn BlobSource>, chunks: &[ChunkRef]) -> Result<()> {
        let config = &self.inner.config;
        let mut seen = HashSet::with_capacity(chunks.len());
        let mut distinct: Vec<ChunkRef> = chunks
            .iter()
            .filter(|chunk| seen.insert(chunk.digest))
            .copied()
            .collect();
        drop(seen);
        distinct.sort_by_key(|chunk| chunk.offset);
        let max_bytes = config.max_request_decoded_bytes.min(config.max_get_bytes);
        for group in groups(&distinct, max_bytes, config.max_get_chunks) {
            let deadline = config.fetch_deadline;
            self.get_from(source, group, deadline, &self.inner.warming)
                .await?;
        }
        Ok(())
    }

    /// The verified content of each chunk if every one is on the node: from memory, else read
    /// from disk and re-verified; `None` as soon as one is not (nothing is fetched). For work
    /// that must not go to the network (copies of whole files for passthrough): chunks read
    /// here are not kept in memory, so they do not push out what reads use.
    pub async fn get_local(&self, chunks: &[ChunkRef]) -> Option<Vec<Bytes>> {
        let mut out = Vec::with_capacity(chunks.len());
        for &chunk in chunks {
            if let Some(data) = self.memory_get(&chunk) {
                out.push(data);
                continue;
            }
            if !lock(&self.inner.index).touch(&chunk.digest) {
                return None;
            }
            out.push(self.load(chunk).await?);
        }
        Some(out)
    }

    /// Whether the chunk is in memory or on disk (as far as the index knows; no I/O).
    pub fn contains(&self, digest: &Digest) -> bool {
        lock(&self.inner.memory).contains(digest) || lock(&self.inner.index).contains(digest)
    }

    /// How long a [`get`](Self::get) waits for the source before it fails.
    pub fn fetch_deadline(&self) -> std::time::Duration {
        self.inner.config.fetch_deadline
    }

    /// The byte cap of the chunk files on disk.
    pub fn capacity_bytes(&self) -> u64 {
        self.inner.config.capacity_bytes
    }

    /// Whether the chunk is decoded in memory, where a read finds it without disk I/O.
    pub fn in_memory(&self, digest: &Digest) -> bool {
        lock(&self.inner.memory).contains(digest)
    }

    pub fn usage(&self) -> Usage {
        let (disk_bytes, disk_chunks) = {
            let index = lock(&self.inner.index);
            (index.stored_bytes(), index.len() as u64)
        };
        Usage {
            disk_bytes,
            disk_chunks,
            memory_bytes: lock(&self.inner.memory).bytes(),
        }
    }

    /// The counters, read from the cache's [`Metrics`].
    pub fn stats(&self) -> Stats {
        self.inner.metrics.stats()
    }

    /// The metrics this cache counts into (those of [`CacheConfig::metrics`], or its own).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Refuses an ask one call may not hold (see [`get`](Self::get)); its decoded bytes.
    fn check_ask(&self, wanted: &[ChunkRef]) -> Result<u64> {
        if let Some((chunk, reason)) = wanted
            .iter()
            .find_map(|chunk| Some((chunk, fetch::implausible(chunk)?)))
        {
            return Err(Error::InvalidRef {
                digest: chunk.digest,
                reason,
            });
        }
        let bytes: u64 = wanted.iter().map(|chunk| u64::from(chunk.size)).sum();
        let config = &self.inner.config;
        if wanted.len() > config.max_get_chunks
            || (wanted.len() > 1 && bytes > config.max_get_bytes)
        {
            return Err(Error::TooLarge {
                chunks: wanted.len(),
                bytes,
                max_chunks: config.max_get_chunks,
                max_bytes: config.max_get_bytes,
            });
        }
        Ok(bytes)
    }

    /// Waits until `bytes` of decoded data fit in `budget` (all of it for an ask larger than
    /// the whole budget), within the deadline.
    async fn reserve<'b>(
        &self,
        budget: &'b Budget,
        bytes: u64,
        source: &dyn BlobSource,
        deadline: &Deadline,
    ) -> Result<tokio::sync::SemaphorePermit<'b>> {
        let units = bytes.div_ceil(BUDGET_UNIT).min(budget.units) as u32;
        match tokio::time::timeout_at(deadline.at, budget.semaphore.acquire_many(units)).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => {
                self.inner.metrics.fetch_failure(FailureReason::Deadline);
                let last = "waiting for memory: other reads hold the decoded-bytes budget";
                Err(deadline.exceeded(source, Some(last.to_string())))
            }
        }
    }

    fn memory_get(&self, chunk: &ChunkRef) -> Option<Bytes> {
        lock(&self.inner.memory)
            .get(&chunk.digest)
            .filter(|data| data.len() == chunk.size as usize)
    }

    /// Gets the chunks this call leads: from disk where indexed, else from the source.
    async fn lead<'a>(
        &'a self,
        source: &dyn BlobSource,
        leads: Vec<(ChunkRef, Lead<'a>)>,
        deadline: &Deadline,
    ) -> Vec<(Digest, Outcome)> {
        if leads.is_empty() {
            return Vec::new();
        }
        let (on_disk, mut missing): (Vec<_>, Vec<_>) = {
            let mut index = lock(&self.inner.index);
            leads
                .into_iter()
                .partition(|(chunk, _)| index.touch(&chunk.digest))
        };
        let loads = join_all(on_disk.into_iter().map(|(chunk, lead)| async move {
            let data = self.load(chunk).await;
            (chunk, lead, data)
        }))
        .await;
        let mut results = Vec::new();
        for (chunk, lead, data) in loads {
            match data {
                Some(data) => {
                    self.inner.metrics.hits_disk.inc();
                    lock(&self.inner.memory).insert(chunk.digest, data.clone());
                    lead.resolve(Ok(data.clone()));
                    results.push((chunk.digest, Ok(data)));
                }
                None => missing.push((chunk, lead)),
            }
        }
        if missing.is_empty() {
            return results;
        }
        self.inner.metrics.misses.inc_by(missing.len() as u64);
        let config = &self.inner.config;
        let limits = RunLimits {
            bytes: config.max_request_bytes,
            decoded_bytes: config.max_request_decoded_bytes,
            chunks: config.max_request_chunks,
            gap: config.max_gap_bytes,
        };
        let runs = fetch::plan_runs(missing, limits);
        let fetched = join_all(
            runs.into_iter()
                .map(|run| self.fetch_run(source, run, deadline)),
        )
        .await;
        results.extend(fetched.into_iter().flatten());
        results
    }

    /// Reads a chunk file and verifies it. A file that is missing, unreadable or corrupt is
    /// taken out of the index (and deleted): `None`, fetch it.
    async fn load(&self, chunk: ChunkRef) -> Option<Bytes> {
        let inner = Arc::clone(&self.inner);
        let digest = chunk.digest;
        let loaded = tokio::task::spawn_blocking(move || {
            let loaded = inner.layout.load(&digest, chunk.size);
            let delete = match &loaded {
                Load::Verified(_) | Load::OtherSize => false,
                Load::Missing => true,
                Load::Corrupt(actual) => {
                    inner.metrics.verify_failures_disk.inc();
                    tracing::warn!(%digest, %actual, "cached chunk is corrupt on disk, deleting it");
                    true
                }
                Load::Failed(e) => {
                    tracing::warn!(%digest, error = %e, "cannot read a cached chunk, deleting it");
                    true
                }
            };
            let taken = if delete { lock(&inner.index).take(&digest) } else { None };
            if let Some(size) = taken {
                if !matches!(loaded, Load::Missing) {
                    inner.layout.remove(&digest);
                }
                lock(&inner.index).deleted(size);
            }
            loaded
        })
        .await;
        match loaded {
            Ok(Load::Verified(data)) if data.len() == chunk.size as usize => {
                Some(Bytes::from(data))
            }
            _ => None,
        }
    }

    /// Fetches one run, then verifies its frames one at a time, handing each good chunk to
    /// its followers, the memory and the disk before decoding the next; bad frames are
    /// refetched alone afterwards.
    async fn fetch_run(
        &self,
        source: &dyn BlobSource,
        run: fetch::Run<Lead<'_>>,
        deadline: &Deadline,
    ) -> Vec<(Digest, Outcome)> {
        let metrics = &self.inner.metrics;
        let body = match fetch::read_range(source, run.offset, run.len, deadline, metrics).await {
            Ok(body) => body,
            Err(e) => {
                return run
                    .chunks
                    .into_iter()
                    .map(|(chunk, lead)| {
                        lead.resolve(Err(e.clone()));
                        (chunk.digest, Err(e.clone()))
                    })
                    .collect();
            }
        };
        if body.len() as u64 != run.len {
            tracing::debug!(
                blob = %source.describe(), offset = run.offset, len = run.len, got = body.len(),
                "source returned a body of the wrong length"
            );
        }
        let mut results = Vec::with_capacity(run.chunks.len());
        let mut bad = Vec::new();
        for (chunk, lead) in run.chunks {
            let frame = frame_of(&body, run.offset, &chunk);
            match fetch::verify(source, chunk, frame).await {
                Ok(data) => results.push(self.finish(chunk.digest, lead, Ok(data)).await),
                Err(reason) => bad.push((chunk, lead, reason)),
            }
        }
        drop(body);
        let refetching = bad.into_iter().map(|(chunk, lead, reason)| async move {
            let outcome = self.refetch(source, chunk, reason, deadline).await;
            self.finish(chunk.digest, lead, outcome).await
        });
        results.extend(join_all(refetching).await);
        results
    }

    /// After a frame failed verification (`reason`): fetches it alone until it verifies or
    /// `verify_attempts` fetches in all failed.
    async fn refetch(
        &self,
        source: &dyn BlobSource,
        chunk: ChunkRef,
        mut reason: String,
        deadline: &Deadline,
    ) -> Outcome {
        let metrics = &self.inner.metrics;
        let mut attempts = 1;
        loop {
            metrics.verify_failures_fetched.inc();
            tracing::debug!(blob = %source.describe(), digest = %chunk.digest, attempts, %reason, "chunk failed verification");
            if attempts >= self.inner.config.verify_attempts {
                metrics.fetch_failure(FailureReason::Corrupt);
                return Err(Error::Corrupt {
                    blob: source.describe(),
                    digest: chunk.digest,
                    attempts,
                    reason,
                });
            }
            attempts += 1;
            let len = u64::from(chunk.compressed_size);
            let body = fetch::read_range(source, chunk.offset, len, deadline, metrics).await?;
            let frame = frame_of(&body, chunk.offset, &chunk);
            match fetch::verify(source, chunk, frame).await {
                Ok(data) => return Ok(data),
                Err(why) => reason = why,
            }
        }
    }

    /// Publishes the outcome: memory first and the followers, then the disk, and only then
    /// ends the flight, so that a call arriving meanwhile finds either the flight or the file.
    async fn finish(&self, digest: Digest, lead: Lead<'_>, outcome: Outcome) -> (Digest, Outcome) {
        if let Ok(data) = &outcome {
            lock(&self.inner.memory).insert(digest, data.clone());
            lead.resolve(Ok(data.clone()));
            let inner = Arc::clone(&self.inner);
            let data = data.clone();
            let stored = tokio::task::spawn_blocking(move || {
                inner
                    .layout
                    .store(&inner.index, &inner.metrics, &digest, &data)
            })
            .await;
            if stored.is_err() {
                self.inner.metrics.store_failures.inc();
            }
        } else if let Err(e) = &outcome {
            lead.resolve(Err(e.clone()));
        }
        drop(lead);
        (digest, outcome)
    }
}

/// `chunks` cut in order into groups of at most `max_bytes` decoded bytes (a larger chunk
/// alone) and `max_chunks` chunks.
fn groups(chunks: &[ChunkRef], max_bytes: u64, max_chunks: usize) -> Vec<&[ChunkRef]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, chunk) in chunks.iter().enumerate() {
        let size = u64::from(chunk.size);
        if i > start && (bytes + size > max_bytes || i - start >= max_chunks) {
            groups.push(&chunks[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < chunks.len() {
        groups.push(&chunks[start..]);
    }
    groups
}

/// The frame of `chunk` in a body fetched from `offset`, or why it is not all there.
fn frame_of(body: &Bytes, offset: u64, chunk: &ChunkRef) -> Result<Bytes, String> {
    let start = chunk.offset - offset;
    let end = start + u64::from(chunk.compressed_size);
    if end > body.len() as u64 {
        return Err(format!(
            "short body: the source returned {} bytes from offset {offset}, the frame ends at {}",
            body.len(),
            chunk.end()
        ));
    }
    Ok(body.slice(start as usize..end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(sizes: &[u32]) -> Vec<ChunkRef> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| ChunkRef {
                digest: Digest::sha256(&i.to_le_bytes()),
                offset: i as u64 * 100,
                compressed_size: 100,
                size,
            })
            .collect()
    }

    #[test]
    fn groups_stay_within_bytes_and_count_and_take_a_large_chunk_alone() {
        let chunks = sized(&[10, 10, 30, 5, 5, 5, 5]);
        let lens: Vec<usize> = groups(&chunks, 20, 3).iter().map(|g| g.len()).collect();
        assert_eq!(lens, vec![2, 1, 3, 1]);
        assert!(groups(&[], 20, 3).is_empty());
    }
}
