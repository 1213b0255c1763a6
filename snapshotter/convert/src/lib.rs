//! Conversion: container image in, streaming artifact out, pushed as an OCI referrer of the
//! image it was made from.
//!
//! This layer knows the format (how a layer becomes a TOC and chunk blob) and the registry
//! client (where bytes come from and go to). It knows nothing of containerd, FUSE or the node.
//! Conversion itself is synchronous and CPU-bound (`layer`, `chunker`); `create` drives it from
//! async code, streaming each layer from the registry into a blocking conversion thread.

mod chunker;
mod create;
mod entry;
mod error;
pub mod index;
mod layer;
mod sign;
mod source;
mod tarstream;

pub use create::{
    ArtifactKind, CreateOptions, Created, LayerReport, Progress, create, find_existing,
    find_existing_kind,
};
pub use error::{Error, Result};
pub use index::{DEFAULT_SPAN_SIZE, IndexedLayer, index_layer};
pub use layer::{ConvertOptions, ConvertedLayer, LayerSource, convert_layer};
pub use sign::{push_signature, referrer_descriptor};
pub use source::{PLATFORM_ARCHITECTURE, PLATFORM_OS, SourceImage, SourceLayer, resolve};
