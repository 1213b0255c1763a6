//! The index of chunks on disk: LRU order and byte accounting against the cap.
//!
//! Pure bookkeeping, no I/O: the cache holds it in a `Mutex` for short sections and does file
//! operations outside. To keep the files actually on disk under the cap while those operations
//! run unlocked, the accounting counts three kinds of bytes against the capacity:
//! - `stored`: files in the index;
//! - `reserved`: files being written (reserved before the write, committed after the rename);
//! - `deleting`: files evicted from the index that are not yet unlinked.
//!
//! `stored + reserved + deleting <= capacity` always holds after open, so the files on disk
//! never add up to more than the cap.

use lru::LruCache;
use prometheus::IntGauge;
use streamsnap_format::Digest;

use crate::metrics;

#[derive(Debug)]
pub(crate) struct Index {
    lru: LruCache<Digest, u64>,
    capacity: u64,
    stored: u64,
    reserved: u64,
    deleting: u64,
    /// Gauges kept equal to `stored` and the number of files, updated with them.
    gauges: Option<(IntGauge, IntGauge)>,
}

/// The outcome of [`Index::reserve`]: files to unlink (then report with [`Index::deleted`]),
/// and whether the new chunk may be written.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub granted: bool,
    pub victims: Vec<(Digest, u64)>,
}

impl Index {
    pub fn new(capacity: u64) -> Self {
        Self {
            lru: LruCache::unbounded(),
            capacity,
            stored: 0,
            reserved: 0,
            deleting: 0,
            gauges: None,
        }
    }

    /// Publishes the stored bytes and files in these gauges from now on.
    pub fn observed(mut self, bytes: IntGauge, chunks: IntGauge) -> Self {
        self.gauges = Some((bytes, chunks));
        self.publish();
        self
    }

    fn publish(&self) {
        if let Some((bytes, chunks)) = &self.gauges {
            metrics::set(bytes, self.stored);
            metrics::set(chunks, self.lru.len() as u64);
        }
    }

    /// Adds a file found at open. Call in least to most recently used order.
    pub fn insert_existing(&mut self, digest: Digest, size: u64) {
        if let Some(old) = self.lru.put(digest, size) {
            self.stored -= old;
        }
        self.stored += size;
        self.publish();
    }

    /// Evicts least recently used files until the stored ones fit the capacity (after open with
    /// a smaller cap). The victims count as `deleting` until reported [`Index::deleted`].
    pub fn evict_over_capacity(&mut self) -> Vec<(Digest, u64)> {
        let accounted = self.stored + self.reserved + self.deleting;
        let mut victims = Vec::new();
        let mut freed = 0;
        while accounted - freed > self.capacity {
            let Some(victim) = self.pop_lru() else { break };
            freed += victim.1;
            victims.push(victim);
        }
        victims
    }

    /// Marks the chunk most recently used; whether it is in the index.
    pub fn touch(&mut self, digest: &Digest) -> bool {
        self.lru.promote(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lru.contains(digest)
    }

    /// Reserves room for writing a chunk of `size` bytes. Granted when it fits; otherwise the
    /// least recently used files that make room are taken out of the index and returned as
    /// victims: unlink them, report them with [`Index::deleted`], then reserve again. Refused
    /// without victims if the chunk is already stored, is larger than the capacity, or cannot
    /// fit beside the writes and deletions in progress.
    pub fn reserve(&mut self, digest: &Digest, size: u64) -> Reservation {
        let mut reservation = Reservation {
            granted: false,
            victims: Vec::new(),
        };
        if self.lru.contains(digest) || self.reserved + self.deleting + size > self.capacity {
            return reservation;
        }
        let accounted = self.stored + self.reserved + self.deleting + size;
        if accounted <= self.capacity {
            self.reserved += size;
            reservation.granted = true;
            return reservation;
        }
        let mut freed = 0;
        while accounted - freed > self.capacity {
            let Some(victim) = self.pop_lru() else { break };
            freed += victim.1;
            reservation.victims.push(victim);
        }
        reservation
    }

    /// The reserved chunk is on disk under its name.
    pub fn commit(&mut self, digest: Digest, size: u64) {
        self.reserved -= size;
        if let Some(old) = self.lru.put(digest, size) {
            self.stored -= old;
        }
        self.stored += size;
        self.publish();
    }

    /// The reserved chunk could not be written.
    pub fn cancel(&mut self, size: u64) {
        self.reserved -= size;
    }

    /// Takes a chunk out of the index to delete its file (found corrupt or missing); counted as
    /// `deleting` until [`Index::deleted`].
    pub fn take(&mut self, digest: &Digest) -> Option<u64> {
        let size = self.lru.pop(digest)?;
        self.stored -= size;
        self.deleting += size;
        self.publish();
        Some(size)
    }

    /// Files taken out of the index (victims or [`Index::take`]) are gone from disk.
    pub fn deleted(&mut self, bytes: u64) {
        self.deleting -= bytes;
    }

    pub fn stored_bytes(&self) -> u64 {
        self.stored
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    fn pop_lru(&mut self) -> Option<(Digest, u64)> {
        let (digest, size) = self.lru.pop_lru()?;
        self.stored -= size;
        self.deleting += size;
        self.publish();
        Some((digest, size))
    }

    #[cfg(test)]
    fn accounted(&self) -> u64 {
        self.stored + self.reserved + self.deleting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    #[test]
    fn reserve_evicts_least_recently_used_until_the_chunk_fits() {
        let mut index = Index::new(100);
        for n in 0..4 {
            index.insert_existing(d(n), 25);
        }
        assert!(index.touch(&d(0)));
        let r = index.reserve(&d(9), 30);
        assert!(!r.granted);
        // d(0) was touched, so d(1) and d(2) go first; they count until they are unlinked.
        assert_eq!(r.victims, vec![(d(1), 25), (d(2), 25)]);
        assert_eq!(index.accounted(), 100);
        index.deleted(50);
        assert!(index.reserve(&d(9), 30).granted);
        assert_eq!(index.accounted(), 80);
        index.commit(d(9), 30);
        assert_eq!(index.stored_bytes(), 80);
        assert_eq!(index.len(), 3);
        assert!(index.accounted() <= 100);
    }

    #[test]
    fn concurrent_reservations_and_pending_deletions_count_against_the_cap() {
        let mut index = Index::new(100);
        assert!(index.reserve(&d(1), 60).granted);
        // Another write in flight: only 40 bytes left, nothing to evict.
        assert!(!index.reserve(&d(2), 50).granted);
        assert!(index.reserve(&d(3), 40).granted);
        index.commit(d(1), 60);
        index.cancel(40);
        let r = index.reserve(&d(4), 90);
        assert_eq!(r.victims, vec![(d(1), 60)]);
        // d(1) not yet unlinked: another writer cannot use its bytes.
        assert_eq!(
            index.reserve(&d(5), 50),
            Reservation {
                granted: false,
                victims: vec![]
            }
        );
        index.deleted(60);
        assert!(index.reserve(&d(4), 90).granted);
        assert!(index.accounted() <= 100);
    }

    #[test]
    fn refuses_oversized_and_already_stored_chunks() {
        let mut index = Index::new(100);
        index.insert_existing(d(1), 10);
        assert!(!index.reserve(&d(2), 101).granted);
        assert!(!index.reserve(&d(1), 10).granted);
        assert_eq!(
            index.stored_bytes(),
            10,
            "a refused reservation evicts nothing"
        );
    }

    #[test]
    fn shrunk_capacity_and_take() {
        let mut index = Index::new(50);
        for n in 0..4 {
            index.insert_existing(d(n), 20);
        }
        let victims = index.evict_over_capacity();
        assert_eq!(victims, vec![(d(0), 20), (d(1), 20)]);
        index.deleted(40);
        assert_eq!(index.take(&d(3)), Some(20));
        assert_eq!(index.take(&d(3)), None);
        index.deleted(20);
        assert_eq!(index.stored_bytes(), 20);
        assert!(index.contains(&d(2)) && !index.contains(&d(3)));
    }
}
