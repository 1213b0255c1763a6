//! The filesystem operations over a [`LayerIndex`]: lookup, getattr, readdir, readlink, xattrs
//! and statfs read the index; read asks a [`ChunkReader`] for exactly the chunks a byte range
//! needs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

use streamsnap_format::{Piece, pieces_of_extents};

use crate::ChunkReader;
use crate::index::{ChunkTable, Extent, Kind, LayerIndex, Node};
use crate::layer::{
    Attr, BLOCK_SIZE, DirEntry, FileKind, FsOptions, NAME_MAX, OPAQUE_XATTR, StatFs, system_time,
};

/// Pieces of a read handled at once: a read of 1 MiB over a file of 1-byte extents has a
/// million, each needing a slot while its chunk is found.
const MAX_PIECES_AT_ONCE: usize = 64 << 10;

pub(crate) fn file_kind(kind: Kind) -> FileKind {
    match kind {
        Kind::Dir => FileKind::Directory,
        Kind::Regular => FileKind::RegularFile,
        Kind::Symlink => FileKind::Symlink,
        Kind::CharDevice | Kind::Whiteout => FileKind::CharDevice,
        Kind::BlockDevice => FileKind::BlockDevice,
        Kind::Fifo => FileKind::NamedPipe,
    }
}

impl LayerIndex {
    fn node_or_enoent(&self, ino: u64) -> Result<Node<'_>, Errno> {
        self.node(ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<Node<'_>, Errno> {
        let node = self.node_or_enoent(ino)?;
        if node.kind() == Kind::Dir {
            Ok(node)
        } else {
            Err(Errno::ENOTDIR)
        }
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let dir = self.dir(parent)?;
        let ino = self
            .find_child(&dir, name.as_bytes())
            .ok_or(Errno::ENOENT)?;
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node_or_enoent(ino)?;
        let kind = node.kind();
        let size = node.size();
        let (secs, nanos) = node.mtime();
        Ok(Attr {
            ino,
            kind: file_kind(kind),
            perm: node.perm(),
            nlink: node.nlink(),
            uid: node.uid(),
            gid: node.gid(),
            size,
            blocks: if kind == Kind::Regular {
                size.div_ceil(512)
            } else {
                0
            },
            rdev: node.rdev(),
            mtime: system_time(secs, nanos),
        })
    }

    /// The listing of directory `ino` after `offset` (0 for the start): `.`, `..`, then the
    /// entries sorted by name. Each entry's `offset` resumes the listing after it.
    pub fn readdir_iter(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<impl Iterator<Item = DirEntry<'_>> + '_, Errno> {
        let dir = self.dir(ino)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        const DOTS: usize = 2;
        let dots = [(".", ino), ("..", dir.parent())];
        let count = self.child_count(&dir);
        let dots_from = start.min(DOTS);
        let children_from = start.saturating_sub(DOTS).min(count);
        let listed_dots = dots
            .into_iter()
            .enumerate()
            .skip(dots_from)
            .map(|(i, (name, ino))| DirEntry {
                ino,
                offset: i as u64 + 1,
                kind: FileKind::Directory,
                name: OsStr::new(name),
            });
        let listed_children = (children_from..count).map(move |i| {
            let (name, ino) = self.child(&dir, i);
            let kind = self
                .node(ino)
                .map_or(FileKind::RegularFile, |node| file_kind(node.kind()));
            DirEntry {
                ino,
                offset: (DOTS + i) as u64 + 1,
                kind,
                name: OsStr::from_bytes(name),
            }
        });
        Ok(listed_dots.chain(listed_children))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let node = self.node_or_enoent(ino)?;
        self.target(&node).map(<[u8]>::to_vec).ok_or(Errno::EINVAL)
    }

    /// The value of xattr `name`; ENODATA when the inode has none of that name.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let node = self.node_or_enoent(ino)?;
        let name = name.as_bytes();
        if node.opaque() && name == OPAQUE_XATTR.as_bytes() {
            return Ok(b"y".to_vec());
        }
        self.xattrs(ino)
            .filter(|xattr| xattr.name == name)
            .last()
            .map(|xattr| xattr.value.to_vec())
            .ok_or(Errno::ENODATA)
    }

    /// The names of the inode's xattrs, each followed by a NUL byte.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let node = self.node_or_enoent(ino)?;
        let mut names: Vec<&[u8]> = Vec::new();
        if node.opaque() {
            names.push(OPAQUE_XATTR.as_bytes());
        }
        for xattr in self.xattrs(ino) {
            if !names.contains(&xattr.name) {
                names.push(xattr.name);
            }
        }
        let mut out = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for name in names {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn statfs(&self) -> StatFs {
        let (blocks, files) = self.statfs_totals();
        StatFs {
            blocks,
            files,
            block_size: BLOCK_SIZE,
            name_max: NAME_MAX,
        }
    }

    /// The chunk pieces holding `len` bytes at `offset` of regular file `node`, clamped to the
    /// end of the file.
    fn pieces<'s>(
        &'s self,
        node: &Node<'_>,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = Piece> + 's {
        let extents = self
            .extents(node)
            .map(|e: Extent| (e.chunk, e.offset, e.length));
        pieces_of_extents(extents, node.size(), offset, len).filter(|piece| piece.len > 0)
    }
}

/// `size` bytes at `offset` of regular file `ino`; shorter only at the end of the file. Asks
/// the reader for just the chunks the range touches, each once however many pieces of the
/// range it holds, in groups of at most `read_group_bytes` decoded bytes and
/// `read_group_chunks` chunks, one group at a time; answers EIO when the reader fails.
pub(crate) async fn read(
    index: &LayerIndex,
    reader: &dyn ChunkReader,
    options: &FsOptions,
    ino: u64,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    let node = index.node_or_enoent(ino)?;
    match node.kind() {
        Kind::Regular => {}
        Kind::Dir => return Err(Errno::EISDIR),
        _ => return Err(Errno::EINVAL),
    }
    let end = offset.saturating_add(u64::from(size)).min(node.size());
    if end <= offset {
        return Ok(Vec::new());
    }
    let mut out = vec![0u8; (end - offset) as usize];
    let mut pieces = index.pieces(&node, offset, u64::from(size));
    let mut at = 0usize;
    loop {
        // The next pieces with where each goes in `out`.
        let window: Vec<(Piece, usize)> = pieces
            .by_ref()
            .take(MAX_PIECES_AT_ONCE)
            .map(|piece| {
                let placed = (piece, at);
                at += piece.len as usize;
                placed
            })
            .collect();
        if window.is_empty() {
            break;
        }
        fill(
            index,
            reader,
            options,
            (ino, offset, size),
            &window,
            &mut out,
        )
        .await?;
    }
    if at != out.len() {
        tracing::debug!(
            ino,
            offset,
            size,
            got = at,
            "extents do not cover the range"
        );
        return Err(Errno::EIO);
    }
    Ok(out)
}

/// Copies `window`'s pieces into `out`, asking the reader for their chunks in bounded groups of
/// distinct chunks (in chunk order: every piece of a chunk is served by one ask).
async fn fill(
    index: &LayerIndex,
    reader: &dyn ChunkReader,
    options: &FsOptions,
    (ino, offset, size): (u64, u64, u32),
    window: &[(Piece, usize)],
    out: &mut [u8],
) -> Result<(), Errno> {
    let mut order: Vec<usize> = (0..window.len()).collect();
    order.sort_by_key(|&i| window[i].0.chunk);
    // Validated: every extent names a chunk of the table.
    let chunk_size = |chunk: u32| index.chunk(chunk).map_or(0, |c| c.size);
    let mut start = 0;
    while start < order.len() {
        // The group: distinct chunks from `start` while they fit.
        let mut group: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        let mut stop = start;
        while stop < order.len() {
            let chunk = window[order[stop]].0.chunk;
            if group.last() != Some(&chunk) {
                let size = u64::from(chunk_size(chunk));
                let full = bytes + size > options.read_group_bytes
                    || group.len() >= options.read_group_chunks;
                if !group.is_empty() && full {
                    break;
                }
                group.push(chunk);
                bytes += size;
            }
            stop += 1;
        }
        let chunks = reader
            .read_chunks_in(index, &group)
            .await
            .map_err(|error| {
                tracing::debug!(ino, offset, size, %error, "chunk read failed");
                Errno::EIO
            })?;
        if chunks.len() != group.len() {
            tracing::debug!(
                ino,
                asked = group.len(),
                got = chunks.len(),
                "chunk reader miscounted"
            );
            return Err(Errno::EIO);
        }
        for (&chunk, data) in group.iter().zip(&chunks) {
            let expected = chunk_size(chunk) as usize;
            if data.len() != expected {
                tracing::debug!(chunk, expected, got = data.len(), "chunk of wrong size");
                return Err(Errno::EIO);
            }
        }
        let mut data = group.iter().zip(&chunks).peekable();
        for &i in &order[start..stop] {
            let (piece, to) = window[i];
            while data.peek().is_some_and(|(chunk, _)| **chunk != piece.chunk) {
                data.next();
            }
            let (_, chunk) = data.peek().ok_or(Errno::EIO)?;
            let from = piece.offset as usize;
            let len = piece.len as usize;
            out[to..to + len].copy_from_slice(&chunk[from..from + len]);
        }
        start = stop;
    }
    Ok(())
}
