//! The filesystem's types, and [`LayerFs`]: a layer built from its TOC in memory. Free of FUSE
//! types.

use std::ffi::OsStr;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use streamsnap_format::{Digest, Toc};

use crate::ChunkReader;
use crate::error::Error;
use crate::index::LayerIndex;
use crate::table::ROOT;

/// The xattr overlayfs reads to tell an opaque directory.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Xattr namespaces overlayfs interprets. Such xattrs in a tar are not presented: they would
/// steer overlayfs (redirects, metacopy, origin) from inside an image. Opaque directories get
/// their marker from the TOC's opaque entries instead.
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
/// The owner given to ids that do not fit in 32 bits (the kernel's overflow id).
pub(crate) const OVERFLOW_ID: u32 = 65534;
/// Block size reported by stat and statfs.
pub(crate) const BLOCK_SIZE: u32 = 4096;
pub(crate) const NAME_MAX: u32 = 255;

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

/// One layer as a read-only filesystem built from its TOC: metadata from the layer's index
/// (built at creation and kept for the layer's life), file content through a [`ChunkReader`].
/// The node daemon serves a [`Layer`](crate::Layer) instead, whose index is loaded from disk
/// when used and dropped when idle; this is the same filesystem, always resident.
pub struct LayerFs {
    toc: Arc<Toc>,
    reader: Arc<dyn ChunkReader>,
    index: Arc<LayerIndex>,
    options: FsOptions,
}

impl fmt::Debug for LayerFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerFs")
            .field("layer", &self.toc.layer_digest())
            .field("inodes", &self.index.node_count())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl LayerFs {
    /// Builds the index of the layer. Entries that cannot be presented (a hardlink to a missing
    /// file or a directory, a path below a non-directory) are skipped with a warning; a layer
    /// whose root entry is not a directory is refused.
    pub fn new(
        toc: Arc<Toc>,
        reader: Arc<dyn ChunkReader>,
        options: FsOptions,
    ) -> Result<Self, Error> {
        // Not saved anywhere, so the TOC blob's digest is not needed to find it again.
        let index = LayerIndex::build(&toc, Digest::from_bytes([0; 32]), &options)?;
        Ok(Self {
            toc,
            reader,
            index: Arc::new(index),
            options,
        })
    }

    /// Whether any inode has an extended attribute (opaque markers count). Layers without any
    /// (most) can tell the kernel so once instead of answering every xattr query.
    pub fn has_xattrs(&self) -> bool {
        self.index.has_xattrs()
    }

    pub fn toc(&self) -> &Arc<Toc> {
        &self.toc
    }

    /// The layer's index, which every operation reads.
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    pub(crate) fn reader(&self) -> &Arc<dyn ChunkReader> {
        &self.reader
    }

    pub(crate) fn options(&self) -> &FsOptions {
        &self.options
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        self.index.lookup(parent, name)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        self.index.getattr(ino)
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
        self.index.readdir_iter(ino, offset)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.index.readlink(ino)
    }

    /// The value of xattr `name`; ENODATA when the inode has none of that name.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        self.index.getxattr(ino, name)
    }

    /// The names of the inode's xattrs, each followed by a NUL byte.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.index.listxattr(ino)
    }

    /// `size` bytes at `offset` of regular file `ino`; shorter only at the end of the file. Asks
    /// the reader for just the chunks the range touches, each once however many pieces of the
    /// range it holds, in groups of at most `read_group_bytes` decoded bytes and
    /// `read_group_chunks` chunks, one group at a time; answers EIO when the reader fails.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        crate::ops::read(&self.index, &*self.reader, &self.options, ino, offset, size).await
    }

    pub fn statfs(&self) -> StatFs {
        self.index.statfs()
    }
}

/// Inode number of the layer root, for callers that walk from it.
pub const ROOT_INO: u64 = ROOT;

/// Whether an xattr of the TOC is presented: those in the namespaces overlayfs interprets are
/// not.
pub(crate) fn presented_xattr(name: &str) -> bool {
    !OVERLAY_XATTR_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The kernel's 32-bit device number encoding (`new_encode_dev`), as FUSE carries it.
pub(crate) fn makedev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

pub(crate) fn system_time(secs: i64, nanos: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos.min(999_999_999)));
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    time.and_then(|t| t.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}
