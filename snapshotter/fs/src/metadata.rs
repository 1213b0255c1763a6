//! Layers whose metadata is in memory only while they are used.
//!
//! A mounted [`Layer`] keeps its [`LayerIndex`] (the "hot" metadata every lookup, getattr and
//! readdir reads) only while requests come: a node-wide [`MetadataCache`] drops the index of a
//! layer that had no request for its idle period, and the least recently used ones when the
//! indexes held together pass its byte budget. The mount stays; the next request loads the
//! index again from the file saved next to the layer's TOC (one read of a few MB, its digest
//! checked), or, when that file is missing, damaged or was built from another TOC, rebuilds it
//! from the TOC (one rebuild at a time on the node) and saves it.
//!
//! Requests hold the index they use (an `Arc`): dropping it from the cache never pulls it from
//! under a request in flight; its memory goes when the last one ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use streamsnap_format::{Digest, Toc};

use crate::ChunkReader;
use crate::error::Error;
use crate::index::LayerIndex;
use crate::layer::{FsOptions, LayerFs};
use crate::metrics::Metrics;

/// Where a layer's metadata is loaded from: its saved index, and the TOC that can rebuild it.
#[derive(Clone, Debug)]
pub struct IndexFile {
    /// The saved index (`<snapshot dir>/index`).
    pub index: PathBuf,
    /// The saved TOC blob (`<snapshot dir>/toc`).
    pub toc: PathBuf,
    /// sha256 of the TOC blob: the index must have been built from it.
    pub toc_digest: Digest,
}

impl IndexFile {
    /// `dir/index`, rebuilt from `dir/toc` when needed.
    pub fn in_dir(dir: &Path, toc_digest: Digest) -> Self {
        Self {
            index: dir.join("index"),
            toc: dir.join("toc"),
            toc_digest,
        }
    }

    /// The saved index if it can be used, otherwise one rebuilt from the TOC (and saved).
    fn load(
        &self,
        options: &FsOptions,
        rebuilds: &Mutex<()>,
    ) -> Result<(LayerIndex, Source), Error> {
        let saved = std::fs::read(&self.index)
            .map_err(|source| Error::Io {
                action: "reading",
                path: self.index.clone(),
                source,
            })
            .and_then(|bytes| {
                LayerIndex::from_bytes(bytes, self.toc_digest, options.default_dir_mode).map_err(
                    |source| Error::Index {
                        path: self.index.clone(),
                        source: Box::new(source),
                    },
                )
            });
        let reason = match saved {
            Ok(index) => return Ok((index, Source::Index)),
            Err(reason) => reason,
        };
        // One rebuild at a time: decoding a TOC costs up to the format's decode budget.
        let _one = rebuilds.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(index = %self.index.display(), reason = %crate::error_chain(&reason), "rebuilding a layer index from its TOC");
        let blob = std::fs::read(&self.toc).map_err(|source| Error::Io {
            action: "reading",
            path: self.toc.clone(),
            source,
        })?;
        if Digest::sha256(&blob) != self.toc_digest {
            return Err(Error::TocDigest {
                path: self.toc.clone(),
                expected: self.toc_digest,
            });
        }
        let toc = Toc::decode(&blob).map_err(|source| Error::Toc {
            path: self.toc.clone(),
            source: Box::new(source),
        })?;
        drop(blob);
        let index = LayerIndex::build(&toc, self.toc_digest, options)?;
        drop(toc);
        if let Err(error) = save_index(&index, &self.index) {
            // Served all the same; the next load rebuilds it again.
            tracing::warn!(error = %crate::error_chain(&error), "cannot save a rebuilt layer index");
        }
        Ok((index, Source::Toc))
    }
}

/// Writes `index` to `path` atomically (a temporary file renamed into place).
pub fn save_index(index: &LayerIndex, path: &Path) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    std::fs::write(&tmp, index.as_bytes()).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))
}

/// Where a loaded index came from (the `source` label of the loads metric).
#[derive(Clone, Copy, Debug)]
enum Source {
    Index,
    Toc,
}

/// How long an unused layer keeps its metadata in memory, and how much all may keep.
#[derive(Clone, Debug)]
pub struct MetadataConfig {
    /// A layer without a request for this long drops its index (`None`: never, for idleness).
    pub idle: Option<Duration>,
    /// Most bytes of indexes kept at once (0: no limit). The least recently used are dropped
    /// past it; the index a request needs is always loaded, even alone over the budget.
    pub max_bytes: u64,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            idle: Some(Self::DEFAULT_IDLE),
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

impl MetadataConfig {
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
}

/// The node's layer metadata in memory: which mounted layers hold their index, how much that
/// takes, and dropping what is idle or over budget (see the module doc). One per daemon.
pub struct MetadataCache {
    config: MetadataConfig,
    epoch: Instant,
    slots: Mutex<Vec<Weak<Slot>>>,
    resident: AtomicU64,
    loaded_layers: AtomicU64,
    rebuilds: Mutex<()>,
    metrics: Metrics,
}

impl std::fmt::Debug for MetadataCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataCache")
            .field("config", &self.config)
            .field("resident", &self.resident_bytes())
            .finish_non_exhaustive()
    }
}

impl MetadataCache {
    /// Counts into `metrics` (share the daemon's [`Metrics`] to export it).
    pub fn new(config: MetadataConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            config,
            epoch: Instant::now(),
            slots: Mutex::default(),
            resident: AtomicU64::new(0),
            loaded_layers: AtomicU64::new(0),
            rebuilds: Mutex::default(),
            metrics,
        })
    }

    /// Bytes of indexes held now.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::SeqCst)
    }

    /// Layers whose index is held now.
    pub fn loaded_layers(&self) -> u64 {
        self.loaded_layers.load(Ordering::SeqCst)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, slot: &Arc<Slot>) {
        let mut slots = self.lock_slots();
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(slot));
    }

    fn live_slots(&self) -> Vec<Arc<Slot>> {
        self.lock_slots().iter().filter_map(Weak::upgrade).collect()
    }

    fn add(&self, bytes: u64) {
        let resident = self.resident.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let layers = self.loaded_layers.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.metadata_resident(resident, layers);
    }

    fn remove(&self, bytes: u64) {
        let resident = self.resident.fetch_sub(bytes, Ordering::SeqCst) - bytes;
        let layers = self.loaded_layers.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.metadata_resident(resident, layers);
    }

    /// After `slot` loaded: drops the least recently used other indexes while over budget.
    fn enforce_budget(&self, slot: &Arc<Slot>) {
        let max = self.config.max_bytes;
        if max == 0 || self.resident_bytes() <= max {
            return;
        }
        let mut victims: Vec<(u64, Arc<Slot>)> = self
            .live_slots()
            .into_iter()
            .filter(|s| !Arc::ptr_eq(s, slot))
            .map(|s| (s.last_used.load(Ordering::Relaxed), s))
            .collect();
        victims.sort_by_key(|(used, _)| *used);
        let mut evicted = 0;
        for (_, victim) in victims {
            if self.resident_bytes() <= max {
                break;
            }
            if victim.evict() {
                self.metrics.metadata_evicted("budget");
                evicted += 1;
            }
        }
        if evicted > 0 {
            trim_heap();
        }
    }

    /// Drops the index of every layer without a request for the idle period; returns how many.
    pub fn sweep(&self) -> usize {
        let Some(idle) = self.config.idle else {
            return 0;
        };
        let now = self.now_ms();
        let idle = idle.as_millis() as u64;
        let mut evicted = 0;
        for slot in self.live_slots() {
            let used = slot.last_used.load(Ordering::Relaxed);
            if now.saturating_sub(used) >= idle && slot.evict() {
                self.metrics.metadata_evicted("idle");
                evicted += 1;
            }
        }
        if evicted > 0 {
            trim_heap();
            tracing::debug!(
                evicted,
                resident = self.resident_bytes(),
                "idle layer metadata dropped"
            );
        }
        evicted
    }

    /// Sweeps every quarter of the idle period (at least every second, at most every minute)
    /// on `handle`, for as long as the cache exists.
    pub fn start_sweeper(self: &Arc<Self>, handle: &tokio::runtime::Handle) {
        let Some(idle) = self.config.idle else {
            return;
        };
        let period = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let cache = Arc::downgrade(self);
        handle.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(cache) = cache.upgrade() else { return };
                // Dropping many indexes and trimming the heap can take milliseconds.
                let _ = tokio::task::spawn_blocking(move || cache.sweep()).await;
            }
        });
    }
}

/// Gives the heap's free pages back to the kernel. Indexes are a few large allocations, but
/// glibc keeps freed memory of that size in the heap once such blocks have been freed before
/// (its mmap threshold adapts), so without this a dropped index would stay in the RSS.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists and returns pages to the
    // kernel; it is thread-safe and touches no memory the program uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One layer's metadata: the index if loaded, and how to load it again.
struct Slot {
    /// `None`: resident for the layer's life (built from a TOC in memory).
    file: Option<IndexFile>,
    options: FsOptions,
    loaded: Mutex<Option<Arc<LayerIndex>>>,
    /// When a request last used it, in ms since the cache's epoch.
    last_used: AtomicU64,
    cache: Option<Arc<MetadataCache>>,
}

impl Slot {
    fn touch(&self) {
        if let Some(cache) = &self.cache {
            self.last_used.store(cache.now_ms(), Ordering::Relaxed);
        }
    }

    fn get(self: &Arc<Self>) -> Result<Arc<LayerIndex>, Error> {
        self.touch();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(index) = &*loaded {
            return Ok(index.clone());
        }
        let (Some(file), Some(cache)) = (&self.file, &self.cache) else {
            unreachable!("a resident layer's index is never dropped");
        };
        // Loaded under the lock: concurrent requests of this layer wait for the one load.
        let started = Instant::now();
        let result = file.load(&self.options, &cache.rebuilds);
        cache.metrics.metadata_loaded(
            started.elapsed(),
            result.as_ref().ok().map(|(_, source)| match source {
                Source::Index => "index",
                Source::Toc => "toc",
            }),
        );
        let (index, _) = result?;
        let index = Arc::new(index);
        *loaded = Some(index.clone());
        drop(loaded);
        cache.add(index.len_bytes());
        cache.enforce_budget(self);
        Ok(index)
    }

    /// Drops the index unless it is being loaded or used by the cache right now; whether it
    /// did. Resident slots keep theirs.
    fn evict(&self) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        if self.file.is_none() {
            return false;
        }
        let Ok(mut loaded) = self.loaded.try_lock() else {
            return false;
        };
        match loaded.take() {
            Some(index) => {
                drop(loaded);
                cache.remove(index.len_bytes());
                true
            }
            None => false,
        }
    }

    fn is_loaded(&self) -> bool {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let loaded = self.loaded.get_mut().unwrap_or_else(|e| e.into_inner());
        if let (Some(index), Some(cache)) = (loaded.take(), &self.cache) {
            cache.remove(index.len_bytes());
        }
    }
}

/// A mounted layer as the FUSE adapter serves it: its index, loaded when used and dropped when
/// idle ([`Layer::open`]), or resident for its life ([`Layer::resident`]), and the reader of its
/// chunks.
pub struct Layer {
    digest: Digest,
    reader: Arc<dyn ChunkReader>,
    options: FsOptions,
    slot: Arc<Slot>,
    /// Keeps a resident layer's TOC alive with it.
    _fs: Option<Arc<LayerFs>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("layer", &self.digest)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

impl Layer {
    /// Layer `digest`, its metadata loaded from `file` on first use and dropped when `cache`
    /// finds it idle. Reads nothing yet.
    pub fn open(
        digest: Digest,
        file: IndexFile,
        reader: Arc<dyn ChunkReader>,
        options: FsOptions,
        cache: &Arc<MetadataCache>,
    ) -> Self {
        let slot = Arc::new(Slot {
            file: Some(file),
            options: options.clone(),
            loaded: Mutex::new(None),
            last_used: AtomicU64::new(cache.now_ms()),
            cache: Some(cache.clone()),
        });
        cache.register(&slot);
        Self {
            digest,
            reader,
            options,
            slot,
            _fs: None,
        }
    }

    /// Starts with `index` loaded (one just built from the TOC, and saved to the layer's
    /// [`IndexFile`]), counted in the cache like one loaded by a request.
    pub fn with_index(self, index: LayerIndex) -> Self {
        let bytes = index.len_bytes();
        *self.slot.loaded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(index));
        self.slot.touch();
        if let Some(cache) = &self.slot.cache {
            cache.add(bytes);
            cache.enforce_budget(&self.slot);
        }
        self
    }

    /// A layer built from its TOC in memory, whose index stays for its life.
    pub fn resident(fs: Arc<LayerFs>) -> Self {
        let slot = Arc::new(Slot {
            file: None,
            options: fs.options().clone(),
            loaded: Mutex::new(Some(fs.index().clone())),
            last_used: AtomicU64::new(0),
            cache: None,
        });
        Self {
            digest: fs.toc().layer_digest(),
            reader: fs.reader().clone(),
            options: fs.options().clone(),
            slot,
            _fs: Some(fs),
        }
    }

    /// The original layer's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The layer's index, loaded if it is not; marks the layer used.
    pub fn index(&self) -> Result<Arc<LayerIndex>, Error> {
        self.slot.get()
    }

    /// Whether the index is in memory now.
    pub fn is_loaded(&self) -> bool {
        self.slot.is_loaded()
    }

    /// Drops the index now (it is loaded again when used); whether it was held.
    pub fn evict(&self) -> bool {
        self.slot.evict()
    }

    pub fn reader(&self) -> &Arc<dyn ChunkReader> {
        &self.reader
    }

    pub fn options(&self) -> &FsOptions {
        &self.options
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use streamsnap_format::encode_toc;

    use super::*;
    use crate::testutil::{LayerBuilder, MemoryChunks};
    use crate::{FileKind, IndexError, ROOT_INO};

    /// A layer of `files` files under `d/`, its TOC saved in a temp dir.
    struct Saved {
        dir: tempfile::TempDir,
        file: IndexFile,
        fs: Arc<LayerFs>,
        reader: Arc<MemoryChunks>,
    }

    fn saved(files: usize, seed: &str) -> Saved {
        let mut b = LayerBuilder::new(4096);
        b.dir("d", 0o750).xattrs.push(api_xattr("user.note", b"v"));
        for i in 0..files {
            b.file(
                &format!("d/{seed}{i:04}"),
                0o644,
                format!("{seed}{i}").as_bytes(),
            );
        }
        b.symlink("link", "d/target");
        let (toc, reader) = b.build();
        let blob = encode_toc(toc.raw());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("toc"), &blob).unwrap();
        let file = IndexFile::in_dir(dir.path(), Digest::sha256(&blob));
        let fs = Arc::new(LayerFs::new(toc, reader.clone(), FsOptions::default()).unwrap());
        Saved {
            dir,
            file,
            fs,
            reader,
        }
    }

    fn api_xattr(name: &str, value: &[u8]) -> streamsnap_format::api::Xattr {
        streamsnap_format::api::Xattr {
            name: name.into(),
            value: value.to_vec(),
        }
    }

    fn config(idle: Option<Duration>, max_bytes: u64) -> MetadataConfig {
        MetadataConfig { idle, max_bytes }
    }

    fn open(saved: &Saved, cache: &Arc<MetadataCache>) -> Layer {
        Layer::open(
            saved.fs.toc().layer_digest(),
            saved.file.clone(),
            saved.reader.clone(),
            FsOptions::default(),
            cache,
        )
    }

    fn build(saved: &Saved) -> LayerIndex {
        LayerIndex::build(saved.fs.toc(), saved.file.toc_digest, &FsOptions::default()).unwrap()
    }

    /// Every inode's attributes, listing and xattrs, from `index`.
    fn describe(index: &LayerIndex) -> Vec<String> {
        let mut out = Vec::new();
        for ino in 1..=index.node_count() as u64 {
            let attr = index.getattr(ino).unwrap();
            out.push(format!("{attr:?} {:?}", index.listxattr(ino)));
            if attr.kind == FileKind::Directory {
                for entry in index.readdir_iter(ino, 0).unwrap() {
                    out.push(format!("  {entry:?}"));
                }
            }
            if attr.kind == FileKind::Symlink {
                out.push(format!("  -> {:?}", index.readlink(ino)));
            }
        }
        out
    }

    #[test]
    fn a_saved_index_reads_back_and_answers_as_the_one_built() {
        let saved = saved(50, "f");
        let built = build(&saved);
        save_index(&built, &saved.file.index).unwrap();
        let bytes = std::fs::read(&saved.file.index).unwrap();
        let read = LayerIndex::from_bytes(bytes, saved.file.toc_digest, 0o755).unwrap();
        assert_eq!(describe(&read), describe(&built));
        assert_eq!(describe(&read), describe(saved.fs.index()));
        assert_eq!(read.layer_digest(), saved.fs.toc().layer_digest());
        assert!(read.has_xattrs());
        assert_eq!(read.getxattr(2, OsStr::new("user.note")).unwrap(), b"v");
    }

    #[test]
    fn damaged_foreign_or_stale_indexes_are_refused() {
        let saved = saved(5, "f");
        let good = build(&saved).as_bytes().to_vec();
        let toc = saved.file.toc_digest;
        let read =
            |bytes: Vec<u8>, toc, mode| LayerIndex::from_bytes(bytes, toc, mode).unwrap_err();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(read(flipped, toc, 0o755), IndexError::Digest));
        assert!(matches!(
            read(good[..good.len() - 1].to_vec(), toc, 0o755),
            IndexError::Length { .. }
        ));
        assert!(matches!(
            read(b"junk".to_vec(), toc, 0o755),
            IndexError::Magic { .. }
        ));
        let other = Digest::sha256(b"other");
        assert!(matches!(
            read(good.clone(), other, 0o755),
            IndexError::OtherToc { .. }
        ));
        assert!(matches!(read(good, toc, 0o700), IndexError::Options { .. }));
    }

    #[test]
    fn records_pointing_outside_their_sections_are_refused_even_with_a_good_digest() {
        use crate::index::HEADER_LEN;
        let saved = saved(3, "f");
        let mut bytes = build(&saved).as_bytes().to_vec();
        // The root's first child (field b) far past the children section.
        let b = HEADER_LEN + 32;
        bytes[b..b + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let digest = Digest::sha256(&bytes[HEADER_LEN..]);
        bytes[80..112].copy_from_slice(digest.as_bytes());
        let error = LayerIndex::from_bytes(bytes, saved.file.toc_digest, 0o755).unwrap_err();
        assert!(
            matches!(
                error,
                IndexError::Record {
                    section: "nodes",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn an_idle_layer_drops_its_index_and_loads_it_again_when_used() {
        let saved = saved(20, "f");
        save_index(&build(&saved), &saved.file.index).unwrap();
        let metrics = Metrics::unregistered();
        let cache = MetadataCache::new(config(Some(Duration::ZERO), 0), metrics.clone());
        let layer = open(&saved, &cache);
        assert!(!layer.is_loaded(), "nothing is read at open");
        assert_eq!(cache.resident_bytes(), 0);
        let index = layer.index().unwrap();
        let bytes = index.len_bytes();
        assert_eq!((cache.resident_bytes(), cache.loaded_layers()), (bytes, 1));
        assert_eq!(metrics.metadata_bytes(), bytes);
        assert_eq!(cache.sweep(), 1);
        assert_eq!((cache.resident_bytes(), cache.loaded_layers()), (0, 0));
        // A request in flight keeps the index it holds.
        assert_eq!(index.lookup(ROOT_INO, OsStr::new("link")).unwrap().size, 8);
        drop(index);
        let again = layer.index().unwrap();
        assert_eq!(describe(&again), describe(saved.fs.index()));
        assert_eq!(cache.resident_bytes(), bytes);
        drop(layer);
        assert_eq!(
            cache.resident_bytes(),
            0,
            "an unmounted layer gives its index back"
        );
    }

    #[test]
    fn a_layer_used_within_the_idle_period_keeps_its_index() {
        let saved = saved(3, "f");
        let cache = MetadataCache::new(
            config(Some(Duration::from_secs(3600)), 0),
            Metrics::default(),
        );
        let layer = open(&saved, &cache).with_index(build(&saved));
        assert!(layer.is_loaded());
        assert_eq!(cache.sweep(), 0);
        assert!(layer.is_loaded());
        let never = MetadataCache::new(config(None, 0), Metrics::default());
        let layer = open(&saved, &never).with_index(build(&saved));
        assert_eq!(never.sweep(), 0);
        assert!(layer.is_loaded());
    }

    #[test]
    fn a_missing_or_damaged_index_is_rebuilt_from_the_toc_and_saved() {
        let saved = saved(20, "f");
        let cache = MetadataCache::new(config(None, 0), Metrics::default());
        let layer = open(&saved, &cache);
        assert!(!saved.file.index.exists());
        let index = layer.index().unwrap();
        assert_eq!(describe(&index), describe(saved.fs.index()));
        let written = std::fs::read(&saved.file.index).unwrap();
        assert_eq!(written, index.as_bytes(), "the rebuilt index is saved");
        // Damaged on disk: rebuilt again.
        std::fs::write(&saved.file.index, &written[..100]).unwrap();
        assert!(layer.evict());
        assert_eq!(describe(&layer.index().unwrap()), describe(&index));
        assert_eq!(std::fs::read(&saved.file.index).unwrap(), written);
        // Neither usable: the load fails (the request gets EIO), and works once they are.
        std::fs::remove_file(&saved.file.index).unwrap();
        std::fs::write(saved.dir.path().join("toc"), b"not the toc").unwrap();
        assert!(layer.evict());
        assert!(matches!(layer.index(), Err(Error::TocDigest { .. })));
        assert!(!layer.is_loaded());
        assert_eq!(cache.resident_bytes(), 0);
        save_index(&index, &saved.file.index).unwrap();
        assert!(layer.index().is_ok());
    }

    #[test]
    fn over_the_budget_the_least_recently_used_indexes_go() {
        let layers: Vec<Saved> = ["a", "b", "c"].iter().map(|s| saved(200, s)).collect();
        for s in &layers {
            save_index(&build(s), &s.file.index).unwrap();
        }
        let one = build(&layers[0]).len_bytes();
        let cache = MetadataCache::new(config(None, 2 * one + one / 2), Metrics::default());
        let opened: Vec<Layer> = layers.iter().map(|s| open(s, &cache)).collect();
        opened[0].index().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        opened[1].index().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        opened[0].index().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        opened[2].index().unwrap();
        let loaded: Vec<bool> = opened.iter().map(Layer::is_loaded).collect();
        assert_eq!(loaded, [true, false, true], "b was used least recently");
        assert!(cache.resident_bytes() <= 2 * one + one / 2);
        // One layer alone over the budget is still served.
        let tiny = MetadataCache::new(config(None, 1), Metrics::default());
        let alone = open(&layers[0], &tiny);
        assert!(alone.index().is_ok());
        assert!(alone.is_loaded());
    }
}
