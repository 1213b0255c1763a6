//! `streamsnap-snapshotterd`: the containerd remote snapshotter of streamsnap.
//!
//! This is the outermost layer of the node: it knows containerd's snapshot semantics and gRPC
//! API, the metadata store, mounting, and configuration. It wires the pieces below it together
//! (registry client -> chunk cache -> layer filesystem) without knowing their internals: the
//! registry is a `BlobSource` to the cache, the cache a `ChunkReader` to the filesystem.
//!
//! A snapshot is an ordinary overlay directory, exactly like containerd's overlayfs
//! snapshotter, unless containerd prepares a layer of an image that has a streaming artifact:
//! then the layer is a FUSE mount whose reads fetch verified chunks on demand.

pub mod api;
mod commit;
pub mod config;
pub mod credentials;
pub mod cri_proxy;
pub mod error;
pub mod filter;
pub mod http;
pub mod locks;
pub mod metrics;
pub mod mounter;
mod prepare;
mod query;
pub mod remote;
mod remove;
pub mod service;
pub mod snapshotter;
pub mod startup;
pub mod store;
mod usage;

pub use snapshotter::{Info, Mount, Snapshotter};
