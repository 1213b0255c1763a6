//! Who may call what: the API token for `/v1/...` calls, the webhook's shared secret, and the
//! explicit loopback dev mode. Secrets are compared in constant time and never printed.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A token or shared secret. `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// `None` for an empty (or all-whitespace) value.
    pub fn new(value: impl Into<String>) -> Option<Self> {
        let value = value.into();
        let trimmed = value.trim();
        (!trimmed.is_empty()).then(|| Self(trimmed.to_owned()))
    }

    /// Reads a secret from a file (surrounding whitespace and the final newline removed).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "reading the secret file",
            path: path.to_owned(),
            source,
        })?;
        Self::new(text).ok_or_else(|| {
            Error::Config(format!(
                "{} is empty: write the secret into it",
                path.display()
            ))
        })
    }

    /// The value, for sending it (the client's `Authorization` header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret, in time independent of where they differ: both
    /// are hashed, and the hashes compared without early exit.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(candidate.as_bytes());
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The token of an `Authorization: Bearer TOKEN` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The access rules of the API (everything under `/v1/` but the webhook and the health probe).
#[derive(Clone, Debug)]
pub struct ApiAuth {
    /// Needed on every call, unless `loopback_without_token` lets a loopback peer through.
    pub token: Option<Secret>,
    /// `--insecure-dev-loopback`: calls from 127.0.0.0/8 and ::1 need no token.
    pub loopback_without_token: bool,
}

impl ApiAuth {
    pub fn check(&self, peer: IpAddr, authorization: Option<&str>) -> Result<()> {
        if let (Some(token), Some(given)) = (&self.token, bearer(authorization))
            && token.matches(given)
        {
            return Ok(());
        }
        if self.loopback_without_token && is_loopback(peer) {
            return Ok(());
        }
        Err(Error::Unauthorized)
    }
}

/// Checks the webhook's `Authorization: Bearer SECRET`.
pub fn check_webhook(secret: &Secret, authorization: Option<&str>) -> Result<()> {
    match bearer(authorization) {
        Some(given) if secret.matches(given) => Ok(()),
        _ => Err(Error::WebhookUnauthorized),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn secrets_compare_exactly_and_hide_in_debug() {
        let s = Secret::new("s3cret\n").unwrap();
        assert!(s.matches("s3cret"));
        assert!(!s.matches("s3cre"));
        assert!(!s.matches("s3cret "));
        assert!(!s.matches(""));
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(Secret::new("  \n").is_none());
    }

    #[test]
    fn bearer_tokens_are_taken_from_the_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn api_needs_the_token_unless_dev_loopback_allows_the_peer() {
        let strict = ApiAuth {
            token: Secret::new("t"),
            loopback_without_token: false,
        };
        assert!(strict.check(ip("127.0.0.1"), Some("Bearer t")).is_ok());
        assert!(strict.check(ip("10.0.0.1"), Some("Bearer t")).is_ok());
        assert!(strict.check(ip("127.0.0.1"), None).is_err());
        assert!(strict.check(ip("127.0.0.1"), Some("Bearer x")).is_err());

        let dev = ApiAuth {
            token: None,
            loopback_without_token: true,
        };
        assert!(dev.check(ip("127.0.0.1"), None).is_ok());
        assert!(dev.check(ip("::1"), None).is_ok());
        assert!(dev.check(ip("::ffff:127.0.0.1"), None).is_ok());
        assert!(dev.check(ip("10.0.0.1"), None).is_err());
        assert!(dev.check(ip("10.0.0.1"), Some("Bearer t")).is_err());
    }

    #[test]
    fn webhook_needs_the_secret() {
        let secret = Secret::new("hook").unwrap();
        assert!(check_webhook(&secret, Some("Bearer hook")).is_ok());
        assert!(check_webhook(&secret, Some("Bearer nope")).is_err());
        assert!(check_webhook(&secret, None).is_err());
    }
}
