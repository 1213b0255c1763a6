//! [`LayerFs`]: the filesystem operations over a layer's TOC, free of FUSE types.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use streamsnap_format::api;
use streamsnap_format::{Piece, Toc};

use crate::ChunkReader;
use crate::error::Error;
use crate::table::{Node, NodeKind, ROOT, Table};

/// The xattr overlayfs reads to tell an opaque directory.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Xattr namespaces overlayfs interprets. Such xattrs in a tar are not presented: they would
/// steer overlayfs (redirects, metacopy, origin) from inside an image. Opaque directories get
/// their marker from the TOC's opaque entries instead.
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
/// The owner given to ids that do not fit in 32 bits (the kernel's overflow id).
const OVERFLOW_ID: u32 = 65534;
/// Block size reported by stat and statfs.
const BLOCK_SIZE: u32 = 4096;
const NAME_MAX: u32 = 255;

/// How to present parts of the layer the TOC says nothing about, and how much a read may hold.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Permission bits of implied directories (parents that have no entry of their own, and the
    /// root when the layer has no root entry). Their owner is root and their mtime the epoch.
    pub default_dir_mode: u32,
    /// Most decoded bytes of chunks one read asks the reader for at once. A read touching more
    /// (a file of many tiny extents can touch a different chunk with every byte) asks in
    /// groups, one after the other; a chunk larger than this is asked for alone.
    pub read_group_bytes: u64,
    /// Most chunks one read asks the reader for at once.
    pub read_group_chunks: usize,
}

impl FsOptions {
    pub const DEFAULT_READ_GROUP_BYTES: u64 = 16 << 20;
    pub const DEFAULT_READ_GROUP_CHUNKS: usize = 1024;
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            default_dir_mode: 0o755,
            read_group_bytes: Self::DEFAULT_READ_GROUP_BYTES,
            read_group_chunks: Self::DEFAULT_READ_GROUP_CHUNKS,
        }
    }
}

/// Pieces of a read handled at once: a read of 1 MiB over a file of 1-byte extents has a
/// million, each needing a slot while its chunk is found.
const MAX_PIECES_AT_ONCE: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
    Symlink,
    CharDevice,
    BlockDevice,
    NamedPipe,
}

/// What stat shows of an inode. Access and change times equal `mtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits with setuid, setgid and sticky (`mode & 07777`).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks: `ceil(size / 512)`.
    pub blocks: u64,
    /// Device number of character and block devices, in the kernel's encoding.
    pub rdev: u32,
    pub mtime: SystemTime,
}

/// One entry of a directory listing. `offset` is where the next listing continues from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    pub offset: u64,
    pub kind: FileKind,
    pub name: &'a OsStr,
}

/// Filesystem totals: everything is used, nothing is free (the layer is read-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Blocks of `block_size` bytes held by regular files.
    pub blocks: u64,
    /// Inodes in use.
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// One layer as a read-only filesystem: metadata from an inode table built from the TOC at
/// creation, file content through a [`ChunkReader`].
pub struct LayerFs {
    toc: Arc<Toc>,
    reader: Arc<dyn ChunkReader>,
    table: Table,
    options: FsOptions,
    statfs: StatFs,
    /// Some inode has an xattr (or an opaque marker, which is presented as one).
    has_xattrs: bool,
}

impl fmt::Debug for LayerFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerFs")
            .field("layer", &self.toc.layer_digest())
            .field("inodes", &self.table.nodes.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl LayerFs {
    /// Builds the inode table of the layer. Entries that cannot be presented (a hardlink to a
    /// missing file or a directory, a path below a non-directory) are skipped with a warning; a
    /// layer whose root entry is not a directory is refused.
    pub fn new(
        toc: Arc<Toc>,
        reader: Arc<dyn ChunkReader>,
        options: FsOptions,
    ) -> Result<Self, Error> {
        let table = Table::build(toc.entries())?;
        let mut blocks = 0u64;
        let mut files = 0u64;
        for node in &table.nodes {
            if node.nlink == 0 {
                continue;
            }
            files += 1;
            if let (NodeKind::Regular, Some(entry)) = (node.kind, node.entry(toc.entries())) {
                blocks += entry.size.div_ceil(u64::from(BLOCK_SIZE));
            }
        }
        let statfs = StatFs {
            blocks,
            files,
            block_size: BLOCK_SIZE,
            name_max: NAME_MAX,
        };
        let mut layer = Self {
            toc,
            reader,
            table,
            options,
            statfs,
            has_xattrs: false,
        };
        layer.has_xattrs = layer
            .table
            .nodes
            .iter()
            .any(|node| node.opaque || layer.xattrs(node).next().is_some());
        Ok(layer)
    }

    /// Whether any inode has an extended attribute (opaque markers count). Layers without any
    /// (most) can tell the kernel so once instead of answering every xattr query.
    pub fn has_xattrs(&self) -> bool {
        self.has_xattrs
    }

    pub fn toc(&self) -> &Arc<Toc> {
        &self.toc
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let dir = self.dir(parent)?;
        let ino = self
            .table
            .child(dir, name.as_bytes(), self.toc.entries())
            .ok_or(Errno::ENOENT)?;
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let entry = node.entry(self.toc.entries());
        let (mode, uid, gid, mtime) = match entry {
            Some(e) => (
                e.mode,
                id(e.uid),
                id(e.gid),
                system_time(e.mtime, e.mtime_nanos),
            ),
            None => (self.options.default_dir_mode, 0, 0, UNIX_EPOCH),
        };
        let (size, rdev) = match (node.kind, entry) {
            (NodeKind::Regular, Some(e)) => (e.size, 0),
            (NodeKind::Symlink, Some(e)) => (e.link_target.len() as u64, 0),
            (NodeKind::CharDevice | NodeKind::BlockDevice, Some(e)) => {
                (0, makedev(e.dev_major, e.dev_minor))
            }
            _ => (0, 0),
        };
        Ok(Attr {
            ino,
            kind: file_kind(node.kind),
            // overlayfs wants a whiteout to be a bare 0/0 character device
            perm: if node.kind == NodeKind::Whiteout {
                0
            } else {
                (mode & 0o7777) as u16
            },
            nlink: node.nlink,
            uid,
            gid,
            size,
            blocks: if node.kind == NodeKind::Regular {
                size.div_ceil(512)
            } else {
                0
            },
            rdev,
            mtime,
        })
    }

    /// The listing of directory `ino` after `offset` (0 for the start): `.`, `..`, then the
    /// entries sorted by name. Each entry's `offset` resumes the listing after it.
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Vec<DirEntry<'_>>, Errno> {
        Ok(self.readdir_iter(ino, offset)?.collect())
    }

    /// Like [`readdir`](Self::readdir), lazily, for callers that stop when their buffer is full.
    pub fn readdir_iter(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<impl Iterator<Item = DirEntry<'_>> + '_, Errno> {
        let dir = self.dir(ino)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        const DOTS: usize = 2;
        let dots = [(".", ino), ("..", dir.parent)];
        let children = self.table.children(dir);
        let dots_from = start.min(DOTS);
        let children_from = start.saturating_sub(DOTS).min(children.len());
        let entries = self.toc.entries();
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
        let listed_children =
            children[children_from..]
                .iter()
                .enumerate()
                .map(move |(i, child)| DirEntry {
                    ino: child.ino,
                    offset: (DOTS + children_from + i) as u64 + 1,
                    kind: file_kind(self.table.nodes[child.ino as usize - 1].kind),
                    name: OsStr::from_bytes(child.name.bytes(entries)),
                });
        Ok(listed_dots.chain(listed_children))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        match (node.kind, node.entry(self.toc.entries())) {
            (NodeKind::Symlink, Some(entry)) => Ok(entry.link_target.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The value of xattr `name`; ENODATA when the inode has none of that name.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        let name = name.as_bytes();
        if node.opaque && name == OPAQUE_XATTR.as_bytes() {
            return Ok(b"y".to_vec());
        }
        self.xattrs(node)
            .filter(|xattr| xattr.name.as_bytes() == name)
            .last()
            .map(|xattr| xattr.value.clone())
            .ok_or(Errno::ENODATA)
    }

    /// The names of the inode's xattrs, each followed by a NUL byte.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        let mut names: Vec<&str> = Vec::new();
        if node.opaque {
            names.push(OPAQUE_XATTR);
        }
        for xattr in self.xattrs(node) {
            if !names.contains(&xattr.name.as_str()) {
                names.push(&xattr.name);
            }
        }
        let mut out = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for name in names {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// `size` bytes at `offset` of regular file `ino`; shorter only at the end of the file. Asks
    /// the reader for just the chunks the range touches, each once however many pieces of the
    /// range it holds, in groups of at most `read_group_bytes` decoded bytes and
    /// `read_group_chunks` chunks, one group at a time; answers EIO when the reader fails.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        let entry = match (node.kind, node.entry(self.toc.entries())) {
            (NodeKind::Regular, Some(entry)) => entry,
            (NodeKind::Dir, _) => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        };
        let end = offset.saturating_add(u64::from(size)).min(entry.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pieces = self
            .toc
            .pieces_iter(entry, offset, u64::from(size))
            .filter(|piece| piece.len > 0);
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
            self.fill(ino, offset, size, &window, &mut out).await?;
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

    /// Copies `window`'s pieces into `out`, asking the reader for their chunks in bounded
    /// groups of distinct chunks (in chunk order: every piece of a chunk is served by one ask).
    async fn fill(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        window: &[(Piece, usize)],
        out: &mut [u8],
    ) -> Result<(), Errno> {
        let mut order: Vec<usize> = (0..window.len()).collect();
        order.sort_by_key(|&i| window[i].0.chunk);
        let table = self.toc.chunks();
        let mut start = 0;
        while start < order.len() {
            // The group: distinct chunks from `start` while they fit.
            let mut group: Vec<u32> = Vec::new();
            let mut bytes = 0u64;
            let mut stop = start;
            while stop < order.len() {
                let chunk = window[order[stop]].0.chunk;
                if group.last() != Some(&chunk) {
                    let chunk_size = u64::from(table[chunk as usize].size);
                    let full = bytes + chunk_size > self.options.read_group_bytes
                        || group.len() >= self.options.read_group_chunks;
                    if !group.is_empty() && full {
                        break;
                    }
                    group.push(chunk);
                    bytes += chunk_size;
                }
                stop += 1;
            }
            let chunks = self.reader.read_chunks(&group).await.map_err(|error| {
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
            for (&index, data) in group.iter().zip(&chunks) {
                let expected = table[index as usize].size as usize;
                if data.len() != expected {
                    tracing::debug!(
                        chunk = index,
                        expected,
                        got = data.len(),
                        "chunk of wrong size"
                    );
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

    pub fn statfs(&self) -> StatFs {
        self.statfs
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.table.get(ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Node, Errno> {
        let node = self.node(ino)?;
        if node.kind == NodeKind::Dir {
            Ok(node)
        } else {
            Err(Errno::ENOTDIR)
        }
    }

    fn xattrs<'a>(&'a self, node: &Node) -> impl Iterator<Item = &'a api::Xattr> + 'a {
        let xattrs = node
            .entry(self.toc.entries())
            .map_or(&[][..], |e| &e.xattrs[..]);
        xattrs.iter().filter(|xattr| {
            !OVERLAY_XATTR_PREFIXES
                .iter()
                .any(|prefix| xattr.name.starts_with(prefix))
        })
    }
}

/// Inode number of the layer root, for callers that walk from it.
pub const ROOT_INO: u64 = ROOT;

fn file_kind(kind: NodeKind) -> FileKind {
    match kind {
        NodeKind::Dir => FileKind::Directory,
        NodeKind::Regular => FileKind::RegularFile,
        NodeKind::Symlink => FileKind::Symlink,
        NodeKind::CharDevice | NodeKind::Whiteout => FileKind::CharDevice,
        NodeKind::BlockDevice => FileKind::BlockDevice,
        NodeKind::Fifo => FileKind::NamedPipe,
    }
}

fn id(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(OVERFLOW_ID)
}

/// The kernel's 32-bit device number encoding (`new_encode_dev`), as FUSE carries it.
pub(crate) fn makedev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn system_time(secs: i64, nanos: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos.min(999_999_999)));
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    time.and_then(|t| t.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}
