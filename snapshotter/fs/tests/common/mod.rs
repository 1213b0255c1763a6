//! Shared by the integration tests: the crate's own test helpers, plus mount bookkeeping that
//! cleans up even when a test fails.
#![allow(dead_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use streamsnap_fs::{BoxFuture, ChunkReader, ChunkTable, ReadError};
use streamsnap_fs::{FsOptions, LayerFs, MountOptions, MountedLayer};

#[path = "../../src/testutil.rs"]
pub mod testutil;

/// Fails the test unless FUSE mounts can be made here, or says why it is skipped when
/// `STREAMSNAP_SKIP_FUSE_TESTS=1` allows skipping.
pub fn fuse_available() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = format!("FUSE tests need root and /dev/fuse (root: {root}, /dev/fuse: {dev})");
    if std::env::var_os("STREAMSNAP_SKIP_FUSE_TESTS").is_some_and(|v| v == "1") {
        eprintln!("skipped: {why}");
        return false;
    }
    panic!("{why}; set STREAMSNAP_SKIP_FUSE_TESTS=1 to skip them");
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn mount_options() -> MountOptions {
    MountOptions {
        fsname: "streamsnap-test".into(),
        threads: 2,
        ..MountOptions::default()
    }
}

/// A layer mounted on a directory of its own. Field order is drop order: the mount goes first,
/// then the directory.
pub struct Mounted {
    pub layer: Option<MountedLayer>,
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(
        toc: Arc<streamsnap_format::Toc>,
        reader: Arc<dyn ChunkReader>,
        handle: tokio::runtime::Handle,
    ) -> Self {
        Self::with_options(toc, reader, handle, &mount_options())
    }

    pub fn with_options(
        toc: Arc<streamsnap_format::Toc>,
        reader: Arc<dyn ChunkReader>,
        handle: tokio::runtime::Handle,
        options: &MountOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(LayerFs::new(toc, reader, FsOptions::default()).unwrap());
        let layer = streamsnap_fs::mount(fs, dir.path(), handle, options).unwrap();
        Self {
            layer: Some(layer),
            dir,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    pub fn join(&self, relative: &str) -> PathBuf {
        self.path().join(relative)
    }

    pub fn unmount(&mut self) -> std::io::Result<()> {
        self.layer.take().map_or(Ok(()), MountedLayer::unmount)
    }
}

/// Detaches a mount on drop (overlays, and mounts left by a killed child).
pub struct DetachOnDrop(pub PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if mount_entry(&self.0).is_some() {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The mount on exactly `path` in /proc/self/mountinfo: (mount options, fs type, source).
pub fn mount_entry(path: &Path) -> Option<(String, String, String)> {
    let path = path.to_str().unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(4) == Some(&path)).then(|| {
            (
                fields[5].to_string(),
                fields[dash + 1].to_string(),
                fields[dash + 2].to_string(),
            )
        })
    })
}

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// The value of one series in the registry's text exposition, as Prometheus would scrape it:
/// `name` with exactly `labels`; 0 if the series does not exist (yet).
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut got: Vec<String> = series_labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        got.sort();
        if series_name == name && got == wanted {
            return value.parse().unwrap();
        }
    }
    0.0
}

pub fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// `lgetxattr`; with `size` 0 it returns the value's length as the kernel reports it.
pub fn getxattr(path: &Path, name: &str, size: usize) -> io::Result<(isize, Vec<u8>)> {
    let path = c_path(path);
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf` is writable for
    // `buf.len()` bytes (a null-sized buffer is allowed with size 0).
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(if size == 0 { 0 } else { n as usize });
    Ok((n, buf))
}
