//! The boot guard: a systemd drop-in for containerd that starts it on its original config when
//! the snapshotter is not running, for nodes where the snapshotter runs as a pod.
//!
//! A pod cannot start without a snapshotter, and the snapshotter pod would be one of them: after
//! a reboot, a containerd configured to use streamsnap would wait forever for a daemon that
//! cannot start. `/run` is empty after a boot, so the drop-in's `ExecStartPre` puts the original
//! config back (from the installer's backup, keeping backup and marker) when the daemon's
//! socket is absent. containerd then runs pods on its own snapshotter until the DaemonSet's
//! daemon serves again and installs the patch again.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::install::Paths;

/// Where the drop-in goes, for containerd's unit `containerd.service`.
pub const DEFAULT_DROPIN: &str =
    "/etc/systemd/system/containerd.service.d/50-streamsnap-boot-guard.conf";

/// The drop-in file's text for the config `paths` and the daemon's `socket`.
pub fn dropin_text(paths: &Paths, socket: &Path) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    format!(
        "# Written by `streamsnap node install --boot-guard`; `streamsnap node uninstall` \
         removes it.\n# When the streamsnap snapshotter's socket is absent (after a boot), \
         containerd starts on\n# its original config so pods, the streamsnap DaemonSet among \
         them, can run; the DaemonSet\n# installs streamsnap's settings again once its daemon \
         serves.\n[Service]\nExecStartPre=-/bin/sh -c \"if [ ! -S {socket} ] && [ -f {marker} \
         ]; then if grep -q '^original_present = true' {marker}; then cp -p {backup} {config}; \
         else rm -f {config}; fi; fi\"\n",
        socket = q(socket),
        marker = q(&paths.marker),
        backup = q(&paths.backup),
        config = q(&paths.config),
    )
}

/// Writes the drop-in at `dropin` unless it already has this text; whether it changed (then
/// systemd needs a `daemon-reload`).
pub fn install(dropin: &Path, paths: &Paths, socket: &Path) -> Result<bool> {
    let text = dropin_text(paths, socket);
    if fs::read_to_string(dropin).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    let err = |path: PathBuf| move |source| Error::Write { path, source };
    if let Some(dir) = dropin.parent() {
        fs::create_dir_all(dir).map_err(err(dir.to_owned()))?;
    }
    fs::write(dropin, text).map_err(err(dropin.to_owned()))?;
    Ok(true)
}

/// Removes the drop-in; whether it existed.
pub fn uninstall(dropin: &Path) -> Result<bool> {
    match fs::remove_file(dropin) {
        Ok(()) => {
            if let Some(dir) = dropin.parent() {
                // Only if empty: other drop-ins stay.
                let _ = fs::remove_dir(dir);
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Write {
            path: dropin.to_owned(),
            source,
        }),
    }
}

/// `text` quoted for a POSIX shell inside the double-quoted `sh -c` argument of the unit file:
/// paths with only safe characters stay bare.
fn shell_quote(text: &str) -> String {
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs the drop-in's command line the way systemd would (after unquoting its argument).
    fn run_guard(text: &str) {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStartPre=-/bin/sh -c \""))
            .unwrap();
        let script = line.strip_suffix('"').unwrap();
        let status = Command::new("/bin/sh")
            .args(["-c", script])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn guard_restores_the_original_only_without_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "version = 2\n").unwrap();
        let installer = crate::Installer::new(&config, crate::Settings::default(), None);
        installer.install().unwrap();
        let patched = std::fs::read(&config).unwrap();
        let socket = dir.path().join("s.sock");
        let dropin = dir
            .path()
            .join("containerd.service.d/50-streamsnap-boot-guard.conf");
        assert!(install(&dropin, installer.paths(), &socket).unwrap());
        assert!(!install(&dropin, installer.paths(), &socket).unwrap());
        let text = std::fs::read_to_string(&dropin).unwrap();

        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        run_guard(&text);
        assert_eq!(std::fs::read(&config).unwrap(), patched, "daemon up: kept");
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
        run_guard(&text);
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "version = 2\n");
        assert!(
            installer.is_installed(),
            "backup and marker stay for the next install"
        );
        assert_eq!(installer.install().unwrap(), crate::Outcome::Changed);
        assert_eq!(std::fs::read(&config).unwrap(), patched);

        assert!(uninstall(&dropin).unwrap());
        assert!(!dropin.parent().unwrap().exists());
        assert!(!uninstall(&dropin).unwrap());
    }

    #[test]
    fn odd_paths_are_quoted() {
        assert_eq!(
            shell_quote("/etc/containerd/config.toml"),
            "/etc/containerd/config.toml"
        );
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
