//! Reads: exactly the bytes of the clamped range, never more than asked, chunks asked for in
//! ascending order without repeats, EIO when the reader fails or lies; and the read over a file
//! of 1-byte extents of the "Trust on the node" issue as a seed.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{Digest, FORMAT_VERSION, Toc};
use streamsnap_fs::{BoxFuture, ChunkReader, Errno, FsOptions, LayerFs, ROOT_INO, ReadError};

use crate::layer_props::{content, files_layer};
use crate::{config, runtime};

/// File sizes and a chunk size: small chunks (one byte each, the worst case) with small files.
fn layer_shape() -> impl Strategy<Value = (Vec<usize>, u32)> {
    prop_oneof![
        (
            prop::collection::vec(0usize..300, 1..4),
            prop::sample::select(&[1u32, 3][..])
        ),
        (
            prop::collection::vec(0usize..6000, 1..4),
            prop::sample::select(&[64u32, 1000, 4096][..])
        ),
    ]
}

fn range() -> impl Strategy<Value = (u64, u32)> {
    (
        prop_oneof![8 => 0u64..7000, 1 => any::<u64>(), 1 => Just(u64::MAX)],
        prop_oneof![8 => 0u32..9000, 1 => any::<u32>(), 1 => Just(u32::MAX)],
    )
}

fn clamped(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = offset.min(data.len() as u64) as usize;
    let end = offset
        .saturating_add(u64::from(size))
        .min(data.len() as u64) as usize;
    &data[start..end.max(start)]
}

fn file_entry(fs: &LayerFs, index: usize) -> (u64, api::Entry) {
    let name = format!("f{index}");
    let ino = fs.lookup(ROOT_INO, name.as_ref()).unwrap().ino;
    let entry = fs.toc().entries()[index].clone();
    (ino, entry)
}

/// A reader over the layer's chunks that hands back one chunk a byte short or long.
struct Lying {
    chunks: Arc<crate::testutil::MemoryChunks>,
    chunk: u32,
    longer: bool,
}

impl ChunkReader for Lying {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let asked = chunks.to_vec();
        Box::pin(async move {
            let mut got = self.chunks.read_chunks(&asked).await?;
            for (data, index) in got.iter_mut().zip(&asked) {
                if *index == self.chunk {
                    let mut changed = data.to_vec();
                    if self.longer {
                        changed.push(0);
                    } else {
                        changed.pop();
                    }
                    *data = Bytes::from(changed);
                }
            }
            Ok(got)
        })
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn reads_return_exactly_the_clamped_range(
        (lens, max_chunk) in layer_shape(),
        reads in prop::collection::vec((any::<prop::sample::Index>(), range()), 1..12),
    ) {
        let (fs, reader) = files_layer(&lens, max_chunk);
        let rt = runtime();
        for (which, (offset, size)) in reads {
            let index = which.index(lens.len());
            let (ino, _) = file_entry(&fs, index);
            let data = content(index, lens[index]);
            reader.clear_calls();
            let got = rt.block_on(fs.read(ino, offset, size)).unwrap();
            prop_assert!(got.len() as u64 <= u64::from(size));
            prop_assert_eq!(got.as_slice(), clamped(&data, offset, size));
            for call in reader.calls() {
                prop_assert!(!call.is_empty());
                prop_assert!(call.windows(2).all(|w| w[0] < w[1]), "asked {:?}", call);
            }
        }
    }

    #[test]
    fn a_failing_chunk_fails_exactly_the_reads_that_touch_it(
        (lens, max_chunk) in layer_shape(),
        failing in any::<prop::sample::Index>(),
        reads in prop::collection::vec((any::<prop::sample::Index>(), range()), 1..8),
    ) {
        let (fs, reader) = files_layer(&lens, max_chunk);
        let chunk_count = fs.toc().chunks().len();
        prop_assume!(chunk_count > 0);
        let failing = failing.index(chunk_count) as u32;
        reader.fail(failing);
        let rt = runtime();
        for (which, (offset, size)) in reads {
            let index = which.index(lens.len());
            let (ino, entry) = file_entry(&fs, index);
            let touches = fs
                .toc()
                .pieces(&entry, offset, u64::from(size))
                .iter()
                .any(|p| p.chunk == failing && p.len > 0);
            match rt.block_on(fs.read(ino, offset, size)) {
                Ok(got) => {
                    prop_assert!(!touches);
                    let data = content(index, lens[index]);
                    prop_assert_eq!(got.as_slice(), clamped(&data, offset, size));
                }
                Err(errno) => {
                    prop_assert_eq!(errno, Errno::EIO);
                    prop_assert!(touches);
                }
            }
        }
    }

    #[test]
    fn a_chunk_of_the_wrong_size_is_eio(
        (lens, max_chunk) in layer_shape(),
        lying in any::<prop::sample::Index>(),
        longer in any::<bool>(),
        reads in prop::collection::vec((any::<prop::sample::Index>(), range()), 1..8),
    ) {
        let (honest, chunks) = files_layer(&lens, max_chunk);
        let chunk_count = honest.toc().chunks().len();
        prop_assume!(chunk_count > 0);
        let chunk = lying.index(chunk_count) as u32;
        let reader = Arc::new(Lying { chunks, chunk, longer });
        let fs = LayerFs::new(honest.toc().clone(), reader, FsOptions::default()).unwrap();
        let rt = runtime();
        for (which, (offset, size)) in reads {
            let index = which.index(lens.len());
            let (ino, entry) = file_entry(&fs, index);
            let touches = fs
                .toc()
                .pieces(&entry, offset, u64::from(size))
                .iter()
                .any(|p| p.chunk == chunk && p.len > 0);
            match rt.block_on(fs.read(ino, offset, size)) {
                Ok(got) => {
                    prop_assert!(!touches);
                    let data = content(index, lens[index]);
                    prop_assert_eq!(got.as_slice(), clamped(&data, offset, size));
                }
                Err(errno) => {
                    prop_assert_eq!(errno, Errno::EIO);
                    prop_assert!(touches);
                }
            }
        }
    }
}

/// Most chunks the node's chunk cache hands out in one call (its `get` refuses more).
const CACHE_MAX_CHUNKS: usize = 4096;

/// 1-byte chunks in memory, refusing calls for more chunks than the cache would serve, and
/// recording how many each call asked for.
#[derive(Default)]
struct OneByteChunks {
    count: u32,
    calls: Mutex<Vec<usize>>,
}

impl ChunkReader for OneByteChunks {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let asked = chunks.to_vec();
        Box::pin(async move {
            self.calls.lock().unwrap().push(asked.len());
            if asked.len() > CACHE_MAX_CHUNKS {
                return Err(ReadError::new(format!(
                    "{} chunks in one read",
                    asked.len()
                )));
            }
            Ok(asked
                .iter()
                .map(|&c| {
                    assert!(c < self.count);
                    Bytes::from(vec![c as u8])
                })
                .collect())
        })
    }
}

/// The read of the issue: a file of 1-byte extents, each in a chunk of its own, so one read
/// touches as many chunks as it reads bytes (a million for a 1 MiB read). The read answers the
/// right bytes or EIO, and never asks the reader for more than `size` chunks in all.
#[test]
fn seed_read_over_one_byte_extents_is_bounded() {
    const CHUNKS: u32 = 100_000;
    let digest = Digest::sha256(b"one-byte extents").to_string();
    let raw = api::Toc {
        version: FORMAT_VERSION,
        layer_digest: digest.clone(),
        diff_id: digest.clone(),
        data_digest: digest,
        data_size: u64::from(CHUNKS),
        max_chunk_size: 1,
        chunks: (0..CHUNKS)
            .map(|i| api::Chunk {
                offset: u64::from(i),
                compressed_size: 1,
                size: 1,
                sha256: vec![0; 32],
            })
            .collect(),
        entries: vec![api::Entry {
            path: b"f".to_vec(),
            r#type: EntryType::Regular as i32,
            size: u64::from(CHUNKS),
            extents: (0..CHUNKS)
                .map(|chunk| api::Extent {
                    chunk,
                    offset: 0,
                    length: 1,
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let toc = Arc::new(Toc::from_raw(raw).unwrap());
    let reader = Arc::new(OneByteChunks {
        count: CHUNKS,
        ..Default::default()
    });
    let fs = LayerFs::new(toc, reader.clone(), FsOptions::default()).unwrap();
    let ino = fs.lookup(ROOT_INO, "f".as_ref()).unwrap().ino;
    let rt = runtime();
    for (offset, size) in [(0u64, 1u32 << 20), (12_345, 128 << 10), (99_999, 4096)] {
        reader.calls.lock().unwrap().clear();
        match rt.block_on(fs.read(ino, offset, size)) {
            Ok(data) => {
                let expected: Vec<u8> = (offset..u64::from(CHUNKS).min(offset + u64::from(size)))
                    .map(|c| c as u8)
                    .collect();
                assert_eq!(data, expected);
            }
            Err(errno) => assert_eq!(errno, Errno::EIO),
        }
        let asked: usize = reader.calls.lock().unwrap().iter().sum();
        assert!(
            asked as u64 <= u64::from(size),
            "{asked} chunks for {size} bytes"
        );
    }
}
