//! Errors of the node set-up.

use std::path::PathBuf;

/// What went wrong patching, restoring or inspecting a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml_edit::TomlError>,
    },
    #[error("{path}: {what}")]
    Shape { path: PathBuf, what: String },
    #[error(
        "{path} is a containerd config of version 1 (no `version` key): streamsnap supports \
         versions 2 and 3; migrate it first (`containerd config migrate` on containerd 2.x, or \
         add `version = 2` and rename the sections on 1.x)"
    )]
    ConfigVersion1 { path: PathBuf },
    #[error("{path} has config version {version}: streamsnap supports versions 2 and 3")]
    UnknownConfigVersion { path: PathBuf, version: i64 },
    #[error(
        "{path} has config version {config} but containerd is {containerd}: version 3 needs \
         containerd 2.0 or later"
    )]
    ConfigTooNew {
        path: PathBuf,
        config: i64,
        containerd: String,
    },
    #[error(
        "{path} changed since streamsnap patched it and now carries its own [proxy_plugins.\
         {plugin}]: the original is kept at {backup}; remove the streamsnap settings from it or \
         run `streamsnap node uninstall --force` first"
    )]
    EditedAfterInstall {
        path: PathBuf,
        plugin: String,
        backup: PathBuf,
    },
    #[error(
        "{path} was edited after streamsnap patched it: restoring the original would lose those \
         edits; the original is at {backup}: restore it by hand or pass --force"
    )]
    EditedBeforeUninstall { path: PathBuf, backup: PathBuf },
    #[error("the install marker {path} is unreadable or of another format: {what}")]
    Marker { path: PathBuf, what: String },
    #[error("the backup {path} does not match the digest in its marker: not restoring it")]
    BackupCorrupt { path: PathBuf },
    #[error("unsupported node: {0}")]
    Unsupported(String),
    #[error("cannot tell the containerd version from {output:?}")]
    VersionOutput { output: String },
    #[error("running {command} on the host")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed with {status}: {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;
