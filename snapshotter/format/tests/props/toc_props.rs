//! The TOC decoder: round trips, invariants of whatever it accepts, no panic on anything, and
//! the hostile blobs of the "Trust on the node" issue as regression seeds.

use std::mem::size_of_val;

use proptest::prelude::*;
use prost::Message;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{Error, MAX_TOC_MEMORY_RATIO, TOC_MEMORY_FREE, Toc, encode_toc, tar_name};

use crate::config;
use crate::toc::{assert_invariants, assert_pieces, valid};

/// Ways to damage an encoded TOC: change, insert or remove a byte, or cut it short.
fn damage(mut raw: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, op, byte) in edits {
        if raw.is_empty() {
            break;
        }
        let at = at.index(raw.len());
        match op % 4 {
            0 => raw[at] = *byte,
            1 => raw.insert(at, *byte),
            2 => {
                raw.remove(at);
            }
            _ => raw.truncate(at),
        }
    }
    raw
}

/// What a decoded TOC may cost in memory, by the bound of docs/format.md: the structs alone,
/// which is less than the decoder's estimate.
fn assert_memory_bounded(toc: &Toc, blob_len: usize) {
    let structs = size_of_val(toc.entries())
        + size_of_val(toc.chunks())
        + toc
            .entries()
            .iter()
            .map(|e| size_of_val(e.extents.as_slice()))
            .sum::<usize>();
    let bound = TOC_MEMORY_FREE.max(blob_len as u64 * MAX_TOC_MEMORY_RATIO);
    assert!(
        structs as u64 <= bound,
        "{structs} bytes of structs from a {blob_len} byte blob"
    );
}

proptest! {
    #![proptest_config(config(4096))]

    /// Everything the encoder writes decodes to the same message.
    #[test]
    fn valid_tocs_round_trip(raw in valid()) {
        let blob = encode_toc(&raw);
        let toc = Toc::decode(&blob).expect("a valid TOC decodes");
        prop_assert_eq!(toc.raw(), &raw);
        assert_invariants(&toc);
        for entry in toc.entries() {
            // tar_name never panics and keeps the path for everything but the markers
            let name = tar_name(entry);
            if !matches!(EntryType::try_from(entry.r#type), Ok(EntryType::Whiteout | EntryType::Opaque)) {
                prop_assert_eq!(&name, &entry.path);
            }
        }
    }

    /// `pieces` covers exactly the clamped range, whatever the offset and length (overflowing
    /// ones included).
    #[test]
    fn pieces_cover_the_clamped_range(
        raw in valid(),
        which in any::<prop::sample::Index>(),
        ranges in prop::collection::vec((
            prop_oneof![0u64..20_000, any::<u64>(), Just(u64::MAX)],
            prop_oneof![0u64..20_000, any::<u64>(), Just(u64::MAX)],
        ), 1..8),
    ) {
        let toc = Toc::from_raw(raw).expect("valid");
        let files: Vec<&api::Entry> = toc
            .entries()
            .iter()
            .filter(|e| e.r#type == EntryType::Regular as i32)
            .collect();
        if !files.is_empty() {
            let entry = files[which.index(files.len())];
            for (offset, len) in ranges {
                assert_pieces(&toc, entry, offset, len);
                assert_pieces(&toc, entry, offset % (entry.size + 1), len);
            }
        }
    }

    /// A damaged TOC is refused or, if it still decodes, holds every invariant.
    #[test]
    fn damaged_tocs_are_refused_or_valid(
        raw in valid(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..6),
        level in 1i32..4,
    ) {
        let damaged = damage(raw.encode_to_vec(), &edits);
        let blob = zstd::bulk::compress(&damaged, level).unwrap();
        if let Ok(toc) = Toc::decode(&blob) {
            assert_invariants(&toc);
            assert_memory_bounded(&toc, blob.len());
        }
    }

    /// No bytes make the decoder panic, compressed or not.
    #[test]
    fn arbitrary_blobs_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Toc::decode(&bytes);
        let blob = zstd::bulk::compress(&bytes, 1).unwrap();
        if let Ok(toc) = Toc::decode(&blob) {
            assert_invariants(&toc);
        }
    }

    /// Many copies of one record (the shape of the 4-million-entry blob): refused with a limit,
    /// or decoded within the memory bound for the blob's size.
    #[test]
    fn repeated_records_stay_within_the_memory_bound(
        record in prop_oneof![
            Just(vec![0x42, 0x00]),
            Just(vec![0x42, 0x02, 0x10, 0x02]),
            Just(vec![0x3a, 0x00]),
            prop::collection::vec(any::<u8>(), 1..8),
        ],
        count in prop_oneof![1usize..1000, 1000usize..200_000],
        header in prop::bool::ANY,
    ) {
        let mut raw = Vec::new();
        if header {
            let digest = crate::toc::DIGEST.to_owned();
            raw = api::Toc {
                version: 1,
                layer_digest: digest.clone(),
                diff_id: digest.clone(),
                data_digest: digest,
                max_chunk_size: 1,
                ..Default::default()
            }
            .encode_to_vec();
        }
        raw.extend(record.repeat(count));
        let blob = zstd::bulk::compress(&raw, 3).unwrap();
        match Toc::decode(&blob) {
            Ok(toc) => {
                assert_invariants(&toc);
                assert_memory_bounded(&toc, blob.len());
            }
            Err(Error::TocLimit { value, limit, .. }) => prop_assert!(value > limit),
            Err(_) => {}
        }
    }
}

/// The blob of the issue: 4 million empty root entries in 1,447 bytes, which decoded at once
/// took about 800 MB. Refused by a limit before anything is decoded (tests/hostile.rs measures
/// the memory in a process of its own).
#[test]
fn seed_four_million_root_entries_in_a_small_blob() {
    let blob = zstd::bulk::compress(&[0x42u8, 0x00].repeat(4_000_000), 19).unwrap();
    assert!(blob.len() < 2048, "{} bytes", blob.len());
    let error = Toc::decode(&blob).unwrap_err();
    assert!(
        matches!(error, Error::TocLimit { what, .. } if what.contains("estimated decoded size")),
        "{error}"
    );
}
