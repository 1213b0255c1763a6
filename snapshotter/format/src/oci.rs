//! The OCI image-spec JSON documents streamsnap reads and writes (and their Docker v2 twins,
//! which share the same shape). Unknown fields are ignored on read, as the spec asks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub type Annotations = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Annotations,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.into(),
            digest,
            size,
            artifact_type: None,
            urls: Vec::new(),
            platform: None,
            annotations: Annotations::new(),
        }
    }

    /// The descriptor of `data` with `media_type`.
    pub fn of(media_type: impl Into<String>, data: &[u8]) -> Self {
        Self::new(media_type, Digest::sha256(data), data.len() as u64)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Annotations,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Annotations,
}

/// The one platform streaming artifacts are made for.
pub const PLATFORM_OS: &str = "linux";
pub const PLATFORM_ARCHITECTURE: &str = "amd64";

impl ImageIndex {
    /// The first image manifest of this index for `os`/`architecture` (any variant).
    pub fn manifest_for(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            crate::media::is_image_manifest(&d.media_type)
                && d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }

    /// The platforms this index lists, for messages: "linux/arm64/v8, unknown" ("none" when
    /// empty).
    pub fn platforms(&self) -> String {
        let mut platforms: Vec<String> = self
            .manifests
            .iter()
            .map(|d| {
                d.platform
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), ToString::to_string)
            })
            .collect();
        platforms.dedup();
        if platforms.is_empty() {
            "none".into()
        } else {
            platforms.join(", ")
        }
    }

    /// An empty OCI index, as the referrers API and the fallback tag hold.
    pub fn empty() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(crate::media::OCI_INDEX.to_owned()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: Annotations::new(),
        }
    }
}

/// The parts of an image configuration streamsnap needs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_serializes_with_oci_field_names_and_skips_empty_fields() {
        let d = Descriptor::of(crate::media::OCI_EMPTY, crate::media::OCI_EMPTY_CONTENT);
        assert_eq!(d.digest.to_string(), crate::media::OCI_EMPTY_DIGEST);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{}","size":2}}"#,
                crate::media::OCI_EMPTY_DIGEST
            )
        );
    }

    #[test]
    fn manifest_parse_ignores_unknown_fields_and_rejects_bad_digests() {
        let good = r#"{"schemaVersion":2,"x":1,"config":{"mediaType":"a","size":2,
            "digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
            "layers":[]}"#;
        let m: ImageManifest = serde_json::from_str(good).unwrap();
        assert_eq!(m.config.size, 2);
        let bad = good.replace("sha256:4413", "sha256:zz13");
        assert!(serde_json::from_str::<ImageManifest>(&bad).is_err());
    }
}
