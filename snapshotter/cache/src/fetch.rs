//! Getting missing chunks from a source: grouping frames into range requests, single-flight for
//! concurrent misses, retries with backoff under a deadline, and verification off the runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streamsnap_format::{Digest, decode_chunk};
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

/// Groups frames into runs in blob order: a frame joins the previous run if at most `max_gap`
/// bytes separate them and the run stays within `max_request` bytes. A frame larger than
/// `max_request` gets a run of its own. `T` travels with each frame (a fetch's waiters, a
/// prefetch's ranks).
pub fn plan_runs<T>(mut chunks: Vec<(ChunkRef, T)>, max_request: u64, max_gap: u64) -> Vec<Run<T>> {
    chunks.sort_by_key(|(chunk, _)| (chunk.offset, chunk.compressed_size));
    let mut runs: Vec<Run<T>> = Vec::new();
    for (chunk, item) in chunks {
        if let Some(run) = runs.last_mut() {
            let end = run.offset + run.len;
            let new_end = end.max(chunk.end());
            if chunk.offset.saturating_sub(end) <= max_gap && new_end - run.offset <= max_request {
                run.len = new_end - run.offset;
                run.chunks.push((chunk, item));
                continue;
            }
        }
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

/// Decompresses and verifies frames against their refs, on the blocking pool. A frame given as
/// `Err` (not fully received) stays a failure with that reason.
pub(crate) async fn verify(
    frames: Vec<(ChunkRef, Result<Bytes, String>)>,
) -> Vec<Result<Bytes, String>> {
    let count = frames.len();
    let decoded = tokio::task::spawn_blocking(move || {
        frames
            .into_iter()
            .map(|(chunk, frame)| {
                let frame = frame?;
                decode_chunk(&chunk.to_toc(), &frame)
                    .map(Bytes::from)
                    .map_err(|e| error_chain(&e))
            })
            .collect::<Vec<_>>()
    })
    .await;
    decoded.unwrap_or_else(|e| vec![Err(format!("verification task failed: {e}")); count])
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
        let chunk = ChunkRef {
            digest: Digest::sha256(&offset.to_le_bytes()),
            offset,
            compressed_size,
            size: 1,
        };
        (chunk, offset)
    }

    fn shape(runs: &[Run<u64>]) -> Vec<(u64, u64, Vec<u64>)> {
        runs.iter()
            .map(|r| (r.offset, r.len, r.chunks.iter().map(|(_, o)| *o).collect()))
            .collect()
    }

    #[test]
    fn adjacent_frames_merge_in_blob_order_and_gaps_split_them() {
        let frames = vec![frame(20, 10), frame(0, 10), frame(10, 10), frame(40, 10)];
        let runs = plan_runs(frames, 1 << 20, 0);
        assert_eq!(
            shape(&runs),
            vec![(0, 30, vec![0, 10, 20]), (40, 10, vec![40])]
        );
    }

    #[test]
    fn gaps_up_to_max_gap_merge() {
        let frames = vec![frame(0, 10), frame(20, 10), frame(41, 10)];
        let runs = plan_runs(frames, 1 << 20, 10);
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
        let runs = plan_runs(frames, 25, 0);
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
