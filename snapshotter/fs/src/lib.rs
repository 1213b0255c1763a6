//! The image layer filesystem of the node daemon.
//!
//! One streaming layer, presented as a read-only directory tree. Three parts live here:
//!
//! - [`LayerIndex`]: a layer's metadata in one flat buffer (the inode table built from a
//!   validated [`Toc`](streamsnap_format::Toc), flattened into fixed-width records and one pool
//!   of names), with pure lookup, getattr, readdir, readlink, xattrs and statfs over it. Saved
//!   next to the TOC and read back whole, without decoding. [`LayerFs`] is a layer built from
//!   its TOC in memory; reads ask a [`ChunkReader`] for exactly the chunks a byte range needs.
//!   Whiteouts and opaque directories are presented the way overlayfs expects (0/0 character
//!   devices, `trusted.overlay.opaque=y`).
//! - [`Layer`] and [`MetadataCache`]: a mounted layer holds its index only while it is used; the
//!   node-wide cache drops idle ones and keeps the total within a budget, and the next request
//!   loads the index again from disk.
//! - [`FuseLayer`] and [`mount`]: a thin `fuser` adapter that serves a `Layer` on a mount point,
//!   answering metadata inline and running reads as tasks on a tokio runtime handed in by the
//!   caller. It times every request and counts errors in [`Metrics`], and rate-limits the
//!   warnings of failing reads so a container cannot flood the log.
//!
//! What it must not know: HTTP, registries, the chunk cache's internals, containerd. File content
//! arrives only through [`ChunkReader`], already decompressed and verified.

mod conn;
mod error;
mod features;
mod fuse;
mod handover;
mod index;
mod layer;
mod merged;
mod metadata;
mod metrics;
mod mount;
mod ops;
mod passthrough;
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
pub use features::{KernelFeature, KernelFeatures};
pub use fuse::FuseLayer;
pub use handover::{HandoverReport, handover};
pub use index::{ChunkInfo, ChunkTable, IndexError, LayerIndex};
pub use layer::{Attr, DirEntry, FileKind, FsOptions, LayerFs, ROOT_INO, StatFs};
pub use merged::MAX_MERGED_LAYERS;
pub use metadata::{IndexFile, Layer, MetadataCache, MetadataConfig, save_index, trim_heap};
pub use metrics::Metrics;
pub use mount::{
    DEFAULT_READAHEAD_BYTES, IntoLayer, MountOptions, MountedLayer, force_unmount, is_stale_mount,
    mount, readahead, serve, set_readahead,
};
pub use nix::errno::Errno;
pub use passthrough::{PassthroughConfig, PassthroughStore};

/// A boxed future, as returned by [`ChunkReader::read_chunks`] (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where file content comes from: the decoded, verified chunks of this layer.
pub trait ChunkReader: Send + Sync + 'static {
    /// The content of the chunks at these indices of the layer's TOC chunk table, in the order
    /// asked. Indices are unique and ascending. Every returned chunk must be exactly its TOC
    /// size; the filesystem answers EIO for one that is not rather than serve wrong bytes.
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<bytes::Bytes>, ReadError>>;

    /// [`read_chunks`](Self::read_chunks) with the layer's chunk table at hand: what the
    /// filesystem calls. A reader that looks chunks up (their digest, where their frame is)
    /// reads them from `table` here instead of keeping a table of its own, so nothing but the
    /// layer's index holds the layer's metadata. The default ignores the table.
    fn read_chunks_in<'a>(
        &'a self,
        table: &'a dyn ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Result<Vec<bytes::Bytes>, ReadError>> {
        let _ = table;
        self.read_chunks(chunks)
    }

    /// The chunks at these indices if every one of them is on the node (read and verified
    /// locally, never fetched), for a passthrough copy ([`PassthroughStore`]); `None` if one is
    /// not, or cannot be read. Reads made here are not file reads: a reader that records its
    /// reads (an access trace) leaves these out. The default has nothing local.
    fn local_chunks_in<'a>(
        &'a self,
        table: &'a dyn ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Option<Vec<bytes::Bytes>>> {
        let _ = (table, chunks);
        Box::pin(async { None })
    }
}

/// An error and its sources, `: `-separated, for logs.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        out.push_str(": ");
        out.push_str(&next.to_string());
        source = next.source();
    }
    out
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
