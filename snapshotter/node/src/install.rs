//! Applying the patch to a config file, and taking it back.
//!
//! Next to `config.toml` the installer keeps `config.toml.streamsnap-original` (the original
//! bytes, same mode and owner; absent when there was no config) and the marker
//! `config.toml.streamsnap-installed` (whether there was an original, its sha256 and the
//! sha256 of what was written). With them:
//! - install on a config it patched, or on the original (after a boot guard put it back, see
//!   [`crate::guard`]), writes the patch of the original again: same settings, same bytes,
//!   nothing written;
//! - install on a config someone else rewrote takes that as the new original, unless it already
//!   names streamsnap's plugin (refused: uninstall could not tell what to give back);
//! - uninstall writes the original bytes back (or removes the file there was none), mode and
//!   owner included, then removes backup and marker; a config edited after install is only
//!   overwritten with `force`.
//!
//! Every file is written to a temp file in the same dir and renamed over, so a crash leaves the
//! old or the new content, never half of one; the backup and the marker are in place before the
//! config changes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::patch::{Settings, has_proxy_plugin, patch};
use crate::version::ContainerdVersion;

const MARKER_FORMAT: u32 = 1;
const MARKER_HEADER: &str = "# written by `streamsnap node install`; `streamsnap node \
                             uninstall` restores the original from the backup beside it\n";

/// The config file and the two files the installer keeps next to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub config: PathBuf,
    pub backup: PathBuf,
    pub marker: PathBuf,
}

impl Paths {
    /// `CONFIG`, `CONFIG.streamsnap-original`, `CONFIG.streamsnap-installed`.
    pub fn for_config(config: &Path) -> Self {
        let with = |suffix: &str| {
            let mut name = config.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Self {
            config: config.to_owned(),
            backup: with(".streamsnap-original"),
            marker: with(".streamsnap-installed"),
        }
    }
}

/// What an install or uninstall did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The config file changed: containerd must be restarted to use it.
    Changed,
    /// The config file already was as wanted; nothing was written to it.
    Unchanged,
    /// Uninstall found no marker: streamsnap's installer never patched this config.
    NotInstalled,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: u32,
    original_present: bool,
    original_sha256: String,
    patched_sha256: String,
}

/// Installs and uninstalls streamsnap's settings in one containerd config file.
#[derive(Clone, Debug)]
pub struct Installer {
    paths: Paths,
    settings: Settings,
    containerd: Option<ContainerdVersion>,
}

impl Installer {
    /// For the config at `config`; `containerd` picks the config version of an empty config
    /// and refuses a version 3 config on containerd 1.x.
    pub fn new(config: &Path, settings: Settings, containerd: Option<ContainerdVersion>) -> Self {
        Self {
            paths: Paths::for_config(config),
            settings,
            containerd,
        }
    }

    /// The files it reads and writes.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Whether the marker exists (an install happened and was not undone).
    pub fn is_installed(&self) -> bool {
        self.paths.marker.exists()
    }

    /// Patches the config; see the module doc.
    pub fn install(&self) -> Result<Outcome> {
        let current = read_optional(&self.paths.config)?;
        let Some(marker) = self.read_marker()? else {
            let text = as_text(&self.paths.config, current.as_deref())?;
            let patched = self.patch(text)?;
            if current.is_some() && patched == text {
                return Ok(Outcome::Unchanged);
            }
            self.save_original(current.as_deref())?;
            self.write_patched(&patched, current.as_deref(), current.as_deref())?;
            return Ok(Outcome::Changed);
        };
        let original = self.read_original(&marker)?;
        let ours = current
            .as_deref()
            .is_some_and(|c| sha256(c) == marker.patched_sha256);
        if ours || current == original {
            let patched = self.patch(as_text(&self.paths.backup, original.as_deref())?)?;
            if current.as_deref() == Some(patched.as_bytes()) {
                return Ok(Outcome::Unchanged);
            }
            self.write_patched(&patched, original.as_deref(), current.as_deref())?;
            return Ok(Outcome::Changed);
        }
        // Rewritten by someone else since the install: that is the original now.
        let text = as_text(&self.paths.config, current.as_deref())?;
        if has_proxy_plugin(text, &self.paths.config, &self.settings.plugin)? {
            return Err(Error::EditedAfterInstall {
                path: self.paths.config.clone(),
                plugin: self.settings.plugin.clone(),
                backup: self.paths.backup.clone(),
            });
        }
        let patched = self.patch(text)?;
        self.save_original(current.as_deref())?;
        self.write_patched(&patched, current.as_deref(), current.as_deref())?;
        Ok(Outcome::Changed)
    }

    /// Restores the original config; see the module doc.
    pub fn uninstall(&self, force: bool) -> Result<Outcome> {
        let Some(marker) = self.read_marker()? else {
            return Ok(Outcome::NotInstalled);
        };
        let original = self.read_original(&marker)?;
        let current = read_optional(&self.paths.config)?;
        if current == original {
            self.forget()?;
            return Ok(Outcome::Unchanged);
        }
        let ours = current
            .as_deref()
            .is_some_and(|c| sha256(c) == marker.patched_sha256);
        if !ours && !force {
            return Err(Error::EditedBeforeUninstall {
                path: self.paths.config.clone(),
                backup: self.paths.backup.clone(),
            });
        }
        match &original {
            Some(bytes) => {
                let meta = fs::metadata(&self.paths.backup).map_err(|e| self.read_err(e, true))?;
                write_atomic(&self.paths.config, bytes, Some(&meta))?;
            }
            None => fs::remove_file(&self.paths.config).map_err(|source| Error::Write {
                path: self.paths.config.clone(),
                source,
            })?,
        }
        self.forget()?;
        Ok(Outcome::Changed)
    }

    fn patch(&self, text: &str) -> Result<String> {
        patch(
            text,
            &self.paths.config,
            &self.settings,
            self.containerd.as_ref(),
        )
    }

    /// Writes the backup (when there is an original) and a marker for it, before the config
    /// changes.
    fn save_original(&self, original: Option<&[u8]>) -> Result<()> {
        match original {
            Some(bytes) => {
                let meta = fs::metadata(&self.paths.config).map_err(|source| Error::Read {
                    path: self.paths.config.clone(),
                    source,
                })?;
                write_atomic(&self.paths.backup, bytes, Some(&meta))?;
            }
            None => remove_if_exists(&self.paths.backup)?,
        }
        self.write_marker(&Marker {
            format: MARKER_FORMAT,
            original_present: original.is_some(),
            original_sha256: sha256(original.unwrap_or_default()),
            patched_sha256: String::new(),
        })
    }

    /// Writes `patched` over the config (mode and owner of `like`'s file: the current config,
    /// else the backup) and records its digest in the marker.
    fn write_patched(
        &self,
        patched: &str,
        original: Option<&[u8]>,
        current: Option<&[u8]>,
    ) -> Result<()> {
        let meta = if current.is_some() {
            fs::metadata(&self.paths.config).ok()
        } else {
            fs::metadata(&self.paths.backup).ok()
        };
        self.write_marker(&Marker {
            format: MARKER_FORMAT,
            original_present: original.is_some(),
            original_sha256: sha256(original.unwrap_or_default()),
            patched_sha256: sha256(patched.as_bytes()),
        })?;
        write_atomic(&self.paths.config, patched.as_bytes(), meta.as_ref())
    }

    fn write_marker(&self, marker: &Marker) -> Result<()> {
        let body = format!(
            "format = {}\noriginal_present = {}\noriginal_sha256 = \"{}\"\npatched_sha256 = \"{}\"\n",
            marker.format, marker.original_present, marker.original_sha256, marker.patched_sha256
        );
        write_atomic(
            &self.paths.marker,
            format!("{MARKER_HEADER}{body}").as_bytes(),
            None,
        )
    }

    fn read_marker(&self) -> Result<Option<Marker>> {
        let Some(bytes) = read_optional(&self.paths.marker)? else {
            return Ok(None);
        };
        let bad = |what: String| Error::Marker {
            path: self.paths.marker.clone(),
            what,
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| bad(e.to_string()))?;
        let marker: Marker = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if marker.format != MARKER_FORMAT {
            return Err(bad(format!("format {}", marker.format)));
        }
        Ok(Some(marker))
    }

    /// The original bytes (`None`: there was no config), checked against the marker.
    fn read_original(&self, marker: &Marker) -> Result<Option<Vec<u8>>> {
        if !marker.original_present {
            return Ok(None);
        }
        let bytes = fs::read(&self.paths.backup).map_err(|e| self.read_err(e, true))?;
        if sha256(&bytes) != marker.original_sha256 {
            return Err(Error::BackupCorrupt {
                path: self.paths.backup.clone(),
            });
        }
        Ok(Some(bytes))
    }

    fn forget(&self) -> Result<()> {
        remove_if_exists(&self.paths.backup)?;
        remove_if_exists(&self.paths.marker)
    }

    fn read_err(&self, source: std::io::Error, backup: bool) -> Error {
        Error::Read {
            path: if backup {
                self.paths.backup.clone()
            } else {
                self.paths.config.clone()
            },
            source,
        }
    }
}

fn as_text<'a>(path: &Path, bytes: Option<&'a [u8]>) -> Result<&'a str> {
    std::str::from_utf8(bytes.unwrap_or_default()).map_err(|e| Error::Shape {
        path: path.to_owned(),
        what: format!("not UTF-8 text ({e})"),
    })
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` through a temp file renamed over it, with the mode and owner of
/// `like` (0644 root otherwise).
fn write_atomic(path: &Path, bytes: &[u8], like: Option<&fs::Metadata>) -> Result<()> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".streamsnap-tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        let mode = like.map_or(0o644, |m| m.permissions().mode() & 0o7777);
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = like {
            std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()))?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  \
                            sandbox_image = \"pause:3.9\"\n";

    fn installer(dir: &Path) -> Installer {
        Installer::new(
            &dir.join("config.toml"),
            Settings::default(),
            Some("1.6.20".parse().unwrap()),
        )
    }

    #[test]
    fn install_is_idempotent_and_uninstall_gives_back_the_bytes_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, ORIGINAL).unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let i = installer(dir.path());
        assert_eq!(i.install().unwrap(), Outcome::Changed);
        let patched = fs::read(&config).unwrap();
        assert_ne!(patched, ORIGINAL.as_bytes());
        assert_eq!(fs::read(&i.paths().backup).unwrap(), ORIGINAL.as_bytes());
        assert!(i.is_installed());
        assert_eq!(i.install().unwrap(), Outcome::Unchanged);
        assert_eq!(fs::read(&config).unwrap(), patched);
        assert_eq!(i.uninstall(false).unwrap(), Outcome::Changed);
        assert_eq!(fs::read(&config).unwrap(), ORIGINAL.as_bytes());
        let mode = fs::metadata(&config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!i.paths().backup.exists() && !i.paths().marker.exists());
        assert_eq!(i.uninstall(false).unwrap(), Outcome::NotInstalled);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the config is left: {left:?}");
    }

    #[test]
    fn a_missing_config_is_created_and_removed_again() {
        let dir = tempfile::tempdir().unwrap();
        let i = installer(dir.path());
        assert_eq!(i.install().unwrap(), Outcome::Changed);
        assert!(
            fs::read_to_string(&i.paths().config)
                .unwrap()
                .starts_with("version = 2")
        );
        assert!(!i.paths().backup.exists());
        assert_eq!(i.install().unwrap(), Outcome::Unchanged);
        assert_eq!(i.uninstall(false).unwrap(), Outcome::Changed);
        assert!(!i.paths().config.exists());
    }

    #[test]
    fn a_restored_original_is_patched_again_and_a_rewrite_is_the_new_original() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, ORIGINAL).unwrap();
        let i = installer(dir.path());
        i.install().unwrap();
        let patched = fs::read(&config).unwrap();
        // What the boot guard does: the original back, backup and marker kept.
        fs::copy(&i.paths().backup, &config).unwrap();
        assert_eq!(i.install().unwrap(), Outcome::Changed);
        assert_eq!(fs::read(&config).unwrap(), patched);
        // A configuration tool rewrites the file without streamsnap.
        let rewritten = "version = 2\noom_score = -999\n";
        fs::write(&config, rewritten).unwrap();
        assert_eq!(i.install().unwrap(), Outcome::Changed);
        assert_eq!(fs::read_to_string(&i.paths().backup).unwrap(), rewritten);
        assert_eq!(i.uninstall(false).unwrap(), Outcome::Changed);
        assert_eq!(fs::read_to_string(&config).unwrap(), rewritten);
    }

    #[test]
    fn edits_after_install_are_not_overwritten_silently() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, ORIGINAL).unwrap();
        let i = installer(dir.path());
        i.install().unwrap();
        let mut edited = fs::read_to_string(&config).unwrap();
        edited.push_str("\n[metrics]\n  address = \"127.0.0.1:1338\"\n");
        fs::write(&config, &edited).unwrap();
        let err = i.install().unwrap_err().to_string();
        assert!(err.contains("changed since streamsnap patched it"), "{err}");
        let err = i.uninstall(false).unwrap_err().to_string();
        assert!(err.contains("pass --force"), "{err}");
        assert_eq!(fs::read_to_string(&config).unwrap(), edited);
        assert_eq!(i.uninstall(true).unwrap(), Outcome::Changed);
        assert_eq!(fs::read_to_string(&config).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_config_configured_by_hand_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let by_hand = patch(ORIGINAL, &config, &Settings::default(), None).unwrap();
        fs::write(&config, &by_hand).unwrap();
        let i = installer(dir.path());
        assert_eq!(i.install().unwrap(), Outcome::Unchanged);
        assert!(!i.is_installed());
        assert_eq!(i.uninstall(false).unwrap(), Outcome::NotInstalled);
        assert_eq!(fs::read_to_string(&config).unwrap(), by_hand);
    }

    #[test]
    fn a_tampered_backup_is_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, ORIGINAL).unwrap();
        let i = installer(dir.path());
        i.install().unwrap();
        fs::write(&i.paths().backup, "version = 2\n").unwrap();
        let err = i.uninstall(false).unwrap_err();
        assert!(matches!(err, Error::BackupCorrupt { .. }), "{err}");
    }
}
