//! ECDSA P-256 keys: a PKCS#8 private key signs, an SPKI public key verifies. Signatures are
//! ASN.1 DER, base64 (cosign's encoding).

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

use crate::error::{Error, Result};
use crate::pem;

/// The DER of a P-256 SubjectPublicKeyInfo up to its 65-byte uncompressed point: SEQUENCE {
/// SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const POINT_LEN: usize = 65;
/// Longest base64 signature accepted (a DER P-256 signature is at most 72 bytes).
const MAX_SIGNATURE_B64: usize = 512;

/// A public key that verifies signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    point: Vec<u8>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl VerifyingKey {
    /// Reads a `PUBLIC KEY` PEM block (what `cosign generate-key-pair` writes as `cosign.pub`,
    /// and `openssl pkey -pubout`).
    pub fn from_pem(text: &[u8]) -> Result<Self> {
        Self::from_spki_der(&pem::decode(text, "PUBLIC KEY")?)
    }

    fn from_spki_der(der: &[u8]) -> Result<Self> {
        match der.strip_prefix(&SPKI_P256_PREFIX[..]) {
            Some(point) if point.len() == POINT_LEN && point[0] == 0x04 => Ok(Self {
                point: point.to_vec(),
            }),
            _ => Err(Error::Key(
                "the public key is not an uncompressed ECDSA P-256 key".into(),
            )),
        }
    }

    /// The `PUBLIC KEY` PEM block.
    pub fn to_pem(&self) -> String {
        pem::encode(&[&SPKI_P256_PREFIX[..], &self.point].concat(), "PUBLIC KEY")
    }

    /// `sha256:` of the SPKI DER, to name a key in logs without printing it.
    pub fn fingerprint(&self) -> String {
        streamsnap_format::Digest::sha256(&[&SPKI_P256_PREFIX[..], &self.point].concat())
            .to_string()
    }

    /// Checks `signature` (base64 of an ASN.1 DER ECDSA signature) over `payload`.
    pub fn verify(&self, payload: &[u8], signature: &str) -> Result<()> {
        if signature.len() > MAX_SIGNATURE_B64 {
            return Err(Error::BadSignature);
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| Error::BadSignature)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(payload, &der)
            .map_err(|_| Error::BadSignature)
    }
}

/// A private key that signs.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    public: VerifyingKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads an unencrypted PKCS#8 `PRIVATE KEY` PEM block of a P-256 key (`openssl genpkey
    /// -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem`).
    pub fn from_pem(text: &[u8]) -> Result<Self> {
        let der = pem::decode(text, "PRIVATE KEY").map_err(|e| match e {
            Error::Pem { .. }
                if std::str::from_utf8(text).is_ok_and(|t| t.contains("ENCRYPTED")) =>
            {
                Error::Key(
                    "the private key is encrypted: give an unencrypted PKCS#8 P-256 key (openssl \
                     genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256), kept in a file \
                     only the signer can read"
                        .into(),
                )
            }
            other => other,
        })?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|e| Error::Key(format!("not a PKCS#8 ECDSA P-256 private key ({e})")))?;
        let public = VerifyingKey {
            point: pair.public_key().as_ref().to_vec(),
        };
        Ok(Self { pair, public, rng })
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.public
    }

    /// Base64 of the ASN.1 DER ECDSA P-256 / SHA-256 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String> {
        let signature = self
            .pair
            .sign(&self.rng, payload)
            .map_err(|_| Error::Sign)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_refused() {
        let key = SigningKey::from_pem(include_bytes!("../tests/data/test-key.pem")).unwrap();
        let public = key.verifying_key().clone();
        assert_eq!(
            VerifyingKey::from_pem(public.to_pem().as_bytes()).unwrap(),
            public
        );
        let signature = key.sign(b"payload").unwrap();
        public.verify(b"payload", &signature).unwrap();
        assert!(public.verify(b"payload!", &signature).is_err());
        assert!(public.verify(b"payload", "not base64").is_err());
        assert!(public.verify(b"payload", &"A".repeat(10_000)).is_err());
        // An RSA public key and a P-384 one.
        assert!(VerifyingKey::from_pem(include_bytes!("../tests/data/rsa.pub")).is_err());
        assert!(VerifyingKey::from_pem(include_bytes!("../tests/data/p384.pub")).is_err());
        // The public key where a private one belongs, and an encrypted private key.
        assert!(SigningKey::from_pem(include_bytes!("../tests/data/test-key.pub")).is_err());
        let err = SigningKey::from_pem(
            b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }
}
