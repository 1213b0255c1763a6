//! The seams between the pieces: the registry as the cache's `BlobSource`, the cache as the
//! filesystem's `ChunkReader`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, ChunkCache, ChunkRef, SourceError};
use streamsnap_format::Digest;
use streamsnap_fs::{ChunkInfo, ChunkReader, ChunkTable, ReadError};
use streamsnap_registry::{Client, Repository};

use super::background::OnDemandRead;
use super::profile::AccessLog;

/// A data blob in a registry, read by range: from its mirrors first (in order), then from the
/// registry itself. Every byte is verified by the cache, so a mirror can fail or lag, never lie.
///
/// A mirror is tried once per read, never retried (the next source is its retry), and the
/// whole try, a HEAD included, is bounded by the client's request timeout
/// (`[fetch] timeout_seconds`). A mirror that fails so (no answer in time, connection refused
/// or reset, 5xx) or whose bytes the cache found wrong is down for every blob of the node
/// ([`MirrorHealth`]): reads go past it to the next source at once, and one background HEAD
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
    /// The node's: every blob made with [`RegistryBlob::new`] shares it. One per process (a
    /// daemon is one node), so that blobs made anywhere share it without it being passed down.
    pub fn node() -> Arc<Self> {
        static NODE: OnceLock<Arc<MirrorHealth>> = OnceLock::new();
        NODE.get_or_init(Arc::default).clone()
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
            return Duration::ZERO;
        }
        let wait = state.next;
        state.until = Instant::now() + wait;
        state.next = (wait * 2).min(MAX_PASS_OVER);
        wait
    }
}

impl RegistryBlob {
    /// The blob at `origin`, read through `mirrors` (`host[:port]`) first, whose health it
    /// shares with the node's other blobs ([`MirrorHealth::node`]).
    pub fn new(client: Client, origin: Repository, mirrors: &[String], digest: Digest) -> Self {
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
            health: MirrorHealth::node(),
            served: Mutex::default(),
        }
    }

    /// Reads through at most `max_skip` bytes of a mirror's whole-blob answer.
    pub fn with_max_skip(mut self, max_skip: u64) -> Self {
        self.max_skip = max_skip;
        self
    }

    /// Shares the mirrors' health with the blobs given the same `health` only (tests: each
    /// its own mirrors).
    #[cfg(test)]
    fn with_health(mut self, health: Arc<MirrorHealth>) -> Self {
        self.health = health;
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

/// The cache's name for a chunk of a layer's table.
pub fn chunk_ref(chunk: ChunkInfo) -> ChunkRef {
    ChunkRef {
        digest: chunk.digest,
        offset: chunk.offset,
        compressed_size: chunk.compressed_size,
        size: chunk.size,
    }
}

/// A layer's chunks, through the shared chunk cache, with read-ahead for readers that move
/// forward through the layer (an import, `cat` of a large file): once two reads in a row are
/// sequential in chunk order, the chunks that follow are fetched in the background, in a
/// window that starts at [`FIRST_WINDOW`] and doubles with every further sequential read up to
/// `readahead_bytes` (compressed). Random reads (a container starting) reset the window and
/// fetch nothing extra, so lazy start-up still moves only the bytes it reads.
///
/// It keeps no chunk table: each read comes with the layer's (its index, held by the read), so
/// the layer's metadata lives only in the index, which is dropped when the layer is idle.
pub struct CacheReader {
    cache: Arc<ChunkCache>,
    source: Arc<dyn BlobSource>,
    /// On-demand reads in flight, which background fetch yields to.
    on_demand: Arc<AtomicUsize>,
    readahead_bytes: u64,
    pattern: Mutex<Pattern>,
    /// One read-ahead at a time per layer.
    reading_ahead: Arc<AtomicBool>,
    /// The chunks the layer's first reads touched (for a start-up profile).
    log: Arc<AccessLog>,
    /// When a read of this blob last failed at its deadline (the source is down).
    outage: Mutex<Option<Instant>>,
}

/// After a read of a blob failed at its deadline, reads of that blob wait at most this long
/// until one succeeds: the kernel retries a failed readahead page by page, and a reader may try
/// again (`cat` falls back from sendfile to read), so a full deadline each time would make one
/// read wait several deadlines during an outage.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// How long after such a failure the shorter deadline applies.
pub const OUTAGE_MEMORY: Duration = Duration::from_secs(30);

/// The smallest read-ahead window, in compressed bytes.
pub const FIRST_WINDOW: u64 = 256 << 10;
/// Most decoded bytes one read-ahead brings in, whatever the window (compressed) allows: a
/// window of frames that inflate thousands of times would otherwise stand for gigabytes.
pub const MAX_READAHEAD_DECODED: u64 = 16 << 20;
/// Most chunks one read-ahead brings in.
pub const MAX_READAHEAD_CHUNKS: usize = 1024;

/// What the last read of a layer looked like.
#[derive(Debug, Default)]
struct Pattern {
    /// The last chunk of the previous read.
    last: Option<u32>,
    /// The current read-ahead window in compressed bytes; 0 until reads are sequential.
    window: u64,
}

impl Pattern {
    /// Records a read of chunks `first..=last` and returns the window to fetch after `last`
    /// (0: none). A read is sequential when it starts in the chunk the previous one ended in
    /// or the one after it.
    fn record(&mut self, first: u32, last: u32, max: u64) -> u64 {
        let sequential = self
            .last
            .is_some_and(|prev| first == prev || first == prev.saturating_add(1));
        let advanced = self.last != Some(last);
        self.last = Some(last);
        if !sequential {
            self.window = 0;
            return 0;
        }
        if advanced {
            self.window = if self.window == 0 {
                FIRST_WINDOW
            } else {
                self.window.saturating_mul(2)
            }
            .min(max);
        }
        self.window
    }
}

impl CacheReader {
    pub fn new(
        cache: Arc<ChunkCache>,
        source: Arc<dyn BlobSource>,
        on_demand: Arc<AtomicUsize>,
        readahead_bytes: u64,
    ) -> Self {
        Self {
            cache,
            source,
            on_demand,
            readahead_bytes,
            pattern: Mutex::default(),
            reading_ahead: Arc::default(),
            log: Arc::default(),
            outage: Mutex::default(),
        }
    }

    /// The deadline of the next on-demand read: the cache's, or [`PROBE_DEADLINE`] while the
    /// blob is known to be down.
    fn deadline(&self) -> Duration {
        let full = self.cache.fetch_deadline();
        let outage = *self
            .outage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match outage {
            Some(at) if at.elapsed() < OUTAGE_MEMORY => full.min(PROBE_DEADLINE),
            _ => full,
        }
    }

    fn note_outcome<T>(&self, result: &Result<T, streamsnap_cache::Error>) {
        let mut outage = self
            .outage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(_) => *outage = None,
            Err(streamsnap_cache::Error::Deadline { .. }) => *outage = Some(Instant::now()),
            Err(_) => {}
        }
    }

    /// Records the chunks reads touch in `log` too.
    pub fn with_log(mut self, log: Arc<AccessLog>) -> Self {
        self.log = log;
        self
    }

    /// The chunks after `last` in blob order, up to `window` compressed bytes,
    /// [`MAX_READAHEAD_DECODED`] decoded bytes and [`MAX_READAHEAD_CHUNKS`] chunks, that are not
    /// in memory yet: those on disk are loaded (and verified) ahead too, in parallel.
    fn ahead_of(&self, table: &dyn ChunkTable, last: u32, window: u64) -> Vec<ChunkRef> {
        let mut ahead = Vec::new();
        let (mut bytes, mut decoded, mut count) = (0u64, 0u64, 0usize);
        let following = (last.saturating_add(1)..).map_while(|i| table.chunk(i));
        for chunk in following {
            bytes += u64::from(chunk.compressed_size);
            decoded += u64::from(chunk.size);
            count += 1;
            let over = bytes > window || decoded > MAX_READAHEAD_DECODED;
            if (over || count > MAX_READAHEAD_CHUNKS) && !ahead.is_empty() {
                break;
            }
            let chunk = chunk_ref(chunk);
            if !self.cache.in_memory(&chunk.digest) {
                ahead.push(chunk);
            }
            if bytes >= window || decoded >= MAX_READAHEAD_DECODED {
                break;
            }
        }
        ahead
    }

    /// Notes a read of chunks `first..=last` and, when the reads are sequential, starts
    /// fetching what follows unless a read-ahead of this layer still runs. Runs inside the
    /// runtime (it spawns).
    fn read_ahead(&self, table: &dyn ChunkTable, first: u32, last: u32) {
        if self.readahead_bytes == 0 {
            return;
        }
        let window = self
            .pattern
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(first, last, self.readahead_bytes);
        if window == 0 || self.reading_ahead.swap(true, Ordering::AcqRel) {
            return;
        }
        let ahead = self.ahead_of(table, last, window);
        if ahead.is_empty() {
            self.reading_ahead.store(false, Ordering::Release);
            return;
        }
        let (cache, source, flag) = (
            self.cache.clone(),
            self.source.clone(),
            self.reading_ahead.clone(),
        );
        tokio::spawn(async move {
            if let Err(error) = cache.warm(&source, &ahead).await {
                tracing::debug!(blob = source.describe(), %error, "read-ahead failed");
            }
            flag.store(false, Ordering::Release);
        });
    }
}

impl ChunkReader for CacheReader {
    /// Needs the layer's chunk table: the filesystem calls
    /// [`read_chunks_in`](ChunkReader::read_chunks_in).
    fn read_chunks(&self, _chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        Box::pin(async {
            Err(ReadError::new(
                "the cache reader needs the layer's chunk table (read_chunks_in)",
            ))
        })
    }

    fn read_chunks_in<'a>(
        &'a self,
        table: &'a dyn ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, ReadError>> {
        let refs: Option<Vec<ChunkRef>> = chunks
            .iter()
            .map(|&i| table.chunk(i).map(chunk_ref))
            .collect();
        let Some(refs) = refs else {
            return Box::pin(async {
                Err(ReadError::new("a chunk index past the layer's chunk table"))
            });
        };
        let span = chunks.first().copied().zip(chunks.last().copied());
        self.log.record(chunks);
        Box::pin(async move {
            let _reading = OnDemandRead::begin(&self.on_demand);
            if let Some((first, last)) = span {
                self.read_ahead(table, first, last);
            }
            let result = self
                .cache
                .get_within(&self.source, &refs, self.deadline())
                .await;
            self.note_outcome(&result);
            result.map_err(|error| {
                tracing::debug!(blob = self.source.describe(), %error, "chunk read failed");
                ReadError::new(error.to_string())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use streamsnap_cache::CacheConfig;
    use streamsnap_format::Toc;

    use super::super::fake::{Blob, layer};
    use super::*;

    #[test]
    fn only_sequential_reads_open_a_window_and_it_doubles_up_to_the_cap() {
        let mut p = Pattern::default();
        assert_eq!(p.record(5, 5, 1 << 20), 0, "a first read is not sequential");
        assert_eq!(p.record(6, 6, 1 << 20), FIRST_WINDOW);
        assert_eq!(
            p.record(6, 6, 1 << 20),
            FIRST_WINDOW,
            "same chunk again keeps it"
        );
        assert_eq!(p.record(7, 8, 1 << 20), 2 * FIRST_WINDOW);
        assert_eq!(p.record(8, 9, 1 << 20), 1 << 20, "4x is capped");
        assert_eq!(p.record(3, 3, 1 << 20), 0, "a jump back resets");
        assert_eq!(p.record(9, 9, 1 << 20), 0, "a jump forward resets");
        assert_eq!(p.record(10, 10, 1 << 20), FIRST_WINDOW);
    }

    #[test]
    fn a_mirror_answering_whole_blobs_is_passed_over_longer_each_time_then_asked_with_a_head() {
        let client = Client::new(streamsnap_registry::ClientConfig::default()).unwrap();
        let origin = Repository::new("origin:5000", "r");
        let mirrors = ["m1:5000".to_owned(), "m2:5000".to_owned()];
        let blob = RegistryBlob::new(client, origin, &mirrors, Digest::sha256(b"blob"));
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
        )
        .with_health(health.clone())
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

    struct Rig {
        reader: CacheReader,
        cache: Arc<ChunkCache>,
        toc: Arc<Toc>,
        blob: Arc<Blob>,
        _dir: tempfile::TempDir,
    }

    fn rig(readahead_bytes: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let (toc, blob) = layer(40, 4096, true);
        let source: Arc<dyn BlobSource> = blob.clone();
        let reader = CacheReader::new(cache.clone(), source, Arc::default(), readahead_bytes);
        Rig {
            reader,
            cache,
            toc,
            blob,
            _dir: dir,
        }
    }

    impl Rig {
        fn cached(&self) -> Vec<usize> {
            (0..self.toc.chunks().len())
                .filter(|&i| {
                    self.cache
                        .contains(&ChunkRef::from_toc(&self.toc.chunks()[i]).digest)
                })
                .collect()
        }

        async fn settle(&self) {
            for _ in 0..200 {
                if !self.reader.reading_ahead.load(Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("the read-ahead never finished");
        }
    }

    #[tokio::test]
    async fn the_window_ahead_is_bounded_in_decoded_bytes_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let reader = |toc: &Arc<Toc>, blob: &Arc<Blob>| {
            let source: Arc<dyn BlobSource> = blob.clone();
            (
                CacheReader::new(cache.clone(), source, Arc::default(), 4 << 20),
                toc.clone(),
            )
        };
        // 1 MiB chunks that compress to a few hundred bytes: a 4 MiB window holds all of them.
        let (toc, blob) = layer(64, 1 << 20, false);
        let (r, t) = reader(&toc, &blob);
        let ahead = r.ahead_of(&*t, 0, 4 << 20);
        assert_eq!(ahead.len(), 16, "16 MiB decoded");
        // One chunk over the decoded bound is still read ahead, alone.
        let ahead = r.ahead_of(&*t, 0, 1);
        assert_eq!(ahead.len(), 1);
        let (toc, blob) = layer(3000, 16, false);
        let (r, t) = reader(&toc, &blob);
        let ahead = r.ahead_of(&*t, 0, 4 << 20);
        assert_eq!(ahead.len(), MAX_READAHEAD_CHUNKS);
    }

    #[tokio::test]
    async fn random_reads_fetch_only_what_they_read() {
        let rig = rig(1 << 20);
        for chunk in [5, 1, 20, 9, 30] {
            rig.reader
                .read_chunks_in(&*rig.toc, &[chunk])
                .await
                .unwrap();
            rig.settle().await;
        }
        assert_eq!(rig.cached(), vec![1, 5, 9, 20, 30]);
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn sequential_reads_fetch_the_window_ahead_in_one_request() {
        // Frames of random 4 KiB are a little over 4 KiB: a 16 KiB window holds three.
        let rig = rig(16 << 10);
        rig.reader.read_chunks_in(&*rig.toc, &[0]).await.unwrap();
        rig.reader.read_chunks_in(&*rig.toc, &[1]).await.unwrap();
        rig.settle().await;
        assert_eq!(rig.cached(), vec![0, 1, 2, 3, 4]);
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 3);
        // Reading on finds them cached and pushes the window further.
        rig.reader.read_chunks_in(&*rig.toc, &[2, 3]).await.unwrap();
        rig.settle().await;
        assert_eq!(rig.cached(), (0..=6).collect::<Vec<_>>());
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn sequential_reads_load_the_window_ahead_from_disk_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (toc, blob) = layer(40, 4096, true);
        let source: Arc<dyn BlobSource> = blob.clone();
        let refs: Vec<ChunkRef> = toc.chunks().iter().map(ChunkRef::from_toc).collect();
        // A first cache puts every chunk on disk; a second one over the same directory starts
        // with an empty memory, as after a restart.
        {
            let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap();
            cache.get(&source, &refs).await.unwrap();
        }
        let cache = Arc::new(ChunkCache::open(CacheConfig::new(dir.path(), 1 << 30)).unwrap());
        let reader = CacheReader::new(cache.clone(), source, Arc::default(), 16 << 10);
        reader.read_chunks_in(&*toc, &[0]).await.unwrap();
        reader.read_chunks_in(&*toc, &[1]).await.unwrap();
        for _ in 0..200 {
            if !reader.reading_ahead.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let in_memory: Vec<usize> = (0..refs.len())
            .filter(|&i| cache.in_memory(&refs[i].digest))
            .collect();
        assert_eq!(in_memory, vec![0, 1, 2, 3, 4]);
        assert_eq!(
            blob.requests.load(Ordering::SeqCst),
            1,
            "only the first cache fetched"
        );
    }

    #[tokio::test]
    async fn after_a_read_hits_the_deadline_reads_of_the_blob_wait_briefly_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::new(dir.path(), 1 << 30);
        config.fetch_deadline = Duration::from_secs(3);
        let cache = Arc::new(ChunkCache::open(config).unwrap());
        let (toc, blob) = layer(8, 4096, true);
        let source: Arc<dyn BlobSource> = blob.clone();
        let reader = CacheReader::new(cache, source, Arc::default(), 0);
        blob.stalled.store(true, Ordering::SeqCst);
        let waited = |started: Instant| started.elapsed().as_secs_f64().round();

        let started = Instant::now();
        assert!(reader.read_chunks_in(&*toc, &[0]).await.is_err());
        assert_eq!(
            waited(started),
            3.0,
            "the first read waits the whole deadline"
        );
        let started = Instant::now();
        assert!(reader.read_chunks_in(&*toc, &[0]).await.is_err());
        assert_eq!(
            waited(started),
            PROBE_DEADLINE.as_secs_f64(),
            "a retry during the outage fails fast"
        );

        blob.stalled.store(false, Ordering::SeqCst);
        reader.read_chunks_in(&*toc, &[1]).await.unwrap();
        assert_eq!(
            reader.deadline(),
            Duration::from_secs(3),
            "a success ends it"
        );
    }

    #[tokio::test]
    async fn without_the_table_nothing_is_read_and_chunks_past_it_are_refused() {
        let rig = rig(0);
        assert!(rig.reader.read_chunks(&[0]).await.is_err());
        assert!(rig.reader.read_chunks_in(&*rig.toc, &[40]).await.is_err());
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn no_read_ahead_when_it_is_off() {
        let rig = rig(0);
        for chunk in 0..6 {
            rig.reader
                .read_chunks_in(&*rig.toc, &[chunk])
                .await
                .unwrap();
        }
        assert_eq!(rig.cached(), (0..6).collect::<Vec<_>>());
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 6);
    }
}
