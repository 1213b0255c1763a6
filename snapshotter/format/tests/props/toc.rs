//! Valid TOCs of every shape (small: a few chunks, a dozen entries), and the invariants every
//! TOC that passes validation must hold.

use proptest::prelude::*;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{
    FORMAT_VERSION, MAX_CHUNK_RATIO, MAX_CHUNK_SIZE, Toc, max_compressed_size, validate_path,
};

pub const DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// A normalized path of up to three components from a small set, so entries collide and nest.
pub fn path() -> impl Strategy<Value = Vec<u8>> {
    let component = prop::sample::select(&["a", "b", "dir", "f.txt", "é", "x y", ".wh.a"][..]);
    prop::collection::vec(component, 0..=3).prop_map(|parts| parts.join("/").into_bytes())
}

/// A chunk table laid out as the converter does (ascending, maybe with gaps), with sizes up to
/// `max_chunk_size` and compressed sizes anywhere a reader accepts.
fn chunks(max_chunk_size: u32) -> impl Strategy<Value = Vec<api::Chunk>> {
    let chunk = (1..=max_chunk_size, any::<u8>(), 0u64..4, any::<[u8; 32]>());
    prop::collection::vec(chunk, 0..6).prop_map(|specs| {
        let mut offset = 0u64;
        specs
            .into_iter()
            .map(|(size, pick, gap, sha256)| {
                let min = u64::from(size).div_ceil(MAX_CHUNK_RATIO).max(1);
                let max = max_compressed_size(size).min(u64::from(u32::MAX));
                let compressed_size = min + u64::from(pick) * (max - min) / 255;
                offset += gap;
                let chunk = api::Chunk {
                    offset,
                    compressed_size: compressed_size as u32,
                    size,
                    sha256: sha256.to_vec(),
                };
                offset += compressed_size;
                chunk
            })
            .collect()
    })
}

/// What an entry is made of before it is fitted to a chunk table.
type EntrySpec = (
    Vec<u8>,
    u8,
    u32,
    (u32, u32, i64, u32),
    Vec<(String, Vec<u8>)>,
    Vec<(prop::sample::Index, u32, u32)>,
    Vec<u8>,
);

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    (
        path(),
        0u8..10,
        0u32..=0o7777,
        (
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            0u32..1_000_000_000,
        ),
        prop::collection::vec(
            ("[a-z.]{1,12}", prop::collection::vec(any::<u8>(), 0..8)),
            0..3,
        ),
        prop::collection::vec(
            (any::<prop::sample::Index>(), any::<u32>(), any::<u32>()),
            0..4,
        ),
        path(),
    )
}

fn entry(spec: EntrySpec, chunks: &[api::Chunk]) -> api::Entry {
    let (path, kind, mode, (uid, gid, mtime, mtime_nanos), xattrs, extents, target) = spec;
    let mut kind = match kind {
        0..=3 => EntryType::Regular,
        4 => EntryType::Directory,
        5 => EntryType::Symlink,
        6 => EntryType::Hardlink,
        7 => EntryType::Whiteout,
        8 => EntryType::Opaque,
        _ => EntryType::CharDevice,
    };
    if path.is_empty() && kind == EntryType::Whiteout {
        kind = EntryType::Directory;
    }
    let mut entry = api::Entry {
        path,
        r#type: kind as i32,
        mode,
        uid: u64::from(uid),
        gid: u64::from(gid),
        mtime,
        mtime_nanos,
        xattrs: xattrs
            .into_iter()
            .map(|(name, value)| api::Xattr { name, value })
            .collect(),
        ..Default::default()
    };
    match kind {
        EntryType::Regular if !chunks.is_empty() => {
            for (chunk, offset, length) in extents {
                let index = chunk.index(chunks.len());
                let size = chunks[index].size;
                let offset = offset % size;
                let length = 1 + length % (size - offset);
                entry.size += u64::from(length);
                entry.extents.push(api::Extent {
                    chunk: index as u32,
                    offset,
                    length,
                });
            }
        }
        EntryType::Symlink => entry.link_target = [b"../".as_slice(), &target].concat(),
        EntryType::Hardlink => {
            entry.link_target = if target.is_empty() {
                b"a".to_vec()
            } else {
                target
            }
        }
        EntryType::CharDevice => (entry.dev_major, entry.dev_minor) = (uid, gid),
        _ => {}
    }
    entry
}

/// A TOC that passes validation.
pub fn valid() -> impl Strategy<Value = api::Toc> {
    prop_oneof![1u32..=64, 1u32..=4096, Just(MAX_CHUNK_SIZE)]
        .prop_flat_map(|max_chunk_size| {
            (
                Just(max_chunk_size),
                chunks(max_chunk_size.min(4096)),
                0u64..16,
            )
        })
        .prop_flat_map(|(max_chunk_size, chunks, slack)| {
            let entries = prop::collection::vec(entry_spec(), 0..12);
            (Just((max_chunk_size, chunks, slack)), entries)
        })
        .prop_map(|((max_chunk_size, chunks, slack), specs)| {
            let entries = specs.into_iter().map(|spec| entry(spec, &chunks)).collect();
            let end = chunks
                .last()
                .map_or(0, |c| c.offset + u64::from(c.compressed_size));
            api::Toc {
                version: FORMAT_VERSION,
                layer_digest: DIGEST.into(),
                diff_id: DIGEST.into(),
                data_digest: DIGEST.into(),
                data_size: end + slack,
                max_chunk_size,
                chunks,
                entries,
                ..Default::default()
            }
        })
}

/// Per byte of a regular file: the chunk and the offset in it that hold it.
pub fn byte_map(entry: &api::Entry) -> Vec<(u32, u32)> {
    entry
        .extents
        .iter()
        .flat_map(|e| (e.offset..e.offset + e.length).map(move |o| (e.chunk, o)))
        .collect()
}

/// What readers rely on in a TOC that passed validation: every index, offset and length in
/// bounds, and no more decoded bytes than the blob can stand for.
pub fn assert_invariants(toc: &Toc) {
    let raw = toc.raw();
    assert_eq!(raw.version, FORMAT_VERSION);
    assert!(raw.max_chunk_size >= 1 && raw.max_chunk_size <= MAX_CHUNK_SIZE);
    let mut previous_end = 0u64;
    let mut decoded = 0u64;
    for chunk in toc.chunks() {
        assert_eq!(chunk.sha256.len(), 32);
        assert!(chunk.size >= 1 && chunk.size <= raw.max_chunk_size);
        assert!(chunk.compressed_size >= 1);
        assert!(u64::from(chunk.size) <= u64::from(chunk.compressed_size) * MAX_CHUNK_RATIO);
        assert!(chunk.offset >= previous_end);
        previous_end = chunk.offset + u64::from(chunk.compressed_size);
        assert!(previous_end <= raw.data_size);
        decoded += u64::from(chunk.size);
    }
    assert!(decoded <= raw.data_size.saturating_mul(MAX_CHUNK_RATIO));
    for (index, _) in toc.chunks().iter().enumerate() {
        toc.chunk_digest(index as u32);
    }
    for entry in toc.entries() {
        validate_path(&entry.path).expect("validated path");
        let kind = EntryType::try_from(entry.r#type).expect("known type");
        assert_ne!(kind, EntryType::Unspecified);
        assert_eq!(entry.mode & !0o7777, 0);
        assert!(entry.mtime_nanos < 1_000_000_000);
        if kind != EntryType::Regular {
            assert!(entry.size == 0 && entry.extents.is_empty());
        }
        let mut total = 0u64;
        for extent in &entry.extents {
            let chunk = &toc.chunks()[extent.chunk as usize];
            assert!(extent.length >= 1);
            assert!(u64::from(extent.offset) + u64::from(extent.length) <= u64::from(chunk.size));
            total += u64::from(extent.length);
        }
        assert_eq!(total, entry.size);
    }
}

/// `Toc::pieces` gives exactly the bytes of the clamped range, each piece inside its chunk, at
/// most one piece per byte asked for.
pub fn assert_pieces(toc: &Toc, entry: &api::Entry, offset: u64, len: u64) {
    let pieces = toc.pieces(entry, offset, len);
    let mut got = Vec::new();
    for piece in &pieces {
        let chunk = &toc.chunks()[piece.chunk as usize];
        assert!(u64::from(piece.offset) + u64::from(piece.len) <= u64::from(chunk.size));
        got.extend((piece.offset..piece.offset + piece.len).map(|o| (piece.chunk, o)));
    }
    assert!(
        pieces.len() as u64 <= len.max(1),
        "{} pieces for {len} bytes",
        pieces.len()
    );
    let map = byte_map(entry);
    let start = offset.min(entry.size) as usize;
    let end = offset.saturating_add(len).min(entry.size) as usize;
    assert_eq!(
        got,
        map[start..end.max(start)],
        "range {offset}+{len} of {}",
        entry.size
    );
}
