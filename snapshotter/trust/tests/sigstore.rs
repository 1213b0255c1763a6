//! What streamsnap signs verifies with the sigstore project's own code (the `sigstore` crate's
//! `CosignVerificationKey`, the verifier cosign's Rust implementation uses for `--key`), not only
//! with streamsnap's: the payload, the signature encoding and the public key format are cosign's.

use sigstore::crypto::{CosignVerificationKey, Signature, SigningScheme};
use streamsnap_format::Digest;
use streamsnap_format::oci::Descriptor;
use streamsnap_trust::{ANNOTATION_SIGNATURE, SigningKey, payload_descriptor, sign};

const PRIVATE: &[u8] = include_bytes!("data/test-key.pem");
const PUBLIC: &[u8] = include_bytes!("data/test-key.pub");
const OTHER_PUBLIC: &[u8] = include_bytes!("data/other-key.pub");

#[test]
fn sigstore_verifies_a_streamsnap_signature() {
    let key = SigningKey::from_pem(PRIVATE).unwrap();
    let subject = Descriptor::new(
        "application/vnd.oci.image.manifest.v1+json",
        Digest::sha256(b"an artifact manifest"),
        20,
    );
    let signed = sign(&key, "registry.example.com/team/app", &subject).unwrap();
    let layer = payload_descriptor(&signed.manifest).unwrap();
    let signature = layer.annotations[ANNOTATION_SIGNATURE].as_bytes();

    let theirs = CosignVerificationKey::from_pem(PUBLIC, &SigningScheme::default()).unwrap();
    theirs
        .verify_signature(Signature::Base64Encoded(signature), &signed.payload)
        .expect("sigstore rejects a streamsnap signature");
    // Our public key PEM is the same key to sigstore.
    let ours = key.verifying_key().to_pem();
    CosignVerificationKey::from_pem(ours.as_bytes(), &SigningScheme::default())
        .unwrap()
        .verify_signature(Signature::Base64Encoded(signature), &signed.payload)
        .unwrap();

    // And it is a real check: another key, or another payload, fails in sigstore too.
    let other = CosignVerificationKey::from_pem(OTHER_PUBLIC, &SigningScheme::default()).unwrap();
    assert!(
        other
            .verify_signature(Signature::Base64Encoded(signature), &signed.payload)
            .is_err()
    );
    let mut changed = signed.payload.clone();
    changed[10] ^= 1;
    assert!(
        theirs
            .verify_signature(Signature::Base64Encoded(signature), &changed)
            .is_err()
    );
}
