//! The layer index: a layer's metadata in one flat buffer, the form the filesystem serves from.
//!
//! Built once from the TOC and the inode table ([`LayerIndex::build`]), saved next to the TOC
//! under the daemon's root, and read back whole when a layer is used again
//! ([`LayerIndex::from_bytes`]): no decoding, no per-entry allocation. Every record is
//! fixed-width little-endian, so an operation reads its answer straight out of the buffer:
//!
//! | section | record | bytes |
//! | --- | --- | --- |
//! | header | magic, version, digests, counts, statfs | [`HEADER_LEN`] |
//! | nodes | one per inode, `ino - 1` is its index: kind, flags, permission bits, nlink, uid, gid, mtime, and per kind a directory's parent and children, a file's size and extents, a symlink's target, a device's number | [`NODE_LEN`] |
//! | children | every directory's entries, one run per directory sorted by name: inode, name | [`CHILD_LEN`] |
//! | extents | regular files' pieces in file order: chunk, offset, length | [`EXTENT_LEN`] |
//! | chunks | the TOC's chunk table: frame offset and length, size, sha256 | [`CHUNK_LEN`] |
//! | xattrs | presented xattrs by inode, in tar order: inode, name, value | [`XATTR_LEN`] |
//! | strings | names (each distinct name once), symlink targets, xattr names and values | |
//!
//! The header carries the sha256 of everything after it and of the TOC it was built from:
//! [`from_bytes`](LayerIndex::from_bytes) refuses an index that does not match either, or
//! whose records point outside their sections, so the accessors below index without further
//! checks and never panic on a damaged file (it is rebuilt from the TOC instead).

mod build;
mod check;

use std::ops::Range;

use streamsnap_format::{Digest, Toc, api};

pub use check::IndexError;

/// `magic` of the header: the file's type and its layout version.
pub const MAGIC: [u8; 8] = *b"SSLAYIX1";
/// Bytes of the header; the sections follow it back to back.
pub const HEADER_LEN: usize = 160;
pub const NODE_LEN: usize = 44;
pub const CHILD_LEN: usize = 9;
pub const EXTENT_LEN: usize = 12;
pub const CHUNK_LEN: usize = 48;
pub const XATTR_LEN: usize = 17;

/// Header field offsets.
mod header {
    pub const MAGIC: usize = 0;
    pub const DEFAULT_DIR_MODE: usize = 8;
    pub const FLAGS: usize = 12;
    pub const TOC_DIGEST: usize = 16;
    pub const LAYER_DIGEST: usize = 48;
    pub const BODY_DIGEST: usize = 80;
    pub const NODES: usize = 112;
    pub const CHILDREN: usize = 116;
    pub const EXTENTS: usize = 120;
    pub const CHUNKS: usize = 124;
    pub const XATTRS: usize = 128;
    pub const STRINGS: usize = 136;
    pub const BLOCKS: usize = 144;
    pub const FILES: usize = 152;
}

/// The rule of [`LayerIndex::worth_passthrough`]: `large` bytes in files big enough for copies
/// out of `all` bytes in files.
pub(crate) fn worth_passthrough(large: u64, all: u64) -> bool {
    large > 0 && large >= all / 2
}

/// `flags` bit of the header: some inode has an xattr (or an opaque marker).
const HAS_XATTRS: u32 = 1;
/// Node flag bit: the directory is opaque.
const OPAQUE: u8 = 1;

/// Node kinds as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Dir = 1,
    Regular = 2,
    Symlink = 3,
    CharDevice = 4,
    BlockDevice = 5,
    Fifo = 6,
    Whiteout = 7,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Dir,
            2 => Self::Regular,
            3 => Self::Symlink,
            4 => Self::CharDevice,
            5 => Self::BlockDevice,
            6 => Self::Fifo,
            7 => Self::Whiteout,
            _ => return None,
        })
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn digest_at(bytes: &[u8], at: usize) -> Digest {
    Digest::from_slice(&bytes[at..at + 32]).expect("32 bytes")
}

/// One inode's record.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node<'a>(&'a [u8]);

impl<'a> Node<'a> {
    pub(crate) fn kind(&self) -> Kind {
        Kind::from_u8(self.0[0]).expect("validated: node kinds are known")
    }
    pub(crate) fn opaque(&self) -> bool {
        self.0[1] & OPAQUE != 0
    }
    /// `mode & 07777` (0 for a whiteout).
    pub(crate) fn perm(&self) -> u16 {
        u16_at(self.0, 2)
    }
    pub(crate) fn nlink(&self) -> u32 {
        u32_at(self.0, 4)
    }
    pub(crate) fn uid(&self) -> u32 {
        u32_at(self.0, 8)
    }
    pub(crate) fn gid(&self) -> u32 {
        u32_at(self.0, 12)
    }
    pub(crate) fn mtime(&self) -> (i64, u32) {
        (u64_at(self.0, 16) as i64, u32_at(self.0, 24))
    }
    /// Directory: its parent's inode; regular file: first extent; symlink: target offset in
    /// the strings; device: its number.
    fn a(&self) -> u32 {
        u32_at(self.0, 28)
    }
    /// Directory: first child; regular file: extent count; symlink: target length.
    fn b(&self) -> u32 {
        u32_at(self.0, 32)
    }
    /// Directory: child count; regular file: size; symlink: target length.
    fn x(&self) -> u64 {
        u64_at(self.0, 36)
    }
    /// Directories: the inode of `..`.
    pub(crate) fn parent(&self) -> u64 {
        u64::from(self.a())
    }
    /// Content length of a regular file, target length of a symlink, 0 otherwise.
    pub(crate) fn size(&self) -> u64 {
        match self.kind() {
            Kind::Regular | Kind::Symlink => self.x(),
            _ => 0,
        }
    }
    pub(crate) fn rdev(&self) -> u32 {
        match self.kind() {
            Kind::CharDevice | Kind::BlockDevice => self.a(),
            _ => 0,
        }
    }
    fn children(&self) -> Range<usize> {
        match self.kind() {
            Kind::Dir => range(self.b(), self.x()),
            _ => 0..0,
        }
    }
    fn extents(&self) -> Range<usize> {
        match self.kind() {
            Kind::Regular => range(self.a(), u64::from(self.b())),
            _ => 0..0,
        }
    }
    fn target(&self) -> Option<Range<usize>> {
        (self.kind() == Kind::Symlink).then(|| range(self.a(), u64::from(self.b())))
    }
}

fn range(start: u32, len: u64) -> Range<usize> {
    let start = start as usize;
    start..start + len as usize
}

/// One chunk of the layer's data blob, as its TOC lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Offset of the chunk's zstd frame in the data blob.
    pub offset: u64,
    /// Length of the frame.
    pub compressed_size: u32,
    /// Length of the chunk once decompressed.
    pub size: u32,
    /// sha256 of the decompressed chunk.
    pub digest: Digest,
}

impl ChunkInfo {
    fn of(chunk: &api::Chunk) -> Self {
        Self {
            offset: chunk.offset,
            compressed_size: chunk.compressed_size,
            size: chunk.size,
            digest: Digest::from_slice(&chunk.sha256)
                .expect("validated: chunk digests are 32 bytes"),
        }
    }
}

/// A layer's chunk table: what a [`ChunkReader`](crate::ChunkReader) needs to find and verify
/// the chunks a read asks for. Implemented by the layer index and by a TOC.
pub trait ChunkTable: Sync {
    /// Number of chunks.
    fn chunk_count(&self) -> usize;
    /// Chunk `index`, `None` past the end.
    fn chunk(&self, index: u32) -> Option<ChunkInfo>;
}

impl ChunkTable for Toc {
    fn chunk_count(&self) -> usize {
        self.chunks().len()
    }
    fn chunk(&self, index: u32) -> Option<ChunkInfo> {
        self.chunks().get(index as usize).map(ChunkInfo::of)
    }
}

/// A piece of a regular file: `length` bytes at `offset` of chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) chunk: u32,
    pub(crate) offset: u32,
    pub(crate) length: u32,
}

/// An xattr of an inode: its name and value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Xattr<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// A layer's metadata in its index form (see the module doc). Immutable; shared behind an
/// `Arc` by the requests that use it.
pub struct LayerIndex {
    bytes: Box<[u8]>,
    nodes: Range<usize>,
    children: Range<usize>,
    extents: Range<usize>,
    chunks: Range<usize>,
    xattrs: Range<usize>,
    strings: Range<usize>,
}

impl std::fmt::Debug for LayerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerIndex")
            .field("layer", &self.layer_digest())
            .field("inodes", &self.node_count())
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl LayerIndex {
    /// The whole index as saved (header included).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bytes the index takes in memory.
    pub fn len_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The original layer's digest (as the TOC names it).
    pub fn layer_digest(&self) -> Digest {
        digest_at(&self.bytes, header::LAYER_DIGEST)
    }

    /// The sha256 of the TOC blob the index was built from.
    pub fn toc_digest(&self) -> Digest {
        digest_at(&self.bytes, header::TOC_DIGEST)
    }

    /// Permission bits the index gave implied directories.
    pub fn default_dir_mode(&self) -> u32 {
        u32_at(&self.bytes, header::DEFAULT_DIR_MODE)
    }

    /// Whether any inode has an xattr (opaque markers count).
    pub fn has_xattrs(&self) -> bool {
        u32_at(&self.bytes, header::FLAGS) & HAS_XATTRS != 0
    }

    /// Whether some inode has an xattr of the image's own (opaque markers aside): what a
    /// merged mount, which applies opaque directories instead of presenting them, can show.
    pub fn has_image_xattrs(&self) -> bool {
        self.xattr_count() > 0
    }

    /// Bytes of the regular files of at least `min` bytes, and of all regular files (each
    /// inode once, however many names it has; a pass over every inode).
    pub fn file_bytes(&self, min: u64) -> (u64, u64) {
        (1..=self.node_count() as u64)
            .filter_map(|ino| self.node(ino))
            .filter(|node| node.kind() == Kind::Regular)
            .fold((0, 0), |(large, all), node| {
                let size = node.size();
                let large = if size >= min {
                    large.saturating_add(size)
                } else {
                    large
                };
                (large, all.saturating_add(size))
            })
    }

    /// Whether the layer is worth FUSE passthrough, which costs every open of its files a
    /// request (zero-message opens are off with it): when files of at least `min_file_bytes`
    /// (the ones that get copies) hold at least half its bytes, as in layers of model weights
    /// or data. Layers of libraries and code, where a start-up opens thousands of files and
    /// reads little of each, keep zero-message opens (with such layers passed through too, the
    /// bench's warm start took 15% longer: docs/benchmarks.md).
    pub fn worth_passthrough(&self, min_file_bytes: u64) -> bool {
        let (large, all) = self.file_bytes(min_file_bytes.max(1));
        worth_passthrough(large, all)
    }

    pub(crate) fn statfs_totals(&self) -> (u64, u64) {
        (
            u64_at(&self.bytes, header::BLOCKS),
            u64_at(&self.bytes, header::FILES),
        )
    }

    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len() / NODE_LEN
    }

    /// Inode `ino`'s record, `None` for an inode number the layer does not have.
    pub(crate) fn node(&self, ino: u64) -> Option<Node<'_>> {
        let index = usize::try_from(ino.checked_sub(1)?).ok()?;
        if index >= self.node_count() {
            return None;
        }
        let start = self.nodes.start + index * NODE_LEN;
        Some(Node(&self.bytes[start..start + NODE_LEN]))
    }

    fn string(&self, start: usize, len: usize) -> &[u8] {
        let start = self.strings.start + start;
        &self.bytes[start..start + len]
    }

    /// Number of entries of directory `node` (0 for others).
    pub(crate) fn child_count(&self, node: &Node<'_>) -> usize {
        node.children().len()
    }

    /// Entry `i` of directory `node`'s run (sorted by name): its name and inode.
    pub(crate) fn child(&self, node: &Node<'_>, i: usize) -> (&[u8], u64) {
        let at = self.children.start + (node.children().start + i) * CHILD_LEN;
        let record = &self.bytes[at..at + CHILD_LEN];
        let name = self.string(u32_at(record, 4) as usize, usize::from(record[8]));
        (name, u64::from(u32_at(record, 0)))
    }

    /// The inode named `name` in directory `node`.
    pub(crate) fn find_child(&self, node: &Node<'_>, name: &[u8]) -> Option<u64> {
        let (mut low, mut high) = (0, self.child_count(node));
        while low < high {
            let mid = low + (high - low) / 2;
            let (candidate, ino) = self.child(node, mid);
            match candidate.cmp(name) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(ino),
            }
        }
        None
    }

    /// A symlink's target.
    pub(crate) fn target(&self, node: &Node<'_>) -> Option<&[u8]> {
        let range = node.target()?;
        Some(self.string(range.start, range.len()))
    }

    /// A regular file's extents, in file order.
    pub(crate) fn extents<'s>(&'s self, node: &Node<'_>) -> impl Iterator<Item = Extent> + 's {
        let range = node.extents();
        let start = self.extents.start + range.start * EXTENT_LEN;
        let end = self.extents.start + range.end * EXTENT_LEN;
        self.bytes[start..end]
            .chunks_exact(EXTENT_LEN)
            .map(|record| Extent {
                chunk: u32_at(record, 0),
                offset: u32_at(record, 4),
                length: u32_at(record, 8),
            })
    }

    fn xattr_count(&self) -> usize {
        self.xattrs.len() / XATTR_LEN
    }

    fn xattr_record(&self, i: usize) -> &[u8] {
        let at = self.xattrs.start + i * XATTR_LEN;
        &self.bytes[at..at + XATTR_LEN]
    }

    /// The xattrs of inode `ino` that are presented, in tar order.
    pub(crate) fn xattrs(&self, ino: u64) -> impl Iterator<Item = Xattr<'_>> + '_ {
        // The records are sorted by inode: the first of `ino` is where `ino - 1` ends.
        let count = self.xattr_count();
        let (mut low, mut high) = (0, count);
        while low < high {
            let mid = low + (high - low) / 2;
            if u64::from(u32_at(self.xattr_record(mid), 0)) < ino {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        (low..count)
            .map(|i| self.xattr_record(i))
            .take_while(move |record| u64::from(u32_at(record, 0)) == ino)
            .map(|record| Xattr {
                name: self.string(u32_at(record, 4) as usize, usize::from(record[8])),
                value: self.string(u32_at(record, 9) as usize, u32_at(record, 13) as usize),
            })
    }
}

impl ChunkTable for LayerIndex {
    fn chunk_count(&self) -> usize {
        self.chunks.len() / CHUNK_LEN
    }

    fn chunk(&self, index: u32) -> Option<ChunkInfo> {
        let index = index as usize;
        if index >= self.chunk_count() {
            return None;
        }
        let at = self.chunks.start + index * CHUNK_LEN;
        let record = &self.bytes[at..at + CHUNK_LEN];
        Some(ChunkInfo {
            offset: u64_at(record, 0),
            compressed_size: u32_at(record, 8),
            size: u32_at(record, 12),
            digest: digest_at(record, 16),
        })
    }
}
