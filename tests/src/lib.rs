//! The end-to-end test harness of streamsnap.
//!
//! End-to-end tests run the real programs, never mocks: the distribution registry
//! (`docker-registry`), `skopeo`, containerd (with `ctr` and `ctr-remote`), runc and FUSE. This crate
//! starts private instances of them on free ports in temp dirs, generates test images (layer
//! tars with every entry type, OCI layouts, multi-arch indexes) and pushes them, and cleans up:
//! processes are killed by PID and temp dirs removed on drop, so tests can run in parallel, in
//! several test binaries at once. Set `STREAMSNAP_E2E_KEEP=1` to keep a registry's or a
//! containerd's dir for a post-mortem; their logs are printed when a test panics.
//!
//! Tests run as root on a machine with the Debian packages named by [`debian_package`]; a test
//! calls [`require_root_tools`] first so a missing package is a clear error.

pub mod bins;
pub mod browser;
pub mod busybox;
pub mod container;
pub mod containerd;
pub mod demo_image;
pub mod forge;
pub mod host_python;
pub mod http;
pub mod https;
pub mod image;
pub mod k8s_tools;
pub mod layer_view;
pub mod layers;
pub mod mirror_node;
pub mod nginx;
pub mod node_containerd;
pub mod postgres;
pub mod private_node;
pub mod proxy;
pub mod registry;
pub mod secure_registry;
pub mod secure_skopeo;
pub mod service;
pub mod shaper;
pub mod skopeo;
pub mod snapshotterd;
pub mod streaming_node;
pub mod sys;
pub mod targen;
pub mod test_ca;
pub mod token_server;
pub mod tree;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use bins::{run, workspace_bin};
pub use busybox::busybox_layer;
pub use container::{
    RootfsGuard, mount_rootfs, pull, rpull, run_container, run_container_with, sha256_check,
    sha256_check_parallel,
};
pub use containerd::{CRI_NAMESPACE, Containerd, ContainerdOptions};
pub use image::{Compression, ImageSpec, LayerBlob, OciLayout, WrittenImage, WrittenIndex};
pub use layer_view::{EntryView, diff_views, tar_views, toc_views, toc_views_decoded};
pub use layers::{every_entry_type_layer, upper_layers, upper_layers_view};
pub use proxy::{CountingProxy, Fault};
pub use registry::Registry;
pub use secure_registry::{RegistryAuth, SecureRegistry};
pub use shaper::{LinkShape, RequestRecord, ShapingProxy};
pub use skopeo::{manifest_digest, skopeo_inspect_raw, skopeo_pull_dir, skopeo_push};
pub use snapshotterd::{
    Snapshotterd, SnapshotterdOptions, ViewGuard, chain_id, mount_view, run_container_in,
};
pub use targen::{EntryOpts, TarGen};
pub use tree::{DiffOptions, Node, NodeKind, diff_trees, diff_trees_with, walk_tree};

/// The Debian package that installs `program`, for the programs the tests use.
pub fn debian_package(program: &str) -> Option<&'static str> {
    Some(match program {
        "docker-registry" => "docker-registry",
        "skopeo" => "skopeo",
        "containerd" | "ctr" | "containerd-shim-runc-v2" => "containerd",
        "runc" => "runc",
        "ctr-remote" | "containerd-stargz-grpc" => "stargz-snapshotter",
        "fusermount3" => "fuse3",
        "busybox" => "busybox-static",
        "tar" => "tar",
        "curl" => "curl",
        "openssl" => "openssl",
        "htpasswd" => "apache2-utils",
        "ip" | "tc" => "iproute2",
        "unshare" | "nsenter" | "mount" | "umount" => "util-linux",
        "protoc" => "protobuf-compiler",
        "initdb" | "pg_ctl" | "postgres" | "psql" => "postgresql",
        "nginx" => "nginx",
        _ => return None,
    })
}

/// What a streaming node needs on the host: a registry, image tools, containerd and runc.
pub const STREAMING_NODE_TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "containerd",
    "ctr",
    "ctr-remote",
    "runc",
];

/// Checks that every program is on `PATH`; the error names each missing one and the Debian
/// package to install.
pub fn require_root_tools(programs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<String> = programs
        .iter()
        .filter(|p| find_on_path(p).is_none())
        .map(|p| match debian_package(p) {
            Some(package) => format!("{p} (install the Debian package {package})"),
            None => format!("{p} (not packaged for Debian as far as this harness knows)"),
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "programs the end-to-end tests need are missing: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Checks that the tests run as root (they mount, run containers and create devices).
pub fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if euid != Some("0") {
        bail!("the end-to-end tests must run as root (euid is {euid:?}): run them with sudo");
    }
    Ok(())
}

/// The first executable file called `program` in `PATH` (or `program` itself if it has a `/`).
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exe = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exe(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_exe(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_named_with_their_package() {
        assert!(require_root_tools(&["sh"]).is_ok());
        let err = require_root_tools(&["sh", "/nonexistent/skopeo", "no-such-tool-xyz"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-tool-xyz (not packaged"), "{err}");
        assert!(!err.contains("sh,"), "{err}");
    }
}
