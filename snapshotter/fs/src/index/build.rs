//! Writing a layer index from a validated TOC through the inode table.

use std::collections::HashMap;

use streamsnap_format::{Digest, Toc};

use super::{
    CHILD_LEN, CHUNK_LEN, EXTENT_LEN, HAS_XATTRS, HEADER_LEN, Kind, LayerIndex, MAGIC, NODE_LEN,
    OPAQUE, XATTR_LEN, header,
};
use crate::error::Error;
use crate::layer::{BLOCK_SIZE, FsOptions, OVERFLOW_ID, makedev, presented_xattr};
use crate::table::{NodeKind, Table};

/// The section an oversized count is in, for the error.
fn narrow(what: &'static str, value: usize) -> Result<u32, Error> {
    u32::try_from(value).map_err(|_| Error::IndexTooLarge {
        what,
        count: value as u64,
    })
}

fn kind(kind: NodeKind) -> Kind {
    match kind {
        NodeKind::Dir => Kind::Dir,
        NodeKind::Regular => Kind::Regular,
        NodeKind::Symlink => Kind::Symlink,
        NodeKind::CharDevice => Kind::CharDevice,
        NodeKind::BlockDevice => Kind::BlockDevice,
        NodeKind::Fifo => Kind::Fifo,
        NodeKind::Whiteout => Kind::Whiteout,
    }
}

fn id(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(OVERFLOW_ID)
}

/// The strings section under construction: names are stored once however many directories
/// use them.
#[derive(Default)]
struct Strings<'a> {
    bytes: Vec<u8>,
    interned: HashMap<&'a [u8], u32>,
}

impl<'a> Strings<'a> {
    fn push(&mut self, value: &[u8]) -> Result<u32, Error> {
        let at = narrow("string bytes", self.bytes.len())?;
        self.bytes.extend_from_slice(value);
        narrow("string bytes", self.bytes.len())?;
        Ok(at)
    }

    fn intern(&mut self, value: &'a [u8]) -> Result<u32, Error> {
        if let Some(&at) = self.interned.get(value) {
            return Ok(at);
        }
        let at = self.push(value)?;
        self.interned.insert(value, at);
        Ok(at)
    }
}

impl LayerIndex {
    /// Builds the index of a validated TOC: the inode table the way extracting the layer's tar
    /// would make it (entries that cannot be presented are skipped with a warning; a layer
    /// whose root is not a directory is refused), flattened. `toc_digest` is the sha256 of the
    /// TOC blob, kept in the header so a saved index is only used with its TOC.
    pub fn build(toc: &Toc, toc_digest: Digest, options: &FsOptions) -> Result<Self, Error> {
        let entries = toc.entries();
        let table = Table::build(entries)?;
        let mut strings = Strings::default();
        let mut nodes = Vec::with_capacity(table.nodes.len() * NODE_LEN);
        let mut children = Vec::new();
        let mut extents = Vec::new();
        let mut xattrs = Vec::new();
        let (mut blocks, mut files, mut any_xattr) = (0u64, 0u64, false);
        for (i, node) in table.nodes.iter().enumerate() {
            let ino = narrow("inodes", i + 1)?;
            let entry = node.entry(entries);
            let (perm, uid, gid, mtime, nanos) = match entry {
                Some(e) => (
                    e.mode & 0o7777,
                    id(e.uid),
                    id(e.gid),
                    e.mtime,
                    e.mtime_nanos,
                ),
                None => (options.default_dir_mode & 0o7777, 0, 0, 0, 0),
            };
            // overlayfs wants a whiteout to be a bare 0/0 character device
            let perm = if node.kind == NodeKind::Whiteout {
                0
            } else {
                perm as u16
            };
            let (a, b, x) = match (node.kind, entry) {
                (NodeKind::Dir, _) => {
                    let start = narrow("directory entries", children.len() / CHILD_LEN)?;
                    let run = table.children(node);
                    for child in run {
                        let name = child.name.bytes(entries);
                        children.extend_from_slice(
                            &narrow("inodes", child.ino as usize)?.to_le_bytes(),
                        );
                        children.extend_from_slice(&strings.intern(name)?.to_le_bytes());
                        children.push(
                            u8::try_from(name.len()).expect("validated: names fit in 255 bytes"),
                        );
                    }
                    (
                        narrow("inodes", node.parent as usize)?,
                        start,
                        run.len() as u64,
                    )
                }
                (NodeKind::Regular, Some(e)) => {
                    let start = narrow("extents", extents.len() / EXTENT_LEN)?;
                    for extent in &e.extents {
                        extents.extend_from_slice(&extent.chunk.to_le_bytes());
                        extents.extend_from_slice(&extent.offset.to_le_bytes());
                        extents.extend_from_slice(&extent.length.to_le_bytes());
                    }
                    narrow("extents", extents.len() / EXTENT_LEN)?;
                    (start, narrow("extents", e.extents.len())?, e.size)
                }
                (NodeKind::Symlink, Some(e)) => {
                    let at = strings.push(&e.link_target)?;
                    let len = narrow("string bytes", e.link_target.len())?;
                    (at, len, u64::from(len))
                }
                (NodeKind::CharDevice | NodeKind::BlockDevice, Some(e)) => {
                    (makedev(e.dev_major, e.dev_minor), 0, 0)
                }
                _ => (0, 0, 0),
            };
            if node.nlink > 0 {
                files += 1;
                if node.kind == NodeKind::Regular {
                    blocks += x.div_ceil(u64::from(BLOCK_SIZE));
                }
            }
            any_xattr |= node.opaque;
            for xattr in entry.map_or(&[][..], |e| &e.xattrs[..]) {
                if !presented_xattr(&xattr.name) {
                    continue;
                }
                any_xattr = true;
                xattrs.extend_from_slice(&ino.to_le_bytes());
                xattrs.extend_from_slice(&strings.intern(xattr.name.as_bytes())?.to_le_bytes());
                xattrs.push(
                    u8::try_from(xattr.name.len())
                        .expect("validated: xattr names fit in 255 bytes"),
                );
                xattrs.extend_from_slice(&strings.push(&xattr.value)?.to_le_bytes());
                xattrs.extend_from_slice(&narrow("string bytes", xattr.value.len())?.to_le_bytes());
            }
            nodes.push(kind(node.kind) as u8);
            nodes.push(if node.opaque { OPAQUE } else { 0 });
            nodes.extend_from_slice(&perm.to_le_bytes());
            nodes.extend_from_slice(&node.nlink.to_le_bytes());
            nodes.extend_from_slice(&uid.to_le_bytes());
            nodes.extend_from_slice(&gid.to_le_bytes());
            nodes.extend_from_slice(&mtime.to_le_bytes());
            nodes.extend_from_slice(&nanos.to_le_bytes());
            nodes.extend_from_slice(&a.to_le_bytes());
            nodes.extend_from_slice(&b.to_le_bytes());
            nodes.extend_from_slice(&x.to_le_bytes());
        }
        drop(table);
        let mut chunks = Vec::with_capacity(toc.chunks().len() * CHUNK_LEN);
        for chunk in toc.chunks() {
            chunks.extend_from_slice(&chunk.offset.to_le_bytes());
            chunks.extend_from_slice(&chunk.compressed_size.to_le_bytes());
            chunks.extend_from_slice(&chunk.size.to_le_bytes());
            chunks.extend_from_slice(&chunk.sha256);
        }
        let counts = [
            ("inodes", nodes.len() / NODE_LEN),
            ("directory entries", children.len() / CHILD_LEN),
            ("extents", extents.len() / EXTENT_LEN),
            ("chunks", chunks.len() / CHUNK_LEN),
            ("xattrs", xattrs.len() / XATTR_LEN),
        ];
        let body = [
            &nodes,
            &children,
            &extents,
            &chunks,
            &xattrs,
            &strings.bytes,
        ];
        let total = HEADER_LEN + body.iter().map(|s| s.len()).sum::<usize>();
        let mut bytes = Vec::with_capacity(total);
        bytes.resize(HEADER_LEN, 0);
        for section in body {
            bytes.extend_from_slice(section);
        }
        let head = &mut bytes[..HEADER_LEN];
        head[header::MAGIC..header::MAGIC + 8].copy_from_slice(&MAGIC);
        head[header::DEFAULT_DIR_MODE..][..4]
            .copy_from_slice(&options.default_dir_mode.to_le_bytes());
        head[header::FLAGS..][..4].copy_from_slice(&u32::from(any_xattr).to_le_bytes());
        debug_assert_eq!(HAS_XATTRS, 1);
        head[header::TOC_DIGEST..][..32].copy_from_slice(toc_digest.as_bytes());
        head[header::LAYER_DIGEST..][..32].copy_from_slice(toc.layer_digest().as_bytes());
        let fields = [
            header::NODES,
            header::CHILDREN,
            header::EXTENTS,
            header::CHUNKS,
            header::XATTRS,
        ];
        for (field, (what, count)) in fields.into_iter().zip(counts) {
            head[field..][..4].copy_from_slice(&narrow(what, count)?.to_le_bytes());
        }
        head[header::STRINGS..][..8].copy_from_slice(&(strings.bytes.len() as u64).to_le_bytes());
        head[header::BLOCKS..][..8].copy_from_slice(&blocks.to_le_bytes());
        head[header::FILES..][..8].copy_from_slice(&files.to_le_bytes());
        let body_digest = Digest::sha256(&bytes[HEADER_LEN..]);
        bytes[header::BODY_DIGEST..][..32].copy_from_slice(body_digest.as_bytes());
        Self::parse(bytes.into_boxed_slice(), false).map_err(|error| Error::InvalidIndex {
            reason: format!("a freshly built index does not read back: {error}"),
        })
    }
}
