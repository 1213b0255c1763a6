//! Media types, artifact type and annotation keys: the names the artifact is found and read by.

/// `artifactType` of a streaming artifact manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.streamsnap.streaming.v1";
/// A streaming layer's table of contents: protobuf `streamsnap.toc.v1.Toc`, zstd-compressed.
pub const TOC: &str = "application/vnd.streamsnap.toc.v1.protobuf+zstd";
/// A streaming layer's data blob: independently zstd-compressed chunks, back to back.
pub const CHUNKS: &str = "application/vnd.streamsnap.chunks.v1+zstd";

/// `artifactType` of an index-only streaming artifact: per gzip layer a TOC of spans of the
/// ORIGINAL layer blob and a checkpoints blob; no copy of the content (docs/format.md).
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.streamsnap.streaming.index.v1";
/// An index layer's checkpoints blob: decompression windows, one zstd frame each.
pub const CHECKPOINTS: &str = "application/vnd.streamsnap.checkpoints.v1+zstd";

/// The two kinds of streaming artifact (docs/format.md): what the converter makes, the service
/// keeps per repository, and the node reads. Named `chunked` and `index` on the command line, in
/// the service's API (serde) and in the console.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// The layers' content in independently compressed chunks: a second copy of the image,
    /// the fastest to read and any layer compression.
    #[default]
    Chunked,
    /// Only an index over the ORIGINAL gzip layers (TOC and decompression checkpoints): no
    /// second copy; gzip layers only.
    Index,
}

impl ArtifactKind {
    pub const ALL: [Self; 2] = [Self::Chunked, Self::Index];

    /// The artifact manifest's `artifactType`.
    pub fn artifact_type(self) -> &'static str {
        match self {
            Self::Chunked => ARTIFACT_TYPE,
            Self::Index => INDEX_ARTIFACT_TYPE,
        }
    }

    /// The kind of an `artifactType`, if it is a streaming artifact's.
    pub fn of_artifact_type(artifact_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.artifact_type() == artifact_type)
    }

    /// The media type of the second blob of each layer pair (after the TOC).
    pub fn data_media_type(self) -> &'static str {
        match self {
            Self::Chunked => CHUNKS,
            Self::Index => CHECKPOINTS,
        }
    }

    /// Its name on the command line, in the service's API and in the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chunked => "chunked",
            Self::Index => "index",
        }
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ArtifactKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown artifact kind {s:?} (chunked or index)"))
    }
}

/// `artifactType` of a start-up profile manifest (see [`Profile`](crate::Profile)).
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.streamsnap.profile.v1";
/// A start-up profile blob: JSON, [`Profile`](crate::Profile).
pub const PROFILE: &str = "application/vnd.streamsnap.profile.v1+json";

/// Manifest annotation: the format version the artifact was written in.
pub const ANNOTATION_FORMAT_VERSION: &str = "io.streamsnap.format.version";
/// Manifest annotation: digest of the image manifest the artifact was made from.
pub const ANNOTATION_SOURCE_MANIFEST: &str = "io.streamsnap.source.manifest";
/// Layer annotation (on TOC and data descriptors): digest of the original layer blob.
pub const ANNOTATION_LAYER_DIGEST: &str = "io.streamsnap.layer.digest";
/// Layer annotation (on TOC and data descriptors): diff ID of the original layer.
pub const ANNOTATION_LAYER_DIFF_ID: &str = "io.streamsnap.layer.diffid";
/// Manifest annotation: version of the streamsnap build that converted the image.
pub const ANNOTATION_CONVERTER: &str = "io.streamsnap.converter";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_SCHEMA1_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The content of the OCI empty descriptor, and its digest.
pub const OCI_EMPTY_CONTENT: &[u8] = b"{}";
pub const OCI_EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// Every manifest and index media type, for an `Accept` header. Some registries (distribution
/// 2.8) answer 404 for a manifest whose media type the request does not accept.
pub const MANIFEST_ACCEPT: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub fn is_image_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// How an image layer's tar stream is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// `None` for media types that are not image layers this build can read (foreign or
    /// non-distributable layers, encrypted layers, other artifacts).
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_one_name_one_artifact_type_and_one_serde_form() {
        for kind in ArtifactKind::ALL {
            assert_eq!(kind.as_str().parse::<ArtifactKind>(), Ok(kind));
            assert_eq!(
                ArtifactKind::of_artifact_type(kind.artifact_type()),
                Some(kind)
            );
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<ArtifactKind>(&json).unwrap(), kind);
        }
        assert_eq!(ArtifactKind::of_artifact_type(PROFILE_ARTIFACT_TYPE), None);
        assert!("zstd".parse::<ArtifactKind>().is_err());
    }
}
