//! What the console reads from the registry to show a repository: its tags, each tag's
//! manifest, and the referrers that say whether an image has a streaming artifact, a signature
//! and a start-up profile. Lookups for one page run a few at a time, and every list is bounded.

use std::sync::Arc;

use streamsnap_format::oci::Descriptor;
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, Repository};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::api::{Operation, OperationState};

/// Tags shown on a repository page at most (the first, in name order).
pub const MAX_TAGS: usize = 200;
/// Registry lookups in flight at once for one page.
const PARALLEL: usize = 8;
/// The OCI annotation of a creation time.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// One tag and what is known of its manifest.
#[derive(Clone, Debug)]
pub struct TagRow {
    pub tag: String,
    /// The manifest, or why it could not be read.
    pub manifest: Result<Descriptor, String>,
    /// Whether a streaming artifact refers to the image (or, for an index, to the entry an
    /// operation converted).
    pub artifact: Option<Digest>,
    /// Compressed size of an image (config and layers); `None` for an index or when the
    /// manifest could not be parsed.
    pub image_size: Option<u64>,
    pub signature: bool,
    pub profile: bool,
    /// Why the referrers could not be read, if they could not.
    pub referrers_error: Option<String>,
}

/// Whether a tag is a referrers fallback index (`sha256-<64 hex>`), not an image.
pub fn is_fallback_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The manifest a streaming artifact of `manifest` refers to: the linux/amd64 entry an
/// operation converted when `manifest` is an index, else `manifest` itself.
pub fn subject_of(manifest: &Digest, operations: &[Operation]) -> Digest {
    operations
        .iter()
        .find(|op| {
            op.manifest_digest == *manifest
                && op.state == OperationState::Succeeded
                && op.subject_digest.is_some()
        })
        .and_then(|op| op.subject_digest)
        .unwrap_or(*manifest)
}

/// Looks up every tag of `tags` (already bounded by the caller).
pub async fn tag_rows(
    client: &Client,
    repo: &Repository,
    tags: Vec<String>,
    operations: Arc<Vec<Operation>>,
) -> Vec<TagRow> {
    let limit = Arc::new(Semaphore::new(PARALLEL));
    let mut set = JoinSet::new();
    for (i, tag) in tags.into_iter().enumerate() {
        let (client, repo, ops, limit) = (
            client.clone(),
            repo.clone(),
            operations.clone(),
            limit.clone(),
        );
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, tag_row(&client, &repo, tag, &ops).await)
        });
    }
    let mut rows = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(row) = joined {
            rows.push(row);
        }
    }
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter().map(|(_, row)| row).collect()
}

async fn tag_row(client: &Client, repo: &Repository, tag: String, ops: &[Operation]) -> TagRow {
    let mut row = TagRow {
        manifest: Err(String::new()),
        tag,
        artifact: None,
        image_size: None,
        signature: false,
        profile: false,
        referrers_error: None,
    };
    let manifest = match client.head_manifest(repo, &row.tag).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            row.manifest = Err("the tag was deleted meanwhile".into());
            return row;
        }
        Err(e) => {
            row.manifest = Err(crate::error::chain(&e));
            return row;
        }
    };
    let subject = subject_of(&manifest.digest, ops);
    if matches!(
        manifest.media_type.as_str(),
        media::OCI_MANIFEST | media::DOCKER_MANIFEST
    ) {
        row.image_size = image_size(client, repo, &manifest.digest).await;
    }
    row.manifest = Ok(manifest);
    match flags(client, repo, &subject).await {
        Ok((artifact, signature, profile)) => {
            row.artifact = artifact;
            row.signature = signature;
            row.profile = profile;
        }
        Err(e) => row.referrers_error = Some(e),
    }
    row
}

/// (streaming artifact, signed, has a profile) of `subject`: the signature may sign the image
/// or its streaming artifact (what `serve --sign-key` signs).
pub async fn flags(
    client: &Client,
    repo: &Repository,
    subject: &Digest,
) -> Result<(Option<Digest>, bool, bool), String> {
    let referrers = client
        .referrers(repo, subject, None)
        .await
        .map_err(|e| crate::error::chain(&e))?
        .manifests;
    let of_type = |t: &str| {
        referrers
            .iter()
            .find(|d| d.artifact_type.as_deref() == Some(t))
    };
    let artifact = of_type(media::ARTIFACT_TYPE).map(|d| d.digest);
    let profile = of_type(media::PROFILE_ARTIFACT_TYPE).is_some();
    let mut signature = of_type(streamsnap_trust::SIGNATURE_ARTIFACT_TYPE).is_some();
    if !signature && let Some(artifact) = &artifact {
        signature = client
            .referrers(
                repo,
                artifact,
                Some(streamsnap_trust::SIGNATURE_ARTIFACT_TYPE),
            )
            .await
            .is_ok_and(|r| !r.manifests.is_empty());
    }
    Ok((artifact, signature, profile))
}

/// Compressed size of an image manifest's config and layers (what a pull downloads).
async fn image_size(client: &Client, repo: &Repository, digest: &Digest) -> Option<u64> {
    let manifest = client.get_manifest(repo, &digest.to_string()).await.ok()?;
    let parsed: streamsnap_format::oci::ImageManifest =
        serde_json::from_slice(&manifest.bytes).ok()?;
    Some(parsed.config.size + parsed.layers.iter().map(|l| l.size).sum::<u64>())
}

/// Bytes a streaming artifact adds to the registry: its manifest, config and layers.
pub async fn artifact_size(
    client: &Client,
    repo: &Repository,
    artifact: &Digest,
) -> Result<u64, String> {
    let manifest = client
        .get_manifest(repo, &artifact.to_string())
        .await
        .map_err(|e| crate::error::chain(&e))?;
    let parsed: streamsnap_format::oci::ImageManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| format!("artifact {artifact} is not an image manifest: {e}"))?;
    Ok(manifest.bytes.len() as u64
        + parsed.config.size
        + parsed.layers.iter().map(|l| l.size).sum::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_are_not_images() {
        let d = Digest::sha256(b"x");
        assert!(is_fallback_tag(&streamsnap_registry::fallback_tag(&d)));
        assert!(!is_fallback_tag("sha256-abc"));
        assert!(!is_fallback_tag("v1"));
    }
}
