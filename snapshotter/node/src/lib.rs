//! Node set-up for the streamsnap snapshotter: containerd's config file.
//!
//! This layer is what `streamsnap node install` and `streamsnap node uninstall` do to a node.
//! [`patch`] is pure: it adds the proxy snapshotter and makes the CRI plugin use it (with the
//! snapshot annotations a remote snapshotter needs), for containerd 1.6/1.7 (config version 2)
//! and 2.x (config version 3), editing the TOML in place so every other byte of the file stays
//! as it was. [`Installer`] applies it to a file idempotently, keeps the original bytes in a
//! backup next to the file with a marker saying what was written, and gives them back exactly.
//! [`version`] tells which containerd and machine this is and refuses what is unsupported;
//! [`host`] runs a program on the node itself (in the mount namespace of PID 1 when called from
//! a container) to ask `containerd --version` or restart containerd through systemd.
//!
//! What it must not know: the snapshotter daemon, registries, Kubernetes objects, tokio.

mod error;
pub mod guard;
pub mod host;
mod install;
mod patch;
pub mod version;

pub use error::{Error, Result};
pub use install::{Installer, Outcome, Paths};
pub use patch::{ConfigVersion, Settings, config_version, is_patched, patch};
pub use version::{ContainerdVersion, MIN_CONTAINERD};
