use std::path::PathBuf;

use http::StatusCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the service: each maps to one HTTP status ([`Error::status`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),

    #[error("{0}")]
    MethodNotAllowed(String),

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{0}")]
    Conflict(String),

    #[error("missing or wrong bearer token: pass the service token (--token-file)")]
    Unauthorized,

    #[error(
        "missing or wrong webhook secret: configure the registry's notification endpoint \
             with headers: {{Authorization: [Bearer SECRET]}}"
    )]
    WebhookUnauthorized,

    #[error("the registry failed")]
    Registry(#[from] streamsnap_registry::Error),

    #[error("the service is shutting down: try again when it is back")]
    ShuttingDown,

    #[error("store: {context}")]
    Store {
        context: &'static str,
        #[source]
        source: redb::Error,
    },

    /// The shared store (`serve --store postgres://...`) failed.
    #[error("store: {context}")]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("stored record {key:?} is unreadable")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unauthorized | Self::WebhookUnauthorized => StatusCode::UNAUTHORIZED,
            Self::Registry(e) if e.is_not_found() => StatusCode::NOT_FOUND,
            Self::Registry(_) => StatusCode::BAD_GATEWAY,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            // No SQLSTATE: the database is unreachable or the connection broke; try again.
            Self::Postgres { source, .. } if source.code().is_none() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Store { .. }
            | Self::Postgres { .. }
            | Self::Record { .. }
            | Self::Io { .. }
            | Self::Listen { .. }
            | Self::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self::Store { context: "database operation", source: e.into() }
            }
        }
    )*};
}
store_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<tokio_postgres::Error> for Error {
    fn from(source: tokio_postgres::Error) -> Self {
        Self::Postgres {
            context: "database operation",
            source,
        }
    }
}

/// Errors of [`crate::ServiceClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid service URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },

    #[error("cannot reach the service at {url}: is `streamsnap serve` running there?")]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },

    #[error("the service at {url} answered {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },

    #[error("the service at {url} sent an unreadable answer")]
    InvalidJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("setting up TLS for the service client")]
    Tls(#[source] rustls::Error),

    #[error("the token is not a valid HTTP header value: remove control characters from it")]
    InvalidToken,
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An error and its causes on one line (`what: why: cause`), skipping repeated texts.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_statuses_the_api_documents() {
        let table = [
            (Error::BadRequest("x".into()), 400),
            (Error::Unauthorized, 401),
            (Error::WebhookUnauthorized, 401),
            (Error::not_found("operation x"), 404),
            (Error::MethodNotAllowed("x".into()), 405),
            (Error::Conflict("x".into()), 409),
            (Error::ShuttingDown, 503),
            (Error::Config("x".into()), 500),
        ];
        for (error, status) in table {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
        let message = Error::Unauthorized.to_string();
        assert!(message.starts_with("missing or wrong") && message.contains("--token-file"));
    }

    #[test]
    fn chains_join_causes_without_repeats() {
        let io = std::io::Error::other("disk full");
        let error = Error::Io {
            what: "writing",
            path: "/x".into(),
            source: io,
        };
        assert_eq!(chain(&error), "writing /x: disk full");
    }
}
