use crate::digest::Digest;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can be wrong with format data. Variants say which item is wrong and why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid digest {value:?}: {reason}")]
    InvalidDigest { value: String, reason: &'static str },

    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },

    #[error("chunk {index}: {reason}")]
    InvalidChunk { index: usize, reason: String },

    #[error("chunk {digest}: content does not match its digest (got {actual})")]
    ChunkDigestMismatch { digest: Digest, actual: Digest },

    #[error("chunk {digest}: the zstd frame declares {declared} bytes, the TOC says {expected}")]
    ChunkFrameSize {
        digest: Digest,
        declared: u64,
        expected: u32,
    },

    #[error("chunk {digest}: corrupt zstd frame")]
    ChunkDecompress {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },

    #[error("chunk {digest}: the gzip span does not inflate: {reason}")]
    SpanDecompress { digest: Digest, reason: String },

    #[error("checkpoint window: {0}")]
    InvalidWindow(String),

    #[error("toc: unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },

    #[error("toc: corrupt zstd frame")]
    TocDecompress(#[source] std::io::Error),

    /// A TOC over one of the limits of docs/format.md ("Limits"), found before it was decoded.
    #[error("toc: {what} {value} exceeds the limit of {limit}")]
    TocLimit {
        what: &'static str,
        value: u64,
        limit: u64,
    },

    #[error("toc: malformed protobuf")]
    TocDecode(#[from] prost::DecodeError),

    #[error("toc: {0}")]
    InvalidToc(String),

    #[error("start-up profile: {0}")]
    InvalidProfile(String),

    #[error("toc entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },

    #[error("entry {path:?}: read of {len} bytes at {offset} is past the end ({size} bytes)")]
    ReadPastEnd {
        path: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}
