//! Bringing the daemon's state back after a start: remote snapshots are mounted again before
//! the socket accepts calls, and a second daemon on the same root is refused.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;

use crate::snapshotter::Snapshotter;

/// An exclusive lock on the root directory, held for the daemon's life.
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

impl RootLock {
    pub fn acquire(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let path = root.join("lock");
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns and keeps open; no memory involved.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            anyhow::bail!(
                "another streamsnap-snapshotterd is running on {} (it holds {}); stop it first or use another --root",
                root.display(),
                path.display()
            );
        }
        Ok(Self { _file: file })
    }
}

/// Mounts every remote snapshot again from its saved TOC (stale mounts of a crashed daemon are
/// replaced). A snapshot that cannot be mounted is logged and left in place: containers using
/// it fail to read, the rest of the node works, and removing the image removes it. Returns the
/// numbers mounted and failed.
pub fn remount_remote_snapshots(snapshotter: &Snapshotter) -> anyhow::Result<(usize, usize)> {
    let Some(remote) = &snapshotter.remote else {
        return Ok((0, 0));
    };
    let (mut mounted, mut failed) = (0, 0);
    for (key, record) in snapshotter.store.list()? {
        let Some(source) = &record.remote else {
            continue;
        };
        match remote.remount(record.id, &snapshotter.snapshot_dir(record.id), source) {
            Ok(()) => mounted += 1,
            Err(error) => {
                failed += 1;
                tracing::error!(key, error = %crate::error::chain(&error), "cannot mount a remote snapshot again");
            }
        }
    }
    Ok((mounted, failed))
}
