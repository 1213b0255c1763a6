//! Running a program on the node itself: `containerd --version`, `systemctl restart containerd`.
//!
//! On a node, directly. From a container (the DaemonSet, with `hostPID: true` and privileges),
//! the child first joins the mount namespace of PID 1, the host's init, so it runs the host's
//! own binaries against the host's `/run` (systemd's socket), like `nsenter -t 1 -m`. Joining
//! happens after fork, in the single-threaded child: a multi-threaded process cannot change its
//! mount namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::version::ContainerdVersion;

/// The mount namespace of the host's init, seen from a container sharing the host's PIDs.
pub const HOST_MOUNT_NAMESPACE: &str = "/proc/1/ns/mnt";
/// `PATH` for programs run in the host's mount namespace: where distributions and kind install
/// containerd and systemctl.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where host programs run: here, or in another mount namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    mount_namespace: Option<PathBuf>,
}

impl Host {
    /// Programs run in this process's own mount namespace (on the node itself).
    pub fn local() -> Self {
        Self::default()
    }

    /// Programs run in the mount namespace at `ns` (e.g. [`HOST_MOUNT_NAMESPACE`]).
    pub fn in_mount_namespace(ns: &Path) -> Self {
        Self {
            mount_namespace: Some(ns.to_owned()),
        }
    }

    /// Runs `program args...` to completion; its stdout on success.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let command = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let spawn_err = |source| Error::Spawn {
            command: command.clone(),
            source,
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        if self.mount_namespace.is_some() {
            // The container's PATH says nothing about where the host keeps its programs.
            cmd.env("PATH", HOST_PATH);
        }
        // Kept open until the child has exec'd: its descriptor is what the child joins.
        let ns_file = match &self.mount_namespace {
            Some(ns) => Some(File::open(ns).map_err(|source| Error::Spawn {
                command: format!("{command} (opening {})", ns.display()),
                source,
            })?),
            None => None,
        };
        if let Some(file) = &ns_file {
            let fd = file.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and only makes the
            // setns system call on a descriptor the parent keeps open across the fork; it
            // allocates nothing and touches no lock, so it is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNS) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let output = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(spawn_err)?;
        drop(ns_file);
        if !output.status.success() {
            return Err(Error::Command {
                command,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `containerd --version`, parsed.
    pub fn containerd_version(&self) -> Result<ContainerdVersion> {
        let output = self.run("containerd", &["--version"])?;
        ContainerdVersion::from_version_output(&output)
    }

    /// `systemctl daemon-reload` (when `reload`, after a unit file changed), then `systemctl
    /// restart UNIT`. containerd's own unit stops only the daemon (`KillMode=process`): running
    /// containers and their shims keep running.
    pub fn restart_service(&self, unit: &str, reload: bool) -> Result<()> {
        if reload {
            self.run("systemctl", &["daemon-reload"])?;
        }
        self.run("systemctl", &["restart", unit])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_programs_and_reports_failures() {
        let host = Host::local();
        assert_eq!(host.run("echo", &["hi"]).unwrap(), "hi\n");
        let err = host.run("sh", &["-c", "echo no >&2; exit 3"]).unwrap_err();
        assert!(
            err.to_string().contains("sh -c echo no >&2; exit 3 failed"),
            "{err}"
        );
        assert!(err.to_string().ends_with(": no"), "{err}");
        assert!(matches!(
            host.run("streamsnap-no-such-program", &[]).unwrap_err(),
            Error::Spawn { .. }
        ));
    }

    #[test]
    fn joins_a_mount_namespace_it_is_given() {
        // Our own mount namespace: joining it is allowed for root and changes nothing visible.
        let ns = Path::new("/proc/self/ns/mnt");
        let host = Host::in_mount_namespace(ns);
        match host.run("true", &[]) {
            Ok(_) => {}
            // Not root (no CAP_SYS_ADMIN): the join is refused, and said so.
            Err(Error::Spawn { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPERM), "{source}");
            }
            Err(other) => panic!("{other}"),
        }
        let missing = Host::in_mount_namespace(Path::new("/nonexistent/ns"));
        assert!(
            missing
                .run("true", &[])
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/ns")
        );
    }
}
