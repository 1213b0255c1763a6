//! Signing what the converter pushes: a cosign-compatible signature referrer of a manifest
//! (see `streamsnap_trust`), pushed BEFORE the manifest it signs, so that a node requiring
//! signatures never sees the manifest unsigned.

use bytes::Bytes;
use streamsnap_format::media;
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_registry::{Client, Repository};
use streamsnap_trust::SigningKey;

use crate::error::{Error, Result};

/// The descriptor `manifest` gets when pushed with [`Client::push_referrer`] (same bytes, so the
/// same digest).
pub fn referrer_descriptor(manifest: &ImageManifest) -> Result<Descriptor> {
    let bytes = serde_json::to_vec(manifest).map_err(Error::Serialize)?;
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
    Ok(Descriptor::of(media_type, &bytes))
}

/// Signs `subject` (a manifest of `repo`) with `key` and pushes the signature referrer: payload,
/// empty config, then the signature manifest. Returns the signature manifest's descriptor.
pub async fn push_signature(
    client: &Client,
    repo: &Repository,
    key: &SigningKey,
    subject: &Descriptor,
) -> Result<Descriptor> {
    let reference = format!("{}/{}", repo.registry, repo.name);
    let signature = streamsnap_trust::sign(key, &reference, subject).map_err(Error::Sign)?;
    let payload = &signature.manifest.layers[0];
    client
        .push_blob(
            repo,
            &payload.digest,
            Bytes::from(signature.payload.clone()),
        )
        .await?;
    client
        .push_blob(
            repo,
            &signature.manifest.config.digest,
            Bytes::from_static(media::OCI_EMPTY_CONTENT),
        )
        .await?;
    let pushed = client.push_referrer(repo, &signature.manifest).await?;
    tracing::info!(signature = %pushed.digest, signed = %subject.digest, key = %key.verifying_key().fingerprint(), "pushed signature");
    Ok(pushed)
}
