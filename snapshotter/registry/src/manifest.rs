//! Manifests and indexes: get (verified), head, put, delete.

use bytes::Bytes;
use http::{Method, StatusCode, header};
use serde::Deserialize;
use serde::de::IgnoredAny;
use streamsnap_format::oci::Descriptor;
use streamsnap_format::{Digest, media};

use crate::auth::{Access, Scope};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::metrics::Kind;
use crate::reference::{Repository, validate_tag};
use crate::transport::{Call, Retry};

/// Largest manifest accepted, as distribution does.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// A manifest or index as the registry stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// The result of a manifest PUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutManifest {
    pub digest: Digest,
    /// The response carried `OCI-Subject`: the registry indexes referrers itself, the fallback
    /// tag is not needed.
    pub subject_acknowledged: bool,
}

const OCI_SUBJECT: &str = "oci-subject";
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Tries of a manifest PUT whose blob the registry says it does not have, after the first.
const BLOB_RACE_RETRIES: u32 = 3;
/// Half the wait before the first of those (then doubled: 0.2, 0.4, 0.8 s).
const BLOB_RACE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// A 400 for a blob of the manifest the registry does not know (`MANIFEST_BLOB_UNKNOWN`,
/// `BLOB_UNKNOWN`, or the `DIGEST_INVALID` it may put first). Pushed blobs are there, so this
/// is the registry still committing one: distribution 2.8 on a filesystem answers so when two
/// uploads of the same blob (e.g. the empty config `{}` of two artifacts converted at once)
/// race with the PUT. It passes within a moment; a blob really missing still fails after
/// about 1.4 s.
fn blob_race(e: &Error) -> bool {
    matches!(
        e,
        Error::Status { status, code: Some(code), .. }
            if *status == StatusCode::BAD_REQUEST
                && matches!(code.as_str(), "MANIFEST_BLOB_UNKNOWN" | "BLOB_UNKNOWN" | "DIGEST_INVALID")
    )
}

impl Client {
    /// GETs a manifest by tag or digest, accepting every manifest and index media type. A body
    /// over 4 MiB is refused; a digest reference is verified against the body.
    pub async fn get_manifest(&self, repo: &Repository, reference: &str) -> Result<Manifest> {
        let pinned = check_reference(reference)?;
        let call = self
            .manifest_call(Method::GET, repo, reference, Access::Pull)?
            .header(header::ACCEPT, &media::MANIFEST_ACCEPT.join(", "));
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        let response = response.expect(&[StatusCode::OK]).await?;
        let content_type = response.header_str(header::CONTENT_TYPE).map(str::to_owned);
        let url = response.url();
        let bytes = response.into_stream().read_all(MAX_MANIFEST_SIZE).await?;
        let digest = Digest::sha256(&bytes);
        if let Some(expected) = pinned
            && expected != digest
        {
            return Err(Error::DigestMismatch {
                url,
                expected,
                actual: digest,
            });
        }
        let media_type = media_type_of(content_type.as_deref(), &bytes).ok_or_else(|| {
            Error::UnexpectedResponse {
                method: Method::GET,
                url,
                reason: "manifest without a media type (neither Content-Type nor mediaType)".into(),
            }
        })?;
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// The descriptor of a manifest from a HEAD request; `None` when the registry does not
    /// have it. Falls back to a GET when the HEAD answer lacks digest, size or media type.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<Option<Descriptor>> {
        let pinned = check_reference(reference)?;
        let call = self
            .manifest_call(Method::HEAD, repo, reference, Access::Pull)?
            .header(header::ACCEPT, &media::MANIFEST_ACCEPT.join(", "));
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response.expect(&[StatusCode::OK]).await?;
        let media_type = response
            .header_str(header::CONTENT_TYPE)
            .and_then(specific_media_type);
        let announced = response
            .headers
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<Digest>().ok());
        if let (Some(expected), Some(actual)) = (pinned, announced)
            && expected != actual
        {
            return Err(Error::DigestMismatch {
                url: response.url(),
                expected,
                actual,
            });
        }
        let digest = announced.or(pinned);
        if let (Some(media_type), Some(digest), Some(size)) =
            (media_type, digest, response.content_length())
        {
            return Ok(Some(Descriptor::new(media_type, digest, size)));
        }
        drop(response);
        match self.get_manifest(repo, reference).await {
            Ok(m) => Ok(Some(Descriptor::new(
                m.media_type,
                m.digest,
                m.bytes.len() as u64,
            ))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// PUTs a manifest under a tag or its digest.
    pub async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PutManifest> {
        if http::HeaderValue::from_str(media_type).is_err() {
            return Err(Error::InvalidMediaType {
                media_type: media_type.chars().take(200).collect(),
            });
        }
        let digest = Digest::sha256(&bytes);
        let call = self
            .manifest_call(Method::PUT, repo, reference, Access::Push)?
            .header(header::CONTENT_TYPE, media_type)
            .body(bytes);
        if let Some(pinned) = check_reference(reference)?
            && pinned != digest
        {
            return Err(Error::DigestMismatch {
                url: crate::client::display_url(&call.uri),
                expected: pinned,
                actual: digest,
            });
        }
        let mut retry = Retry::new(self.config().retries);
        let mut blob_retries = 0;
        let response = loop {
            let response = self.execute(&call, &mut retry).await?;
            match response
                .expect(&[StatusCode::CREATED, StatusCode::OK])
                .await
            {
                Err(e) if blob_race(&e) && blob_retries < BLOB_RACE_RETRIES => {
                    blob_retries += 1;
                    let wait = BLOB_RACE_WAIT * (1 << blob_retries);
                    tracing::debug!(error = %e, ?wait, "manifest PUT: a blob it names is not visible yet; trying again");
                    tokio::time::sleep(wait).await;
                }
                result => break result?,
            }
        };
        if let Some(stored) = response
            .headers
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<Digest>().ok())
            && stored != digest
        {
            return Err(Error::DigestMismatch {
                url: response.url(),
                expected: digest,
                actual: stored,
            });
        }
        Ok(PutManifest {
            digest,
            subject_acknowledged: response.headers.contains_key(OCI_SUBJECT),
        })
    }

    /// DELETEs a manifest by digest. A missing manifest is an error for which
    /// [`Error::is_not_found`] is true.
    pub async fn delete_manifest(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        let reference = digest.to_string();
        let call = self.manifest_call(Method::DELETE, repo, &reference, Access::Delete)?;
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        response
            .expect(&[StatusCode::ACCEPTED, StatusCode::OK, StatusCode::NO_CONTENT])
            .await?;
        Ok(())
    }

    fn manifest_call<'a>(
        &self,
        method: Method,
        repo: &'a Repository,
        reference: &str,
        access: Access,
    ) -> Result<Call<'a>> {
        let uri = self.url(repo, &format!("manifests/{reference}"))?;
        let scope = Scope {
            registry: &repo.registry,
            repository: &repo.name,
            access,
        };
        Ok(Call::new(Kind::Manifest, method, uri, scope))
    }
}

/// A manifest reference is a tag or a digest; the digest, if it is one.
fn check_reference(reference: &str) -> Result<Option<Digest>> {
    let invalid = |reason: String| Error::InvalidReference {
        reference: reference.chars().take(200).collect(),
        reason,
    };
    if reference.contains(':') {
        let digest = reference
            .parse::<Digest>()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Some(digest))
    } else {
        validate_tag(reference).map_err(|r| invalid(r.into()))?;
        Ok(None)
    }
}

/// A `Content-Type` that names a media type, not a generic one (some registries and proxies
/// answer `application/json`).
fn specific_media_type(content_type: &str) -> Option<String> {
    let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "" | "application/json" | "text/plain" | "application/octet-stream" => None,
        _ => Some(essence),
    }
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<IgnoredAny>,
    #[serde(default)]
    config: Option<IgnoredAny>,
}

/// The media type from `Content-Type`, else the body's `mediaType`, else its shape (an OCI
/// index has `manifests`, an OCI manifest has `config`).
fn media_type_of(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if let Some(mt) = content_type.and_then(specific_media_type) {
        return Some(mt);
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    match probe {
        Probe {
            media_type: Some(mt),
            ..
        } if !mt.is_empty() => Some(mt),
        Probe {
            manifests: Some(_), ..
        } => Some(media::OCI_INDEX.to_owned()),
        Probe {
            config: Some(_), ..
        } => Some(media::OCI_MANIFEST.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_comes_from_content_type_then_body() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(
            media_type_of(
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                body
            )
            .as_deref(),
            Some(media::DOCKER_MANIFEST)
        );
        assert_eq!(
            media_type_of(Some("application/json"), body).as_deref(),
            Some(media::OCI_INDEX)
        );
        assert_eq!(
            media_type_of(None, br#"{"schemaVersion":2,"config":{}}"#).as_deref(),
            Some(media::OCI_MANIFEST)
        );
        assert_eq!(media_type_of(None, br#"{"schemaVersion":2}"#), None);
        assert_eq!(media_type_of(Some("text/plain"), b"not json"), None);
    }

    #[test]
    fn references_are_tags_or_sha256_digests() {
        assert_eq!(check_reference("v1.0").unwrap(), None);
        let d = Digest::sha256(b"x");
        assert_eq!(check_reference(&d.to_string()).unwrap(), Some(d));
        assert!(check_reference("sha512:00").is_err());
        assert!(check_reference("../x").is_err());
        assert!(check_reference("").is_err());
    }
}
