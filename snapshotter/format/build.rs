//! Generates the TOC types from proto/streamsnap/toc/v1/toc.proto. Needs `protoc` on PATH
//! (Debian package protobuf-compiler) or in $PROTOC.

fn main() -> std::io::Result<()> {
    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let toc = format!("{proto_root}/streamsnap/toc/v1/toc.proto");
    println!("cargo:rerun-if-changed={toc}");
    prost_build::Config::new().compile_protos(&[toc.as_str()], &[proto_root])
}
