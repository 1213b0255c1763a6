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

    /// A `get` asking for more than one call may hold: a caller's bug, or a read over a file
    /// of many tiny extents that the caller must split.
    #[error(
        "a read of {chunks} chunks ({bytes} bytes decoded) is over the limit of one read \
         ({max_chunks} chunks, {max_bytes} bytes): ask for fewer chunks at a time"
    )]
    TooLarge {
        chunks: usize,
        bytes: u64,
        max_chunks: usize,
        max_bytes: u64,
    },

    /// A chunk ref no valid TOC holds: it would make the cache allocate more than a chunk may
    /// take.
    #[error("chunk {digest}: {reason}")]
    InvalidRef { digest: Digest, reason: String },

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
            Self::Config { .. }
            | Self::Io { .. }
            | Self::Corrupt { .. }
            | Self::TooLarge { .. }
            | Self::InvalidRef { .. } => false,
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
