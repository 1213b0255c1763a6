//! The seam between the cache and the file system: the cache as the filesystem's
//! `ChunkReader` (the registry as the cache's `BlobSource` is `registry_blob`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, ChunkCache, ChunkRef};
use streamsnap_fs::{ChunkInfo, ChunkReader, ChunkTable, ReadError};

use super::background::OnDemandRead;
use super::profile::AccessLog;

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
/// `readahead_bytes` (compressed). Random reads (a container starting) reset the window; one
/// that misses the cache fetches a fixed window after it instead when
/// [`CacheReader::with_readahead_after_miss`] is set (the next file a start reads often
/// follows in the layer), otherwise nothing extra.
///
/// It keeps no chunk table: each read comes with the layer's (its index, held by the read), so
/// the layer's metadata lives only in the index, which is dropped when the layer is idle.
pub struct CacheReader {
    cache: Arc<ChunkCache>,
    source: Arc<dyn BlobSource>,
    /// On-demand reads in flight, which background fetch yields to.
    on_demand: Arc<AtomicUsize>,
    readahead_bytes: u64,
    /// Compressed bytes fetched after a read that is not sequential and misses the cache.
    after_miss_bytes: u64,
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
/// The default read-ahead after a random read that missed the cache (`[fetch]
/// readahead_after_miss_bytes`), in compressed bytes: on a 1 GiB image without a profile it
/// cut the cold start by 45% behind 80 ms of round trip, for half as many bytes again
/// (docs/benchmarks.md).
pub const DEFAULT_READAHEAD_AFTER_MISS: u64 = 4 << 20;
/// The largest `[fetch] readahead_after_miss_bytes`.
pub const MAX_READAHEAD_AFTER_MISS: u64 = 16 << 20;

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
            after_miss_bytes: 0,
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

    /// After a read that is not sequential and misses the cache (some chunk neither in memory
    /// nor on disk), also fetches up to `bytes` (compressed) of the chunks that follow it.
    pub fn with_readahead_after_miss(mut self, bytes: u64) -> Self {
        self.after_miss_bytes = bytes;
        self
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

    /// Notes a read of chunks `first..=last` (`refs`) and, when the reads are sequential (or
    /// this one misses the cache and [`Self::with_readahead_after_miss`] is set), starts
    /// fetching what follows unless a read-ahead of this layer still runs. The cache is asked
    /// about `refs` only when that decides it. Runs inside the runtime (it spawns).
    fn read_ahead(&self, table: &dyn ChunkTable, refs: &[ChunkRef], first: u32, last: u32) {
        let mut window = if self.readahead_bytes == 0 {
            0
        } else {
            self.pattern
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record(first, last, self.readahead_bytes)
        };
        if window == 0
            && self.after_miss_bytes > 0
            && !self.reading_ahead.load(Ordering::Acquire)
            && refs.iter().any(|chunk| !self.cache.contains(&chunk.digest))
        {
            window = self.after_miss_bytes;
        }
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
        let Some(refs) = chunk_refs(table, chunks) else {
            return Box::pin(async {
                Err(ReadError::new("a chunk index past the layer's chunk table"))
            });
        };
        let span = chunks.first().copied().zip(chunks.last().copied());
        self.log.record(chunks);
        Box::pin(async move {
            let _reading = OnDemandRead::begin(&self.on_demand);
            if let Some((first, last)) = span {
                self.read_ahead(table, &refs, first, last);
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

    /// Not recorded in the access log (a copy is not a read of the start-up) and never fetched.
    fn local_chunks_in<'a>(
        &'a self,
        table: &'a dyn ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Option<Vec<Bytes>>> {
        let refs = chunk_refs(table, chunks);
        Box::pin(async move { self.cache.get_local(&refs?).await })
    }
}

/// The cache's refs of the chunks at these indices of `table`; `None` if one is past its end.
fn chunk_refs(table: &dyn ChunkTable, chunks: &[u32]) -> Option<Vec<ChunkRef>> {
    chunks
        .iter()
        .map(|&i| table.chunk(i).map(chunk_ref))
        .collect()
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
    async fn local_chunks_come_only_from_the_node_and_are_never_fetched() {
        let rig = rig(0);
        assert_eq!(rig.reader.local_chunks_in(&*rig.toc, &[3, 4]).await, None);
        assert_eq!(
            rig.blob.requests.load(Ordering::SeqCst),
            0,
            "nothing fetched"
        );
        let read = rig.reader.read_chunks_in(&*rig.toc, &[3]).await.unwrap();
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 1);
        let local = rig.reader.local_chunks_in(&*rig.toc, &[3]).await.unwrap();
        assert_eq!(local, read);
        // One chunk off the node: none at all.
        assert_eq!(rig.reader.local_chunks_in(&*rig.toc, &[3, 4]).await, None);
        assert_eq!(rig.blob.requests.load(Ordering::SeqCst), 1);
        assert_eq!(rig.cached(), vec![3]);
    }

    #[tokio::test]
    async fn a_random_miss_fetches_what_follows_when_asked_and_a_hit_does_not() {
        let mut rig = rig(1 << 20);
        // Room for exactly the two chunks after the one read.
        let window: u64 = rig.toc.chunks()[6..8]
            .iter()
            .map(|c| u64::from(c.compressed_size))
            .sum();
        rig.reader = rig.reader.with_readahead_after_miss(window);
        rig.reader.read_chunks_in(&*rig.toc, &[5]).await.unwrap();
        rig.settle().await;
        assert_eq!(rig.cached(), vec![5, 6, 7], "the miss of 5 brought 6 and 7");
        // Random reads of cached chunks (7 after 5, then 5 after 7) fetch nothing more.
        rig.reader.read_chunks_in(&*rig.toc, &[7]).await.unwrap();
        rig.settle().await;
        rig.reader.read_chunks_in(&*rig.toc, &[5]).await.unwrap();
        rig.settle().await;
        assert_eq!(rig.cached(), vec![5, 6, 7]);
        // The next random miss does.
        rig.reader.read_chunks_in(&*rig.toc, &[20]).await.unwrap();
        rig.settle().await;
        assert_eq!(rig.cached(), vec![5, 6, 7, 20, 21, 22]);
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
