//! The small in-memory LRU of decoded chunks in front of the disk.

use bytes::Bytes;
use lru::LruCache;
use prometheus::IntGauge;
use streamsnap_format::Digest;

use crate::metrics;

/// Decoded chunks bounded by their total length. Not locked itself: the cache holds it in a
/// `Mutex` for short, I/O-free sections.
#[derive(Debug)]
pub(crate) struct Memory {
    lru: LruCache<Digest, Bytes>,
    capacity: u64,
    bytes: u64,
    /// Kept equal to `bytes`.
    gauge: Option<IntGauge>,
}

impl Memory {
    pub fn new(capacity: u64) -> Self {
        Self {
            lru: LruCache::unbounded(),
            capacity,
            bytes: 0,
            gauge: None,
        }
    }

    /// Publishes the bytes held in `gauge` from now on.
    pub fn observed(mut self, gauge: IntGauge) -> Self {
        metrics::set(&gauge, self.bytes);
        self.gauge = Some(gauge);
        self
    }

    /// The chunk, marked most recently used.
    pub fn get(&mut self, digest: &Digest) -> Option<Bytes> {
        self.lru.get(digest).cloned()
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lru.contains(digest)
    }

    /// Keeps `data`, dropping least recently used chunks to make room. A chunk larger than the
    /// whole capacity is not kept.
    pub fn insert(&mut self, digest: Digest, data: Bytes) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        if let Some(old) = self.lru.pop(&digest) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes + len > self.capacity {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.len() as u64,
                None => break,
            }
        }
        self.bytes += len;
        self.lru.put(digest, data);
        if let Some(gauge) = &self.gauge {
            metrics::set(gauge, self.bytes);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (Digest, Bytes) {
        let data = vec![n; len];
        (Digest::sha256(&data), Bytes::from(data))
    }

    #[test]
    fn stays_under_capacity_dropping_the_least_recently_used() {
        let mut m = Memory::new(100);
        let (a, da) = chunk(1, 40);
        let (b, db) = chunk(2, 40);
        let (c, dc) = chunk(3, 40);
        m.insert(a, da.clone());
        m.insert(b, db);
        assert_eq!(m.get(&a), Some(da)); // a is now more recent than b
        m.insert(c, dc);
        assert_eq!(m.bytes(), 80);
        assert!(m.contains(&a) && m.contains(&c) && !m.contains(&b));

        m.insert(a, chunk(1, 40).1); // reinserting does not double count
        assert_eq!(m.bytes(), 80);
    }

    #[test]
    fn a_chunk_larger_than_the_capacity_is_not_kept_and_zero_disables() {
        let mut m = Memory::new(10);
        let (a, da) = chunk(1, 11);
        m.insert(a, da);
        assert!(!m.contains(&a));
        assert_eq!(m.bytes(), 0);

        let mut off = Memory::new(0);
        let (b, db) = chunk(2, 1);
        off.insert(b, db);
        assert!(!off.contains(&b));
    }
}
