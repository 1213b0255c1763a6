//! A data blob in a registry as the cache's `BlobSource`: read by range from the node's mirrors
//! first, then from the registry itself, with the mirrors' health shared by the node's blobs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, SourceError};
use streamsnap_format::Digest;
use streamsnap_registry::{Client, Repository};

/// A data blob in a registry, read by range: from its mirrors first (in order), then from the
/// registry itself. Every byte is verified by the cache, so a mirror can fail or lag, never lie.
///
/// A mirror is tried once per read, never retried (the next source is its retry), and the
/// whole try, a HEAD included, is bounded by the client's request timeout
/// (`[fetch] timeout_seconds`). A mirror that fails so (no answer in time, connection refused
/// or reset, 5xx) or whose bytes the cache found wrong is down for every blob of the node
/// ([`MirrorHealth`], one per node): reads go past it to the next source at once, and one background HEAD
/// per while ([`FIRST_PASS_OVER`], doubling up to [`MAX_PASS_OVER`]) finds out when it is back.
/// A stalled mirror thus costs the reads in flight one timeout, and the reads after them none.
///
/// Wrong bytes are seen through the cache: it reads a range again only to fetch a frame that
/// failed verification or came short (runs hold only the frames it misses, and a verified
/// chunk is kept), so a read inside a range a mirror served this blob within
/// [`REREAD_WINDOW`] goes to the next source, and the mirror is down as above.
///
/// A mirror that answers a range with the whole blob (a pull-through cache that has not cached
/// it yet) is read through only up to `max_skip` bytes before the range; past that the read
/// goes to the next source, and the mirror is passed over for this blob for a while
/// ([`FIRST_PASS_OVER`], doubling up to [`MAX_PASS_OVER`] while it keeps answering so), since
/// such a cache fills itself in the background and answers 206 once it has the blob. When a
/// while is over, a HEAD asks first (`Accept-Ranges: bytes`: a pull-through cache says so only
/// once it has the blob, and a HEAD neither costs the origin a stream nor starts a fill); after
/// a [`MAX_PASS_OVER`] wait the range GET is sent whatever the HEAD would say, so a fill that
/// failed is started again and a mirror that never says `Accept-Ranges` is still used. The
/// origin, the last source, is always read, through the whole prefix if it must, with the
/// client's retries.
pub struct RegistryBlob {
    client: Client,
    /// The repository on each mirror, then on the origin registry (last).
    endpoints: Vec<Repository>,
    digest: Digest,
    max_skip: u64,
    /// Per mirror: until when it is passed over, and for how long the next time.
    passed_over: Mutex<Vec<PassOver>>,
    /// Which mirrors are down, shared with the node's other blobs.
    health: Arc<MirrorHealth>,
    /// The last ranges mirrors served this blob, to know a read of them again.
    served: Mutex<VecDeque<Served>>,
}

/// How long a mirror that answered a range of a blob with the whole blob is first passed over
/// for that blob, and a mirror that failed for all blobs.
pub const FIRST_PASS_OVER: Duration = Duration::from_secs(2);
/// The longest it is passed over at once.
pub const MAX_PASS_OVER: Duration = Duration::from_secs(60);
/// The default of `[fetch] mirror_max_skip_bytes`.
pub const DEFAULT_MIRROR_MAX_SKIP: u64 = 4 << 20;
/// A read of bytes a mirror served this blob this recently is the cache fetching them again
/// because they failed verification.
pub const REREAD_WINDOW: Duration = Duration::from_secs(60);
/// How many served ranges a blob remembers.
const SERVED_KEPT: usize = 256;

#[derive(Clone, Copy, Debug, Default)]
struct PassOver {
    until: Option<Instant>,
    /// The last wait.
    waited: Duration,
    next: Duration,
}

/// A range a mirror served.
#[derive(Clone, Copy, Debug)]
struct Served {
    mirror: usize,
    offset: u64,
    end: u64,
    at: Instant,
}

/// What a read does with a mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// Passed over: go to the next source.
    Skip,
    /// Ask with a HEAD whether it serves ranges of the blob now, read it if so.
    Probe,
    /// Read the range from it.
    Read,
}

/// The mirrors (`host[:port]`) that failed, for every blob read through them: a node's blobs
/// share one, so a mirror that stalls costs one timeout, not one per layer.
#[derive(Debug, Default)]
pub struct MirrorHealth {
    down: Mutex<HashMap<String, Down>>,
    metrics: Option<MirrorMetrics>,
}

/// What [`MirrorHealth`] counts, by mirror (`host[:port]`, from the config: a bounded set).
#[derive(Clone, Debug)]
pub struct MirrorMetrics {
    /// 1 while the mirror is down (reads go past it), 0 once it answers again.
    pub down: prometheus::IntGaugeVec,
    /// Times the mirror was found down.
    pub failures: prometheus::IntCounterVec,
}

#[derive(Clone, Copy, Debug)]
struct Down {
    until: Instant,
    /// The wait after the next failure.
    next: Duration,
    /// A background HEAD is asking it.
    probing: bool,
    /// When it was last found back (`None`: still down).
    back: Option<Instant>,
}

/// Whether a read goes to a mirror, by its health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Up,
    /// Down: go past it.
    Down,
    /// Down and its while is over: go past it and ask it with a HEAD in the background.
    Probe,
}

impl MirrorHealth {
    /// Counts into `metrics`.
    pub fn with_metrics(metrics: MirrorMetrics) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    fn down(&self) -> std::sync::MutexGuard<'_, HashMap<String, Down>> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check(&self, mirror: &str) -> Health {
        let mut all = self.down();
        let Some(state) = all.get_mut(mirror) else {
            return Health::Up;
        };
        if state.back.is_some() {
            return Health::Up;
        }
        if state.probing || Instant::now() < state.until {
            return Health::Down;
        }
        state.probing = true;
        Health::Probe
    }

    /// `mirror` failed: down for a while, longer each time it fails again within
    /// [`MAX_PASS_OVER`] of coming back (failures of reads that were in flight together count
    /// once). The wait, if it was up.
    fn failed(&self, mirror: &str) -> Option<Duration> {
        let mut all = self.down();
        let wait = match all.get(mirror) {
            None => FIRST_PASS_OVER,
            Some(Down { back: None, .. }) => return None,
            Some(Down {
                back: Some(back),
                next,
                ..
            }) if back.elapsed() < MAX_PASS_OVER => *next,
            Some(_) => FIRST_PASS_OVER,
        };
        let down = Down {
            until: Instant::now() + wait,
            next: (wait * 2).min(MAX_PASS_OVER),
            probing: false,
            back: None,
        };
        all.insert(mirror.to_owned(), down);
        if let Some(metrics) = &self.metrics {
            metrics.failures.with_label_values(&[mirror]).inc();
            metrics.down.with_label_values(&[mirror]).set(1);
        }
        Some(wait)
    }

    /// The background HEAD of a down `mirror` ended: back if it answered.
    fn probed(&self, mirror: &str, answered: bool) -> Duration {
        let mut all = self.down();
        let Some(state) = all.get_mut(mirror) else {
            return Duration::ZERO;
        };
        state.probing = false;
        if answered {
            state.back = Some(Instant::now());
            if let Some(metrics) = &self.metrics {
                metrics.down.with_label_values(&[mirror]).set(0);
            }
            return Duration::ZERO;
        }
        let wait = state.next;
        state.until = Instant::now() + wait;
        state.next = (wait * 2).min(MAX_PASS_OVER);
        wait
    }
}

impl RegistryBlob {
    /// The blob at `origin`, read through `mirrors` (`host[:port]`) first, whose `health` it
    /// shares with the blobs given the same (the node's: see `RemoteSnapshots`).
    pub fn new(
        client: Client,
        origin: Repository,
        mirrors: &[String],
        digest: Digest,
        health: Arc<MirrorHealth>,
    ) -> Self {
        let mut endpoints: Vec<Repository> = mirrors
            .iter()
            .map(|m| Repository::new(m.clone(), origin.name.clone()))
            .collect();
        endpoints.push(origin);
        Self {
            client,
            passed_over: Mutex::new(vec![PassOver::default(); endpoints.len() - 1]),
            endpoints,
            digest,
            max_skip: DEFAULT_MIRROR_MAX_SKIP,
            health,
            served: Mutex::default(),
        }
    }

    /// Reads through at most `max_skip` bytes of a mirror's whole-blob answer.
    pub fn with_max_skip(mut self, max_skip: u64) -> Self {
        self.max_skip = max_skip;
        self
    }

    fn passed_over(&self) -> std::sync::MutexGuard<'_, Vec<PassOver>> {
        self.passed_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn served_log(&self) -> std::sync::MutexGuard<'_, VecDeque<Served>> {
        self.served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a read does with mirror `i` now.
    fn attempt(&self, i: usize) -> Attempt {
        let state = self.passed_over()[i];
        match state.until {
            None => Attempt::Read,
            Some(until) if Instant::now() < until => Attempt::Skip,
            Some(_) if state.waited < MAX_PASS_OVER => Attempt::Probe,
            Some(_) => Attempt::Read,
        }
    }

    /// Mirror `i` answered with the whole blob: pass it over for a while, longer each time
    /// (reads that were in flight together, answered so together, count once).
    fn pass_over(&self, i: usize) -> Duration {
        let mut all = self.passed_over();
        let state = &mut all[i];
        let now = Instant::now();
        if let Some(until) = state.until.filter(|&until| now < until) {
            return until - now;
        }
        let wait = if state.next.is_zero() {
            FIRST_PASS_OVER
        } else {
            state.next
        };
        state.until = Some(now + wait);
        state.waited = wait;
        state.next = (wait * 2).min(MAX_PASS_OVER);
        wait
    }

    /// Mirror `i` served `len` bytes at `offset`: it is used again at once, and the range is
    /// remembered.
    fn served(&self, i: usize, offset: u64, len: u64) {
        self.passed_over()[i] = PassOver::default();
        let mut log = self.served_log();
        if log.len() >= SERVED_KEPT {
            log.pop_front();
        }
        log.push_back(Served {
            mirror: i,
            offset,
            end: offset.saturating_add(len),
            at: Instant::now(),
        });
    }

    /// The mirror that served `len` bytes at `offset` of this blob within [`REREAD_WINDOW`]:
    /// the cache reads them again, so they were wrong. Forgets that range.
    fn served_wrong(&self, offset: u64, len: u64) -> Option<usize> {
        let mut log = self.served_log();
        let end = offset.saturating_add(len);
        let at = log
            .iter()
            .rposition(|s| s.offset <= offset && end <= s.end && s.at.elapsed() < REREAD_WINDOW)?;
        log.remove(at).map(|s| s.mirror)
    }

    /// Mirror `i` failed (`why`): down for every blob for a while.
    fn mirror_failed(&self, i: usize, why: &dyn std::fmt::Display) {
        let mirror = &self.endpoints[i];
        if let Some(wait) = self.health.failed(&mirror.registry) {
            // Once per failure of the mirror, not per read: no flood.
            tracing::warn!(%mirror, error = %why, ?wait, "mirror failed; reading from the next source while it is down");
        } else {
            tracing::debug!(%mirror, error = %why, "mirror failed (already down)");
        }
    }

    /// Asks down mirror `i` with a HEAD in the background whether it is back.
    fn probe_in_background(&self, i: usize) {
        let (client, mirror, digest, health) = (
            self.client.clone(),
            self.endpoints[i].clone(),
            self.digest,
            self.health.clone(),
        );
        let timeout = client.request_timeout();
        tokio::spawn(async move {
            let head = client.blob_accepts_ranges_once(&mirror, &digest);
            let answered = match tokio::time::timeout(timeout, head).await {
                Ok(Ok(_)) => true,
                // It answered, if not what a read wants: it is up.
                Ok(Err(error)) => !error.is_transient(),
                Err(_elapsed) => false,
            };
            let wait = health.probed(&mirror.registry, answered);
            if answered {
                tracing::info!(%mirror, "mirror answers again; reading from it");
            } else {
                tracing::debug!(%mirror, ?wait, "mirror still down");
            }
        });
    }

    /// One try of mirror `i`, within the request timeout: the range, or why not.
    async fn try_mirror(
        &self,
        i: usize,
        attempt: Attempt,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, MirrorMiss> {
        let mirror = &self.endpoints[i];
        let timeout = self.client.request_timeout();
        let tried = async {
            if attempt == Attempt::Probe
                && !self
                    .client
                    .blob_accepts_ranges_once(mirror, &self.digest)
                    .await?
            {
                return Ok(None);
            }
            self.client
                .read_range_once(mirror, &self.digest, offset, len, self.max_skip)
                .await
                .map(Some)
        };
        match tokio::time::timeout(timeout, tried).await {
            Ok(Ok(Some(bytes))) => Ok(bytes),
            Ok(Ok(None)) => Err(MirrorMiss::NoRanges(
                "HEAD without Accept-Ranges".to_owned(),
            )),
            Ok(Err(error @ streamsnap_registry::Error::RangeIgnored { .. })) => {
                Err(MirrorMiss::NoRanges(error.to_string()))
            }
            Ok(Err(error)) if error.is_transient() => Err(MirrorMiss::Down(error.to_string())),
            Ok(Err(error)) => Err(MirrorMiss::Refused(error.to_string())),
            Err(_elapsed) => Err(MirrorMiss::Down(format!("no range within {timeout:?}"))),
        }
    }
}

/// Why a mirror did not serve a range.
#[derive(Debug)]
enum MirrorMiss {
    /// It does not serve ranges of this blob yet (a pull-through cache filling): pass it over
    /// for this blob.
    NoRanges(String),
    /// It failed (timeout, connection, 5xx): down for every blob.
    Down(String),
    /// It answered no (404, 401, a bad response): next source for this read.
    Refused(String),
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let (origin, mirrors) = self
                .endpoints
                .split_last()
                .expect("the origin is always last");
            if let Some(i) = self.served_wrong(offset, len) {
                self.mirror_failed(i, &"the bytes it served failed verification");
            }
            for (i, mirror) in mirrors.iter().enumerate() {
                match self.health.check(&mirror.registry) {
                    Health::Up => {}
                    Health::Down => continue,
                    Health::Probe => {
                        self.probe_in_background(i);
                        continue;
                    }
                }
                let attempt = self.attempt(i);
                if attempt == Attempt::Skip {
                    continue;
                }
                match self.try_mirror(i, attempt, offset, len).await {
                    Ok(bytes) => {
                        self.served(i, offset, len);
                        return Ok(bytes);
                    }
                    Err(MirrorMiss::NoRanges(why)) => {
                        let wait = self.pass_over(i);
                        tracing::debug!(%mirror, %why, ?wait, "mirror does not serve ranges of this blob yet; trying the next source");
                    }
                    Err(MirrorMiss::Down(why)) => self.mirror_failed(i, &why),
                    Err(MirrorMiss::Refused(why)) => {
                        tracing::debug!(%mirror, %why, "mirror refused; trying the next source");
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use streamsnap_cache::{CacheConfig, ChunkCache};

    use super::super::fake::layer;
    use super::super::source::CacheReader;
    use super::*;
    use streamsnap_fs::ChunkReader;

    #[test]
    fn a_mirror_answering_whole_blobs_is_passed_over_longer_each_time_then_asked_with_a_head() {
        let client = Client::new(streamsnap_registry::ClientConfig::default()).unwrap();
        let origin = Repository::new("origin:5000", "r");
        let mirrors = ["m1:5000".to_owned(), "m2:5000".to_owned()];
        let blob = RegistryBlob::new(
            client,
            origin,
            &mirrors,
            Digest::sha256(b"blob"),
            Arc::default(),
        );
        assert_eq!(blob.attempt(0), Attempt::Read);
        assert_eq!(blob.attempt(1), Attempt::Read);
        let expire = |blob: &RegistryBlob| blob.passed_over()[0].until = Some(Instant::now());
        let mut waits = Vec::new();
        for _ in 0..7 {
            waits.push(blob.pass_over(0).as_secs());
            assert_eq!(blob.attempt(0), Attempt::Skip);
            assert!(
                blob.pass_over(0).as_secs() <= *waits.last().unwrap(),
                "a read answered so meanwhile does not make the wait longer"
            );
            expire(&blob);
            let after = if waits.last() == Some(&60) {
                Attempt::Read
            } else {
                Attempt::Probe
            };
            assert_eq!(blob.attempt(0), after, "after waiting {waits:?}");
        }
        assert_eq!(waits, vec![2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(blob.attempt(1), Attempt::Read, "per mirror");
        blob.served(0, 0, 1);
        assert_eq!(blob.attempt(0), Attempt::Read);
        assert_eq!(
            blob.pass_over(0),
            FIRST_PASS_OVER,
            "a served range starts over"
        );
    }

    #[test]
    fn a_failed_mirror_is_down_for_a_while_probed_once_per_while_and_longer_each_time() {
        let health = MirrorHealth::default();
        let expire = |health: &MirrorHealth| {
            health.down().get_mut("m:1").unwrap().until = Instant::now();
        };
        assert_eq!(health.check("m:1"), Health::Up);
        assert_eq!(health.failed("m:1"), Some(FIRST_PASS_OVER));
        assert_eq!(
            health.failed("m:1"),
            None,
            "reads in flight together count once"
        );
        assert_eq!(health.check("m:1"), Health::Down);
        assert_eq!(health.check("m:2"), Health::Up, "per mirror");
        expire(&health);
        assert_eq!(health.check("m:1"), Health::Probe);
        assert_eq!(health.check("m:1"), Health::Down, "one probe at a time");
        assert_eq!(health.probed("m:1", false), 2 * FIRST_PASS_OVER);
        assert_eq!(health.check("m:1"), Health::Down);
        expire(&health);
        assert_eq!(health.check("m:1"), Health::Probe);
        assert_eq!(health.probed("m:1", true), Duration::ZERO);
        assert_eq!(health.check("m:1"), Health::Up);
        assert_eq!(
            health.failed("m:1"),
            Some(4 * FIRST_PASS_OVER),
            "failing again soon after coming back waits longer"
        );
        health.down().get_mut("m:1").unwrap().back = None;
        health.probed("m:1", true);
        health.down().get_mut("m:1").unwrap().back = Some(Instant::now() - MAX_PASS_OVER);
        assert_eq!(
            health.failed("m:1"),
            Some(FIRST_PASS_OVER),
            "a long time up starts over"
        );
    }

    /// How a test server answers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Serve {
        Right,
        /// Accepts connections and never answers.
        Stall,
        /// Flips a byte in the middle of every range it serves.
        Corrupt,
    }

    /// A registry serving `data` as every blob, by range, on 127.0.0.1; counts its requests.
    async fn server(data: Arc<Vec<u8>>, serve: Serve) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (data, count) = (data.clone(), count.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if serve == Serve::Stall {
                        std::future::pending::<()>().await;
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let response = if head.starts_with("head ") {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\naccept-ranges: bytes\r\nconnection: close\r\n\r\n",
                            data.len()
                        )
                        .into_bytes()
                    } else {
                        let range = head
                            .lines()
                            .find_map(|l| l.strip_prefix("range: bytes="))
                            .expect("a range GET");
                        let (first, last) = range.trim().split_once('-').unwrap();
                        let (first, last): (usize, usize) =
                            (first.parse().unwrap(), last.parse().unwrap());
                        let mut body = data[first..=last].to_vec();
                        if serve == Serve::Corrupt {
                            let mid = body.len() / 2;
                            body[mid] ^= 0x5a;
                        }
                        let mut r = format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {first}-{last}/{}\r\nconnection: close\r\n\r\n",
                            body.len(),
                            data.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    };
                    let _ = conn.write_all(&response).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        (addr, requests)
    }

    /// An address nothing listens on: connections are refused.
    async fn refusing() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    }

    fn client(timeout: Duration) -> Client {
        Client::new(streamsnap_registry::ClientConfig {
            request_timeout: timeout,
            ..streamsnap_registry::ClientConfig::default()
        })
        .unwrap()
    }

    fn through(
        mirror: &str,
        origin: &str,
        data: &[u8],
        health: &Arc<MirrorHealth>,
    ) -> RegistryBlob {
        let origin = Repository::new(origin, "r");
        RegistryBlob::new(
            client(Duration::from_secs(1)),
            origin,
            &[mirror.to_owned()],
            Digest::sha256(data),
            health.clone(),
        )
    }

    #[tokio::test]
    async fn a_stalled_mirror_costs_one_timeout_then_no_read_of_any_blob_waits_for_it() {
        let data = Arc::new(
            (0..100_000u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let (mirror, mirror_requests) = server(data.clone(), Serve::Stall).await;
        let (origin, origin_requests) = server(data.clone(), Serve::Right).await;
        let health = Arc::new(MirrorHealth::default());
        let first = through(&mirror, &origin, &data, &health);
        let second = through(&mirror, &origin, b"another blob", &health);

        let started = Instant::now();
        let bytes = first.read_range(1000, 5000).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(&bytes[..], &data[1000..6000]);
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1800),
            "one timeout (1 s), no retry of the mirror: {waited:?}"
        );
        let started = Instant::now();
        assert_eq!(
            &first.read_range(9000, 100).await.unwrap()[..],
            &data[9000..9100]
        );
        assert_eq!(&second.read_range(0, 100).await.unwrap()[..], &data[..100]);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(mirror_requests.load(Ordering::SeqCst), 1);
        assert_eq!(origin_requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_mirror_goes_to_the_origin_at_once() {
        let data = Arc::new(vec![7u8; 10_000]);
        let mirror = refusing().await;
        let (origin, origin_requests) = server(data.clone(), Serve::Right).await;
        let health = Arc::new(MirrorHealth::default());
        let blob = through(&mirror, &origin, &data, &health);
        let started = Instant::now();
        for _ in 0..3 {
            assert_eq!(&blob.read_range(10, 100).await.unwrap()[..], &data[10..110]);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "no retry, no backoff: {:?}",
            started.elapsed()
        );
        assert_eq!(origin_requests.load(Ordering::SeqCst), 3);
        assert_eq!(health.check(&mirror), Health::Down);
    }

    #[tokio::test]
    async fn chunks_a_mirror_served_wrong_are_read_again_from_the_origin_not_failed() {
        let (toc, blob) = layer(8, 16 << 10, true);
        let data = Arc::new(blob.data.clone());
        let (mirror, mirror_requests) = server(data.clone(), Serve::Corrupt).await;
        let (origin, origin_requests) = server(data.clone(), Serve::Right).await;
        let health = Arc::new(MirrorHealth::default());
        let source: Arc<dyn BlobSource> = Arc::new(through(&mirror, &origin, &data, &health));
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let reader = CacheReader::new(cache.clone(), source, Arc::default(), 0);

        let chunks = reader.read_chunks_in(&*toc, &[2, 3]).await.unwrap();
        for (i, chunk) in [2usize, 3].iter().zip(&chunks) {
            let digest = Digest::from_slice(&toc.chunks()[*i].sha256).unwrap();
            assert_eq!(Digest::sha256(chunk), digest, "chunk {i}");
        }
        assert_eq!(
            mirror_requests.load(Ordering::SeqCst),
            1,
            "one run from the mirror"
        );
        assert_eq!(
            origin_requests.load(Ordering::SeqCst),
            1,
            "the bad frame (the middle byte of the run is in one) again, from the origin"
        );
        assert_eq!(cache.stats().verify_failures, 1);
        assert_eq!(
            health.check(&mirror),
            Health::Down,
            "a lying mirror is down too"
        );
        // Reads meanwhile go to the origin.
        reader.read_chunks_in(&*toc, &[6]).await.unwrap();
        assert_eq!(origin_requests.load(Ordering::SeqCst), 2);
        assert_eq!(mirror_requests.load(Ordering::SeqCst), 1);
    }
}
