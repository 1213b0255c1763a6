//! Chunk files on disk. Blocking functions: callers run them in `spawn_blocking` (or at open).
//!
//! Layout: `<dir>/<first 2 hex>/<64 hex>` holds the uncompressed content of the chunk whose
//! sha256 is that hex; `<dir>/tmp` holds files being written. A file is written under a temporary
//! name then renamed into place, so a chunk path never shows a partial file. Contents are not
//! trusted anyway: every load re-hashes the file.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use streamsnap_format::Digest;

use crate::error::{Error, Result};
use crate::index::Index;
use crate::metrics::Metrics;

const TMP: &str = "tmp";

/// Writers give up storing a chunk after this many rounds of evicting without getting room
/// (other writers keep taking it); the chunk is still served.
const RESERVE_ROUNDS: usize = 4;

#[derive(Debug)]
pub(crate) struct Layout {
    root: PathBuf,
    tmp: PathBuf,
}

/// A chunk file found at open.
#[derive(Debug)]
pub(crate) struct Found {
    pub digest: Digest,
    pub size: u64,
    pub used: SystemTime,
}

/// What loading a chunk file gave.
#[derive(Debug)]
pub(crate) enum Load {
    /// Content that hashes to the digest.
    Verified(Vec<u8>),
    /// No such file (deleted since it was indexed).
    Missing,
    /// The file does not hold the chunk: delete it.
    Corrupt(Digest),
    /// The file could not be read.
    Failed(io::Error),
    /// The file has another size than the ref asked with: the ref or the file is wrong. Kept
    /// (a wrong ref must not cost a good file); the caller fetches instead.
    OtherSize,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            tmp: root.join(TMP),
        }
    }

    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Creates the directories, empties `tmp/`, deletes non-chunk files in the shard
    /// directories and lists the chunk files, least recently used first. Reads no contents.
    pub fn open(&self) -> Result<Vec<Found>> {
        fs::create_dir_all(&self.tmp)
            .map_err(|e| Error::io(&self.tmp, "cannot create it (check the configured dir)", e))?;
        for entry in read_dir(&self.tmp)? {
            remove_entry(&entry);
        }
        let mut found = Vec::new();
        for entry in read_dir(&self.root)? {
            let name = entry.file_name();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match name.to_str() {
                Some(shard) if is_dir && is_shard(shard) => {
                    self.scan_shard(&entry.path(), shard, &mut found)?;
                }
                Some(TMP) => {}
                _ => {
                    tracing::debug!(path = %entry.path().display(), "ignoring unknown entry in the cache directory")
                }
            }
        }
        found.sort_by(|a, b| a.used.cmp(&b.used).then(a.digest.cmp(&b.digest)));
        Ok(found)
    }

    fn scan_shard(&self, dir: &Path, shard: &str, found: &mut Vec<Found>) -> Result<()> {
        for entry in read_dir(dir)? {
            let digest = entry
                .file_name()
                .to_str()
                .filter(|name| name.starts_with(shard))
                .and_then(|name| format!("sha256:{name}").parse::<Digest>().ok());
            let meta = entry
                .file_type()
                .ok()
                .filter(|t| t.is_file())
                .and_then(|_| entry.metadata().ok());
            match (digest, meta) {
                (Some(digest), Some(meta)) if meta.len() > 0 => {
                    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    let accessed = meta.accessed().unwrap_or(modified);
                    found.push(Found {
                        digest,
                        size: meta.len(),
                        used: modified.max(accessed),
                    });
                }
                _ => {
                    tracing::debug!(path = %entry.path().display(), "deleting a file that is not a chunk");
                    remove_entry(&entry);
                }
            }
        }
        Ok(())
    }

    /// Reads and verifies a chunk file of `size` bytes, and marks it used (its mtime orders the
    /// LRU at the next open). Reads at most one byte more than `size`, whatever the file holds.
    /// The open fd keeps the content readable even if the file is evicted meanwhile.
    pub fn load(&self, digest: &Digest, size: u32) -> Load {
        let mut file = match fs::File::open(self.chunk_path(digest)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Load::Missing,
            Err(e) => return Load::Failed(e),
        };
        let mut data = Vec::with_capacity(size as usize + 1);
        if let Err(e) = (&mut file).take(u64::from(size) + 1).read_to_end(&mut data) {
            return Load::Failed(e);
        }
        if data.len() > size as usize {
            return Load::OtherSize;
        }
        let actual = Digest::sha256(&data);
        if actual != *digest {
            return Load::Corrupt(actual);
        }
        if data.len() != size as usize {
            return Load::OtherSize;
        }
        // Best effort: only the LRU order after a restart depends on it.
        let _ = file.set_modified(SystemTime::now());
        Load::Verified(data)
    }

    /// Unlinks a chunk file; a file already gone is fine.
    pub fn remove(&self, digest: &Digest) {
        let path = self.chunk_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a cache file")
            }
        }
    }

    /// Writes a chunk into place through a temporary file and a rename.
    fn write(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        let path = self.chunk_path(digest);
        if let Some(shard) = path.parent() {
            fs::create_dir_all(shard)?;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp)?;
        tmp.write_all(data)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Stores a verified chunk under the cap: evicts least recently used files first (unlinking
    /// them before writing), writes, then indexes it. A chunk that does not fit (larger than the
    /// cap, or no room while other writes hold it) is not stored. Returns whether it was.
    pub fn store(
        &self,
        index: &Mutex<Index>,
        metrics: &Metrics,
        digest: &Digest,
        data: &[u8],
    ) -> bool {
        let size = data.len() as u64;
        for _ in 0..RESERVE_ROUNDS {
            let reservation = lock(index).reserve(digest, size);
            if !reservation.victims.is_empty() {
                let bytes: u64 = reservation.victims.iter().map(|(_, size)| size).sum();
                for (victim, _) in &reservation.victims {
                    self.remove(victim);
                }
                lock(index).deleted(bytes);
                metrics.evictions.inc_by(reservation.victims.len() as u64);
                metrics.evicted_bytes.inc_by(bytes);
            }
            if !reservation.granted {
                if reservation.victims.is_empty() {
                    break;
                }
                continue;
            }
            return match self.write(digest, data) {
                Ok(()) => {
                    lock(index).commit(*digest, size);
                    true
                }
                Err(e) => {
                    lock(index).cancel(size);
                    metrics.store_failures.inc();
                    tracing::debug!(%digest, error = %e, "cannot write a chunk to the cache directory");
                    false
                }
            };
        }
        tracing::trace!(%digest, size, "chunk not stored: no room in the cache");
        false
    }
}

/// Locks a mutex of the cache. Sections under these locks do no I/O and cannot leave the data
/// half-updated, so a poisoned lock (a panic elsewhere) is still consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_shard(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    fs::read_dir(dir)
        .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
        .map_err(|e| Error::io(dir, "cannot list it", e))
}

fn remove_entry(entry: &fs::DirEntry) {
    let path = entry.path();
    let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete a leftover in the cache directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_keeps_chunks_in_use_order_and_deletes_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.open().unwrap();
        let old = b"old chunk".as_slice();
        let new = b"new chunk".as_slice();
        layout.write(&Digest::sha256(old), old).unwrap();
        layout.write(&Digest::sha256(new), new).unwrap();
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        let f = fs::File::options()
            .write(true)
            .open(layout.chunk_path(&Digest::sha256(old)))
            .unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(past).set_modified(past))
            .unwrap();

        fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        fs::create_dir(dir.path().join("tmp/subdir")).unwrap();
        let shard = layout
            .chunk_path(&Digest::sha256(new))
            .parent()
            .unwrap()
            .to_path_buf();
        fs::write(shard.join("not-a-digest"), b"x").unwrap();
        let other_shard = dir
            .path()
            .join(if shard.ends_with("00") { "01" } else { "00" });
        fs::create_dir_all(&other_shard).unwrap();
        // A digest name in the wrong shard, and an uppercase one: not chunks of this layout.
        let misplaced = other_shard.join(Digest::sha256(new).hex());
        fs::write(&misplaced, new).unwrap();
        let upper = shard.join(Digest::sha256(new).hex().to_uppercase());
        fs::write(&upper, new).unwrap();
        fs::write(dir.path().join("README"), b"kept").unwrap();

        let found = layout.open().unwrap();
        let digests: Vec<_> = found.iter().map(|f| f.digest).collect();
        assert_eq!(digests, vec![Digest::sha256(old), Digest::sha256(new)]);
        assert_eq!(found[0].size, old.len() as u64);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(!shard.join("not-a-digest").exists());
        assert!(!misplaced.exists() && !upper.exists());
        assert!(dir.path().join("README").exists());
    }

    #[test]
    fn load_verifies_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.open().unwrap();
        let data = b"chunk".as_slice();
        let digest = Digest::sha256(data);
        assert!(matches!(layout.load(&digest, 5), Load::Missing));
        layout.write(&digest, data).unwrap();
        assert!(matches!(layout.load(&digest, 5), Load::Verified(d) if d == data));
        assert!(matches!(layout.load(&digest, 4), Load::OtherSize));
        assert!(matches!(layout.load(&digest, 6), Load::OtherSize));
        fs::write(layout.chunk_path(&digest), b"chunK").unwrap();
        assert!(matches!(layout.load(&digest, 5), Load::Corrupt(_)));
        // A file grown huge is not read past the size asked for.
        fs::write(layout.chunk_path(&digest), vec![0u8; 1 << 20]).unwrap();
        assert!(matches!(layout.load(&digest, 5), Load::OtherSize));
        layout.remove(&digest);
        layout.remove(&digest);
        assert!(matches!(layout.load(&digest, 5), Load::Missing));
    }
}
