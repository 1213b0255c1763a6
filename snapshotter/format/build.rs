//! Generates the TOC types from proto/streamsnap/toc/v1/toc.proto. Needs `protoc` on PATH
//! (Debian package protobuf-compiler) or in $PROTOC.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    // Read at run time, not baked in with env!: the build script binary may be reused for a
    // checkout at another path.
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let proto_root = manifest_dir.join("../../proto");
    let toc = proto_root.join("streamsnap/toc/v1/toc.proto");
    println!("cargo:rerun-if-changed={}", toc.display());
    prost_build::Config::new().compile_protos(&[&toc], &[&proto_root])
}
