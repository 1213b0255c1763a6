//! Generates the server side of containerd's Snapshots gRPC service (tonic 0.14) over the
//! message types the `containerd-client` crate already generates, so the daemon needs no copy of
//! containerd's protobuf files and no second protobuf stack.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    const TYPES: &str = "containerd_client::services::v1::snapshots";
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{TYPES}::{input}"))
            .output_type(output.replace("$", TYPES))
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    // google.protobuf.Empty: prost encodes () as the empty message; a path is needed here.
    let empty = "crate::api::Empty";
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(unary(
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            "$::PrepareSnapshotResponse",
        ))
        .method(unary(
            "view",
            "View",
            "ViewSnapshotRequest",
            "$::ViewSnapshotResponse",
        ))
        .method(unary(
            "mounts",
            "Mounts",
            "MountsRequest",
            "$::MountsResponse",
        ))
        .method(unary("commit", "Commit", "CommitSnapshotRequest", empty))
        .method(unary("remove", "Remove", "RemoveSnapshotRequest", empty))
        .method(unary(
            "stat",
            "Stat",
            "StatSnapshotRequest",
            "$::StatSnapshotResponse",
        ))
        .method(unary(
            "update",
            "Update",
            "UpdateSnapshotRequest",
            "$::UpdateSnapshotResponse",
        ))
        .method(
            Method::builder()
                .name("list")
                .route_name("List")
                .input_type(format!("{TYPES}::ListSnapshotsRequest"))
                .output_type(format!("{TYPES}::ListSnapshotsResponse"))
                .codec_path("tonic_prost::ProstCodec")
                .server_streaming()
                .build(),
        )
        .method(unary("usage", "Usage", "UsageRequest", "$::UsageResponse"))
        .method(unary("cleanup", "Cleanup", "CleanupRequest", empty))
        .build();
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[service]);
}
