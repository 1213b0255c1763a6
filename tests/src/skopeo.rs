//! Moving images with `skopeo` (Debian package `skopeo`, 1.9): push an OCI layout to a registry
//! byte for byte, read manifests back, pull to a local dir.
//!
//! Every call passes `--insecure-policy` (no dependency on the machine's
//! /etc/containers/policy.json) and turns TLS verification off: the test registries speak plain
//! HTTP on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Context;
use streamsnap_format::Digest;

use crate::bins::run;

/// Runs `skopeo --insecure-policy ARGS...`.
pub fn skopeo(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("skopeo").arg("--insecure-policy").args(args))
}

/// Pushes tag `tag` of the OCI layout at `layout_dir` to `dest` (`127.0.0.1:PORT/repo:tag`):
/// every platform of an index (`--all`), blobs and manifests unchanged (`--preserve-digests`:
/// skopeo neither recompresses layers nor rewrites manifests, and fails rather than do so).
pub fn skopeo_push(layout_dir: &Path, tag: &str, dest: &str) -> anyhow::Result<()> {
    let src = format!("oci:{}:{tag}", layout_dir.display());
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src,
        &format!("docker://{dest}"),
    ])
    .with_context(|| format!("pushing {src} to {dest}"))?;
    Ok(())
}

/// Copies `image` (`127.0.0.1:PORT/repo:tag` or `…@sha256:…`) from a registry into the `dir:`
/// transport at `dest_dir`, as a pull. For an index, skopeo picks the host's platform.
pub fn skopeo_pull_dir(image: &str, dest_dir: &Path) -> anyhow::Result<()> {
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{image}"),
        &format!("dir:{}", dest_dir.display()),
    ])
    .with_context(|| format!("pulling {image} into {}", dest_dir.display()))?;
    Ok(())
}

/// The manifest or index of `image` exactly as the registry serves it.
pub fn skopeo_inspect_raw(image: &str) -> anyhow::Result<Vec<u8>> {
    let output = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ])
    .with_context(|| format!("reading the manifest of {image}"))?;
    Ok(output.stdout)
}

/// The digest of `image`'s manifest (or index) as the registry serves it.
pub fn manifest_digest(image: &str) -> anyhow::Result<Digest> {
    Ok(Digest::sha256(&skopeo_inspect_raw(image)?))
}
