//! The streaming artifact format, version 1 (specified in docs/format.md).
//!
//! This is the innermost layer of streamsnap: the table of contents (TOC) and chunk table of a
//! streaming layer, the media types and annotations of the artifact, content digests and the OCI
//! manifest types the artifact is written in. It is pure: no I/O, no network, no async runtime.
//! Everything that reads bytes from somewhere hands them to this crate as slices.

pub mod api;
mod chunk;
mod digest;
mod error;
pub mod gzip;
mod limits;
pub mod media;
pub mod oci;
mod path;
mod profile;
mod toc;

pub use api::Codec;
pub use chunk::{
    MAX_CHUNK_RATIO, MAX_CHUNK_SIZE, compress_chunk, decode_chunk, max_compressed_size,
};
pub use digest::{Digest, DigestHasher};
pub use error::{Error, Result};
pub use limits::{
    MAX_TOC_CHUNKS, MAX_TOC_DECODED_RATIO, MAX_TOC_DECODED_SIZE, MAX_TOC_ENTRIES, MAX_TOC_EXTENTS,
    MAX_TOC_MEMORY, MAX_TOC_MEMORY_RATIO, MAX_TOC_XATTRS, TOC_DECODED_FREE, TOC_MEMORY_FREE,
};
pub use path::{normalize_tar_path, validate_path};
pub use profile::{LayerProfile, MAX_PROFILE_BLOB, PROFILE_VERSION, Profile};
pub use toc::{FORMAT_VERSION, Piece, Toc, encode_toc, pieces_of_extents, tar_name};
