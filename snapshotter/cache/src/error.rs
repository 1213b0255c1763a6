use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use streamsnap_format::Digest;

use crate::SourceError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can make the cache fail. Errors are cheap to clone (sources are shared behind
/// `Arc`) because one failed fetch is reported to every read that was waiting for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cache configuration: {field}: {reason}")]
    Config {
        field: &'static str,
        reason: &'static str,
    },

    #[error("cache directory {}: {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error("fetching from {blob}")]
    Source {
        blob: String,
        #[source]
        source: Arc<SourceError>,
    },

    #[error(
        "fetching from {blob}: gave up after {waited:?}{}",
        last.as_ref().map(|l| format!(" (last error: {l})")).unwrap_or_default()
    )]
    Deadline {
        blob: String,
        waited: Duration,
        last: Option<String>,
    },

    #[error(
        "chunk {digest} from {blob}: failed verification {attempts} times (last: {reason}); \
         the blob does not hold the content its TOC describes"
    )]
    Corrupt {
        blob: String,
        digest: Digest,
        attempts: u32,
        reason: String,
    },
}

impl Error {
    /// Whether the same read may succeed if tried again later (the source was unreachable or
    /// slow), as opposed to a setup problem or a blob that does not match its TOC.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Source { source, .. } => source.retryable,
            Self::Deadline { .. } => true,
            Self::Config { .. } | Self::Io { .. } | Self::Corrupt { .. } => false,
        }
    }

    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            path: path.into(),
            action,
            source: Arc::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_context_and_transience_follows_the_cause() {
        let e = Error::Deadline {
            blob: "r/x@sha256:ab".into(),
            waited: Duration::from_secs(2),
            last: Some("503".into()),
        };
        assert_eq!(
            e.to_string(),
            "fetching from r/x@sha256:ab: gave up after 2s (last error: 503)"
        );
        assert!(e.is_transient());

        let source = |retryable| Error::Source {
            blob: "b".into(),
            source: Arc::new(SourceError {
                message: "m".into(),
                retryable,
                source: None,
            }),
        };
        assert!(source(true).is_transient());
        assert!(!source(false).is_transient());
        let corrupt = Error::Corrupt {
            blob: "b".into(),
            digest: Digest::sha256(b""),
            attempts: 3,
            reason: "bad".into(),
        };
        assert!(!corrupt.is_transient());
        assert!(corrupt.to_string().contains("3 times"));
    }
}
