//! The image layer filesystem of the node daemon.
//!
//! One streaming layer, presented as a read-only directory tree. Two parts live here:
//!
//! - [`LayerFs`]: pure lookup, getattr, readdir, readlink, xattrs and read over a validated
//!   [`Toc`](streamsnap_format::Toc) and a [`ChunkReader`]. Metadata comes from an inode table
//!   built once from the TOC; only `read` awaits, and it asks the reader for exactly the chunks
//!   the byte range needs. Whiteouts and opaque directories are presented the way overlayfs
//!   expects (0/0 character devices, `trusted.overlay.opaque=y`).
//! - [`FuseLayer`] and [`mount`]: a thin `fuser` adapter that serves a `LayerFs` on a mount point,
//!   answering metadata inline and running reads as tasks on a tokio runtime handed in by the
//!   caller. It times every request and counts errors in [`Metrics`], and rate-limits the
//!   warnings of failing reads so a container cannot flood the log.
//!
//! What it must not know: HTTP, registries, the chunk cache's internals, containerd. File content
//! arrives only through [`ChunkReader`], already decompressed and verified.

mod conn;
mod error;
mod fuse;
mod handover;
mod layer;
mod metrics;
mod mount;
mod table;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
mod warnings;

use std::future::Future;
use std::pin::Pin;

pub use conn::{ConnectionOptions, FuseConnection};
pub use error::Error;
pub use fuse::FuseLayer;
pub use handover::{HandoverReport, handover};
pub use layer::{Attr, DirEntry, FileKind, FsOptions, LayerFs, ROOT_INO, StatFs};
pub use metrics::Metrics;
pub use mount::{
    DEFAULT_READAHEAD_BYTES, MountOptions, MountedLayer, force_unmount, is_stale_mount, mount,
    readahead, serve, set_readahead,
};
pub use nix::errno::Errno;

/// A boxed future, as returned by [`ChunkReader::read_chunks`] (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where file content comes from: the decoded, verified chunks of this layer.
pub trait ChunkReader: Send + Sync + 'static {
    /// The content of the chunks at these indices of the layer's TOC chunk table, in the order
    /// asked. Indices are unique and ascending. Every returned chunk must be exactly its TOC
    /// size; the filesystem answers EIO for one that is not rather than serve wrong bytes.
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<bytes::Bytes>, ReadError>>;
}

/// Why a [`ChunkReader`] could not deliver; the filesystem answers the read with EIO.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ReadError {
    pub message: String,
}

impl ReadError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}
