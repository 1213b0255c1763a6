//! Types generated from `proto/streamsnap/toc/v1/toc.proto`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/streamsnap.toc.v1.rs"));
