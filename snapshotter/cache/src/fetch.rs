//! Getting missing chunks from a source: grouping frames into range requests, single-flight for
//! concurrent misses, retries with backoff under a deadline, and verification off the runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streamsnap_format::{Digest, MAX_CHUNK_RATIO, MAX_CHUNK_SIZE, decode_chunk};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::disk::lock;
use crate::error::Error;
use crate::metrics::{FailureReason, Metrics};
use crate::{BlobSource, ChunkRef};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a load or fetch of one chunk gave: verified content, or why there is none.
pub(crate) type Outcome = Result<Bytes, Error>;

/// The fetch budget of one `get` call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    pub start: Instant,
    pub at: Instant,
}

impl Deadline {
    pub fn after(budget: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            at: start + budget,
        }
    }

    pub fn exceeded(&self, source: &dyn BlobSource, last: Option<String>) -> Error {
        Error::Deadline {
            blob: source.describe(),
            waited: self.start.elapsed(),
            last,
        }
    }
}

/// A run of frames fetched with one range request: `len` bytes at `offset` of the blob.
#[derive(Debug)]
pub struct Run<T> {
    pub offset: u64,
    pub len: u64,
    pub chunks: Vec<(ChunkRef, T)>,
}

/// How large a run may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Most bytes of blob in one run (one range request), gaps included.
    pub bytes: u64,
    /// Most decoded bytes in one run: the sum of its chunks' sizes, what verifying it gives.
    pub decoded_bytes: u64,
    /// Most chunks in one run.
    pub chunks: usize,
    /// Most bytes between two frames of one run (fetched and discarded).
    pub gap: u64,
}

impl<T> Run<T> {
    /// The decoded size of the run's chunks.
    pub fn decoded_bytes(&self) -> u64 {
        self.chunks.iter().map(|(c, _)| u64::from(c.size)).sum()
    }
}

/// Groups frames into runs in blob order: a frame joins the previous run if at most
/// `limits.gap` bytes separate them and the run stays within every limit. A frame over a limit
/// on its own gets a run of its own. `T` travels with each frame (a fetch's waiters, a
/// prefetch's ranks).
pub fn plan_runs<T>(mut chunks: Vec<(ChunkRef, T)>, limits: RunLimits) -> Vec<Run<T>> {
    chunks.sort_by_key(|(chunk, _)| (chunk.offset, chunk.compressed_size));
    let mut runs: Vec<Run<T>> = Vec::new();
    let mut decoded = 0u64;
    for (chunk, item) in chunks {
        if let Some(run) = runs.last_mut() {
            let end = run.offset + run.len;
            let new_end = end.max(chunk.end());
            if chunk.offset.saturating_sub(end) <= limits.gap
                && new_end - run.offset <= limits.bytes
                && decoded + u64::from(chunk.size) <= limits.decoded_bytes
                && run.chunks.len() < limits.chunks
            {
                run.len = new_end - run.offset;
                decoded += u64::from(chunk.size);
                run.chunks.push((chunk, item));
                continue;
            }
        }
        decoded = u64::from(chunk.size);
        runs.push(Run {
            offset: chunk.offset,
            len: u64::from(chunk.compressed_size),
            chunks: vec![(chunk, item)],
        });
    }
    runs
}

/// Loads and fetches in progress, by digest, so that concurrent reads of a chunk share one.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<Digest, watch::Receiver<Option<Outcome>>>>,
}

/// Who gets a chunk: this call, or a call already doing it.
#[derive(Debug)]
pub(crate) enum Role<'a> {
    Lead(Lead<'a>),
    Follow(Follow),
}

impl Flights {
    pub fn join(&self, digest: Digest) -> Role<'_> {
        let mut map = lock(&self.map);
        if let Some(rx) = map.get(&digest) {
            return Role::Follow(Follow(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        map.insert(digest, rx);
        Role::Lead(Lead {
            flights: self,
            digest,
            tx,
        })
    }
}

/// The duty of getting one chunk for everyone who asks meanwhile. Dropping it ends the flight:
/// followers that got no outcome (the leading call was cancelled) try again themselves.
#[derive(Debug)]
pub(crate) struct Lead<'a> {
    flights: &'a Flights,
    digest: Digest,
    tx: watch::Sender<Option<Outcome>>,
}

impl Lead<'_> {
    /// Hands the outcome to the followers. Calls arriving until the lead is dropped get it too.
    pub fn resolve(&self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        lock(&self.flights.map).remove(&self.digest);
    }
}

/// Waiting for another call's load or fetch.
#[derive(Debug)]
pub(crate) struct Follow(watch::Receiver<Option<Outcome>>);

impl Follow {
    /// The leader's outcome, or `None` if it gave up without one.
    pub async fn wait(mut self) -> Option<Outcome> {
        let outcome = self.0.wait_for(Option::is_some).await.ok()?;
        outcome.clone()
    }
}

/// `len` bytes at `offset`, retrying retryable errors with exponential backoff until the
/// deadline. The body is returned as received: its length is checked by the caller. A failure
/// is counted in the metrics by its reason.
pub(crate) async fn read_range(
    source: &dyn BlobSource,
    offset: u64,
    len: u64,
    deadline: &Deadline,
    metrics: &Metrics,
) -> Outcome {
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    loop {
        metrics.range_requests.inc();
        let error = match tokio::time::timeout_at(deadline.at, source.read_range(offset, len)).await
        {
            Err(_elapsed) => {
                metrics.fetch_failure(FailureReason::Deadline);
                return Err(deadline.exceeded(source, last));
            }
            Ok(Ok(body)) => {
                metrics.fetched_bytes.inc_by(body.len() as u64);
                return Ok(body);
            }
            Ok(Err(error)) => error,
        };
        if !error.retryable {
            metrics.fetch_failure(FailureReason::Source);
            return Err(Error::Source {
                blob: source.describe(),
                source: Arc::new(error),
            });
        }
        tracing::debug!(blob = %source.describe(), offset, len, error = %error, ?backoff, "range read failed, retrying");
        last = Some(error_chain(&error));
        if Instant::now() + backoff >= deadline.at {
            metrics.fetch_failure(FailureReason::Deadline);
            return Err(deadline.exceeded(source, last));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Decodes one frame and verifies it against its ref, as its source says (zstd unless the
/// source decodes otherwise). A frame given as `Err` (not fully received) stays a failure with
/// that reason. One frame at a time: what a run decodes is handed on chunk by chunk, never held
/// all at once.
pub(crate) async fn verify(
    source: &dyn BlobSource,
    chunk: ChunkRef,
    frame: Result<Bytes, String>,
) -> Result<Bytes, String> {
    let data = source.decode(chunk, frame?).await?;
    // Whatever the source did: the size must be the table's (its digest the source checked).
    if data.len() != chunk.size as usize {
        return Err(format!(
            "decoded {} bytes, the chunk table says {}",
            data.len(),
            chunk.size
        ));
    }
    Ok(data)
}

/// Decompresses an independent zstd frame and verifies it against its ref, on the blocking
/// pool: [`BlobSource::decode`]'s default.
pub async fn decode_zstd(chunk: ChunkRef, frame: Bytes) -> Result<Bytes, String> {
    tokio::task::spawn_blocking(move || {
        decode_chunk(&chunk.to_toc(), &frame)
            .map(Bytes::from)
            .map_err(|e| error_chain(&e))
    })
    .await
    .unwrap_or_else(|e| Err(format!("verification task failed: {e}")))
}

/// Why a ref cannot be a chunk of a valid TOC (its size would let a frame claim more memory
/// than any chunk may take), if it cannot.
pub(crate) fn implausible(chunk: &ChunkRef) -> Option<String> {
    if chunk.size == 0 || chunk.size > MAX_CHUNK_SIZE {
        return Some(format!(
            "size {} is outside 1..={MAX_CHUNK_SIZE}",
            chunk.size
        ));
    }
    if u64::from(chunk.size) > u64::from(chunk.compressed_size) * MAX_CHUNK_RATIO {
        return Some(format!(
            "{} bytes cannot compress to {} (more than {MAX_CHUNK_RATIO} bytes per compressed \
             byte)",
            chunk.size, chunk.compressed_size
        ));
    }
    None
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, compressed_size: u32) -> (ChunkRef, u64) {
        sized(offset, compressed_size, 1)
    }

    fn sized(offset: u64, compressed_size: u32, size: u32) -> (ChunkRef, u64) {
        let chunk = ChunkRef {
            digest: Digest::sha256(&offset.to_le_bytes()),
            offset,
            compressed_size,
            size,
        };
        (chunk, offset)
    }

    fn limits(bytes: u64, gap: u64) -> RunLimits {
        RunLimits {
            bytes,
            decoded_bytes: u64::MAX,
            chunks: usize::MAX,
            gap,
        }
    }

    fn shape(runs: &[Run<u64>]) -> Vec<(u64, u64, Vec<u64>)> {
        runs.iter()
            .map(|r| (r.offset, r.len, r.chunks.iter().map(|(_, o)| *o).collect()))
            .collect()
    }

    #[test]
    fn adjacent_frames_merge_in_blob_order_and_gaps_split_them() {
        let frames = vec![frame(20, 10), frame(0, 10), frame(10, 10), frame(40, 10)];
        let runs = plan_runs(frames, limits(1 << 20, 0));
        assert_eq!(
            shape(&runs),
            vec![(0, 30, vec![0, 10, 20]), (40, 10, vec![40])]
        );
    }

    #[test]
    fn gaps_up_to_max_gap_merge() {
        let frames = vec![frame(0, 10), frame(20, 10), frame(41, 10)];
        let runs = plan_runs(frames, limits(1 << 20, 10));
        assert_eq!(shape(&runs), vec![(0, 30, vec![0, 20]), (41, 10, vec![41])]);
    }

    #[test]
    fn runs_stay_within_max_request_but_a_big_frame_is_whole() {
        let frames = vec![
            frame(0, 10),
            frame(10, 10),
            frame(20, 10),
            frame(30, 50),
            frame(80, 5),
        ];
        let runs = plan_runs(frames, limits(25, 0));
        assert_eq!(
            shape(&runs),
            vec![
                (0, 20, vec![0, 10]),
                (20, 10, vec![20]),
                (30, 50, vec![30]),
                (80, 5, vec![80])
            ]
        );
    }

    #[test]
    fn runs_stay_within_their_decoded_bytes_and_chunk_count() {
        // Frames of 500 bytes that inflate to 16 MiB each: the compressed size would put all
        // of them in one request.
        let bombs: Vec<_> = (0..6).map(|i| sized(i * 500, 500, 16 << 20)).collect();
        let runs = plan_runs(
            bombs,
            RunLimits {
                decoded_bytes: 32 << 20,
                ..limits(8 << 20, 0)
            },
        );
        assert_eq!(
            shape(&runs),
            vec![
                (0, 1000, vec![0, 500]),
                (1000, 1000, vec![1000, 1500]),
                (2000, 1000, vec![2000, 2500])
            ]
        );
        assert!(runs.iter().all(|r| r.decoded_bytes() == 32 << 20));
        let small: Vec<_> = (0..5).map(|i| frame(i * 10, 10)).collect();
        let runs = plan_runs(
            small,
            RunLimits {
                chunks: 2,
                ..limits(1 << 20, 0)
            },
        );
        assert_eq!(
            runs.iter().map(|r| r.chunks.len()).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
    }

    #[test]
    fn refs_no_valid_toc_holds_are_implausible() {
        let (ok, _) = sized(0, 520, 16 << 20);
        assert_eq!(implausible(&ok), None);
        let (bomb, _) = sized(0, 100, 16 << 20);
        assert!(implausible(&bomb).unwrap().contains("cannot compress"));
        let (huge, _) = sized(0, u32::MAX, u32::MAX);
        assert!(implausible(&huge).is_some());
    }

    #[test]
    fn error_chain_includes_sources() {
        let e = crate::SourceError {
            message: "GET failed".into(),
            retryable: true,
            source: Some(Box::new(std::io::Error::other("connection reset"))),
        };
        assert_eq!(error_chain(&e), "GET failed: connection reset");
    }

    #[tokio::test]
    async fn single_flight_shares_one_outcome_and_a_dropped_lead_releases_followers() {
        let flights = Flights::default();
        let d = Digest::sha256(b"x");
        let Role::Lead(lead) = flights.join(d) else {
            panic!("first caller leads")
        };
        let Role::Follow(follower) = flights.join(d) else {
            panic!("second caller follows")
        };
        lead.resolve(Ok(Bytes::from_static(b"x")));
        let Role::Follow(late) = flights.join(d) else {
            panic!("lead still held")
        };
        drop(lead);
        assert_eq!(follower.wait().await.unwrap().unwrap(), "x");
        assert_eq!(late.wait().await.unwrap().unwrap(), "x");

        let Role::Lead(lead) = flights.join(d) else {
            panic!("flight ended")
        };
        let Role::Follow(follower) = flights.join(d) else {
            panic!()
        };
        drop(lead);
        assert!(
            follower.wait().await.is_none(),
            "cancelled lead: follower retries"
        );
    }
}
