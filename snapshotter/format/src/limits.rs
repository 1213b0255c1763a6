//! What a TOC blob may cost a reader, checked before the cost is paid.
//!
//! A TOC comes from the registry: whoever can push to a repository chooses its bytes. Protobuf
//! and zstd both amplify: a 1.4 KB blob can decompress to 8 MB of empty `Entry` records that
//! `prost` would turn into 800 MB of structs. So the blob is decoded in steps, each bounded
//! before it allocates (docs/format.md, "Limits"):
//!
//! 1. decompression: at most [`MAX_TOC_DECODED_SIZE`] bytes, and at most
//!    [`MAX_TOC_DECODED_RATIO`] bytes per compressed byte past the first
//!    [`TOC_DECODED_FREE`]; a frame header declaring more is refused before decompressing;
//! 2. a walk over the protobuf wire format (tags and lengths only, no allocation) counts the
//!    entries, chunks, extents and xattrs, and refuses counts over their caps, or a decoded form
//!    that would take more than [`MAX_TOC_MEMORY`] bytes, or more than [`MAX_TOC_MEMORY_RATIO`]
//!    bytes per compressed byte past the first [`TOC_MEMORY_FREE`];
//! 3. only then `prost` decodes, into vectors reserved to the counted sizes.

use std::io::Read;
use std::mem::size_of;

use crate::api;
use crate::error::{Error, Result};

/// Largest decompressed (protobuf) TOC a reader accepts.
pub const MAX_TOC_DECODED_SIZE: usize = 512 << 20;
/// Decompressed bytes any TOC may have, whatever its compressed size.
pub const TOC_DECODED_FREE: usize = 16 << 20;
/// Past [`TOC_DECODED_FREE`], decompressed bytes allowed per compressed byte. Real TOCs
/// compress 2-10x (chunk digests do not compress at all); a million empty files named in
/// sequence, about 70x; zeros, thousands.
pub const MAX_TOC_DECODED_RATIO: usize = 256;
/// Most entries (tar entries) in one TOC: what the converter accepts in one layer.
pub const MAX_TOC_ENTRIES: usize = 4 << 20;
/// Most chunks in one TOC (1 TiB of 64 KiB chunks).
pub const MAX_TOC_CHUNKS: usize = 16 << 20;
/// Most extents, summed over all entries.
pub const MAX_TOC_EXTENTS: usize = 32 << 20;
/// Most xattrs, summed over all entries.
pub const MAX_TOC_XATTRS: usize = 16 << 20;
/// Largest estimated size of a decoded TOC in memory (about 3 million entries of typical size).
pub const MAX_TOC_MEMORY: u64 = 1 << 30;
/// Decoded memory any TOC may take, whatever its compressed size.
pub const TOC_MEMORY_FREE: u64 = 64 << 20;
/// Past [`TOC_MEMORY_FREE`], bytes of decoded memory allowed per compressed byte. Real TOCs
/// take 5-50 bytes of memory per compressed byte, a million empty files named in sequence
/// about 600; an empty entry takes about 270 from 2 bytes of protobuf, which zstd shrinks to
/// nearly nothing (4 million of them: 1.5 million bytes per compressed byte).
pub const MAX_TOC_MEMORY_RATIO: u64 = 4096;

/// Refuses `value` over `limit`, naming which limit.
pub(crate) fn check(what: &'static str, value: u64, limit: u64) -> Result<()> {
    if value > limit {
        return Err(Error::TocLimit { what, value, limit });
    }
    Ok(())
}

/// Decompresses a TOC blob within the decompression limits.
pub(crate) fn decompress(blob: &[u8]) -> Result<Vec<u8>> {
    let limit = MAX_TOC_DECODED_SIZE
        .min(TOC_DECODED_FREE.max(blob.len().saturating_mul(MAX_TOC_DECODED_RATIO)))
        as u64;
    // The frame header may declare the content size: refuse a lie too big before any work,
    // and reserve exactly what a truthful one needs.
    let declared = zstd::zstd_safe::get_frame_content_size(blob).ok().flatten();
    if let Some(declared) = declared {
        check(
            "decompressed size (declared by the zstd frame)",
            declared,
            limit,
        )?;
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(blob).map_err(Error::TocDecompress)?;
    let mut raw = Vec::with_capacity(declared.unwrap_or(0) as usize);
    decoder
        .take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(Error::TocDecompress)?;
    check("decompressed size", raw.len() as u64, limit)?;
    Ok(raw)
}

/// Counts of the repeated messages in an encoded TOC, from its wire format alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Census {
    pub entries: u64,
    pub chunks: u64,
    pub extents: u64,
    pub xattrs: u64,
    /// Gzip spans' checkpoints (one per chunk when valid).
    pub checkpoints: u64,
}

/// Field numbers of `Toc` and `Entry` that hold repeated messages (proto/streamsnap/toc/v1).
const TOC_CHUNKS: u64 = 7;
const TOC_ENTRIES: u64 = 8;
const TOC_CHECKPOINTS: u64 = 12;
const ENTRY_XATTRS: u64 = 12;
const ENTRY_EXTENTS: u64 = 15;
const LEN: u8 = 2;

/// Heap bytes a decoded item takes beyond its protobuf payload (which `memory` counts once):
/// the struct, and allocator overhead for its few small buffers.
const ENTRY_COST: u64 = size_of::<api::Entry>() as u64 + 64;
const CHUNK_COST: u64 = size_of::<api::Chunk>() as u64 + 16;
const CHECKPOINT_COST: u64 = size_of::<api::Checkpoint>() as u64;
/// Nested vectors grow by doubling as `prost` pushes: twice the struct.
const EXTENT_COST: u64 = 2 * size_of::<api::Extent>() as u64;
const XATTR_COST: u64 = 2 * (size_of::<api::Xattr>() as u64 + 16);

impl Census {
    /// Walks an encoded `Toc`: tags and lengths only. Refuses malformed wire data (a decoder
    /// would fail on it anyway) so nothing can hide from the count.
    pub fn of(raw: &[u8]) -> Result<Self> {
        let mut census = Self::default();
        walk(raw, &mut |field, wire, payload| {
            match (field, wire) {
                (TOC_CHUNKS, LEN) => census.chunks += 1,
                (TOC_CHECKPOINTS, LEN) => census.checkpoints += 1,
                (TOC_ENTRIES, LEN) => {
                    census.entries += 1;
                    walk(payload, &mut |field, wire, _| {
                        match (field, wire) {
                            (ENTRY_XATTRS, LEN) => census.xattrs += 1,
                            (ENTRY_EXTENTS, LEN) => census.extents += 1,
                            _ => {}
                        }
                        Ok(())
                    })?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(census)
    }

    /// Estimated bytes the decoded message takes in memory, `raw_len` being its encoded size.
    pub fn memory(&self, raw_len: usize) -> u64 {
        raw_len as u64
            + self.entries * ENTRY_COST
            + self.chunks * CHUNK_COST
            + self.extents * EXTENT_COST
            + self.xattrs * XATTR_COST
            + self.checkpoints * CHECKPOINT_COST
    }

    /// Refuses counts over their caps and a decoded form too large for a blob of
    /// `blob_len` compressed bytes.
    pub fn check(&self, raw_len: usize, blob_len: usize) -> Result<()> {
        check("entry count", self.entries, MAX_TOC_ENTRIES as u64)?;
        check("chunk count", self.chunks, MAX_TOC_CHUNKS as u64)?;
        check("checkpoint count", self.checkpoints, MAX_TOC_CHUNKS as u64)?;
        check("extent count", self.extents, MAX_TOC_EXTENTS as u64)?;
        check("xattr count", self.xattrs, MAX_TOC_XATTRS as u64)?;
        let memory = self.memory(raw_len);
        check("estimated decoded size in memory", memory, MAX_TOC_MEMORY)?;
        let for_blob = TOC_MEMORY_FREE.max((blob_len as u64).saturating_mul(MAX_TOC_MEMORY_RATIO));
        check(
            "estimated decoded size in memory for the blob's compressed size",
            memory,
            for_blob,
        )
    }
}

/// What [`walk`] calls for each field: `(number, wire type, payload)`.
type FieldVisitor<'a> = dyn FnMut(u64, u8, &[u8]) -> Result<()> + 'a;

/// Calls `field(number, wire type, payload)` for each field of an encoded message; `payload`
/// is the content of a length-delimited field, empty for the other wire types.
fn walk(mut buf: &[u8], field: &mut FieldVisitor<'_>) -> Result<()> {
    let malformed = |reason: &str| Error::InvalidToc(format!("malformed protobuf: {reason}"));
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or_else(|| malformed("truncated tag"))?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        let skip = match wire {
            0 => {
                varint(&mut buf).ok_or_else(|| malformed("truncated varint"))?;
                0
            }
            1 => 8,
            LEN => varint(&mut buf).ok_or_else(|| malformed("truncated length"))?,
            5 => 4,
            _ => return Err(malformed(&format!("wire type {wire} in field {number}"))),
        };
        let skip = usize::try_from(skip)
            .ok()
            .filter(|&n| n <= buf.len())
            .ok_or_else(|| malformed(&format!("field {number} runs past the end")))?;
        let (payload, rest) = buf.split_at(skip);
        field(number, wire, if wire == LEN { payload } else { &[] })?;
        buf = rest;
    }
    Ok(())
}

/// A base-128 varint, at most 10 bytes.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn entry(extents: usize, xattrs: usize) -> api::Entry {
        api::Entry {
            path: b"a/b".to_vec(),
            extents: vec![api::Extent::default(); extents],
            xattrs: vec![api::Xattr::default(); xattrs],
            ..Default::default()
        }
    }

    #[test]
    fn the_census_counts_what_prost_would_decode() {
        let toc = api::Toc {
            version: 1,
            layer_digest: "x".into(),
            chunks: vec![api::Chunk::default(); 3],
            entries: vec![entry(2, 1), api::Entry::default(), entry(0, 4)],
            ..Default::default()
        };
        let census = Census::of(&toc.encode_to_vec()).unwrap();
        assert_eq!(
            census,
            Census {
                entries: 3,
                chunks: 3,
                extents: 2,
                xattrs: 5,
                checkpoints: 0
            }
        );
        assert!(census.memory(0) >= 3 * size_of::<api::Entry>() as u64);
    }

    #[test]
    fn malformed_wire_data_is_refused_not_skipped() {
        let raw = api::Toc {
            entries: vec![entry(1, 0)],
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 1..raw.len() {
            assert!(Census::of(&raw[..cut]).is_err(), "cut at {cut}");
        }
        // A group (wire type 3), an overlong varint, field 0.
        for bad in [
            &[0x0b][..],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            &[0x02, 0x00],
        ] {
            assert!(Census::of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_limit_names_itself() {
        let over = Census {
            entries: MAX_TOC_ENTRIES as u64 + 1,
            ..Default::default()
        };
        let e = over.check(0, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("entry count 4194305"), "{e}");
        let many_small = Census {
            entries: 1_000_000,
            ..Default::default()
        };
        let e = many_small.check(2_000_000, 1447).unwrap_err().to_string();
        assert!(e.contains("for the blob's compressed size"), "{e}");
        // The same entries from a blob of realistic size are fine.
        many_small.check(2_000_000, 500_000).unwrap();
    }

    #[test]
    fn decompression_is_bounded_by_the_blob_size() {
        // 32 MiB of zeros compress to about a kilobyte: far over the ratio.
        let zeros = zstd::bulk::compress(&vec![0u8; 32 << 20], 3).unwrap();
        let e = decompress(&zeros).unwrap_err().to_string();
        assert!(e.contains("declared by the zstd frame"), "{e}");
        // Without a declared size (streamed), the decoder stops at the limit.
        let mut streamed = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &vec![0u8; 32 << 20]).unwrap();
        encoder.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        let e = decompress(&streamed).unwrap_err().to_string();
        assert!(e.contains("toc: decompressed size"), "{e}");
        // Under the free allowance, anything goes.
        let small = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        assert_eq!(decompress(&small).unwrap().len(), 1 << 20);
    }
}
