//! Resolving the image to convert: manifest (through an index when there is one), config and
//! layers, with the compatibility rules applied before any layer is read.

use streamsnap_format::Digest;
use streamsnap_format::media::{self, LayerCompression};
use streamsnap_format::oci::{Descriptor, ImageConfig, ImageIndex, ImageManifest};
use streamsnap_registry::{Client, Manifest, Reference};

use crate::error::{Error, Result};
use crate::layer::LayerSource;

/// Largest image config accepted.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// Largest layer blob accepted: a descriptor claiming more is malformed, not big.
const MAX_LAYER_BLOB_SIZE: u64 = 1 << 40;

pub use streamsnap_format::oci::{PLATFORM_ARCHITECTURE, PLATFORM_OS};

/// A linux/amd64 image manifest ready to convert.
#[derive(Debug)]
pub struct SourceImage {
    /// The manifest the artifact will refer to (the platform manifest, not an index).
    pub manifest: Manifest,
    /// Digest of the index it was picked from, if the reference named an index.
    pub index: Option<Digest>,
    pub layers: Vec<SourceLayer>,
}

#[derive(Debug, Clone)]
pub struct SourceLayer {
    pub descriptor: Descriptor,
    pub source: LayerSource,
}

impl SourceImage {
    /// Descriptor of the manifest, as the artifact's `subject`.
    pub fn subject(&self) -> Descriptor {
        Descriptor::new(
            self.manifest.media_type.clone(),
            self.manifest.digest,
            self.manifest.bytes.len() as u64,
        )
    }

    /// Sum of the compressed layer sizes: the work to do.
    pub fn total_layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.descriptor.size).sum()
    }
}

/// Fetches and checks `reference`: linux/amd64 only, an index resolves to its linux/amd64
/// entry, a streaming artifact is refused, layers must be tar, tar+gzip or tar+zstd.
pub async fn resolve(client: &Client, reference: &Reference) -> Result<SourceImage> {
    let image = reference.to_string();
    let repo = &reference.repository;
    let mut manifest = client.get_manifest(repo, &reference.reference()).await?;
    let mut index = None;
    if media::is_index(&manifest.media_type) {
        let parsed: ImageIndex =
            serde_json::from_slice(&manifest.bytes).map_err(|source| Error::MalformedManifest {
                image: image.clone(),
                what: "image index",
                source,
            })?;
        let entry = pick_platform(&image, &parsed)?;
        index = Some(manifest.digest);
        manifest = client.get_manifest(repo, &entry.digest.to_string()).await?;
        if !media::is_image_manifest(&manifest.media_type) {
            return Err(Error::UnsupportedManifest {
                image,
                media_type: manifest.media_type,
            });
        }
    } else if !media::is_image_manifest(&manifest.media_type) {
        return Err(Error::UnsupportedManifest {
            image,
            media_type: manifest.media_type,
        });
    }
    let parsed: ImageManifest =
        serde_json::from_slice(&manifest.bytes).map_err(|source| Error::MalformedManifest {
            image: image.clone(),
            what: "image manifest",
            source,
        })?;
    check_is_image(&image, &parsed)?;

    let config_bytes = client
        .get_blob_bytes(repo, &parsed.config.digest, MAX_CONFIG_SIZE)
        .await?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|source| Error::MalformedManifest {
            image: image.clone(),
            what: "image config",
            source,
        })?;
    if config.os != PLATFORM_OS || config.architecture != PLATFORM_ARCHITECTURE {
        return Err(Error::UnsupportedPlatform {
            image,
            platforms: format!("{}/{}", config.os, config.architecture),
        });
    }
    if config.rootfs.diff_ids.len() != parsed.layers.len() {
        return Err(Error::InvalidImage {
            image,
            reason: format!(
                "the manifest lists {} layers but the config has {} diff IDs",
                parsed.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        });
    }
    let layers = parsed
        .layers
        .into_iter()
        .zip(config.rootfs.diff_ids)
        .map(|(descriptor, diff_id)| {
            let compression = LayerCompression::from_media_type(&descriptor.media_type)
                .ok_or_else(|| Error::UnsupportedLayer {
                    digest: descriptor.digest,
                    media_type: descriptor.media_type.clone(),
                })?;
            if descriptor.size > MAX_LAYER_BLOB_SIZE {
                return Err(Error::InvalidImage {
                    image: image.clone(),
                    reason: format!(
                        "layer {} claims an absurd size of {} bytes",
                        descriptor.digest, descriptor.size
                    ),
                });
            }
            let source = LayerSource {
                digest: descriptor.digest,
                compression,
                diff_id,
            };
            Ok(SourceLayer { descriptor, source })
        })
        .collect::<Result<_>>()?;
    Ok(SourceImage {
        manifest,
        index,
        layers,
    })
}

fn pick_platform<'a>(image: &str, index: &'a ImageIndex) -> Result<&'a Descriptor> {
    index
        .manifest_for(PLATFORM_OS, PLATFORM_ARCHITECTURE)
        .ok_or_else(|| Error::UnsupportedPlatform {
            image: image.to_owned(),
            platforms: index.platforms(),
        })
}

fn check_is_image(image: &str, manifest: &ImageManifest) -> Result<()> {
    let is_streaming = manifest.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE)
        || manifest
            .layers
            .iter()
            .any(|l| l.media_type == media::TOC || l.media_type == media::CHUNKS);
    if is_streaming {
        return Err(Error::AlreadyStreamingArtifact {
            image: image.to_owned(),
        });
    }
    let config_type = manifest.config.media_type.as_str();
    if config_type != media::OCI_CONFIG && config_type != media::DOCKER_CONFIG {
        return Err(Error::InvalidImage {
            image: image.to_owned(),
            reason: format!(
                "not a container image (config media type {config_type:?}{})",
                manifest
                    .artifact_type
                    .as_deref()
                    .map(|t| format!(", artifactType {t:?}"))
                    .unwrap_or_default()
            ),
        });
    }
    Ok(())
}
