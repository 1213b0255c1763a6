//! The table of contents of a streaming layer: decoding with limits, validation, and the mapping
//! from a file byte range to chunk pieces.

use prost::Message;

use crate::api::{self, Codec, EntryType};
use crate::chunk::{MAX_CHUNK_RATIO, MAX_CHUNK_SIZE, max_compressed_size};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::gzip::MAX_WINDOW_FRAME;
use crate::limits::{
    self, Census, MAX_TOC_CHUNKS, MAX_TOC_ENTRIES, MAX_TOC_EXTENTS, MAX_TOC_XATTRS,
};
use crate::path::validate_path;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest xattr value accepted (the Linux limit).
const MAX_XATTR_VALUE: usize = 64 << 10;
const MAX_XATTR_NAME: usize = 255;
/// Longest symlink target accepted.
const MAX_LINK_TARGET: usize = 4096;

/// Encodes a TOC as its blob: protobuf, then one zstd frame.
pub fn encode_toc(toc: &api::Toc) -> Vec<u8> {
    let raw = toc.encode_to_vec();
    zstd::bulk::compress(&raw, 9).expect("zstd compression of an in-memory buffer cannot fail")
}

/// The name the entry had in the original layer tar: whiteouts and opaque markers get their
/// `.wh.` names back. Useful to compare a TOC with its source and for listings.
pub fn tar_name(entry: &api::Entry) -> Vec<u8> {
    let marker = |parent: &[u8], name: &[u8]| {
        let mut out = parent.to_vec();
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(name);
        out
    };
    match EntryType::try_from(entry.r#type) {
        Ok(EntryType::Opaque) => marker(&entry.path, b".wh..wh..opq"),
        Ok(EntryType::Whiteout) => {
            let (parent, name) = match entry.path.iter().rposition(|&b| b == b'/') {
                Some(slash) => (&entry.path[..slash], &entry.path[slash + 1..]),
                None => (&entry.path[..0], &entry.path[..]),
            };
            marker(parent, &[b".wh.".as_slice(), name].concat())
        }
        _ => entry.path.clone(),
    }
}

/// A decoded TOC that passed validation: every index, offset and length in it is in bounds, so
/// readers can use it without further checks.
#[derive(Clone, Debug)]
pub struct Toc {
    raw: api::Toc,
    layer_digest: Digest,
    diff_id: Digest,
    data_digest: Digest,
    /// Gzip spans only: the checkpoints blob.
    checkpoints_digest: Option<Digest>,
}

/// `len` bytes at `offset` of decompressed chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk: u32,
    pub offset: u32,
    pub len: u32,
}

impl Toc {
    /// Decodes and validates a TOC blob. The caller has already checked the blob's digest against
    /// the artifact manifest. Every limit of docs/format.md ("Limits") is checked before the
    /// memory it protects is allocated: the decompressed size against the blob's, then the
    /// counts of entries, chunks, extents and xattrs and the decoded size, from the protobuf
    /// wire format, before anything is decoded.
    pub fn decode(blob: &[u8]) -> Result<Self> {
        let raw = limits::decompress(blob)?;
        let census = Census::of(&raw)?;
        census.check(raw.len(), blob.len())?;
        // Vectors reserved to the counts do not grow (and briefly double) while decoding.
        let mut toc = api::Toc {
            chunks: Vec::with_capacity(census.chunks as usize),
            entries: Vec::with_capacity(census.entries as usize),
            ..Default::default()
        };
        toc.merge(raw.as_slice())?;
        drop(raw);
        Self::from_raw(toc)
    }

    /// Validates a TOC message, the counts of docs/format.md ("Limits") included.
    pub fn from_raw(raw: api::Toc) -> Result<Self> {
        limits::check(
            "entry count",
            raw.entries.len() as u64,
            MAX_TOC_ENTRIES as u64,
        )?;
        limits::check(
            "chunk count",
            raw.chunks.len() as u64,
            MAX_TOC_CHUNKS as u64,
        )?;
        let (extents, xattrs) = raw.entries.iter().fold((0u64, 0u64), |(e, x), entry| {
            (
                e + entry.extents.len() as u64,
                x + entry.xattrs.len() as u64,
            )
        });
        limits::check("extent count", extents, MAX_TOC_EXTENTS as u64)?;
        limits::check("xattr count", xattrs, MAX_TOC_XATTRS as u64)?;
        if raw.version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: raw.version,
                supported: FORMAT_VERSION,
            });
        }
        let layer_digest = raw.layer_digest.parse()?;
        let diff_id = raw.diff_id.parse()?;
        let data_digest = raw.data_digest.parse()?;
        if raw.max_chunk_size == 0 || raw.max_chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::InvalidToc(format!(
                "max_chunk_size {} is outside 1..={MAX_CHUNK_SIZE}",
                raw.max_chunk_size
            )));
        }
        validate_chunks(&raw)?;
        let checkpoints_digest = validate_checkpoints(&raw, layer_digest, data_digest)?;
        for entry in &raw.entries {
            validate_entry(entry, &raw.chunks)?;
        }
        Ok(Self {
            raw,
            layer_digest,
            diff_id,
            data_digest,
            checkpoints_digest,
        })
    }

    pub fn raw(&self) -> &api::Toc {
        &self.raw
    }

    pub fn into_raw(self) -> api::Toc {
        self.raw
    }

    pub fn entries(&self) -> &[api::Entry] {
        &self.raw.entries
    }

    pub fn chunks(&self) -> &[api::Chunk] {
        &self.raw.chunks
    }

    /// Digest of chunk `index`; the index must come from this TOC.
    pub fn chunk_digest(&self, index: u32) -> Digest {
        let chunk = &self.raw.chunks[index as usize];
        Digest::from_slice(&chunk.sha256).expect("validated: chunk digests are 32 bytes")
    }

    pub fn layer_digest(&self) -> Digest {
        self.layer_digest
    }

    pub fn diff_id(&self) -> Digest {
        self.diff_id
    }

    pub fn data_digest(&self) -> Digest {
        self.data_digest
    }

    pub fn data_size(&self) -> u64 {
        self.raw.data_size
    }

    /// How the chunks are stored: zstd frames in a data blob of the artifact (the chunked
    /// kind) or spans of the original gzip layer (the index kind).
    pub fn codec(&self) -> Codec {
        Codec::try_from(self.raw.codec).expect("validated: the codec is known")
    }

    /// Gzip spans: the checkpoints blob (digest, size). `None` for zstd frames.
    pub fn checkpoints_blob(&self) -> Option<(Digest, u64)> {
        self.checkpoints_digest
            .map(|digest| (digest, self.raw.checkpoints_size))
    }

    /// Gzip spans: how to start inflating chunk `index`; `None` for zstd frames or past the end.
    pub fn checkpoint(&self, index: u32) -> Option<&api::Checkpoint> {
        self.raw.checkpoints.get(index as usize)
    }

    /// The chunk pieces that hold `len` bytes at `offset` of regular file `entry`, clamped to the
    /// end of the file. Reading at or past the end gives no pieces.
    pub fn pieces(&self, entry: &api::Entry, offset: u64, len: u64) -> Vec<Piece> {
        self.pieces_iter(entry, offset, len).collect()
    }

    /// [`pieces`](Self::pieces), one at a time: a range over a file of many tiny extents can
    /// have as many pieces as bytes, which a reader may want to handle in bounded groups.
    pub fn pieces_iter<'a>(
        &self,
        entry: &'a api::Entry,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = Piece> + 'a {
        let extents = entry.extents.iter().map(|e| (e.chunk, e.offset, e.length));
        pieces_of_extents(extents, entry.size, offset, len)
    }
}

/// The pieces holding `len` bytes at `offset` of a file of `size` bytes whose content is
/// `extents` in order, each `(chunk, offset in the chunk, length)`; clamped to the end of the
/// file, lazily (the extents after the range are not visited). Shared by the TOC and the node's
/// layer index, which keep extents in different forms.
pub fn pieces_of_extents(
    extents: impl IntoIterator<Item = (u32, u32, u32)>,
    size: u64,
    offset: u64,
    len: u64,
) -> impl Iterator<Item = Piece> {
    let end = offset.saturating_add(len).min(size);
    let mut extent_start = 0u64;
    let mut done = end <= offset;
    extents
        .into_iter()
        .map_while(move |(chunk, chunk_offset, length)| {
            if done {
                return None;
            }
            let extent_end = extent_start + u64::from(length);
            let piece = (extent_end > offset && extent_start < end).then(|| {
                let from = offset.max(extent_start) - extent_start;
                let to = end.min(extent_end) - extent_start;
                Piece {
                    chunk,
                    offset: chunk_offset + from as u32,
                    len: (to - from) as u32,
                }
            });
            done = extent_end >= end;
            extent_start = extent_end;
            Some(piece)
        })
        .flatten()
}

fn validate_chunks(raw: &api::Toc) -> Result<()> {
    let mut previous_end = 0u64;
    for (index, chunk) in raw.chunks.iter().enumerate() {
        let bad = |reason: String| Error::InvalidChunk { index, reason };
        if chunk.sha256.len() != 32 {
            return Err(bad(format!(
                "digest has {} bytes, expected 32",
                chunk.sha256.len()
            )));
        }
        if chunk.size == 0 || chunk.size > raw.max_chunk_size {
            return Err(bad(format!(
                "size {} is outside 1..={} (max_chunk_size)",
                chunk.size, raw.max_chunk_size
            )));
        }
        // A gzip span is deflate: static Huffman codes take up to 9 bits per literal byte.
        let bound = if raw.codec == Codec::GzipSpans as i32 {
            u64::from(chunk.size) + u64::from(chunk.size) / 8 + 1024
        } else {
            max_compressed_size(chunk.size)
        };
        if chunk.compressed_size == 0 || u64::from(chunk.compressed_size) > bound {
            return Err(bad(format!(
                "compressed size {} is impossible for {} bytes",
                chunk.compressed_size, chunk.size
            )));
        }
        if u64::from(chunk.size) > u64::from(chunk.compressed_size) * MAX_CHUNK_RATIO {
            return Err(bad(format!(
                "{} bytes cannot compress to {} (more than {MAX_CHUNK_RATIO} bytes per \
                 compressed byte)",
                chunk.size, chunk.compressed_size
            )));
        }
        let end = chunk.offset.checked_add(u64::from(chunk.compressed_size));
        match end {
            Some(end) if chunk.offset >= previous_end && end <= raw.data_size => previous_end = end,
            _ => {
                return Err(bad(format!(
                    "frame at {}+{} overlaps the previous chunk or ends past the blob ({} bytes)",
                    chunk.offset, chunk.compressed_size, raw.data_size
                )));
            }
        }
    }
    Ok(())
}

/// The checkpoints of gzip spans: one per chunk, each window frame inside the checkpoints blob
/// and at most [`MAX_WINDOW_FRAME`] bytes, none for the first chunk, the data blob
/// being the layer itself. Zstd frames have none. Returns the checkpoints blob's digest.
fn validate_checkpoints(
    raw: &api::Toc,
    layer_digest: Digest,
    data_digest: Digest,
) -> Result<Option<Digest>> {
    let codec = Codec::try_from(raw.codec)
        .map_err(|_| Error::InvalidToc(format!("unknown codec {}", raw.codec)))?;
    if codec == Codec::ZstdFrames {
        if !raw.checkpoints.is_empty()
            || !raw.checkpoints_digest.is_empty()
            || raw.checkpoints_size != 0
        {
            return Err(Error::InvalidToc(
                "zstd frames have no checkpoints".to_owned(),
            ));
        }
        return Ok(None);
    }
    if data_digest != layer_digest {
        return Err(Error::InvalidToc(format!(
            "gzip spans are read from the layer {layer_digest}, not from {data_digest}"
        )));
    }
    if raw.checkpoints.len() != raw.chunks.len() {
        return Err(Error::InvalidToc(format!(
            "{} checkpoints for {} chunks",
            raw.checkpoints.len(),
            raw.chunks.len()
        )));
    }
    let digest: Digest = raw.checkpoints_digest.parse()?;
    for (index, checkpoint) in raw.checkpoints.iter().enumerate() {
        let bad = |reason: String| Error::InvalidChunk { index, reason };
        if checkpoint.bits > 7 || checkpoint.prime >> checkpoint.bits != 0 {
            return Err(bad(format!(
                "checkpoint primes {} bits with {:#x}",
                checkpoint.bits, checkpoint.prime
            )));
        }
        if checkpoint.bits > 0 && raw.chunks[index].offset == 0 {
            return Err(bad("checkpoint bits before the blob's start".to_owned()));
        }
        if (index == 0 && checkpoint.window_size != 0) || checkpoint.window_size > MAX_WINDOW_FRAME
        {
            return Err(bad(format!(
                "window frame of {} bytes (the first span has none, at most {MAX_WINDOW_FRAME})",
                checkpoint.window_size
            )));
        }
        let end = checkpoint
            .window_offset
            .checked_add(u64::from(checkpoint.window_size));
        if end.is_none_or(|end| end > raw.checkpoints_size) {
            return Err(bad(format!(
                "window at {}+{} ends past the checkpoints blob ({} bytes)",
                checkpoint.window_offset, checkpoint.window_size, raw.checkpoints_size
            )));
        }
    }
    Ok(Some(digest))
}

fn validate_entry(entry: &api::Entry, chunks: &[api::Chunk]) -> Result<()> {
    let bad = |reason: String| Error::InvalidEntry {
        path: String::from_utf8_lossy(&entry.path)
            .chars()
            .take(200)
            .collect(),
        reason,
    };
    validate_path(&entry.path)?;
    let kind = EntryType::try_from(entry.r#type)
        .ok()
        .filter(|kind| *kind != EntryType::Unspecified)
        .ok_or_else(|| bad(format!("unknown entry type {}", entry.r#type)))?;
    if entry.mode & !0o7777 != 0 {
        return Err(bad(format!("mode {:o} has bits outside 07777", entry.mode)));
    }
    if entry.mtime_nanos >= 1_000_000_000 {
        return Err(bad("mtime nanoseconds out of range".into()));
    }
    for xattr in &entry.xattrs {
        if xattr.name.is_empty() || xattr.name.len() > MAX_XATTR_NAME {
            return Err(bad(format!("xattr name of {} bytes", xattr.name.len())));
        }
        if xattr.value.len() > MAX_XATTR_VALUE {
            return Err(bad(format!(
                "xattr {} value of {} bytes",
                xattr.name,
                xattr.value.len()
            )));
        }
    }
    if kind != EntryType::Regular && (entry.size != 0 || !entry.extents.is_empty()) {
        return Err(bad("only regular files have content".into()));
    }
    match kind {
        EntryType::Regular => {
            let mut total = 0u64;
            for extent in &entry.extents {
                let chunk = chunks.get(extent.chunk as usize).ok_or_else(|| {
                    bad(format!(
                        "extent names chunk {} of {}",
                        extent.chunk,
                        chunks.len()
                    ))
                })?;
                if extent.length == 0
                    || u64::from(extent.offset) + u64::from(extent.length) > u64::from(chunk.size)
                {
                    return Err(bad(format!(
                        "extent {}+{} is outside chunk {} ({} bytes)",
                        extent.offset, extent.length, extent.chunk, chunk.size
                    )));
                }
                total += u64::from(extent.length);
            }
            if total != entry.size {
                return Err(bad(format!(
                    "extents hold {total} bytes, size is {}",
                    entry.size
                )));
            }
        }
        EntryType::Symlink
            if entry.link_target.is_empty()
                || entry.link_target.len() > MAX_LINK_TARGET
                || entry.link_target.contains(&0) =>
        {
            return Err(bad(
                "symlink target is empty, too long or contains NUL".into()
            ));
        }
        EntryType::Hardlink if entry.link_target.is_empty() => {
            return Err(bad("hardlink without a target".into()));
        }
        EntryType::Hardlink => validate_path(&entry.link_target)?,
        EntryType::Whiteout if entry.path.is_empty() => {
            return Err(bad("whiteout of the layer root".into()));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::compress_chunk;

    const D: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    fn sample() -> api::Toc {
        let a = vec![b'a'; 1000];
        let frame = compress_chunk(&a, 3).unwrap();
        let chunk = |offset| api::Chunk {
            offset,
            compressed_size: frame.len() as u32,
            size: 1000,
            sha256: Digest::sha256(&a).as_bytes().to_vec(),
        };
        let extent = |offset, length| api::Extent {
            chunk: 0,
            offset,
            length,
        };
        api::Toc {
            version: FORMAT_VERSION,
            layer_digest: D.into(),
            diff_id: D.into(),
            data_digest: D.into(),
            data_size: 2 * frame.len() as u64,
            max_chunk_size: 1000,
            chunks: vec![chunk(0), chunk(frame.len() as u64)],
            entries: vec![
                api::Entry {
                    path: b"".to_vec(),
                    r#type: EntryType::Directory as i32,
                    mode: 0o755,
                    ..Default::default()
                },
                api::Entry {
                    path: b"big".to_vec(),
                    r#type: EntryType::Regular as i32,
                    mode: 0o644,
                    size: 2500,
                    extents: vec![
                        extent(0, 1000),
                        api::Extent {
                            chunk: 1,
                            offset: 0,
                            length: 1000,
                        },
                        extent(0, 500),
                    ],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let raw = sample();
        let toc = Toc::decode(&encode_toc(&raw)).unwrap();
        assert_eq!(toc.raw(), &raw);
        assert_eq!(toc.data_digest().to_string(), D);
    }

    #[test]
    fn pieces_map_file_ranges_onto_chunks() {
        let toc = Toc::from_raw(sample()).unwrap();
        let big = &toc.entries()[1];
        assert_eq!(
            toc.pieces(big, 0, 10),
            vec![Piece {
                chunk: 0,
                offset: 0,
                len: 10
            }]
        );
        assert_eq!(
            toc.pieces(big, 990, 1020),
            vec![
                Piece {
                    chunk: 0,
                    offset: 990,
                    len: 10
                },
                Piece {
                    chunk: 1,
                    offset: 0,
                    len: 1000
                },
                Piece {
                    chunk: 0,
                    offset: 0,
                    len: 10
                }
            ]
        );
        assert_eq!(
            toc.pieces(big, 2400, 1000),
            vec![Piece {
                chunk: 0,
                offset: 400,
                len: 100
            }]
        );
        assert!(toc.pieces(big, 2500, 10).is_empty());
        assert!(toc.pieces(big, 10, 0).is_empty());
        assert!(toc.pieces(big, u64::MAX, u64::MAX).is_empty());
    }

    #[test]
    fn validation_refuses_hostile_tocs() {
        type Mutation = Box<dyn Fn(&mut api::Toc)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("future version", Box::new(|t| t.version = 2)),
            (
                "absurd chunk size",
                Box::new(|t| t.max_chunk_size = u32::MAX),
            ),
            ("chunk past blob end", Box::new(|t| t.data_size = 10)),
            (
                "chunk inflating past what zstd can",
                Box::new(|t| {
                    t.max_chunk_size = MAX_CHUNK_SIZE;
                    t.chunks[0].size = MAX_CHUNK_SIZE;
                }),
            ),
            ("overlapping chunks", Box::new(|t| t.chunks[1].offset = 1)),
            (
                "short digest",
                Box::new(|t| t.chunks[0].sha256.pop().map(drop).unwrap_or(())),
            ),
            (
                "extent to missing chunk",
                Box::new(|t| t.entries[1].extents[0].chunk = 7),
            ),
            (
                "extent past chunk",
                Box::new(|t| t.entries[1].extents[0].offset = 999),
            ),
            ("size mismatch", Box::new(|t| t.entries[1].size = 1 << 40)),
            (
                "traversal",
                Box::new(|t| t.entries[1].path = b"../etc/shadow".to_vec()),
            ),
            (
                "absolute",
                Box::new(|t| t.entries[1].path = b"/etc/shadow".to_vec()),
            ),
            ("unknown type", Box::new(|t| t.entries[1].r#type = 99)),
            ("mode bits", Box::new(|t| t.entries[1].mode = 0o170777)),
            ("dir with content", Box::new(|t| t.entries[0].size = 1)),
            (
                "bad digest",
                Box::new(|t| t.data_digest = "sha256:00".into()),
            ),
        ];
        for (name, mutate) in cases {
            let mut raw = sample();
            mutate(&mut raw);
            assert!(Toc::from_raw(raw).is_err(), "{name} must be refused");
        }
    }

    #[test]
    fn tar_name_restores_whiteout_markers() {
        let entry = |path: &[u8], kind: EntryType| api::Entry {
            path: path.to_vec(),
            r#type: kind as i32,
            ..Default::default()
        };
        assert_eq!(
            tar_name(&entry(b"etc/passwd", EntryType::Whiteout)),
            b"etc/.wh.passwd"
        );
        assert_eq!(tar_name(&entry(b"top", EntryType::Whiteout)), b".wh.top");
        assert_eq!(
            tar_name(&entry(b"var/cache", EntryType::Opaque)),
            b"var/cache/.wh..wh..opq"
        );
        assert_eq!(tar_name(&entry(b"", EntryType::Opaque)), b".wh..wh..opq");
        assert_eq!(tar_name(&entry(b"a/b", EntryType::Regular)), b"a/b");
    }

    #[test]
    fn decode_refuses_garbage() {
        assert!(Toc::decode(b"not zstd").is_err());
        let garbage = zstd::bulk::compress(&[0xff; 64], 3).unwrap();
        assert!(Toc::decode(&garbage).is_err());
    }
}
