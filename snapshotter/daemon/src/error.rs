use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Snapshotter errors. The gRPC boundary maps each to the code containerd relies on
/// (see `service::status`): NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
/// Internal for the rest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {key:?} does not exist")]
    NotFound { key: String },

    #[error("snapshot {key:?} already exists")]
    AlreadyExists { key: String },

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    InvalidArgument(String),

    #[error("metadata store: {context}")]
    Store {
        context: &'static str,
        #[source]
        source: redb::Error,
    },

    #[error("metadata record of {key:?} is unreadable")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("remote layer: {0}")]
    Remote(#[from] crate::remote::RemoteError),
}

impl Error {
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    pub fn store(context: &'static str) -> impl FnOnce(redb::Error) -> Self {
        move |source| Self::Store { context, source }
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

/// An error and its causes on one line, for logs.
pub fn chain(error: &dyn std::error::Error) -> String {
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
