use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use streamsnap_format::Digest;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a registry. URLs in these variants never carry a
/// query string or userinfo (upload state and signed redirect URLs live there), and no variant
/// ever holds a password, a token or an `Authorization` header.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error(
        "docker config {} not found: create it (`docker login` writes one) or correct the path",
        path.display()
    )]
    DockerConfigMissing { path: PathBuf },

    #[error("docker config {}: cannot read it", path.display())]
    DockerConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "docker config {}: malformed JSON: {fault}; fix the file or write it again (`docker login`)",
        path.display()
    )]
    DockerConfigParse { path: PathBuf, fault: JsonFault },

    #[error("docker config {}: entry for {registry}: {reason}", path.display())]
    DockerConfigEntry {
        path: PathBuf,
        registry: String,
        reason: &'static str,
    },

    #[error("invalid media type {media_type:?}: not a valid HTTP header value")]
    InvalidMediaType { media_type: String },

    #[error("invalid client configuration: {field}: {reason}")]
    InvalidConfig {
        field: &'static str,
        reason: &'static str,
    },

    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),

    #[error("cannot set up TLS: {0}")]
    TlsConfig(String),

    #[error("CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },

    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },

    #[error("{method} {url}: cannot connect or send the request")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },

    #[error("{method} {url}: no progress for {after:?} while waiting for the {phase}")]
    Timeout {
        method: Method,
        url: String,
        phase: &'static str,
        after: Duration,
    },

    #[error("{method} {url}: reading the response body failed")]
    Body {
        method: Method,
        url: String,
        #[source]
        source: hyper::Error,
    },

    #[error(
        "{method} {url}: body ended after {received} bytes, expected {expected} \
         (connection closed early)"
    )]
    ShortBody {
        method: Method,
        url: String,
        expected: u64,
        received: u64,
    },

    #[error("{registry}: unauthorized: {reason}")]
    Unauthorized { registry: String, reason: String },

    #[error("{method} {url}: not found{}", registry_message(code, message))]
    NotFound {
        method: Method,
        url: String,
        code: Option<String>,
        message: Option<String>,
    },

    #[error(
        "{method} {url}: registry answered {status}{}",
        registry_message(code, message)
    )]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },

    #[error("{method} {url}: unexpected response: {reason}")]
    UnexpectedResponse {
        method: Method,
        url: String,
        reason: String,
    },

    #[error(
        "{registry}: the registry is reached over HTTPS but its bearer challenge names the \
         plain-HTTP token realm {realm}; refusing to send credentials or fetch a token in clear: \
         configure the registry's token service with an https:// realm"
    )]
    InsecureRealm { registry: String, realm: String },

    #[error(
        "{url}: answered over HTTPS with a plain-HTTP location {location}; refusing to follow it \
         in clear: make the registry (or its storage) redirect to an https:// URL"
    )]
    InsecureRedirect { url: String, location: String },

    #[error("{method} {url}: more than {limit} redirects")]
    TooManyRedirects {
        method: Method,
        url: String,
        limit: usize,
    },

    #[error(
        "{url}: the server ignored Range and answered with the whole blob; bytes from {offset} \
         are past the {max_skip} bytes a read may skip: read them from another source (a \
         pull-through cache answers so until it has cached the blob)"
    )]
    RangeIgnored {
        url: String,
        offset: u64,
        max_skip: u64,
    },

    #[error("{url}: body is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },

    #[error("{url}: content does not match digest {expected} (got {actual})")]
    DigestMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("{url}: malformed token response: {fault}")]
    InvalidTokenResponse { url: String, fault: JsonFault },

    #[error("{url}: malformed {what}")]
    InvalidJson {
        url: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{}: {action}", path.display())]
    File {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: content is {actual}, not the digest {expected} it is pushed as", path.display())]
    FileDigestMismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },

    #[error("referrer manifest has no subject: set `subject` to the manifest it refers to")]
    MissingSubject,

    #[error("cannot serialize {what}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The registry answered 404 (blob, manifest, tag or repository unknown).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// A failure that may pass: the network or the registry misbehaved (connection, timeout, cut
    /// body, 429, 5xx). A caller with time left may try again; the client already retried.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. }
            | Self::Timeout { .. }
            | Self::Body { .. }
            | Self::ShortBody { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }

    /// The HTTP status the registry answered with, for errors that come from a status.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::NotFound { .. } => Some(StatusCode::NOT_FOUND),
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where a JSON document is malformed and what kind of fault it is, without the text
/// `serde_json` quotes from the input: for documents that hold secrets (a docker config's auths,
/// a token response), whose values must not reach an error message or a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonFault {
    pub line: usize,
    pub column: usize,
    pub kind: &'static str,
}

impl From<&serde_json::Error> for JsonFault {
    fn from(e: &serde_json::Error) -> Self {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "cannot be read",
            serde_json::error::Category::Syntax => "not valid JSON",
            serde_json::error::Category::Data => "a value of the wrong type or shape",
            serde_json::error::Category::Eof => "ends early",
        };
        Self {
            line: e.line(),
            column: e.column(),
            kind,
        }
    }
}

impl std::fmt::Display for JsonFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at line {} column {} (values not shown: they may hold credentials)",
            self.kind, self.line, self.column
        )
    }
}

/// ` (CODE: message)` for a registry's error body, or nothing.
pub(crate) fn registry_message(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(c), Some(m)) if !m.is_empty() => format!(" ({c}: {m})"),
        (Some(c), _) => format!(" ({c})"),
        (None, Some(m)) if !m.is_empty() => format!(" ({m})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_show_the_registry_code_and_message() {
        let e = Error::Status {
            method: Method::PUT,
            url: "http://r/v2/a/manifests/x".into(),
            status: StatusCode::BAD_REQUEST,
            code: Some("MANIFEST_INVALID".into()),
            message: Some("manifest invalid".into()),
        };
        assert_eq!(
            e.to_string(),
            "PUT http://r/v2/a/manifests/x: registry answered 400 Bad Request \
             (MANIFEST_INVALID: manifest invalid)"
        );
        assert!(!e.is_not_found());
        let nf = Error::NotFound {
            method: Method::GET,
            url: "u".into(),
            code: None,
            message: None,
        };
        assert!(nf.is_not_found());
        assert_eq!(nf.to_string(), "GET u: not found");
    }

    #[test]
    fn json_positions_keep_no_input_text() {
        for (input, kind) in [
            (r#"{"auths": {"r": "c2VjcmV0LXZhbHVl"}}"#, "wrong type"),
            (
                "{\"auths\": {\"r\": {\"auth\": \"c2VjcmV0LXZhbHVl\"}}",
                "ends early",
            ),
            (r#"{"auths": c2VjcmV0LXZhbHVl}"#, "not valid JSON"),
        ] {
            #[derive(Debug, serde::Deserialize)]
            struct Auths {
                #[allow(dead_code)]
                auths:
                    std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
            }
            let e = serde_json::from_str::<Auths>(input).unwrap_err();
            let shown = JsonFault::from(&e).to_string();
            assert!(
                shown.contains(kind) && shown.contains("line 1 column"),
                "{shown}"
            );
            assert!(!shown.contains("c2VjcmV0LXZhbHVl"), "{shown}");
        }
    }
}
