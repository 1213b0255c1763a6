//! Chunk frames: a frame decodes to exactly its chunk table entry or is refused, never to more
//! than the table's size; and the frame bomb of the "Trust on the node" issue as a seed.

use std::sync::OnceLock;

use proptest::prelude::*;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{
    Digest, Error, FORMAT_VERSION, MAX_CHUNK_RATIO, MAX_CHUNK_SIZE, Toc, compress_chunk,
    decode_chunk,
};

use crate::config;
use crate::toc::DIGEST;

fn table_entry(data: &[u8], frame: &[u8]) -> api::Chunk {
    api::Chunk {
        offset: 0,
        compressed_size: frame.len() as u32,
        size: data.len() as u32,
        sha256: Digest::sha256(data).as_bytes().to_vec(),
    }
}

/// Content that compresses anywhere from not at all to very well.
fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..4096),
        (any::<u8>(), 1usize..200_000).prop_map(|(byte, len)| vec![byte; len]),
        (prop::collection::vec(any::<u8>(), 1..16), 1usize..4096)
            .prop_map(|(unit, n)| unit.repeat(n)),
    ]
}

proptest! {
    #![proptest_config(config(4096))]

    /// A real frame decodes to its content; a damaged one is refused or (the digest says so)
    /// still decodes to the same content.
    #[test]
    fn frames_decode_to_their_content_or_are_refused(
        data in content(),
        level in 1i32..6,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let frame = compress_chunk(&data, level).unwrap();
        let chunk = table_entry(&data, &frame);
        prop_assert_eq!(decode_chunk(&chunk, &frame).unwrap(), data.clone());
        let mut damaged = frame.clone();
        for (at, byte) in edits {
            let at = at.index(damaged.len());
            damaged[at] = byte;
        }
        if let Ok(decoded) = decode_chunk(&chunk, &damaged) {
            prop_assert_eq!(decoded, data);
        }
    }

    /// Arbitrary frame bytes under any chunk table entry: refused, or exactly `size` bytes of
    /// the right digest. Never a panic, never more than the table says.
    #[test]
    fn arbitrary_frames_never_decode_to_more_than_the_table_says(
        frame in prop::collection::vec(any::<u8>(), 0..512),
        size in prop_oneof![0u32..4096, Just(MAX_CHUNK_SIZE), any::<u32>()],
        compressed_size in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        sha256 in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        // Sizes a validated TOC cannot hold are refused by it; keep the decode bounded here.
        let size = size.min(MAX_CHUNK_SIZE);
        let chunk = api::Chunk {
            offset: 0,
            compressed_size: compressed_size.unwrap_or(frame.len() as u32),
            size,
            sha256,
        };
        if let Ok(data) = decode_chunk(&chunk, &frame) {
            prop_assert_eq!(data.len(), size as usize);
            prop_assert_eq!(Digest::sha256(&data).as_bytes().to_vec(), chunk.sha256);
        }
    }

    /// A frame whose header declares another size than the table is refused before anything
    /// is decompressed.
    #[test]
    fn a_frame_declaring_another_size_is_refused(data in content(), claimed in 1u32..=MAX_CHUNK_SIZE) {
        let frame = compress_chunk(&data, 1).unwrap();
        let mut chunk = table_entry(&data, &frame);
        prop_assume!(claimed != chunk.size);
        chunk.size = claimed;
        let refused = matches!(
            decode_chunk(&chunk, &frame),
            Err(Error::ChunkFrameSize { declared, expected, .. })
                if declared == data.len() as u64 && expected == claimed
        );
        prop_assert!(refused);
    }
}

/// One 16 MiB frame of a repeated byte at zstd's best: a few hundred bytes.
fn bomb_frame() -> &'static (Vec<u8>, Vec<u8>) {
    static FRAME: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FRAME.get_or_init(|| {
        let data = vec![7u8; MAX_CHUNK_SIZE as usize];
        let frame = compress_chunk(&data, 19).unwrap();
        (data, frame)
    })
}

/// The data blob of the issue: 48 frames of 16 MiB each in about 25 KB. The TOC holds them
/// only within zstd's own ratio, so the decoded bytes a TOC can ask for stay proportional to
/// the bytes of its blob; a frame that inflates past its table entry is refused before it is
/// decompressed (the cache bounds how many a read decodes at once: its tests/hostile.rs).
#[test]
fn seed_frame_bomb_is_bounded_by_the_chunk_ratio() {
    let (data, frame) = bomb_frame();
    assert!(frame.len() < 1024, "{} bytes", frame.len());
    let chunks: Vec<api::Chunk> = (0..48u64)
        .map(|i| api::Chunk {
            offset: i * frame.len() as u64,
            ..table_entry(data, frame)
        })
        .collect();
    let data_size = 48 * frame.len() as u64;
    let toc = |chunks: Vec<api::Chunk>| api::Toc {
        version: FORMAT_VERSION,
        layer_digest: DIGEST.into(),
        diff_id: DIGEST.into(),
        data_digest: DIGEST.into(),
        data_size,
        max_chunk_size: MAX_CHUNK_SIZE,
        entries: vec![api::Entry {
            r#type: EntryType::Directory as i32,
            ..Default::default()
        }],
        chunks,
        ..Default::default()
    };
    let accepted = Toc::from_raw(toc(chunks.clone())).expect("real frames are within the ratio");
    let decoded: u64 = accepted.chunks().iter().map(|c| u64::from(c.size)).sum();
    assert!(decoded <= data_size * MAX_CHUNK_RATIO);

    // The same blob claiming more per frame than zstd can reach is refused.
    let mut inflated = chunks.clone();
    inflated[0].compressed_size = (MAX_CHUNK_SIZE as u64 / MAX_CHUNK_RATIO) as u32 - 1;
    let error = Toc::from_raw(toc(inflated)).unwrap_err();
    assert!(error.to_string().contains("cannot compress"), "{error}");

    // A table entry smaller than what the frame declares: refused, nothing decompressed.
    let mut small = chunks[0].clone();
    small.size = 4096;
    assert!(matches!(
        decode_chunk(&small, frame),
        Err(Error::ChunkFrameSize { .. })
    ));
    // The truthful entry decodes to exactly its 16 MiB.
    assert_eq!(decode_chunk(&chunks[0], frame).unwrap().len(), data.len());
}
