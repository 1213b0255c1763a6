//! The artifact streaming service, the registry side of streamsnap: per-repository streaming
//! states, conversion operations run by a bounded worker pool, and the registry's push and
//! delete notifications (auto-conversion of new images in Active repositories, cascade
//! delete of artifacts whose image was deleted). Served as a versioned HTTP JSON API
//! (`/v1/...`, see `docs/service.md`) with a web console beside it at `/`
//! (`docs/console.md`), persisted in an embedded store (redb, one machine) or
//! in PostgreSQL shared by several replicas; plus the API's client.
//!
//! This layer drives the converter (`streamsnap-convert`) and the registry client; it knows
//! nothing of containerd, FUSE or the node. It serves HTTP with hyper and no framework, and
//! never logs tokens or secrets.

pub mod api;
mod auth;
mod client;
mod console;
mod error;
pub mod events;
mod ids;
mod metrics;
mod routes;
mod server;
mod service;
mod store;
mod worker;

pub use auth::{ApiAuth, Secret};
pub use client::ServiceClient;
pub use error::{ClientError, Error, Result, chain};
pub use server::Server;
pub use service::{OperationLimits, RATIO_FREE_BYTES, ServiceConfig};
pub use store::{PostgresStore, StoreConfig};
