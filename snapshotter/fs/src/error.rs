use std::path::PathBuf;

use streamsnap_format::Digest;

use crate::index::IndexError;

/// Why a layer's TOC cannot be presented as a filesystem, or its metadata not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer root entry is a {kind}, not a directory: the layer cannot be mounted")]
    RootNotDirectory { kind: &'static str },

    #[error("toc has {count} entries, more than a layer filesystem can index ({max})")]
    TooManyEntries { count: usize, max: usize },

    #[error("layer index would have {count} {what}, more than its format holds")]
    IndexTooLarge { what: &'static str, count: u64 },

    #[error("layer index is invalid: {reason}")]
    InvalidIndex { reason: String },

    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("saved TOC {} does not match its digest {expected}", path.display())]
    TocDigest { path: PathBuf, expected: Digest },

    #[error("saved TOC {} is invalid", path.display())]
    Toc {
        path: PathBuf,
        #[source]
        source: Box<streamsnap_format::Error>,
    },

    #[error("layer index {} cannot be used", path.display())]
    Index {
        path: PathBuf,
        #[source]
        source: Box<IndexError>,
    },
}
