//! OCI 1.1 referrers: the referrers API, and the referrers tag schema (`sha256-<hex>` holding an
//! image index) for registries without it, both for listing and for pushing/removing.

use bytes::Bytes;
use http::{Method, header};
use streamsnap_format::oci::{Descriptor, ImageIndex, ImageManifest};
use streamsnap_format::{Digest, media};

use crate::blob::pull_scope;
use crate::client::{Client, display_url, resolve_location, with_query};
use crate::error::{Error, Result};
use crate::manifest::{MAX_MANIFEST_SIZE, Manifest};
use crate::metrics::Kind;
use crate::reference::Repository;
use crate::transport::{Call, Retry};

/// Where a referrers list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferrersSource {
    /// The registry's referrers API.
    Api,
    /// The `sha256-<hex>` fallback tag (possibly absent: then the list is empty).
    FallbackTag,
}

/// The referrers of a manifest, already filtered by artifact type when one was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Referrers {
    pub manifests: Vec<Descriptor>,
    pub source: ReferrersSource,
}

/// Pages of a paginated referrers answer followed at most.
const MAX_PAGES: usize = 64;

/// The referrers tag schema's tag for `subject`: `sha256-<hex>`.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("{}-{}", Digest::ALGORITHM, subject.hex())
}

impl Client {
    /// Lists the manifests whose subject is `subject`, through the referrers API, or through
    /// the fallback tag when the registry has no API (404, 400, 405 or 501). The artifact type
    /// filter is applied here too, since a registry may ignore it.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Referrers> {
        let mut uri = self.url(repo, &format!("referrers/{subject}"))?;
        if let Some(t) = artifact_type {
            uri = with_query(&uri, "artifactType", t)?;
        }
        let mut manifests = Vec::new();
        let mut origin = ReferrersSource::Api;
        for page in 0.. {
            let call = Call::new(Kind::Referrers, Method::GET, uri.clone(), pull_scope(repo))
                .header(header::ACCEPT, media::OCI_INDEX);
            let mut retry = Retry::new(self.config().retries);
            let response = self.execute(&call, &mut retry).await?;
            match response.status.as_u16() {
                200 => {}
                404 | 400 | 405 | 501 if page == 0 => {
                    tracing::debug!(status = %response.status, "no referrers API, reading the fallback tag");
                    origin = ReferrersSource::FallbackTag;
                    if let Some((_, index)) = self.fallback_index(repo, subject).await? {
                        manifests = index.manifests;
                    }
                    break;
                }
                _ => return Err(response.into_error().await),
            }
            let next = next_link(&response)?;
            let url = response.url();
            let body = response.into_stream().read_all(MAX_MANIFEST_SIZE).await?;
            let index: ImageIndex =
                serde_json::from_slice(&body).map_err(|source| Error::InvalidJson {
                    url: url.clone(),
                    what: "referrers index",
                    source,
                })?;
            manifests.extend(index.manifests);
            match next {
                Some(next) if page + 1 < MAX_PAGES => uri = next,
                Some(_) => {
                    tracing::warn!(%url, pages = MAX_PAGES, "referrers list truncated");
                    break;
                }
                None => break,
            }
        }
        if let Some(t) = artifact_type {
            manifests.retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        Ok(Referrers {
            manifests,
            source: origin,
        })
    }

    /// Pushes `manifest` (which must have a subject) by digest, and adds it to the subject's
    /// fallback tag index unless the registry acknowledged the subject with `OCI-Subject`.
    /// Returns its descriptor as it appears in referrers lists.
    pub async fn push_referrer(
        &self,
        repo: &Repository,
        manifest: &ImageManifest,
    ) -> Result<Descriptor> {
        let subject = manifest.subject.as_ref().ok_or(Error::MissingSubject)?;
        let bytes = serde_json::to_vec(manifest).map_err(|source| Error::Serialize {
            what: "referrer manifest",
            source,
        })?;
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        let mut descriptor = Descriptor::of(media_type.clone(), &bytes);
        // As the referrers API lists it: the manifest's artifactType, else its config's type.
        descriptor.artifact_type = Some(
            manifest
                .artifact_type
                .clone()
                .unwrap_or_else(|| manifest.config.media_type.clone()),
        );
        descriptor.annotations = manifest.annotations.clone();
        let put = self
            .put_manifest(
                repo,
                &descriptor.digest.to_string(),
                &media_type,
                Bytes::from(bytes),
            )
            .await?;
        if put.subject_acknowledged {
            tracing::debug!(digest = %put.digest, "registry indexed the subject itself");
        } else {
            self.add_to_fallback(repo, &subject.digest, &descriptor)
                .await?;
        }
        Ok(descriptor)
    }

    /// Removes `referrer` from the subject's fallback tag index (deleting the tag's manifest if
    /// the index becomes empty), then deletes the referrer manifest. Already absent entries and
    /// manifests are not an error, so a cleanup can be repeated.
    pub async fn remove_referrer(
        &self,
        repo: &Repository,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<()> {
        if let Some((stored, mut index)) = self.fallback_index(repo, subject).await? {
            let before = index.manifests.len();
            index.manifests.retain(|d| d.digest != *referrer);
            if index.manifests.len() != before {
                if index.manifests.is_empty() {
                    match self.delete_manifest(repo, &stored.digest).await {
                        Err(e) if !e.is_not_found() => return Err(e),
                        _ => {}
                    }
                } else {
                    self.put_index(repo, &fallback_tag(subject), index).await?;
                }
            }
        }
        match self.delete_manifest(repo, referrer).await {
            Err(e) if e.is_not_found() => {
                tracing::debug!(%referrer, "referrer manifest already gone");
                Ok(())
            }
            other => other,
        }
    }

    async fn add_to_fallback(
        &self,
        repo: &Repository,
        subject: &Digest,
        descriptor: &Descriptor,
    ) -> Result<()> {
        let mut index = match self.fallback_index(repo, subject).await? {
            Some((_, index)) => index,
            None => ImageIndex::empty(),
        };
        if index
            .manifests
            .iter()
            .any(|d| d.digest == descriptor.digest)
        {
            return Ok(());
        }
        index.manifests.push(descriptor.clone());
        self.put_index(repo, &fallback_tag(subject), index).await
    }

    async fn put_index(&self, repo: &Repository, tag: &str, mut index: ImageIndex) -> Result<()> {
        index.media_type = Some(media::OCI_INDEX.to_owned());
        let bytes = serde_json::to_vec(&index).map_err(|source| Error::Serialize {
            what: "referrers fallback index",
            source,
        })?;
        self.put_manifest(repo, tag, media::OCI_INDEX, Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// The fallback tag's manifest and index; `None` when the tag does not exist.
    async fn fallback_index(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<Option<(Manifest, ImageIndex)>> {
        let tag = fallback_tag(subject);
        let manifest = match self.get_manifest(repo, &tag).await {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        if !media::is_index(&manifest.media_type) {
            return Err(Error::UnexpectedResponse {
                method: Method::GET,
                url: display_url(&self.url(repo, &format!("manifests/{tag}"))?),
                reason: format!(
                    "referrers fallback tag holds a {}, not an image index",
                    manifest.media_type
                ),
            });
        }
        let index: ImageIndex =
            serde_json::from_slice(&manifest.bytes).map_err(|source| Error::InvalidJson {
                url: format!("{repo}:{tag}"),
                what: "referrers fallback index",
                source,
            })?;
        Ok(Some((manifest, index)))
    }
}

/// The `rel="next"` target of a `Link` header, resolved against the answering URL.
pub(crate) fn next_link(response: &crate::transport::Response) -> Result<Option<http::Uri>> {
    for value in response.headers.get_all(header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in value.split(',') {
            let Some((target, params)) = link.trim().split_once('>') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if is_next {
                let target = target.trim().trim_start_matches('<');
                return resolve_location(&response.uri, target).map(Some);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tag_is_algorithm_dash_hex() {
        let d = Digest::sha256(b"");
        assert_eq!(
            fallback_tag(&d),
            "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        crate::reference::validate_tag(&fallback_tag(&d)).unwrap();
    }
}
