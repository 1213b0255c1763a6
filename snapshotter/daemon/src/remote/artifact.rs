//! Finding an image's streaming artifact, with a short-lived cache: containerd prepares every
//! layer of an image one after another, and they all share one lookup.
//!
//! An artifact is bound to the image it is used for: its `subject` must be the image manifest
//! containerd pulls (by digest), and each layer it covers must be a layer of that manifest, whose
//! diff ID (from the image config, at the layer's position) the layer's TOC must carry too
//! ([`Artifact::expect_diff_id`]). This catches mix-ups and mistakes; only a signature stops
//! someone who can push referrers and forge the claims.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use streamsnap_format::oci::{
    Descriptor, ImageConfig, ImageIndex, ImageManifest, PLATFORM_ARCHITECTURE, PLATFORM_OS,
};
use streamsnap_format::{Digest, FORMAT_VERSION, MAX_PROFILE_BLOB, Profile, media};
use streamsnap_registry::{Client, Reference, Repository};

use super::{LayerRequest, RemoteError, TrustPolicy};

/// How long a found artifact is remembered.
const FOUND_TTL: Duration = Duration::from_secs(600);
/// How long "this image has no artifact" is remembered (so an unconverted image costs one
/// lookup per pull, and a freshly converted one is found soon).
const MISSING_TTL: Duration = Duration::from_secs(30);
/// Largest artifact manifest accepted.
const MAX_ENTRIES: usize = 4096;
/// The annotation that orders start-up profiles: the newest is used.
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Largest image config read (configs with a long history are a few hundred KB).
const MAX_IMAGE_CONFIG: u64 = 4 << 20;

/// A streaming artifact: for each original layer digest, its TOC and data descriptors.
#[derive(Debug)]
pub struct Artifact {
    pub digest: Digest,
    /// Chunked (its own data blobs) or index (spans of the image's gzip layers).
    pub kind: ArtifactKind,
    pub repository: Repository,
    /// The image manifest it was checked against.
    pub subject: Digest,
    layers: HashMap<Digest, (Descriptor, Descriptor)>,
    /// The image's layers (by digest) and the diff ID its config lists for each.
    diff_ids: HashMap<Digest, Digest>,
    /// The image's newest start-up profile, if it has one that could be read. Fetched beside
    /// the layers' TOCs, not before them: only planning a layer's prefetch needs it.
    profile: ProfileFetch,
    /// Decoded bytes of the profile's chunks planned for prefetch so far (a budget per image).
    prefetch_planned: std::sync::atomic::AtomicU64,
    /// The covered layers in the artifact's (the image's) order.
    order: Vec<Digest>,
    /// When a Prepare last started resolving the layers ahead.
    resolving_ahead: Mutex<Option<Instant>>,
}

pub use streamsnap_format::media::ArtifactKind;

/// A start-up profile being fetched (by a task of its own), awaited by every layer's
/// resolution: `None` when the image has none or it could not be read.
#[derive(Clone)]
pub struct ProfileFetch(Shared<BoxFuture<'static, Option<Arc<Profile>>>>);

impl ProfileFetch {
    fn none() -> Self {
        Self(futures_util::future::ready(None).boxed().shared())
    }

    /// Fetches `fetch` in a task of its own, so it progresses before anyone awaits it; dropping
    /// every clone stops it.
    fn spawn(fetch: impl Future<Output = Option<Arc<Profile>>> + Send + 'static) -> Self {
        struct AbortOnDrop(tokio::task::JoinHandle<Option<Arc<Profile>>>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut task = AbortOnDrop(tokio::spawn(fetch));
        Self(
            async move { (&mut task.0).await.ok().flatten() }
                .boxed()
                .shared(),
        )
    }
}

impl std::fmt::Debug for ProfileFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.peek() {
            None => "pending",
            Some(None) => "none",
            Some(Some(_)) => "found",
        };
        f.write_str(state)
    }
}

impl Artifact {
    pub fn prefetch_planned(&self) -> &std::sync::atomic::AtomicU64 {
        &self.prefetch_planned
    }

    /// The layers it covers, in the image's order.
    pub fn layer_order(&self) -> &[Digest] {
        &self.order
    }

    /// True for the caller that resolves the layers ahead: the first, and again once `every`
    /// has passed (the image is pulled again while the artifact is remembered).
    pub fn begin_resolving_ahead(&self, every: Duration) -> bool {
        let mut last = self
            .resolving_ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Checks a layer's TOC claims against the image: the layer is one of the image's and the
    /// TOC names its digest and the diff ID the image config lists for it.
    pub fn expect_claims(
        &self,
        toc_digest: Digest,
        layer: Digest,
        toc_layer: Digest,
        toc_diff_id: Digest,
    ) -> Result<(), RemoteError> {
        let mismatch = |reason: String| RemoteError::ArtifactMismatch {
            artifact: self.digest,
            reason,
        };
        let expected = self
            .diff_ids
            .get(&layer)
            .ok_or_else(|| mismatch(format!("layer {layer} is not a layer of the image")))?;
        if toc_layer != layer {
            return Err(mismatch(format!(
                "TOC {toc_digest} describes layer {toc_layer}, expected {layer}"
            )));
        }
        if toc_diff_id != *expected {
            return Err(mismatch(format!(
                "TOC {toc_digest} of layer {layer} claims diff ID {toc_diff_id}, the image \
                 config lists {expected}"
            )));
        }
        Ok(())
    }

    /// The image's start-up profile, once fetched.
    pub async fn profile(&self) -> Option<Arc<Profile>> {
        self.profile.0.clone().await
    }

    pub fn layer(&self, layer: &Digest) -> Result<(&Descriptor, &Descriptor), RemoteError> {
        self.layers.get(layer).map(|(toc, data)| (toc, data)).ok_or(
            RemoteError::LayerNotInArtifact {
                artifact: self.digest,
                layer: *layer,
            },
        )
    }

    /// Reads the layer map of an artifact manifest, checking it is one of ours for `image` (the
    /// subject), and that every layer it covers is one of the image's with the same diff ID.
    fn parse(
        digest: Digest,
        kind: ArtifactKind,
        repository: Repository,
        image: &BoundImage,
        bytes: &[u8],
    ) -> Result<Self, RemoteError> {
        let invalid = |reason: String| RemoteError::InvalidArtifact {
            artifact: digest,
            reason,
        };
        let mismatch = |reason: String| RemoteError::ArtifactMismatch {
            artifact: digest,
            reason,
        };
        let manifest = referrer_manifest(bytes, kind.artifact_type(), image.manifest)?;
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
        let mut order = Vec::new();
        for pair in manifest.layers.chunks_exact(2) {
            let (toc, data) = (&pair[0], &pair[1]);
            if toc.media_type != media::TOC || data.media_type != kind.data_media_type() {
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
            let Some(expected) = image.diff_ids.get(&layer) else {
                return Err(mismatch(format!(
                    "it covers layer {layer}, which is not a layer of image {}",
                    image.manifest
                )));
            };
            let claimed = toc.annotations.get(media::ANNOTATION_LAYER_DIFF_ID);
            if claimed.and_then(|d| d.parse::<Digest>().ok()) != Some(*expected) {
                return Err(mismatch(format!(
                    "it claims diff ID {} for layer {layer}, the image config lists {expected}",
                    claimed.map_or("(none)", String::as_str)
                )));
            }
            if layers.insert(layer, (toc.clone(), data.clone())).is_none() {
                order.push(layer);
            }
        }
        Ok(Self {
            digest,
            kind,
            repository,
            subject: image.manifest,
            layers,
            diff_ids: image.diff_ids.clone(),
            profile: ProfileFetch::none(),
            prefetch_planned: Default::default(),
            order,
            resolving_ahead: Default::default(),
        })
    }
}

/// The image manifest an artifact must be bound to, and the diff ID of each of its layers.
#[derive(Debug)]
struct BoundImage {
    manifest: Digest,
    diff_ids: HashMap<Digest, Digest>,
}

impl BoundImage {
    /// Pairs the manifest's layers with the config's diff IDs, position by position.
    fn new(
        manifest: Digest,
        image: &ImageManifest,
        config: &ImageConfig,
    ) -> Result<Self, RemoteError> {
        let invalid = |reason: String| RemoteError::InvalidImage { manifest, reason };
        if image.layers.len() != config.rootfs.diff_ids.len() {
            return Err(invalid(format!(
                "{} layers but {} diff IDs in its config",
                image.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut diff_ids = HashMap::new();
        for (layer, diff_id) in image.layers.iter().zip(&config.rootfs.diff_ids) {
            if let Some(other) = diff_ids.insert(layer.digest, *diff_id)
                && other != *diff_id
            {
                return Err(invalid(format!(
                    "layer {} is listed with two diff IDs",
                    layer.digest
                )));
            }
        }
        Ok(Self { manifest, diff_ids })
    }
}

/// Reads the profile manifest `digest` (a referrer of `subject`), checked against the trust
/// policy, and its blob.
async fn fetch_profile(
    client: &Client,
    trust: &TrustPolicy,
    repo: &Repository,
    subject: Digest,
    digest: &Digest,
) -> Result<Profile, RemoteError> {
    let invalid = |reason: String| RemoteError::InvalidArtifact {
        artifact: *digest,
        reason,
    };
    trust.check(client, repo, digest).await?;
    let fetched = client.get_manifest(repo, &digest.to_string()).await?;
    let manifest = referrer_manifest(&fetched.bytes, media::PROFILE_ARTIFACT_TYPE, subject)?;
    let [layer] = manifest.layers.as_slice() else {
        return Err(invalid(format!(
            "{} layers, expected 1",
            manifest.layers.len()
        )));
    };
    if layer.media_type != media::PROFILE {
        return Err(invalid(format!("layer media type {}", layer.media_type)));
    }
    let blob = client
        .get_blob_bytes(repo, &layer.digest, MAX_PROFILE_BLOB)
        .await?;
    Profile::decode(&blob).map_err(|e| invalid(e.to_string()))
}

/// Parses a manifest that must be an `artifact_type` referrer of `subject`: malformed or of
/// another type is [`RemoteError::InvalidArtifact`], bound to another subject
/// [`RemoteError::ArtifactMismatch`].
fn referrer_manifest(
    bytes: &[u8],
    artifact_type: &str,
    subject: Digest,
) -> Result<ImageManifest, RemoteError> {
    let artifact = Digest::sha256(bytes);
    let invalid = |reason: String| RemoteError::InvalidArtifact { artifact, reason };
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.artifact_type.as_deref() != Some(artifact_type) {
        return Err(invalid(format!(
            "artifactType is {:?}",
            manifest.artifact_type
        )));
    }
    match &manifest.subject {
        Some(s) if s.digest == subject => Ok(manifest),
        other => Err(RemoteError::ArtifactMismatch {
            artifact,
            reason: format!(
                "its subject is {}, not the image manifest {subject}",
                other
                    .as_ref()
                    .map_or_else(|| "missing".to_owned(), |s| s.digest.to_string())
            ),
        }),
    }
}

enum Entry {
    Found(Arc<Artifact>, Instant),
    Missing(Instant),
    /// The artifact did not match the image (no further layer of the image is mounted from
    /// it) or is not signed as the policy asks; remembered until the instant.
    Rejected(Rejected, Instant),
}

/// Why an artifact is not used, as remembered (a [`RemoteError`] is not `Clone`).
enum Rejected {
    Mismatch { artifact: Digest, reason: String },
    Unsigned { manifest: Digest, reason: String },
}

impl Rejected {
    fn of(error: &RemoteError) -> Option<Self> {
        match error {
            RemoteError::ArtifactMismatch { artifact, reason } => Some(Self::Mismatch {
                artifact: *artifact,
                reason: reason.clone(),
            }),
            RemoteError::Unsigned { manifest, reason } => Some(Self::Unsigned {
                manifest: *manifest,
                reason: reason.clone(),
            }),
            _ => None,
        }
    }

    fn error(&self) -> RemoteError {
        match self {
            Self::Mismatch { artifact, reason } => RemoteError::ArtifactMismatch {
                artifact: *artifact,
                reason: reason.clone(),
            },
            Self::Unsigned { manifest, reason } => RemoteError::Unsigned {
                manifest: *manifest,
                reason: reason.clone(),
            },
        }
    }
}

/// Lookups by platform manifest digest, and image references resolved to manifest digests.
pub struct ArtifactCache {
    client: Client,
    trust: TrustPolicy,
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
            trust: TrustPolicy::default(),
            by_manifest: Mutex::default(),
            resolved: Mutex::default(),
        }
    }

    pub fn with_trust(mut self, trust: TrustPolicy) -> Self {
        self.trust = trust;
        self
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
            Some(Entry::Rejected(rejected, until)) if now < *until => {
                return Err(rejected.error());
            }
            _ => {}
        }
        let found = self.lookup(&repo, manifest, &request.image).await;
        let entry = match &found {
            Ok(artifact) => Entry::Found(artifact.clone(), now),
            Err(RemoteError::NoArtifact { .. }) => Entry::Missing(now),
            // A signature may be pushed soon after: looked up again as soon as for no artifact.
            Err(e) if Rejected::of(e).is_some() => {
                Entry::Rejected(Rejected::of(e).expect("checked"), now + MISSING_TTL)
            }
            Err(_) => return found, // transient or malformed: do not remember
        };
        self.by_manifest
            .lock()
            .expect("artifact cache lock")
            .insert(key, entry);
        found
    }

    /// Stops using `artifact` for its image (for as long as a found artifact
    /// is remembered): one of its layers did not match the image.
    pub fn reject(&self, artifact: &Artifact, reason: String) {
        let key = (artifact.repository.to_string(), artifact.subject);
        let rejected = Rejected::Mismatch {
            artifact: artifact.digest,
            reason,
        };
        self.by_manifest
            .lock()
            .expect("artifact cache lock")
            .insert(key, Entry::Rejected(rejected, Instant::now() + FOUND_TTL));
    }

    /// The image's artifact, with its profile on the way. Each round trip that does not need
    /// the answer of another runs beside it: the image manifest and config beside the
    /// referrers, then the artifact manifest and its trust check side by side. The profile (its
    /// check, manifest and blob: two round trips or more) goes on beside the layers' TOCs
    /// instead of holding them back: a round trip of every pull with a profile, 80 ms across
    /// regions, more with a trust policy.
    async fn lookup(
        &self,
        repo: &Repository,
        manifest: Digest,
        image: &str,
    ) -> Result<Arc<Artifact>, RemoteError> {
        let found = async {
            let referrers = self.client.referrers(repo, &manifest, None).await?;
            let version = FORMAT_VERSION.to_string();
            // The chunked kind when the image has both: its reads are cheaper.
            let (descriptor, kind) = [ArtifactKind::Chunked, ArtifactKind::Index]
                .into_iter()
                .find_map(|kind| {
                    referrers
                        .manifests
                        .iter()
                        .find(|d| {
                            d.artifact_type
                                .as_deref()
                                .and_then(ArtifactKind::of_artifact_type)
                                == Some(kind)
                                && d.annotations.get(media::ANNOTATION_FORMAT_VERSION)
                                    == Some(&version)
                        })
                        .map(|d| (d.clone(), kind))
                })
                .ok_or_else(|| RemoteError::NoArtifact {
                    image: image.to_owned(),
                })?;
            let profile = referrers
                .manifests
                .iter()
                .filter(|d| d.artifact_type.as_deref() == Some(media::PROFILE_ARTIFACT_TYPE))
                .max_by(|a, b| {
                    a.annotations
                        .get(ANNOTATION_CREATED)
                        .cmp(&b.annotations.get(ANNOTATION_CREATED))
                })
                .map(|d| d.digest);
            let profile = match profile {
                Some(digest) => {
                    let (client, trust) = (self.client.clone(), self.trust.clone());
                    let (repo, image) = (repo.clone(), image.to_owned());
                    ProfileFetch::spawn(async move {
                        match fetch_profile(&client, &trust, &repo, manifest, &digest).await {
                            Ok(profile) => {
                                tracing::debug!(image, profile = %digest, chunks = profile.len(), "found start-up profile");
                                Some(Arc::new(profile))
                            }
                            // Only a hint: without it, reads fetch on demand.
                            Err(error) => {
                                tracing::warn!(image, profile = %digest, error = %crate::error::chain(&error), "ignoring the image's start-up profile");
                                None
                            }
                        }
                    })
                }
                None => ProfileFetch::none(),
            };
            let reference = descriptor.digest.to_string();
            let (trusted, fetched) = tokio::join!(
                self.trust.check(&self.client, repo, &descriptor.digest),
                self.client.get_manifest(repo, &reference),
            );
            // Nothing fetched beside the check is used unless it passed (the profile is
            // dropped, and so stopped, with the rest).
            trusted?;
            Ok::<_, RemoteError>((kind, fetched?, profile))
        };
        let (found, bound) = tokio::join!(found, self.bound_image(repo, manifest));
        let (kind, fetched, profile) = found?;
        let mut artifact =
            Artifact::parse(fetched.digest, kind, repo.clone(), &bound?, &fetched.bytes)?;
        artifact.profile = profile;
        tracing::debug!(image, artifact = %artifact.digest, layers = artifact.layers.len(), "found streaming artifact");
        Ok(Arc::new(artifact))
    }

    /// The image manifest `manifest` (fetched by digest, so the registry cannot substitute
    /// another) with the diff IDs its config lists.
    async fn bound_image(
        &self,
        repo: &Repository,
        manifest: Digest,
    ) -> Result<BoundImage, RemoteError> {
        let invalid = |reason: String| RemoteError::InvalidImage { manifest, reason };
        let fetched = self
            .client
            .get_manifest(repo, &manifest.to_string())
            .await?;
        if !media::is_image_manifest(&fetched.media_type) {
            return Err(invalid(format!(
                "media type {} is not an image manifest",
                fetched.media_type
            )));
        }
        let image: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| invalid(e.to_string()))?;
        let config = self
            .client
            .get_blob_bytes(repo, &image.config.digest, MAX_IMAGE_CONFIG)
            .await?;
        let config: ImageConfig = serde_json::from_slice(&config)
            .map_err(|e| invalid(format!("image config {}: {e}", image.config.digest)))?;
        BoundImage::new(manifest, &image, &config)
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

#[cfg(test)]
mod tests {
    use streamsnap_format::oci::RootFs;

    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    fn image(layers: &[&str], diff_ids: &[&str]) -> (ImageManifest, ImageConfig) {
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::of(media::OCI_CONFIG, b"{}"),
            layers: layers
                .iter()
                .map(|l| Descriptor::new(media::OCI_MANIFEST, d(l), 1))
                .collect(),
            subject: None,
            annotations: Default::default(),
        };
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: diff_ids.iter().map(|x| d(x)).collect(),
            },
        };
        (manifest, config)
    }

    /// An artifact manifest for subject `subject` covering `(layer, claimed diff ID)`.
    fn artifact(subject: Digest, layers: &[(&str, &str)]) -> Vec<u8> {
        let mut descriptors = Vec::new();
        for (layer, diff_id) in layers {
            let mut toc = Descriptor::new(media::TOC, d(&format!("toc {layer}")), 1);
            toc.annotations
                .insert(media::ANNOTATION_LAYER_DIGEST.into(), d(layer).to_string());
            toc.annotations.insert(
                media::ANNOTATION_LAYER_DIFF_ID.into(),
                d(diff_id).to_string(),
            );
            descriptors.push(toc);
            descriptors.push(Descriptor::new(
                media::CHUNKS,
                d(&format!("data {layer}")),
                1,
            ));
        }
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(
            media::ANNOTATION_FORMAT_VERSION.to_owned(),
            FORMAT_VERSION.to_string(),
        );
        serde_json::to_vec(&ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: Some(media::ARTIFACT_TYPE.into()),
            config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
            layers: descriptors,
            subject: Some(Descriptor::new(media::OCI_MANIFEST, subject, 1)),
            annotations,
        })
        .unwrap()
    }

    fn repo() -> Repository {
        Repository::new("r:5000", "a")
    }

    fn parse(bound: &BoundImage, bytes: &[u8]) -> Result<Artifact, RemoteError> {
        Artifact::parse(
            Digest::sha256(bytes),
            ArtifactKind::Chunked,
            repo(),
            bound,
            bytes,
        )
    }

    #[test]
    fn an_artifact_binds_to_its_subject_layers_and_diff_ids() {
        let subject = d("manifest");
        let (manifest, config) = image(&["l0", "l1"], &["d0", "d1"]);
        let bound = BoundImage::new(subject, &manifest, &config).unwrap();
        let good = parse(&bound, &artifact(subject, &[("l0", "d0"), ("l1", "d1")])).unwrap();
        assert_eq!(good.subject, subject);
        good.expect_claims(d("t"), d("l1"), d("l1"), d("d1"))
            .unwrap();

        // Its TOC claims another diff ID, or another layer, or a layer the image lacks.
        for (layer, toc_layer, toc_diff) in
            [("l1", "l1", "d0"), ("l1", "l0", "d1"), ("lx", "lx", "d1")]
        {
            let err = good
                .expect_claims(d("t"), d(layer), d(toc_layer), d(toc_diff))
                .unwrap_err();
            assert!(matches!(err, RemoteError::ArtifactMismatch { .. }), "{err}");
        }
        // The manifest's own claims: another subject, a foreign layer, another diff ID.
        for bytes in [
            artifact(d("other manifest"), &[("l0", "d0")]),
            artifact(subject, &[("l0", "d0"), ("evil", "d1")]),
            artifact(subject, &[("l0", "d1")]),
        ] {
            let err = parse(&bound, &bytes).unwrap_err();
            assert!(matches!(err, RemoteError::ArtifactMismatch { .. }), "{err}");
            assert!(
                err.to_string().contains("does not match the image"),
                "{err}"
            );
        }
    }

    #[test]
    fn an_image_whose_config_disagrees_with_its_manifest_is_refused() {
        let (manifest, config) = image(&["l0", "l1"], &["d0"]);
        let err = BoundImage::new(d("m"), &manifest, &config).unwrap_err();
        assert!(matches!(err, RemoteError::InvalidImage { .. }), "{err}");
        let (manifest, config) = image(&["l0", "l0"], &["d0", "d1"]);
        assert!(BoundImage::new(d("m"), &manifest, &config).is_err());
        let (manifest, config) = image(&["l0", "l0"], &["d0", "d0"]);
        assert!(BoundImage::new(d("m"), &manifest, &config).is_ok());
    }

    #[test]
    fn a_rejected_artifact_is_not_used_again_for_its_image() {
        let subject = d("manifest");
        let (manifest, config) = image(&["l0"], &["d0"]);
        let bound = BoundImage::new(subject, &manifest, &config).unwrap();
        let artifact = parse(&bound, &artifact(subject, &[("l0", "d0")])).unwrap();
        let cache =
            ArtifactCache::new(Client::new(streamsnap_registry::ClientConfig::default()).unwrap());
        cache.reject(&artifact, "a TOC lied".into());
        let request = LayerRequest {
            image: "r:5000/a:1".into(),
            layer_digest: d("l0"),
            manifest_digest: Some(subject),
        };
        let err = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(cache.get(&request))
            .unwrap_err();
        assert!(err.to_string().contains("a TOC lied"), "{err}");
    }
}
