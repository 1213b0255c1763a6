//! Gzip spans of the index kind: a span of a real deflate stream, cut at any block boundary,
//! decodes from its checkpoint to exactly its content, and a damaged span, window or checkpoint
//! is refused or (the digest says so) still gives the same content; arbitrary bytes under any
//! checkpoint never panic and never give more than the table's size. TOCs with checkpoints that
//! break a rule of docs/format.md are refused.

use std::io::Write;

use proptest::prelude::*;
use streamsnap_format::api::{self, Codec, EntryType};
use streamsnap_format::gzip::{
    MAX_WINDOW_FRAME, RawInflate, WINDOW_SIZE, decode_span, decode_window, encode_window,
};
use streamsnap_format::{Digest, FORMAT_VERSION, Toc};

use crate::config;
use crate::toc::DIGEST;

/// Data with long-range repeats (back-references that cross block boundaries) and noise.
fn content() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 1..32),
        prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 1..4000),
    )
        .prop_map(|(words, picks)| {
            let mut out = Vec::new();
            for (pick, noise) in picks {
                let word = pick.get(&words);
                out.extend_from_slice(word);
                if noise {
                    out.push(word.len() as u8 ^ 0x5a);
                }
            }
            out
        })
}

fn deflate(data: &[u8], level: u32) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Every block boundary of a deflate stream: (input offset, bits, prime, output offset).
fn boundaries(compressed: &[u8]) -> Vec<(usize, u32, u32, usize)> {
    let mut inflate = RawInflate::new();
    let (mut read, mut written) = (0, 0);
    let mut buf = vec![0u8; 8192];
    let mut points = vec![(0, 0, 0, 0)];
    loop {
        let step = inflate.step(&compressed[read..], &mut buf, true).unwrap();
        read += step.consumed;
        written += step.produced;
        if step.stream_end || (step.consumed == 0 && step.produced == 0) {
            break;
        }
        if step.block_boundary && !step.last_block && written > points.last().unwrap().3 {
            let bits = u32::from(step.unused_bits);
            let prime = if bits > 0 {
                u32::from(compressed[read - 1]) >> (8 - bits)
            } else {
                0
            };
            points.push((read, bits, prime, written));
        }
    }
    points.push((compressed.len(), 0, 0, written));
    points
}

proptest! {
    #![proptest_config(config(256))]

    /// A span between any two block boundaries decodes from its checkpoint to its content;
    /// damage to the span or its window is refused or harmless.
    #[test]
    fn spans_decode_from_their_checkpoint_or_are_refused(
        data in content(),
        level in 1u32..10,
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        window_edit in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        let compressed = deflate(&data, level);
        let points = boundaries(&compressed);
        let at = pick.index(points.len() - 1);
        let ((start, bits, prime, out_start), (end, _, _, out_end)) = (points[at], points[at + 1]);
        prop_assume!(out_end > out_start);
        let content = &data[out_start..out_end];
        let chunk = api::Chunk {
            offset: start as u64,
            compressed_size: (end - start) as u32,
            size: content.len() as u32,
            sha256: Digest::sha256(content).as_bytes().to_vec(),
        };
        let window = &data[out_start.saturating_sub(WINDOW_SIZE)..out_start];
        let checkpoint = api::Checkpoint { bits, prime, window_offset: 0, window_size: 0 };
        let frame = &compressed[start..end];
        prop_assert_eq!(decode_span(&chunk, &checkpoint, window, frame).unwrap(), content);

        let mut damaged = frame.to_vec();
        for (i, byte) in edits {
            let i = i.index(damaged.len());
            damaged[i] = byte;
        }
        let mut window = window.to_vec();
        if let (Some((i, byte)), false) = (window_edit, window.is_empty()) {
            let i = i.index(window.len());
            window[i] = byte;
        }
        if let Ok(decoded) = decode_span(&chunk, &checkpoint, &window, &damaged) {
            prop_assert_eq!(decoded, content);
        }
    }

    /// Arbitrary bytes under any chunk and checkpoint: refused, or exactly the chunk's content.
    #[test]
    fn arbitrary_spans_never_panic_or_overflow(
        frame in prop::collection::vec(any::<u8>(), 0..2048),
        window in prop::collection::vec(any::<u8>(), 0..(WINDOW_SIZE + 8)),
        size in 1u32..(1 << 20),
        bits in 0u32..10,
        prime in any::<u32>(),
        claimed in prop::option::of(0u32..4096),
    ) {
        let chunk = api::Chunk {
            offset: 0,
            compressed_size: claimed.unwrap_or(frame.len() as u32),
            size,
            sha256: Digest::sha256(b"whatever").as_bytes().to_vec(),
        };
        let checkpoint = api::Checkpoint { bits, prime, window_offset: 0, window_size: 0 };
        if let Ok(data) = decode_span(&chunk, &checkpoint, &window, &frame) {
            prop_assert_eq!(data.len(), size as usize);
            prop_assert_eq!(Digest::sha256(&data), Digest::sha256(b"whatever"));
        }
    }

    /// Window frames: any bytes decode to at most the window size or are refused.
    #[test]
    fn window_frames_stay_within_the_window(
        window in prop::collection::vec(any::<u8>(), 0..(WINDOW_SIZE * 2)),
        garbage in prop::collection::vec(any::<u8>(), 0..(MAX_WINDOW_FRAME as usize + 16)),
    ) {
        let frame = encode_window(&window[..window.len().min(WINDOW_SIZE)]);
        prop_assert_eq!(decode_window(&frame).unwrap(), &window[..window.len().min(WINDOW_SIZE)]);
        let big = zstd::bulk::compress(&window, 1).unwrap();
        match decode_window(&big) {
            Ok(decoded) => prop_assert!(window.len() <= WINDOW_SIZE && decoded == window),
            Err(_) => prop_assert!(window.len() > WINDOW_SIZE || big.len() > MAX_WINDOW_FRAME as usize),
        }
        if let Ok(decoded) = decode_window(&garbage) {
            prop_assert!(decoded.len() <= WINDOW_SIZE);
        }
    }

    /// A TOC of gzip spans validates only with one checkpoint per chunk, windows inside the
    /// checkpoints blob (none for the first span), bits 0..=7 and the layer as data blob.
    #[test]
    fn gzip_tocs_with_broken_checkpoints_are_refused(
        spans in 1usize..6,
        break_it in 0u8..7,
        bits in 0u32..8,
    ) {
        let mut toc = gzip_toc(spans, bits);
        prop_assert!(Toc::from_raw(toc.clone()).is_ok());
        match break_it {
            0 => { toc.checkpoints.pop(); }
            1 => toc.checkpoints[0].bits = 8,
            2 => toc.checkpoints[spans - 1].window_offset = toc.checkpoints_size + 1,
            3 => toc.checkpoints[0].window_size = 10,
            4 => toc.data_digest = Digest::sha256(b"another blob").to_string(),
            5 => toc.checkpoints[spans - 1].prime = 1 << toc.checkpoints[spans - 1].bits,
            _ => toc.codec = 7,
        }
        prop_assert!(Toc::from_raw(toc).is_err(), "case {}", break_it);
    }
}

/// A valid TOC of `spans` gzip spans of 1000 bytes each, over 100-byte compressed ranges.
fn gzip_toc(spans: usize, bits: u32) -> api::Toc {
    let chunks: Vec<api::Chunk> = (0..spans)
        .map(|i| api::Chunk {
            offset: 10 + 100 * i as u64,
            compressed_size: 100,
            size: 1000,
            sha256: Digest::sha256(&[i as u8]).as_bytes().to_vec(),
        })
        .collect();
    let checkpoints: Vec<api::Checkpoint> = (0..spans)
        .map(|i| api::Checkpoint {
            bits: if i == 0 { 0 } else { bits },
            prime: if i == 0 || bits == 0 {
                0
            } else {
                (1 << bits) - 1
            },
            window_offset: 50 * i.saturating_sub(1) as u64,
            window_size: if i == 0 { 0 } else { 50 },
        })
        .collect();
    api::Toc {
        version: FORMAT_VERSION,
        layer_digest: DIGEST.into(),
        diff_id: DIGEST.into(),
        data_digest: DIGEST.into(),
        data_size: 10 + 100 * spans as u64 + 8,
        max_chunk_size: 1000,
        chunks,
        entries: vec![api::Entry {
            path: Vec::new(),
            r#type: EntryType::Directory as i32,
            mode: 0o755,
            ..Default::default()
        }],
        codec: Codec::GzipSpans as i32,
        checkpoints_digest: DIGEST.into(),
        checkpoints_size: 50 * spans.saturating_sub(1) as u64,
        checkpoints,
    }
}
