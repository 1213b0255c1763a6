//! The registry layer: an OCI distribution client.
//!
//! It speaks HTTP/1.1 to any OCI registry: authentication (anonymous, Basic, Bearer tokens
//! from docker config credentials), manifests, blobs (whole, streamed, or by byte range for lazy
//! pulling), chunked uploads, and referrers through the OCI 1.1 API or the fallback tag schema.
//! Retries, timeouts and redirects are handled here once, not by every caller, and counted in
//! [`Metrics`] (requests by kind and outcome, range reads, retries by reason, token fetches).
//!
//! It must not know what the bytes mean beyond OCI manifests and indexes: nothing about the
//! streaming format's TOC or chunks, caches, filesystems, containerd or conversion. It never
//! logs or reports credentials, tokens or signed URL queries.

mod auth;
mod blob;
mod client;
mod credentials;
mod error;
mod listing;
mod manifest;
mod metrics;
mod reference;
mod referrers;
mod tls;
mod transport;
mod upload;

pub use blob::BlobStream;
pub use client::{Client, ClientConfig};
pub use credentials::{BoxFuture, CredentialSource, CredentialStore, Credentials};
pub use error::{Error, Result};
pub use listing::Listing;
pub use manifest::{MAX_MANIFEST_SIZE, Manifest, PutManifest};
pub use metrics::Metrics;
pub use reference::{DOCKER_HUB, Reference, Repository};
pub use referrers::{Referrers, ReferrersSource, fallback_tag};
