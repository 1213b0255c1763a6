//! Finding an image's streaming artifact, with a short-lived cache: containerd prepares every
//! layer of an image one after another, and they all share one lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamsnap_format::oci::{
    Descriptor, ImageIndex, ImageManifest, PLATFORM_ARCHITECTURE, PLATFORM_OS,
};
use streamsnap_format::{Digest, FORMAT_VERSION, MAX_PROFILE_BLOB, Profile, media};
use streamsnap_registry::{Client, Reference, Repository};

use super::{LayerRequest, RemoteError};

/// How long a found artifact is remembered.
const FOUND_TTL: Duration = Duration::from_secs(600);
/// How long "this image has no artifact" is remembered (so an unconverted image costs one
/// lookup per pull, and a freshly converted one is found soon).
const MISSING_TTL: Duration = Duration::from_secs(30);
/// Largest artifact manifest accepted.
const MAX_ENTRIES: usize = 4096;
/// The annotation that orders start-up profiles: the newest is used.
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// A streaming artifact: for each original layer digest, its TOC and data descriptors.
#[derive(Debug)]
pub struct Artifact {
    pub digest: Digest,
    pub repository: Repository,
    layers: HashMap<Digest, (Descriptor, Descriptor)>,
    /// The image's newest start-up profile, if it has one that could be read.
    profile: Option<Profile>,
}

impl Artifact {
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    pub fn layer(&self, layer: &Digest) -> Result<(&Descriptor, &Descriptor), RemoteError> {
        self.layers.get(layer).map(|(toc, data)| (toc, data)).ok_or(
            RemoteError::LayerNotInArtifact {
                artifact: self.digest,
                layer: *layer,
            },
        )
    }

    /// Reads the layer map of an artifact manifest, checking it is one of ours for `subject`.
    fn parse(
        digest: Digest,
        repository: Repository,
        subject: Digest,
        bytes: &[u8],
    ) -> Result<Self, RemoteError> {
        let invalid = |reason: String| RemoteError::InvalidArtifact {
            artifact: digest,
            reason,
        };
        let manifest = referrer_manifest(bytes, media::ARTIFACT_TYPE, subject).map_err(invalid)?;
        let version = manifest.annotations.get(media::ANNOTATION_FORMAT_VERSION);
        if version != Some(&FORMAT_VERSION.to_string()) {
            return Err(invalid(format!(
                "format version {version:?} is not supported (this node reads {FORMAT_VERSION})"
            )));
        }
        if !manifest.layers.len().is_multiple_of(2) || manifest.layers.len() > 2 * MAX_ENTRIES {
            return Err(invalid(format!(
                "{} layer descriptors",
                manifest.layers.len()
            )));
        }
        let mut layers = HashMap::new();
        for pair in manifest.layers.chunks_exact(2) {
            let (toc, data) = (&pair[0], &pair[1]);
            if toc.media_type != media::TOC || data.media_type != media::CHUNKS {
                return Err(invalid(format!(
                    "unexpected media types {} and {}",
                    toc.media_type, data.media_type
                )));
            }
            let layer: Digest = toc
                .annotations
                .get(media::ANNOTATION_LAYER_DIGEST)
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| {
                    invalid(format!("TOC {} has no layer digest annotation", toc.digest))
                })?;
            layers.insert(layer, (toc.clone(), data.clone()));
        }
        Ok(Self {
            digest,
            repository,
            layers,
            profile: None,
        })
    }
}

/// Parses a manifest that must be an `artifact_type` referrer of `subject`; the error is why not.
fn referrer_manifest(
    bytes: &[u8],
    artifact_type: &str,
    subject: Digest,
) -> Result<ImageManifest, String> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if manifest.artifact_type.as_deref() != Some(artifact_type) {
        return Err(format!("artifactType is {:?}", manifest.artifact_type));
    }
    if manifest.subject.as_ref().map(|s| s.digest) != Some(subject) {
        return Err(format!("its subject is not {subject}"));
    }
    Ok(manifest)
}

enum Entry {
    Found(Arc<Artifact>, Instant),
    Missing(Instant),
}

/// Lookups by platform manifest digest, and image references resolved to manifest digests.
pub struct ArtifactCache {
    client: Client,
    by_manifest: Mutex<HashMap<(String, Digest), Entry>>,
    resolved: Mutex<HashMap<String, (Digest, Instant)>>,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache").finish_non_exhaustive()
    }
}

impl ArtifactCache {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            by_manifest: Mutex::default(),
            resolved: Mutex::default(),
        }
    }

    /// The artifact of the image the request names.
    pub async fn get(&self, request: &LayerRequest) -> Result<Arc<Artifact>, RemoteError> {
        let reference = Reference::parse(&request.image).map_err(RemoteError::Reference)?;
        let repo = reference.repository.clone();
        let manifest = match request.manifest_digest {
            Some(digest) => digest,
            None => self.resolve(&reference).await?,
        };
        let key = (repo.to_string(), manifest);
        let now = Instant::now();
        match self
            .by_manifest
            .lock()
            .expect("artifact cache lock")
            .get(&key)
        {
            Some(Entry::Found(artifact, at)) if now.duration_since(*at) < FOUND_TTL => {
                return Ok(artifact.clone());
            }
            Some(Entry::Missing(at)) if now.duration_since(*at) < MISSING_TTL => {
                return Err(RemoteError::NoArtifact {
                    image: request.image.clone(),
                });
            }
            _ => {}
        }
        let found = self.lookup(&repo, manifest, &request.image).await;
        let entry = match &found {
            Ok(artifact) => Entry::Found(artifact.clone(), now),
            Err(RemoteError::NoArtifact { .. }) => Entry::Missing(now),
            Err(_) => return found, // transient or malformed: do not remember
        };
        self.by_manifest
            .lock()
            .expect("artifact cache lock")
            .insert(key, entry);
        found
    }

    async fn lookup(
        &self,
        repo: &Repository,
        manifest: Digest,
        image: &str,
    ) -> Result<Arc<Artifact>, RemoteError> {
        let referrers = self.client.referrers(repo, &manifest, None).await?;
        let version = FORMAT_VERSION.to_string();
        let descriptor = referrers
            .manifests
            .iter()
            .find(|d| {
                d.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE)
                    && d.annotations.get(media::ANNOTATION_FORMAT_VERSION) == Some(&version)
            })
            .ok_or_else(|| RemoteError::NoArtifact {
                image: image.to_owned(),
            })?;
        let fetched = self
            .client
            .get_manifest(repo, &descriptor.digest.to_string())
            .await?;
        let mut artifact = Artifact::parse(fetched.digest, repo.clone(), manifest, &fetched.bytes)?;
        let profile = referrers
            .manifests
            .iter()
            .filter(|d| d.artifact_type.as_deref() == Some(media::PROFILE_ARTIFACT_TYPE))
            .max_by(|a, b| {
                a.annotations
                    .get(ANNOTATION_CREATED)
                    .cmp(&b.annotations.get(ANNOTATION_CREATED))
            });
        if let Some(descriptor) = profile {
            // Only a hint: without it, reads fetch on demand.
            match self.profile(repo, manifest, &descriptor.digest).await {
                Ok(profile) => {
                    tracing::debug!(image, profile = %descriptor.digest, chunks = profile.len(), "found start-up profile");
                    artifact.profile = Some(profile);
                }
                Err(error) => {
                    tracing::warn!(image, profile = %descriptor.digest, error = %crate::error::chain(&error), "ignoring the image's start-up profile")
                }
            }
        }
        tracing::debug!(image, artifact = %artifact.digest, layers = artifact.layers.len(), "found streaming artifact");
        Ok(Arc::new(artifact))
    }

    /// Reads the profile manifest `digest` (a referrer of `subject`) and its blob.
    async fn profile(
        &self,
        repo: &Repository,
        subject: Digest,
        digest: &Digest,
    ) -> Result<Profile, RemoteError> {
        let invalid = |reason: String| RemoteError::InvalidArtifact {
            artifact: *digest,
            reason,
        };
        let fetched = self.client.get_manifest(repo, &digest.to_string()).await?;
        let manifest = referrer_manifest(&fetched.bytes, media::PROFILE_ARTIFACT_TYPE, subject)
            .map_err(invalid)?;
        let [layer] = manifest.layers.as_slice() else {
            return Err(invalid(format!(
                "{} layers, expected 1",
                manifest.layers.len()
            )));
        };
        if layer.media_type != media::PROFILE {
            return Err(invalid(format!("layer media type {}", layer.media_type)));
        }
        let blob = self
            .client
            .get_blob_bytes(repo, &layer.digest, MAX_PROFILE_BLOB)
            .await?;
        Profile::decode(&blob).map_err(|e| invalid(e.to_string()))
    }

    /// The linux/amd64 manifest digest a reference (tag or digest, image or index) names.
    async fn resolve(&self, reference: &Reference) -> Result<Digest, RemoteError> {
        let key = reference.to_string();
        let now = Instant::now();
        if let Some((digest, at)) = self.resolved.lock().expect("resolve cache lock").get(&key)
            && now.duration_since(*at) < MISSING_TTL
        {
            return Ok(*digest);
        }
        let repo = &reference.repository;
        let mut manifest = self
            .client
            .get_manifest(repo, &reference.reference())
            .await?;
        if media::is_index(&manifest.media_type) {
            let index: ImageIndex = serde_json::from_slice(&manifest.bytes).map_err(|e| {
                RemoteError::InvalidArtifact {
                    artifact: manifest.digest,
                    reason: format!("image index: {e}"),
                }
            })?;
            let entry = index
                .manifest_for(PLATFORM_OS, PLATFORM_ARCHITECTURE)
                .ok_or_else(|| RemoteError::NoPlatform { image: key.clone() })?;
            manifest = self
                .client
                .get_manifest(repo, &entry.digest.to_string())
                .await?;
        }
        self.resolved
            .lock()
            .expect("resolve cache lock")
            .insert(key, (manifest.digest, now));
        Ok(manifest.digest)
    }
}
