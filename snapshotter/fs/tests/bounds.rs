//! A read over a file of tiny extents holds a bounded amount of decoded chunk data, however many
//! chunks the range touches and however large they are: the TOC of a hostile layer can give
//! every byte of a file its own 16 MiB chunk. The reader here decodes afresh on every call (as
//! the chunk cache does on a miss) and counts the decoded bytes alive at any time.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{Digest, FORMAT_VERSION, Toc};
use streamsnap_fs::{FsOptions, LayerFs};

use common::{BoxFuture, ChunkReader, Mounted, ReadError, fuse_available, runtime};

const CHUNKS: u32 = 48;
const CHUNK_SIZE: u32 = 16 << 20;
/// Extents of the "many" file: a million bytes, each from another chunk than the last.
const MANY: u32 = 1_000_000;

/// The byte at `offset` of chunk `chunk`.
fn byte(chunk: u32, offset: u32) -> u8 {
    (chunk as u8).wrapping_mul(37) ^ (offset as u8).wrapping_mul(11) ^ (offset >> 8) as u8
}

/// Where byte `i` of the "many" file is: a chunk that changes with every byte.
fn many_extent(i: u32) -> (u32, u32) {
    (i % CHUNKS, i.wrapping_mul(2_654_435_761) % CHUNK_SIZE)
}

/// A layer of 48 chunks of 16 MiB with two files: `spread`, 48 bytes from 48 chunks, and
/// `many`, a million bytes cycling over them. The chunk table is what a TOC claims (frames of
/// 1 KiB); nothing here reads the data blob.
fn hostile_toc() -> Arc<Toc> {
    let chunks = (0..CHUNKS)
        .map(|c| api::Chunk {
            offset: u64::from(c) * 1024,
            compressed_size: 1024,
            size: CHUNK_SIZE,
            sha256: Digest::sha256(&c.to_le_bytes()).as_bytes().to_vec(),
        })
        .collect();
    let file = |path: &str, extents: Vec<api::Extent>| api::Entry {
        path: path.as_bytes().to_vec(),
        r#type: EntryType::Regular as i32,
        mode: 0o644,
        size: extents.len() as u64,
        extents,
        ..Default::default()
    };
    let extent = |(chunk, offset)| api::Extent {
        chunk,
        offset,
        length: 1,
    };
    let digest = Digest::sha256(b"hostile").to_string();
    let raw = api::Toc {
        version: FORMAT_VERSION,
        layer_digest: digest.clone(),
        diff_id: digest.clone(),
        data_digest: digest,
        data_size: u64::from(CHUNKS) * 1024,
        max_chunk_size: CHUNK_SIZE,
        chunks,
        entries: vec![
            api::Entry {
                r#type: EntryType::Directory as i32,
                mode: 0o755,
                ..Default::default()
            },
            file(
                "spread",
                (0..CHUNKS).map(|c| extent((c, c * 1000))).collect(),
            ),
            file("many", (0..MANY).map(|i| extent(many_extent(i))).collect()),
        ],
        ..Default::default()
    };
    Arc::new(Toc::from_raw(raw).unwrap())
}

/// Decodes every chunk it is asked for into a fresh buffer, and tracks the decoded bytes alive.
#[derive(Debug, Default)]
struct Decoding {
    live: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    calls: Mutex<Vec<usize>>,
}

/// A decoded chunk; its bytes count as alive until the last `Bytes` of it is dropped.
struct Counted {
    data: Vec<u8>,
    live: Arc<AtomicU64>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.data.len() as u64, Ordering::SeqCst);
    }
}

impl ChunkReader for Decoding {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        self.calls.lock().unwrap().push(chunks.len());
        let decoded = chunks
            .iter()
            .map(|&c| {
                let data: Vec<u8> = (0..CHUNK_SIZE).map(|o| byte(c, o)).collect();
                let now =
                    self.live.fetch_add(data.len() as u64, Ordering::SeqCst) + data.len() as u64;
                self.peak.fetch_max(now, Ordering::SeqCst);
                Bytes::from_owner(Counted {
                    data,
                    live: self.live.clone(),
                })
            })
            .collect();
        Box::pin(async move { Ok(decoded) })
    }
}

fn lookup(fs: &LayerFs, name: &str) -> u64 {
    fs.lookup(streamsnap_fs::ROOT_INO, std::ffi::OsStr::new(name))
        .unwrap()
        .ino
}

#[test]
fn a_read_of_bytes_from_48_chunks_holds_one_chunk_at_a_time() {
    let reader = Arc::new(Decoding::default());
    let fs = LayerFs::new(hostile_toc(), reader.clone(), FsOptions::default()).unwrap();
    let spread = lookup(&fs, "spread");
    let got = runtime().block_on(fs.read(spread, 0, 4096)).unwrap();
    let want: Vec<u8> = (0..CHUNKS).map(|c| byte(c, c * 1000)).collect();
    assert_eq!(got, want);
    assert_eq!(reader.peak.load(Ordering::SeqCst), u64::from(CHUNK_SIZE));
    assert_eq!(reader.live.load(Ordering::SeqCst), 0);
    assert_eq!(*reader.calls.lock().unwrap(), vec![1; CHUNKS as usize]);
}

#[test]
fn a_read_over_a_million_tiny_extents_asks_for_each_chunk_once_per_window() {
    let reader = Arc::new(Decoding::default());
    let options = FsOptions {
        read_group_bytes: 2 * u64::from(CHUNK_SIZE),
        ..FsOptions::default()
    };
    let fs = LayerFs::new(hostile_toc(), reader.clone(), options).unwrap();
    let many = lookup(&fs, "many");
    let got = runtime().block_on(fs.read(many, 0, MANY)).unwrap();
    assert_eq!(got.len(), MANY as usize);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| { b == byte(many_extent(i as u32).0, many_extent(i as u32).1) })
    );
    assert_eq!(
        reader.peak.load(Ordering::SeqCst),
        2 * u64::from(CHUNK_SIZE)
    );
    // 64 Ki pieces at a time: 16 windows, each asking for the 48 chunks two at a time.
    let calls = reader.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|&n| n <= 2), "{calls:?}");
    assert_eq!(calls.iter().sum::<usize>(), 16 * CHUNKS as usize);
}

#[test]
fn fuse_reads_of_hostile_files_hold_a_bounded_number_of_chunks() {
    if !fuse_available() {
        return;
    }
    let runtime = runtime();
    let reader = Arc::new(Decoding::default());
    let mounted = Mounted::new(hostile_toc(), reader.clone(), runtime.handle().clone());
    let spread = std::fs::read(mounted.join("spread")).unwrap();
    assert_eq!(
        spread,
        (0..CHUNKS).map(|c| byte(c, c * 1000)).collect::<Vec<_>>()
    );
    assert_eq!(reader.peak.load(Ordering::SeqCst), u64::from(CHUNK_SIZE));
    // Read by the kernel in requests of up to 1 MiB, some of them at once (readahead).
    let file = std::fs::File::open(mounted.join("many")).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let mut at = 0u64;
    while at < u64::from(MANY) {
        let n = file.read_at(&mut buf, at).unwrap();
        assert!(n > 0);
        for (i, &b) in buf[..n].iter().enumerate() {
            let (chunk, offset) = many_extent(at as u32 + i as u32);
            assert_eq!(b, byte(chunk, offset), "byte {}", at + i as u64);
        }
        at += n as u64;
    }
    let calls = reader.calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|&n| n == 1),
        "one 16 MiB chunk per ask: {calls:?}"
    );
    // Each request holds one chunk; the kernel may have a few requests in flight at once.
    let peak = reader.peak.load(Ordering::SeqCst);
    eprintln!("peak decoded bytes alive through FUSE: {} MiB", peak >> 20);
    assert!(peak <= 4 * u64::from(CHUNK_SIZE), "{} MiB", peak >> 20);
}
