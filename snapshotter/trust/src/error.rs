//! Errors of keys, payloads and signatures. Messages never include key material.

/// What went wrong with a key, a payload or a signature.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PEM block {label:?} found")]
    Pem { label: &'static str },
    #[error("the PEM block {label:?} is not valid base64")]
    PemBase64 { label: &'static str },
    #[error("unsupported key: {0} (streamsnap signs and verifies ECDSA P-256 keys)")]
    Key(String),
    #[error("not a cosign signature payload: {0}")]
    Payload(String),
    #[error("the signature does not verify with any configured public key")]
    BadSignature,
    #[error("signing failed")]
    Sign,
}

pub type Result<T> = std::result::Result<T, Error>;
