//! FUSE passthrough for regular files that are whole on the node.
//!
//! The kernel can read a file of a FUSE mount straight from another file (a *backing* file)
//! without a request per read (Linux 6.9+, FUSE_PASSTHROUGH): reads then run at the speed of
//! the local file system, page cache included. A layer's file content lives in chunks, several
//! files to a chunk or several chunks to a file, so the backing file is a copy: when a file of
//! at least `min_file_bytes` is opened a second time and every chunk it needs is on the node (a
//! file read once, as most are during a start-up, is not worth a copy), the store writes
//! the file's bytes, read through the same verified chunk path as any FUSE read, into a file of
//! its own under `dir`; later opens of that file (while no open of it without passthrough is
//! held) hand the copy to the kernel. Nothing goes over the network for a copy: a chunk that is
//! not on the node ends it.
//!
//! The copies take at most `capacity_bytes` together (the least recently opened are deleted to
//! make room; a copy the kernel still reads stays until it is closed). They are only trusted in
//! the process that wrote them: the directory is emptied when the store opens, so a restarted
//! daemon copies again from verified chunks. The directory and the copies are root-only.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use lru::LruCache;
use streamsnap_format::Digest;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::index::{ChunkTable, LayerIndex};
use crate::metadata::Layer;
use crate::metrics::Metrics;
use crate::warnings::{READ_WARNING_INTERVAL, RateLimit};
use crate::{BoxFuture, ChunkReader, ReadError};

/// Bytes read and written per step of a copy.
const COPY_STEP: u32 = 4 << 20;
/// Files remembered as opened once (a copy waits for the second open); forgotten all at once
/// past this many.
const MAX_OPENED_ONCE: usize = 1 << 16;

/// Where copies go and how much room they get.
#[derive(Clone, Debug)]
pub struct PassthroughConfig {
    /// Holds the copies (created, and emptied, when the store opens).
    pub dir: PathBuf,
    /// Most bytes of copies at once (0: passthrough off).
    pub capacity_bytes: u64,
    /// Smaller files are never copied: their reads are few and cheap through FUSE.
    pub min_file_bytes: u64,
}

/// A file of a layer: the TOC it was indexed from and its node number there.
type Key = (Digest, u64);

/// The digest that names the files of `index` in the store: its TOC's, or for a layer built in
/// memory without one (tests, tools), the layer's.
pub(crate) fn toc_key(index: &LayerIndex, layer: &Layer) -> Digest {
    let toc = index.toc_digest();
    if toc.as_bytes() == &[0u8; 32] {
        layer.digest()
    } else {
        toc
    }
}

/// The node's copies of whole files, shared by all mounts. See the module docs.
#[derive(Debug)]
pub struct PassthroughStore {
    config: PassthroughConfig,
    state: Mutex<State>,
    /// One copy at a time on the node: copies are background work and must not take the disk
    /// from reads.
    copying: Semaphore,
    /// Counts copies and their bytes (the node's FUSE metrics).
    metrics: Arc<Metrics>,
    /// Copies the disk refused, warned of at most once a minute.
    warnings: RateLimit,
}

#[derive(Debug)]
struct State {
    /// Finished copies and their sizes, least recently handed out first.
    files: LruCache<Key, u64>,
    /// Copies being written (their bytes are already counted in `used`).
    pending: HashSet<Key>,
    /// Files opened once: the next open starts their copy.
    opened_once: HashSet<Key>,
    /// Bytes of finished and pending copies.
    used: u64,
}

impl PassthroughStore {
    /// Creates `config.dir` (mode 0700) and deletes whatever an earlier process left in it.
    /// Counts copies and their bytes in `metrics`.
    pub fn open(config: PassthroughConfig, metrics: Arc<Metrics>) -> io::Result<Arc<Self>> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match fs::remove_dir_all(&config.dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(annotate(&config.dir, "cannot empty", error)),
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)
            .map_err(|e| annotate(&config.dir, "cannot create", e))?;
        fs::set_permissions(&config.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| annotate(&config.dir, "cannot make root-only", e))?;
        Ok(Arc::new(Self {
            config,
            state: Mutex::new(State {
                files: LruCache::unbounded(),
                pending: HashSet::new(),
                opened_once: HashSet::new(),
                used: 0,
            }),
            copying: Semaphore::new(1),
            metrics,
            warnings: RateLimit::new(READ_WARNING_INTERVAL),
        }))
    }

    pub fn config(&self) -> &PassthroughConfig {
        &self.config
    }

    /// Bytes of copies on disk and being written.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, (toc, ino): Key) -> PathBuf {
        self.config.dir.join(format!("{}-{ino}", toc.hex()))
    }

    fn temp_path(&self, (toc, ino): Key) -> PathBuf {
        self.config.dir.join(format!(".tmp-{}-{ino}", toc.hex()))
    }

    /// The finished copy of file `ino` of the layer indexed from TOC `toc`, opened for reading
    /// (outside the store's lock).
    pub fn file(&self, toc: Digest, ino: u64) -> Option<File> {
        let key = (toc, ino);
        self.lock().files.get(&key)?;
        match File::open(self.path(key)) {
            Ok(file) => Some(file),
            Err(error) => {
                tracing::debug!(%toc, ino, %error, "passthrough copy gone");
                let mut state = self.lock();
                if let Some(size) = state.files.pop(&key) {
                    state.used -= size;
                }
                None
            }
        }
    }

    /// Notes an open of file `ino` (`size` bytes) of `layer` (indexed in `index`, whose files
    /// the store names by `toc`); from its second open on, starts copying it in the background
    /// on `handle` (a file read once, as most are during a start-up, is not worth the disk and
    /// CPU a copy takes from the start), unless
    /// it is too small or too large, copied or being copied already, or there is no room. The
    /// copy stops at the first chunk that is not on the node.
    pub fn copy(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        index: &Arc<LayerIndex>,
        toc: Digest,
        ino: u64,
        size: u64,
        handle: &Handle,
    ) {
        if size < self.config.min_file_bytes.max(1) || size > self.config.capacity_bytes {
            return;
        }
        let key = (toc, ino);
        if !self.opened_before(key) || !self.reserve(key, size) {
            return;
        }
        let (store, layer, index) = (Arc::clone(self), Arc::clone(layer), Arc::clone(index));
        handle.spawn(async move {
            let Ok(_permit) = store.copying.acquire().await else {
                store.abandon(key, size);
                return;
            };
            match store.write_copy(key, &layer, &index, size).await {
                Ok(()) => {
                    store.finished(key, size);
                    store.metrics.passthrough_copied();
                    tracing::debug!(toc = %key.0, ino, size, "file copied for passthrough");
                }
                Err(error) => {
                    let _ = fs::remove_file(store.temp_path(key));
                    store.abandon(key, size);
                    store.copy_failed(key, &error);
                }
            }
            store.metrics.passthrough_bytes(store.used_bytes());
        });
    }

    /// A pending copy of `size` bytes is in place: it can be handed out.
    fn finished(&self, key: Key, size: u64) {
        let mut state = self.lock();
        state.pending.remove(&key);
        state.files.put(key, size);
    }

    /// Logs a copy that failed: at debug level when a chunk was not on the node (normal), as a
    /// warning at most once a minute when the disk refused it.
    fn copy_failed(&self, (toc, ino): Key, error: &CopyError) {
        match error {
            CopyError::NotLocal(error) => {
                tracing::debug!(%toc, ino, error, "no passthrough copy: not whole on the node");
            }
            CopyError::Io(error) => match self.warnings.allow(std::time::Instant::now()) {
                Some(suppressed) => tracing::warn!(
                    dir = %self.config.dir.display(),
                    %error,
                    suppressed,
                    "cannot write a passthrough copy: the file is read through FUSE (correct, \
                     slower); check the disk holding the directory, or lower [fuse] \
                     passthrough_max_bytes"
                ),
                None => tracing::debug!(%toc, ino, %error, "cannot write a passthrough copy"),
            },
        }
    }

    /// Whether `key` was opened before; remembers it otherwise.
    fn opened_before(&self, key: Key) -> bool {
        let mut state = self.lock();
        if state.opened_once.remove(&key) {
            return true;
        }
        if state.opened_once.len() >= MAX_OPENED_ONCE {
            state.opened_once.clear();
        }
        state.opened_once.insert(key);
        false
    }

    /// Counts `size` bytes for `key`, deleting the least recently used copies to make room.
    fn reserve(&self, key: Key, size: u64) -> bool {
        let mut state = self.lock();
        let known = state.files.contains(&key) || state.pending.contains(&key);
        if known || size > self.config.capacity_bytes {
            return false;
        }
        while state.used + size > self.config.capacity_bytes {
            let Some((victim, victim_size)) = state.files.pop_lru() else {
                return false;
            };
            state.used -= victim_size;
            // A copy the kernel still reads stays on disk until it is closed.
            let _ = fs::remove_file(self.path(victim));
        }
        state.used += size;
        state.pending.insert(key);
        true
    }

    fn abandon(&self, key: Key, size: u64) {
        let mut state = self.lock();
        if state.pending.remove(&key) {
            state.used -= size;
        }
    }

    /// Writes the file's bytes, read from chunks on the node only, to a temporary file, then
    /// renames it into place read-only.
    async fn write_copy(
        &self,
        key: Key,
        layer: &Arc<Layer>,
        index: &Arc<LayerIndex>,
        size: u64,
    ) -> Result<(), CopyError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let (temp, path) = (self.temp_path(key), self.path(key));
        let create = temp.clone();
        let mut file = blocking(move || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&create)
        })
        .await?;
        let local = LocalOnly(Arc::clone(layer.reader()));
        let mut offset = 0u64;
        while offset < size {
            let data = crate::ops::read(index, &local, layer.options(), key.1, offset, COPY_STEP)
                .await
                .map_err(|errno| CopyError::NotLocal(format!("reading at {offset}: {errno}")))?;
            if data.is_empty() {
                return Err(CopyError::NotLocal(format!("the file ends at {offset}")));
            }
            offset += data.len() as u64;
            file = blocking(move || file.write_all(&data).map(|()| file)).await?;
        }
        if offset != size {
            return Err(CopyError::NotLocal(format!(
                "read {offset} bytes of {size}"
            )));
        }
        blocking(move || {
            fs::set_permissions(&temp, fs::Permissions::from_mode(0o400))?;
            fs::rename(&temp, path)
        })
        .await
    }
}

/// Runs file system work of a copy on tokio's blocking threads, away from the runtime's workers,
/// which also answer the mounts' reads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, CopyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)
        .and_then(|done| done)
        .map_err(CopyError::Io)
}

/// Why a copy was not made.
#[derive(Debug)]
enum CopyError {
    /// A chunk of the file could not be read from the node (not there, or not verified).
    NotLocal(String),
    /// The copy could not be written.
    Io(io::Error),
}

fn annotate(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!(
            "{what} the passthrough directory {}: {error}",
            path.display()
        ),
    )
}

/// A layer's reader that answers only from chunks on the node.
struct LocalOnly(Arc<dyn ChunkReader>);

impl ChunkReader for LocalOnly {
    fn read_chunks(&self, _chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        Box::pin(async { Err(ReadError::new("a copy reads with the chunk table")) })
    }

    fn read_chunks_in<'a>(
        &'a self,
        table: &'a dyn ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, ReadError>> {
        let local = self.0.local_chunks_in(table, chunks);
        Box::pin(async move {
            local
                .await
                .ok_or_else(|| ReadError::new("a chunk of the file is not on the node"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(capacity_bytes: u64) -> (tempfile::TempDir, Arc<PassthroughStore>) {
        let dir = tempfile::tempdir().unwrap();
        let config = PassthroughConfig {
            dir: dir.path().join("pt"),
            capacity_bytes,
            min_file_bytes: 1,
        };
        let store = PassthroughStore::open(config, Arc::default()).unwrap();
        (dir, store)
    }

    #[test]
    fn opening_empties_the_directory_and_makes_it_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("pt");
        fs::create_dir_all(&pt).unwrap();
        fs::write(pt.join("leftover"), b"x").unwrap();
        let config = PassthroughConfig {
            dir: pt.clone(),
            capacity_bytes: 10,
            min_file_bytes: 1,
        };
        let _store = PassthroughStore::open(config, Arc::default()).unwrap();
        assert_eq!(fs::read_dir(&pt).unwrap().count(), 0);
        let mode = fs::metadata(&pt).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn room_is_made_by_deleting_the_least_recently_used_copies() {
        let (_dir, store) = store(100);
        let toc = Digest::sha256(b"toc");
        for ino in 1..=3 {
            assert!(store.reserve((toc, ino), 40) || ino == 3);
        }
        // Two pending copies fill 80 of 100: a third of 40 has no room (pending ones stay).
        assert_eq!(store.used_bytes(), 80);
        for ino in 1..=2 {
            fs::write(store.path((toc, ino)), b"copy").unwrap();
            store.finished((toc, ino), 40);
        }
        // 1 is used again, so 2 is the least recently used.
        assert!(store.file(toc, 1).is_some());
        assert!(store.reserve((toc, 3), 40));
        assert!(store.file(toc, 2).is_none());
        assert!(!store.path((toc, 2)).exists());
        assert!(store.file(toc, 1).is_some());
        assert_eq!(store.used_bytes(), 80);
        // Asked twice: counted once.
        assert!(!store.reserve((toc, 3), 40));
        store.abandon((toc, 3), 40);
        assert_eq!(store.used_bytes(), 40);
        // Larger than the capacity: refused, nothing deleted.
        assert!(!store.reserve((toc, 9), 101));
        assert!(store.file(toc, 1).is_some());
    }

    #[test]
    fn a_file_is_worth_a_copy_from_its_second_open_on() {
        let (_dir, store) = store(100);
        let toc = Digest::sha256(b"toc");
        assert!(!store.opened_before((toc, 1)));
        assert!(!store.opened_before((toc, 2)));
        assert!(store.opened_before((toc, 1)));
        assert!(
            !store.opened_before((toc, 1)),
            "counted again after a copy was asked for"
        );
        let state = store.lock();
        assert_eq!(state.opened_once.len(), 2);
    }

    #[test]
    fn a_copy_whose_file_was_deleted_is_forgotten() {
        let (_dir, store) = store(100);
        let toc = Digest::sha256(b"toc");
        assert!(store.reserve((toc, 5), 10));
        store.finished((toc, 5), 10);
        assert!(store.file(toc, 5).is_none());
        assert_eq!(store.used_bytes(), 0);
    }
}
