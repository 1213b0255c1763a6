//! Test doubles shared by the integration tests: an in-memory data blob made of real zstd frames,
//! and a `BlobSource` over it that records every request and injects faults.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, CacheConfig, ChunkCache, ChunkRef, SourceError};
use streamsnap_format::{Digest, compress_chunk};
use tokio::sync::Semaphore;

/// Deterministic incompressible-ish content: `len` bytes from `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A data blob: frames back to back, as the converter writes them.
#[derive(Debug, Clone)]
pub struct Blob {
    pub data: Bytes,
    pub chunks: Vec<ChunkRef>,
    pub contents: Vec<Bytes>,
}

impl Blob {
    pub fn new(contents: Vec<Vec<u8>>) -> Self {
        let mut data = Vec::new();
        let mut chunks = Vec::new();
        for c in &contents {
            let frame = compress_chunk(c, 3).unwrap();
            chunks.push(ChunkRef {
                digest: Digest::sha256(c),
                offset: data.len() as u64,
                compressed_size: frame.len() as u32,
                size: c.len() as u32,
            });
            data.extend_from_slice(&frame);
        }
        Self {
            data: data.into(),
            chunks,
            contents: contents.into_iter().map(Bytes::from).collect(),
        }
    }

    /// `count` chunks of `len` bytes each, distinct content.
    pub fn random(count: usize, len: usize) -> Self {
        Self::new((0..count).map(|i| content(i as u64 + 1, len)).collect())
    }

    /// The byte range of chunks `first..=last` (frames are contiguous).
    pub fn range(&self, first: usize, last: usize) -> (u64, u64) {
        let start = self.chunks[first].offset;
        let end = self.chunks[last].offset + u64::from(self.chunks[last].compressed_size);
        (start, end - start)
    }
}

/// What the fake does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Retryable,
    Permanent,
    /// Never answers.
    Stall,
    /// Drops this many bytes from the end of the body.
    Short(usize),
    /// Inverts every byte of the body.
    Flip,
}

#[derive(Debug)]
pub struct FakeSource {
    blob: Bytes,
    requests: Mutex<Vec<(u64, u64)>>,
    calls: AtomicU64,
    faults: Mutex<VecDeque<Fault>>,
    always: Mutex<Option<Fault>>,
    delay: Mutex<Duration>,
    gate: Option<Arc<Semaphore>>,
}

impl FakeSource {
    pub fn new(blob: &Blob) -> Arc<Self> {
        Arc::new(Self::build(blob, None))
    }

    /// Requests wait until `gate` gets permits (one per request).
    pub fn gated(blob: &Blob, gate: Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Self::build(blob, Some(gate)))
    }

    fn build(blob: &Blob, gate: Option<Arc<Semaphore>>) -> Self {
        Self {
            blob: blob.data.clone(),
            requests: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
            faults: Mutex::new(VecDeque::new()),
            always: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            gate,
        }
    }

    /// Faults for the next requests, one each, in order.
    pub fn fail_next(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults);
    }

    /// A fault for every request once the queued ones are used up (`None`: healthy).
    pub fn fail_always(&self, fault: Option<Fault>) {
        *self.always.lock().unwrap() = fault;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn requests(&self) -> Vec<(u64, u64)> {
        self.requests.lock().unwrap().clone()
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn dyn_source(self: &Arc<Self>) -> Arc<dyn BlobSource> {
        Arc::clone(self) as Arc<dyn BlobSource>
    }
}

impl BlobSource for FakeSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.requests.lock().unwrap().push((offset, len));
            let fault = {
                let queued = self.faults.lock().unwrap().pop_front();
                queued.or(*self.always.lock().unwrap())
            };
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let delay = *self.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let end = offset + len;
            if end > self.blob.len() as u64 {
                return Err(SourceError::permanent(format!(
                    "range {offset}+{len} is past the end of the blob"
                )));
            }
            let body = self.blob.slice(offset as usize..end as usize);
            match fault {
                None => Ok(body),
                Some(Fault::Retryable) => Err(SourceError::retryable("503 service unavailable")),
                Some(Fault::Permanent) => Err(SourceError::permanent("404 blob unknown")),
                Some(Fault::Stall) => std::future::pending().await,
                Some(Fault::Short(n)) => Ok(body.slice(..body.len().saturating_sub(n))),
                Some(Fault::Flip) => Ok(body.iter().map(|b| !b).collect::<Vec<_>>().into()),
            }
        })
    }

    fn describe(&self) -> String {
        "fake.registry/repo@sha256:0000".into()
    }
}

/// A config for tests: small and quick.
pub fn config(dir: &Path, capacity_bytes: u64) -> CacheConfig {
    let mut config = CacheConfig::new(dir, capacity_bytes);
    config.fetch_deadline = Duration::from_secs(10);
    config
}

pub fn open(config: CacheConfig) -> ChunkCache {
    ChunkCache::open(config).unwrap()
}

/// Sum of the sizes of all files under `dir` (what is really on disk), and their count.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let Ok(entry) = entry else { continue };
        // Files may vanish while walking (evictions running concurrently).
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            let (b, f) = disk_usage(&entry.path());
            bytes += b;
            files += f;
        } else {
            bytes += meta.len();
            files += 1;
        }
    }
    (bytes, files)
}

/// Path of a chunk's file in the cache layout.
pub fn chunk_path(dir: &Path, digest: &Digest) -> std::path::PathBuf {
    let hex = digest.hex();
    dir.join(&hex[..2]).join(hex)
}

/// Metrics registered in a registry of their own, for `config.metrics`.
pub fn registered_metrics() -> (Arc<streamsnap_cache::Metrics>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = streamsnap_cache::Metrics::register(&registry).unwrap();
    (Arc::new(metrics), registry)
}

/// The value of one series in the registry's text exposition, as Prometheus would scrape it:
/// `name` with exactly `labels`. Panics if the series is not exposed.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut got: Vec<String> = series_labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        got.sort();
        if series_name == name && got == wanted {
            return value.parse().unwrap();
        }
    }
    panic!("no series {name}{labels:?} in\n{text}");
}
