//! `--sign-key FILE`: the private key `create`, `profile` and `serve` sign what they push with
//! (docs/snapshotter.md, "Signed artifacts").

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use streamsnap_trust::SigningKey;

/// Reads a PKCS#8 PEM ECDSA P-256 private key; refuses a file others can read.
pub fn load(path: &Path) -> anyhow::Result<Arc<SigningKey>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("signing key {} not found or unreadable", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "signing key {} can be read by other users (mode {mode:03o}): chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let key =
        SigningKey::from_pem(&text).with_context(|| format!("signing key {}", path.display()))?;
    tracing::debug!(key = %key.verifying_key().fingerprint(), "signing with this key");
    Ok(Arc::new(key))
}
