//! Prometheus metrics of the chunk cache: hits by tier, misses, shared fetches, bytes and range
//! requests to sources, failures by reason, evictions, and gauges of what it holds. They are the
//! cache's only counters: [`ChunkCache::stats`](crate::ChunkCache::stats) reads them back.

use std::fmt;

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::stats::Stats;

/// The metric handles of a [`ChunkCache`](crate::ChunkCache). Build it with
/// [`Metrics::register`] to export it, or [`Metrics::unregistered`] (also `Default`) for handles
/// that count but are not exported; hand it to the cache in
/// [`CacheConfig::metrics`](crate::CacheConfig::metrics). One cache per `Metrics`: the gauges
/// describe a single cache. Cheap to clone: clones share the values.
#[derive(Clone)]
pub struct Metrics {
    /// `streamsnap_cache_hits_total{tier}`: chunks served from memory or from disk (verified),
    /// per distinct chunk of a read.
    hits: IntCounterVec,
    pub(crate) hits_memory: IntCounter,
    pub(crate) hits_disk: IntCounter,
    /// `streamsnap_cache_misses_total`: chunks this cache fetched from a source.
    pub(crate) misses: IntCounter,
    /// `streamsnap_cache_coalesced_total`: chunks a read waited for because a concurrent read
    /// was already loading or fetching them (single-flight).
    pub(crate) coalesced: IntCounter,
    /// `streamsnap_cache_fetched_bytes_total`: compressed bytes received from sources, all
    /// attempts, gap bytes between merged frames included.
    pub(crate) fetched_bytes: IntCounter,
    /// `streamsnap_cache_range_requests_total`: range reads asked of sources, all attempts.
    pub(crate) range_requests: IntCounter,
    /// `streamsnap_cache_fetch_failures_total{reason}`: fetches that gave up.
    fetch_failures: IntCounterVec,
    failures_deadline: IntCounter,
    failures_source: IntCounter,
    failures_corrupt: IntCounter,
    /// `streamsnap_cache_verify_failures_total{where}`: frames fetched from a source, or chunk
    /// files read from disk, whose content did not match the chunk digest.
    verify_failures: IntCounterVec,
    pub(crate) verify_failures_fetched: IntCounter,
    pub(crate) verify_failures_disk: IntCounter,
    /// `streamsnap_cache_evictions_total`: chunk files deleted to stay under the disk cap.
    pub(crate) evictions: IntCounter,
    /// `streamsnap_cache_evicted_bytes_total`: bytes of those files.
    pub(crate) evicted_bytes: IntCounter,
    /// `streamsnap_cache_store_failures_total`: verified chunks that could not be written to
    /// disk (they were served anyway).
    pub(crate) store_failures: IntCounter,
    /// `streamsnap_cache_disk_bytes`: bytes of the chunk files in the cache.
    pub(crate) disk_bytes: IntGauge,
    /// `streamsnap_cache_disk_chunks`: number of chunk files in the cache.
    pub(crate) disk_chunks: IntGauge,
    /// `streamsnap_cache_memory_bytes`: bytes of decoded chunks held in memory.
    pub(crate) memory_bytes: IntGauge,
    /// `streamsnap_cache_capacity_bytes`: the disk cap.
    pub(crate) capacity_bytes: IntGauge,
}

/// Why a fetch gave up: the `reason` label of `streamsnap_cache_fetch_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// The read's fetch deadline passed (source unreachable or slow), also while waiting for a
    /// concurrent read's fetch.
    Deadline,
    /// The source failed with an error that is not worth retrying.
    Source,
    /// A chunk failed verification on every attempt, or does not have its TOC size.
    Corrupt,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::unregistered()
    }
}

impl Metrics {
    /// Creates the handles and registers them in `registry`. Fails if metrics of these names are
    /// registered there already (one cache's metrics per registry); then nothing is left
    /// registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        register_all(registry, || {
            vec![
                Box::new(m.hits.clone()),
                Box::new(m.misses.clone()),
                Box::new(m.coalesced.clone()),
                Box::new(m.fetched_bytes.clone()),
                Box::new(m.range_requests.clone()),
                Box::new(m.fetch_failures.clone()),
                Box::new(m.verify_failures.clone()),
                Box::new(m.evictions.clone()),
                Box::new(m.evicted_bytes.clone()),
                Box::new(m.store_failures.clone()),
                Box::new(m.disk_bytes.clone()),
                Box::new(m.disk_chunks.clone()),
                Box::new(m.memory_bytes.clone()),
                Box::new(m.capacity_bytes.clone()),
            ]
        })?;
        Ok(m)
    }

    /// Handles that count but are exported nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::build().expect("the cache metric definitions are valid")
    }

    fn build() -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let hits = IntCounterVec::new(
            Opts::new(
                "streamsnap_cache_hits_total",
                "Chunks served by the cache without a fetch, by tier (memory, disk)",
            ),
            &["tier"],
        )?;
        let fetch_failures = IntCounterVec::new(
            Opts::new(
                "streamsnap_cache_fetch_failures_total",
                "Chunk fetches that gave up, by reason (deadline, source, corrupt)",
            ),
            &["reason"],
        )?;
        let verify_failures = IntCounterVec::new(
            Opts::new(
                "streamsnap_cache_verify_failures_total",
                "Chunks whose content did not match their digest, by where they came from \
                 (fetched, disk)",
            ),
            &["where"],
        )?;
        Ok(Self {
            hits_memory: hits.with_label_values(&["memory"]),
            hits_disk: hits.with_label_values(&["disk"]),
            hits,
            misses: counter(
                "streamsnap_cache_misses_total",
                "Chunks fetched from a source",
            )?,
            coalesced: counter(
                "streamsnap_cache_coalesced_total",
                "Chunks a read got from a concurrent read's load or fetch",
            )?,
            fetched_bytes: counter(
                "streamsnap_cache_fetched_bytes_total",
                "Compressed bytes received from sources, all attempts",
            )?,
            range_requests: counter(
                "streamsnap_cache_range_requests_total",
                "Range reads asked of sources, all attempts",
            )?,
            failures_deadline: fetch_failures.with_label_values(&["deadline"]),
            failures_source: fetch_failures.with_label_values(&["source"]),
            failures_corrupt: fetch_failures.with_label_values(&["corrupt"]),
            fetch_failures,
            verify_failures_fetched: verify_failures.with_label_values(&["fetched"]),
            verify_failures_disk: verify_failures.with_label_values(&["disk"]),
            verify_failures,
            evictions: counter(
                "streamsnap_cache_evictions_total",
                "Chunk files deleted to stay under the disk cap",
            )?,
            evicted_bytes: counter(
                "streamsnap_cache_evicted_bytes_total",
                "Bytes of the chunk files deleted to stay under the disk cap",
            )?,
            store_failures: counter(
                "streamsnap_cache_store_failures_total",
                "Verified chunks that could not be written to disk (served anyway)",
            )?,
            disk_bytes: gauge(
                "streamsnap_cache_disk_bytes",
                "Bytes of the chunk files in the cache",
            )?,
            disk_chunks: gauge("streamsnap_cache_disk_chunks", "Chunk files in the cache")?,
            memory_bytes: gauge(
                "streamsnap_cache_memory_bytes",
                "Bytes of decoded chunks held in memory",
            )?,
            capacity_bytes: gauge(
                "streamsnap_cache_capacity_bytes",
                "The disk cap of the cache",
            )?,
        })
    }

    pub(crate) fn fetch_failure(&self, reason: FailureReason) {
        match reason {
            FailureReason::Deadline => &self.failures_deadline,
            FailureReason::Source => &self.failures_source,
            FailureReason::Corrupt => &self.failures_corrupt,
        }
        .inc();
    }

    /// The counters as [`Stats`].
    pub(crate) fn stats(&self) -> Stats {
        Stats {
            hits_memory: self.hits_memory.get(),
            hits_disk: self.hits_disk.get(),
            misses: self.misses.get(),
            coalesced: self.coalesced.get(),
            fetched_bytes: self.fetched_bytes.get(),
            range_requests: self.range_requests.get(),
            verify_failures: self.verify_failures_fetched.get() + self.verify_failures_disk.get(),
            evictions: self.evictions.get(),
            evicted_bytes: self.evicted_bytes.get(),
            store_failures: self.store_failures.get(),
        }
    }
}

/// A gauge set from a byte or item count.
pub(crate) fn set(gauge: &IntGauge, value: u64) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

/// Registers every collector `make` gives, or none: on an error the ones already registered
/// are taken out again (the registry matches collectors by their descriptions).
fn register_all(
    registry: &Registry,
    make: impl Fn() -> Vec<Box<dyn Collector>>,
) -> Result<(), prometheus::Error> {
    for (i, collector) in make().into_iter().enumerate() {
        if let Err(e) = registry.register(collector) {
            for done in make().into_iter().take(i) {
                let _ = registry.unregister(done);
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    #[test]
    fn registers_once_per_registry_with_conventional_names() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err());
        metrics.fetch_failure(FailureReason::Corrupt);
        metrics.verify_failures_disk.inc();
        metrics.verify_failures_fetched.inc_by(2);
        assert_eq!(metrics.stats().verify_failures, 3);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("streamsnap_cache_fetch_failures_total{reason=\"corrupt\"} 1\n"));
        assert!(text.contains("streamsnap_cache_fetch_failures_total{reason=\"deadline\"} 0\n"));
        assert!(text.contains("streamsnap_cache_verify_failures_total{where=\"fetched\"} 2\n"));
        assert!(text.contains("streamsnap_cache_hits_total{tier=\"disk\"} 0\n"));
        let mut types = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            types += 1;
            let fields: Vec<&str> = line.split(' ').collect();
            let (name, kind) = (fields[2], fields[3]);
            assert!(name.starts_with("streamsnap_cache_"), "{line}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{line}"),
                "gauge" => assert!(name.ends_with("_bytes") || name.ends_with("_chunks")),
                _ => panic!("unexpected type: {line}"),
            }
        }
        assert_eq!(types, 14, "{text}");
    }
}
