//! A minimal runnable rootfs: the host's static busybox (Debian package `busybox-static`) with
//! applet symlinks, `/etc/passwd` and `/etc/group` (root and `user` 1000), and the dirs a runtime
//! mounts over. Images built on it run with `ctr run` and CRI, so tests can read files from
//! inside a container.

use std::sync::OnceLock;

use anyhow::Context;

use crate::image::{ImageSpec, LayerBlob};
use crate::targen::{EntryOpts, TarGen};

/// Where the static busybox is taken from.
pub const HOST_BUSYBOX: &str = "/usr/bin/busybox";
/// The applets linked in `/bin` (`/bin/NAME -> busybox`).
pub const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "ls",
    "sha256sum",
    "wc",
    "head",
    "echo",
    "true",
    "false",
    "sleep",
    "stat",
    "id",
    "find",
    "dd",
    "env",
    "tail",
    "grep",
    "readlink",
    "test",
];
/// Content of `/etc/hostname` in the busybox layer.
pub const HOSTNAME: &str = "streamsnap-e2e\n";
pub const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n";
pub const GROUP: &str = "root:x:0:\nuser:x:1000:\n";

/// The uncompressed tar of the busybox rootfs. See the module doc. Built once per process.
pub fn busybox_layer() -> anyhow::Result<Vec<u8>> {
    static LAYER: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(layer) = LAYER.get() {
        return Ok(layer.clone());
    }
    let busybox = std::fs::read(HOST_BUSYBOX).with_context(|| {
        format!("reading {HOST_BUSYBOX}: install the Debian package busybox-static")
    })?;
    let mut t = TarGen::new();
    t.dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.dir("etc", 0o755)
        .file("etc/passwd", 0o644, PASSWD.as_bytes())
        .file("etc/group", 0o644, GROUP.as_bytes())
        .file("etc/hostname", 0o644, HOSTNAME.as_bytes())
        .dir("tmp", 0o1777)
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("root", 0o700)
        .dir("home", 0o755)
        .dir_with("home/user", EntryOpts::mode(0o755).owner(1000, 1000));
    Ok(LAYER.get_or_init(|| t.finish()).clone())
}

impl ImageSpec {
    /// linux/amd64: the gzip'd [`busybox_layer`] at the bottom, then `extra_layers`;
    /// `Cmd ["/bin/sh"]` and the default `PATH`.
    pub fn busybox(extra_layers: Vec<LayerBlob>) -> anyhow::Result<Self> {
        let mut layers = vec![LayerBlob::gzip(busybox_layer()?)];
        layers.extend(extra_layers);
        Ok(Self::linux_amd64(layers).with_cmd(&["/bin/sh"]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_has_busybox_and_its_applets() {
        let tar = busybox_layer().unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name == "bin/sh" {
                assert_eq!(
                    entry.link_name().unwrap().unwrap().to_str(),
                    Some("busybox")
                );
            }
            if name == "tmp/" {
                assert_eq!(entry.header().mode().unwrap(), 0o1777);
            }
            names.push(name);
        }
        for expected in [
            "bin/busybox",
            "bin/cat",
            "etc/passwd",
            "etc/group",
            "dev/",
            "proc/",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        let spec = ImageSpec::busybox(Vec::new()).unwrap();
        assert_eq!(spec.cmd, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(spec.layers.len(), 1);
    }
}
