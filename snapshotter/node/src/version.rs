//! Which containerd and which machine this is, and whether streamsnap supports them.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The oldest containerd streamsnap supports: 1.6 sends the CRI image labels to a remote
/// snapshotter (with `disable_snapshot_annotations = false`).
pub const MIN_CONTAINERD: ContainerdVersion = ContainerdVersion {
    major: 1,
    minor: 6,
    patch: 0,
};
/// The newest major version whose config layout streamsnap knows.
const MAX_MAJOR: u32 = 2;

/// A containerd release, e.g. 1.6.20 (distribution suffixes such as `~ds1` dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for ContainerdVersion {
    type Err = Error;

    /// `1.6.20`, `v1.7.13`, `1.6.20~ds1`, `2.0.0-rc.1`, `1.7` (patch 0).
    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::VersionOutput {
            output: text.to_owned(),
        };
        let text = text.strip_prefix('v').unwrap_or(text);
        let mut numbers = text.splitn(3, '.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = numbers.next().flatten().ok_or_else(bad)?;
        let minor = numbers.next().flatten().ok_or_else(bad)?;
        let patch = numbers.next().flatten().unwrap_or(0);
        Ok(Self {
            major,
            minor,
            patch,
        })
    }
}

impl ContainerdVersion {
    /// The version in the output of `containerd --version`, e.g. `containerd
    /// github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` or `containerd
    /// github.com/containerd/containerd/v2 v2.0.0 207ad711...`: the first word after the
    /// module path that reads as a version.
    pub fn from_version_output(output: &str) -> Result<Self> {
        let line = output
            .lines()
            .find(|l| l.contains("containerd"))
            .unwrap_or("");
        line.split_whitespace()
            .skip_while(|w| !w.contains("github.com/containerd/containerd"))
            .skip(1)
            .find_map(|w| w.parse().ok())
            .ok_or_else(|| Error::VersionOutput {
                output: output.trim().to_owned(),
            })
    }

    /// Refuses a containerd older than [`MIN_CONTAINERD`] or of an unknown major version.
    pub fn check_supported(&self) -> Result<()> {
        if *self < MIN_CONTAINERD {
            return Err(Error::Unsupported(format!(
                "containerd {self} is too old: streamsnap needs containerd {}.{} or later (it \
                 sends the image labels a remote snapshotter needs); upgrade containerd",
                MIN_CONTAINERD.major, MIN_CONTAINERD.minor
            )));
        }
        if self.major > MAX_MAJOR {
            return Err(Error::Unsupported(format!(
                "containerd {self} is newer than streamsnap knows (up to {MAX_MAJOR}.x): its \
                 config layout may differ; configure it by hand (docs/snapshotter.md)"
            )));
        }
        Ok(())
    }
}

/// Refuses a machine other than amd64 (`uname -m` x86_64): streaming artifacts are made from
/// linux/amd64 images only.
pub fn check_machine(machine: &str) -> Result<()> {
    if machine == "x86_64" {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "this node is {machine}, streamsnap supports amd64 (x86_64) nodes only: keep the \
             DaemonSet off it with a kubernetes.io/arch=amd64 node selector"
        )))
    }
}

/// `uname -m` of the running kernel.
pub fn machine() -> String {
    // SAFETY: utsname is plain old data; all-zero bytes are a valid value for it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own and pass by valid pointer.
    if unsafe { libc::uname(&mut name) } != 0 {
        return String::from("unknown");
    }
    let bytes: Vec<u8> = name
        .machine
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(text: &str) -> Result<ContainerdVersion> {
        ContainerdVersion::from_version_output(text)
    }

    #[test]
    fn reads_distribution_and_upstream_outputs() {
        let debian =
            out("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n")
                .unwrap();
        assert_eq!(debian.to_string(), "1.6.20");
        let upstream = out("containerd github.com/containerd/containerd v1.7.13 7c3aca7a6\n");
        assert_eq!(upstream.unwrap().to_string(), "1.7.13");
        let two = out("containerd github.com/containerd/containerd/v2 v2.0.0 207ad711e\n").unwrap();
        assert_eq!(two.major, 2);
        let aks = out("containerd github.com/containerd/containerd 1.7.15-1 926c9586fe4a\n");
        assert_eq!(aks.unwrap().to_string(), "1.7.15");
        assert!(out("bash: containerd: command not found").is_err());
        assert!(out("containerd github.com/containerd/containerd unknown").is_err());
    }

    #[test]
    fn too_old_and_too_new_are_refused() {
        let v = |s: &str| s.parse::<ContainerdVersion>().unwrap();
        assert!(v("1.6.0").check_supported().is_ok());
        assert!(v("2.1.4").check_supported().is_ok());
        let old = v("1.5.18").check_supported().unwrap_err().to_string();
        assert!(old.contains("containerd 1.5.18 is too old"), "{old}");
        assert!(v("3.0.0").check_supported().is_err());
        assert!(v("1.7").patch == 0 && v("2.0.0-rc.1").minor == 0);
    }

    #[test]
    fn only_amd64_is_accepted() {
        assert!(check_machine("x86_64").is_ok());
        let err = check_machine("aarch64").unwrap_err().to_string();
        assert!(err.contains("this node is aarch64"), "{err}");
        assert!(!machine().is_empty());
    }
}
