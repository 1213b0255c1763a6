//! Signatures of what streamsnap pushes (streaming artifacts, start-up profiles), in cosign's
//! keyed format so the upstream tools check them too.
//!
//! Layer: beside the format, pure: keys, payloads and signatures as bytes; no I/O, no network, no
//! async runtime. Callers fetch and push the manifests and blobs.
//!
//! A signature is cosign's: a "simple signing" JSON payload naming the signed manifest digest,
//! signed with ECDSA P-256 / SHA-256 (ASN.1 DER, base64), stored as an OCI referrer of the signed
//! manifest (artifactType [`SIGNATURE_ARTIFACT_TYPE`]) whose one layer is the payload with the
//! signature in the [`ANNOTATION_SIGNATURE`] annotation; cosign 2 writes the same with
//! `--registry-referrers-mode=oci-1-1`. Keys: a PKCS#8 PEM private key (`openssl genpkey
//! -algorithm EC -pkeyopt ec_paramgen_curve:P-256`) and its SPKI PEM public key, which is what
//! `cosign verify --key` takes.

mod error;
mod keys;
mod pem;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use streamsnap_format::Digest;
use streamsnap_format::oci::{Descriptor, ImageManifest};

pub use error::{Error, Result};
pub use keys::{SigningKey, VerifyingKey};

/// The artifactType of a signature referrer (cosign's).
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The media type of the signed payload (cosign's simple signing).
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation that holds the base64 signature of the payload.
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload a verifier reads (a payload is a few hundred bytes).
pub const MAX_PAYLOAD: u64 = 64 << 10;
/// Most signature referrers a verifier looks at for one manifest.
pub const MAX_SIGNATURES: usize = 16;
/// The config blob of a signature referrer: OCI's empty descriptor.
const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    #[serde(default)]
    optional: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The simple signing payload for manifest `digest` of repository `docker_reference`
/// (`REGISTRY/REPO`).
pub fn payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    let payload = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: docker_reference.to_owned(),
            },
            image: Image {
                docker_manifest_digest: digest.to_string(),
            },
            kind: PAYLOAD_TYPE.to_owned(),
        },
        optional: None,
    };
    serde_json::to_vec(&payload).expect("serializing a payload cannot fail")
}

/// The manifest digest a payload vouches for; an error if it is not a cosign payload.
pub fn payload_digest(bytes: &[u8]) -> Result<Digest> {
    if bytes.len() as u64 > MAX_PAYLOAD {
        return Err(Error::Payload(format!(
            "{} bytes, more than {MAX_PAYLOAD}",
            bytes.len()
        )));
    }
    let payload: Payload =
        serde_json::from_slice(bytes).map_err(|e| Error::Payload(e.to_string()))?;
    if payload.critical.kind != PAYLOAD_TYPE {
        return Err(Error::Payload(format!(
            "type {:?} is not {PAYLOAD_TYPE:?}",
            payload.critical.kind.chars().take(100).collect::<String>()
        )));
    }
    payload
        .critical
        .image
        .docker_manifest_digest
        .parse()
        .map_err(|e| Error::Payload(format!("docker-manifest-digest: {e}")))
}

/// A signed payload ready to push: the payload blob and the referrer manifest that carries the
/// signature, for `subject` (the signed manifest's descriptor).
#[derive(Clone, Debug)]
pub struct Signature {
    pub payload: Vec<u8>,
    pub manifest: ImageManifest,
}

/// Signs manifest `subject` of repository `docker_reference` with `key`.
pub fn sign(key: &SigningKey, docker_reference: &str, subject: &Descriptor) -> Result<Signature> {
    let payload = payload(docker_reference, &subject.digest);
    let signature = key.sign(&payload)?;
    let mut layer = Descriptor::of(SIMPLE_SIGNING, &payload);
    layer
        .annotations
        .insert(ANNOTATION_SIGNATURE.to_owned(), signature);
    let mut subject = Descriptor::new(subject.media_type.clone(), subject.digest, subject.size);
    subject.annotations.clear();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.manifest.v1+json".to_owned()),
        artifact_type: Some(SIGNATURE_ARTIFACT_TYPE.to_owned()),
        config: Descriptor::of(EMPTY_CONFIG, b"{}"),
        layers: vec![layer],
        subject: Some(subject),
        annotations: BTreeMap::new(),
    };
    Ok(Signature { payload, manifest })
}

/// The payload a signature referrer points at (its one layer), checked to be a payload before it
/// is fetched: the caller fetches this descriptor (bounded by [`MAX_PAYLOAD`]) and calls
/// [`verify`].
pub fn payload_descriptor(manifest: &ImageManifest) -> Result<&Descriptor> {
    if manifest.artifact_type.as_deref() != Some(SIGNATURE_ARTIFACT_TYPE)
        && manifest.config.media_type != SIGNATURE_ARTIFACT_TYPE
    {
        return Err(Error::Payload(format!(
            "artifactType {:?} is not a signature",
            manifest.artifact_type
        )));
    }
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == SIMPLE_SIGNING)
        .ok_or_else(|| Error::Payload("no simple signing layer".into()))?;
    if layer.size > MAX_PAYLOAD {
        return Err(Error::Payload(format!("payload of {} bytes", layer.size)));
    }
    Ok(layer)
}

/// Checks that `payload` (the blob `payload_descriptor(manifest)` names, digest already checked
/// by the fetch) vouches for `signed` and carries a signature by one of `keys`.
pub fn verify(
    manifest: &ImageManifest,
    payload: &[u8],
    signed: &Digest,
    keys: &[VerifyingKey],
) -> Result<()> {
    let layer = payload_descriptor(manifest)?;
    if Digest::sha256(payload) != layer.digest {
        return Err(Error::Payload(
            "the payload does not match its digest".into(),
        ));
    }
    let vouched = payload_digest(payload)?;
    if vouched != *signed {
        return Err(Error::Payload(format!("it signs {vouched}, not {signed}")));
    }
    let signature = layer
        .annotations
        .get(ANNOTATION_SIGNATURE)
        .ok_or_else(|| Error::Payload("no signature annotation".into()))?;
    if keys
        .iter()
        .any(|key| key.verify(payload, signature).is_ok())
    {
        Ok(())
    } else {
        Err(Error::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = include_str!("../tests/data/test-key.pem");
    const PUBLIC: &str = include_str!("../tests/data/test-key.pub");
    const OTHER_PUBLIC: &str = include_str!("../tests/data/other-key.pub");

    fn subject() -> Descriptor {
        Descriptor::of("application/vnd.oci.image.manifest.v1+json", b"artifact")
    }

    #[test]
    fn a_signature_verifies_with_its_key_only() {
        let key = SigningKey::from_pem(PRIVATE.as_bytes()).unwrap();
        let public = VerifyingKey::from_pem(PUBLIC.as_bytes()).unwrap();
        let other = VerifyingKey::from_pem(OTHER_PUBLIC.as_bytes()).unwrap();
        assert_eq!(key.verifying_key(), &public);
        let signed = sign(&key, "r:5000/app", &subject()).unwrap();
        let digest = subject().digest;
        verify(
            &signed.manifest,
            &signed.payload,
            &digest,
            &[other.clone(), public.clone()],
        )
        .unwrap();
        assert!(matches!(
            verify(&signed.manifest, &signed.payload, &digest, &[other]),
            Err(Error::BadSignature)
        ));
        // The payload vouches for one manifest only.
        let another = Digest::sha256(b"another");
        assert!(
            verify(
                &signed.manifest,
                &signed.payload,
                &another,
                std::slice::from_ref(&public)
            )
            .is_err()
        );
        // A payload changed after signing (and its descriptor updated to match) fails.
        let mut changed = signed.clone();
        changed.payload = payload("r:5000/evil", &digest);
        let annotation = signed.manifest.layers[0].annotations.clone();
        changed.manifest.layers[0] = Descriptor::of(SIMPLE_SIGNING, &changed.payload);
        changed.manifest.layers[0].annotations = annotation;
        assert!(matches!(
            verify(&changed.manifest, &changed.payload, &digest, &[public]),
            Err(Error::BadSignature)
        ));
    }

    #[test]
    fn the_manifest_is_a_cosign_signature_referrer() {
        let key = SigningKey::from_pem(PRIVATE.as_bytes()).unwrap();
        let signed = sign(&key, "r:5000/app", &subject()).unwrap();
        let m = &signed.manifest;
        assert_eq!(m.artifact_type.as_deref(), Some(SIGNATURE_ARTIFACT_TYPE));
        assert_eq!(m.subject.as_ref().unwrap().digest, subject().digest);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].media_type, SIMPLE_SIGNING);
        let json: serde_json::Value = serde_json::from_slice(&signed.payload).unwrap();
        assert_eq!(json["critical"]["type"], PAYLOAD_TYPE);
        assert_eq!(
            json["critical"]["identity"]["docker-reference"],
            "r:5000/app"
        );
        assert_eq!(
            json["critical"]["image"]["docker-manifest-digest"],
            subject().digest.to_string()
        );
    }

    #[test]
    fn hostile_payloads_are_refused() {
        for bad in [
            &b"{}"[..],
            br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"sha256:zz"},"type":"cosign container image signature"}}"#,
            br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},"type":"other"}}"#,
        ] {
            assert!(payload_digest(bad).is_err());
        }
        assert!(payload_digest(&vec![b' '; MAX_PAYLOAD as usize + 1]).is_err());
    }
}
