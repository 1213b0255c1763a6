use streamsnap_format::Digest;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] streamsnap_registry::Error),

    #[error(
        "{image}: no linux/amd64 image in this index (it has: {platforms}); streaming artifacts are made for linux/amd64 only"
    )]
    UnsupportedPlatform { image: String, platforms: String },

    #[error("{image}: this is a streaming artifact already; convert the image it was made from")]
    AlreadyStreamingArtifact { image: String },

    #[error(
        "{image}: unsupported manifest media type {media_type:?} (supported: OCI and Docker v2 image manifests and indexes)"
    )]
    UnsupportedManifest { image: String, media_type: String },

    #[error("{image}: malformed {what}")]
    MalformedManifest {
        image: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{image}: {reason}")]
    InvalidImage { image: String, reason: String },

    #[error(
        "layer {digest}: unsupported media type {media_type:?} (supported: tar, tar+gzip, tar+zstd)"
    )]
    UnsupportedLayer { digest: Digest, media_type: String },

    #[error(
        "layer {digest}: {reason}; convert the image with the chunked kind (`--kind chunked`) instead"
    )]
    IndexUnsupported { digest: Digest, reason: String },

    #[error("layer {digest}: corrupt or truncated layer data")]
    CorruptLayer {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },

    #[error("layer {layer}: entry {path:?}: {reason}")]
    BadEntry {
        layer: Digest,
        path: String,
        reason: String,
    },

    #[error("layer {digest}: more than {limit} tar entries")]
    TooManyEntries { digest: Digest, limit: usize },

    #[error("layer {digest}: uncompressed size exceeds the limit of {limit} bytes")]
    LayerTooLarge { digest: Digest, limit: u64 },

    #[error("layer {expected}: the registry sent content with digest {actual}")]
    LayerDigestMismatch { expected: Digest, actual: Digest },

    #[error(
        "layer {layer}: uncompressed content has digest {actual}, the image config says {expected}"
    )]
    DiffIdMismatch {
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },

    #[error("layer {layer}: produced an invalid table of contents (a bug in streamsnap)")]
    InvalidOutput {
        layer: Digest,
        #[source]
        source: streamsnap_format::Error,
    },

    #[error("a layer has more than 2^32 distinct chunks")]
    TooManyChunks,

    #[error("chunk compression failed")]
    Compress(#[source] std::io::Error),

    #[error("writing the chunk data blob failed")]
    WriteBlob {
        #[source]
        source: std::io::Error,
    },

    #[error("the chunk pipeline stopped early")]
    ChunkPipelineStopped,

    #[error("{context}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("conversion canceled")]
    Canceled,

    #[error("serializing a manifest")]
    Serialize(#[source] serde_json::Error),

    #[error("signing")]
    Sign(#[source] streamsnap_trust::Error),
}
