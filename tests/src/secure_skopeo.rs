//! Moving images to and from a registry that wants TLS and credentials, with `skopeo` (Debian
//! package `skopeo`, 1.9): the test CA is trusted through a cert dir holding only `ca.crt`
//! (`--dest-cert-dir`, `--src-cert-dir`, `--cert-dir`), TLS verification stays on, and the
//! credentials are given on the command line (`--dest-creds user:password`) or access is
//! anonymous (`--dest-no-creds`), so no auth file of the machine is read. skopeo fetches a bearer
//! token itself when the registry asks for one (a new one per run: it caches tokens in-process).
//!
//! The free functions take a full reference (`127.0.0.1:PORT/repo:tag`); the methods on
//! [`SecureRegistry`] take `repo:tag` and use the registry's CA (and, without `_as`, its
//! credentials).

use std::path::Path;

use anyhow::Context;

use crate::secure_registry::SecureRegistry;
use crate::skopeo::skopeo;

/// A user and password, or `None` for anonymous access.
pub type Creds<'a> = Option<(&'a str, &'a str)>;

/// `--{side}-cert-dir DIR` and `--{side}-creds U:P` or `--{side}-no-creds`; `side` is `src`,
/// `dest` or empty (inspect).
fn tls_args(side: &str, cert_dir: &Path, creds: Creds<'_>) -> Vec<String> {
    let flag = |name: &str| {
        if side.is_empty() {
            format!("--{name}")
        } else {
            format!("--{side}-{name}")
        }
    };
    let mut args = vec![flag("cert-dir"), cert_dir.display().to_string()];
    match creds {
        Some((user, password)) => args.extend([flag("creds"), format!("{user}:{password}")]),
        None => args.push(flag("no-creds")),
    }
    args
}

fn skopeo_owned(args: &[String]) -> anyhow::Result<std::process::Output> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    skopeo(&args)
}

/// Pushes tag `tag` of the OCI layout at `layout_dir` to `dest` (`127.0.0.1:PORT/repo:tag`) over
/// verified TLS: every platform of an index, blobs and manifests unchanged.
pub fn skopeo_push_tls(
    layout_dir: &Path,
    tag: &str,
    dest: &str,
    cert_dir: &Path,
    creds: Creds<'_>,
) -> anyhow::Result<()> {
    let src = format!("oci:{}:{tag}", layout_dir.display());
    let mut args: Vec<String> = ["copy", "--quiet", "--all", "--preserve-digests"]
        .map(str::to_owned)
        .into();
    args.extend(tls_args("dest", cert_dir, creds));
    args.extend([src.clone(), format!("docker://{dest}")]);
    skopeo_owned(&args).with_context(|| format!("pushing {src} to {dest}"))?;
    Ok(())
}

/// Copies `image` (`127.0.0.1:PORT/repo:tag`) into the `dir:` transport at `dest_dir`, as a pull
/// over verified TLS.
pub fn skopeo_pull_dir_tls(
    image: &str,
    dest_dir: &Path,
    cert_dir: &Path,
    creds: Creds<'_>,
) -> anyhow::Result<()> {
    let mut args: Vec<String> = ["copy", "--quiet", "--preserve-digests"]
        .map(str::to_owned)
        .into();
    args.extend(tls_args("src", cert_dir, creds));
    args.extend([
        format!("docker://{image}"),
        format!("dir:{}", dest_dir.display()),
    ]);
    skopeo_owned(&args).with_context(|| format!("pulling {image} into {}", dest_dir.display()))?;
    Ok(())
}

/// The manifest or index of `image` exactly as the registry serves it, over verified TLS.
pub fn skopeo_inspect_raw_tls(
    image: &str,
    cert_dir: &Path,
    creds: Creds<'_>,
) -> anyhow::Result<Vec<u8>> {
    let mut args: Vec<String> = vec!["inspect".into(), "--raw".into()];
    args.extend(tls_args("", cert_dir, creds));
    args.push(format!("docker://{image}"));
    let output = skopeo_owned(&args).with_context(|| format!("reading the manifest of {image}"))?;
    Ok(output.stdout)
}

impl SecureRegistry {
    /// Pushes `layout_dir:tag` as `name` (`repo:tag`) with the registry's own credentials.
    pub fn push(&self, layout_dir: &Path, tag: &str, name: &str) -> anyhow::Result<()> {
        self.push_as(layout_dir, tag, name, self.credentials())
    }

    /// Pushes `layout_dir:tag` as `name` (`repo:tag`) with `creds`.
    pub fn push_as(
        &self,
        layout_dir: &Path,
        tag: &str,
        name: &str,
        creds: Creds<'_>,
    ) -> anyhow::Result<()> {
        skopeo_push_tls(
            layout_dir,
            tag,
            &self.image_ref(name),
            &self.cert_dir(),
            creds,
        )
    }

    /// Pulls `name` (`repo:tag`) into a `dir:` layout at `dest_dir` with the registry's own
    /// credentials.
    pub fn pull_dir(&self, name: &str, dest_dir: &Path) -> anyhow::Result<()> {
        self.pull_dir_as(name, dest_dir, self.credentials())
    }

    /// Pulls `name` (`repo:tag`) into a `dir:` layout at `dest_dir` with `creds`.
    pub fn pull_dir_as(&self, name: &str, dest_dir: &Path, creds: Creds<'_>) -> anyhow::Result<()> {
        skopeo_pull_dir_tls(&self.image_ref(name), dest_dir, &self.cert_dir(), creds)
    }

    /// The raw manifest of `name` (`repo:tag`) with `creds`.
    pub fn inspect_raw_as(&self, name: &str, creds: Creds<'_>) -> anyhow::Result<Vec<u8>> {
        skopeo_inspect_raw_tls(&self.image_ref(name), &self.cert_dir(), creds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_tls_and_credential_flags() {
        let dir = Path::new("/c");
        assert_eq!(
            tls_args("dest", dir, Some(("u", "p:w"))),
            ["--dest-cert-dir", "/c", "--dest-creds", "u:p:w"]
        );
        assert_eq!(tls_args("", dir, None), ["--cert-dir", "/c", "--no-creds"]);
    }
}
