//! The node's signature policy (`[verify]`): with trusted public keys configured, a streaming
//! artifact is used, and a start-up profile followed, only if a cosign signature referrer of its
//! manifest verifies with one of them. Without keys every artifact bound to its image is used:
//! the node then trusts whoever can push referrers into the image's repository.

use streamsnap_format::Digest;
use streamsnap_format::oci::ImageManifest;
use streamsnap_registry::{Client, Repository};
use streamsnap_trust::{
    MAX_PAYLOAD, MAX_SIGNATURES, SIGNATURE_ARTIFACT_TYPE, VerifyingKey, payload_descriptor,
};

use super::RemoteError;

/// The public keys a signature must verify with; empty means no policy.
#[derive(Clone, Debug, Default)]
pub struct TrustPolicy {
    keys: Vec<VerifyingKey>,
}

impl TrustPolicy {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys }
    }

    pub fn is_enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Ok when manifest `signed` of `repo` has a signature by a trusted key (always Ok without a
    /// policy). At most [`MAX_SIGNATURES`] signature referrers are looked at, each bounded in
    /// size before it is read.
    pub async fn check(
        &self,
        client: &Client,
        repo: &Repository,
        signed: &Digest,
    ) -> Result<(), RemoteError> {
        if !self.is_enforced() {
            return Ok(());
        }
        let unsigned = |reason: String| RemoteError::Unsigned {
            manifest: *signed,
            reason,
        };
        let referrers = client
            .referrers(repo, signed, Some(SIGNATURE_ARTIFACT_TYPE))
            .await?;
        if referrers.manifests.is_empty() {
            return Err(unsigned("it has no signature".into()));
        }
        let mut last = String::new();
        for descriptor in referrers.manifests.iter().take(MAX_SIGNATURES) {
            match self
                .check_one(client, repo, signed, &descriptor.digest)
                .await
            {
                Ok(()) => return Ok(()),
                Err(RemoteError::Registry(e)) if e.is_transient() => {
                    return Err(RemoteError::Registry(e));
                }
                Err(e) => last = format!("{}: {}", descriptor.digest, crate::error::chain(&e)),
            }
        }
        Err(unsigned(format!(
            "no signature verifies with a trusted key ({} checked; last: {last})",
            referrers.manifests.len().min(MAX_SIGNATURES)
        )))
    }

    async fn check_one(
        &self,
        client: &Client,
        repo: &Repository,
        signed: &Digest,
        signature: &Digest,
    ) -> Result<(), RemoteError> {
        let invalid = |reason: String| RemoteError::Unsigned {
            manifest: *signed,
            reason,
        };
        let fetched = client.get_manifest(repo, &signature.to_string()).await?;
        let manifest: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| invalid(e.to_string()))?;
        let payload = payload_descriptor(&manifest).map_err(|e| invalid(e.to_string()))?;
        let payload = client
            .get_blob_bytes(repo, &payload.digest, MAX_PAYLOAD)
            .await?;
        streamsnap_trust::verify(&manifest, &payload, signed, &self.keys)
            .map_err(|e| invalid(e.to_string()))
    }
}
