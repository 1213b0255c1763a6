//! Bringing the daemon's state back after a start: remote snapshots are mounted again before
//! the socket accepts calls, and a second daemon on the same root is refused.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use std::collections::HashMap;

use anyhow::Context;
use streamsnap_fs::FuseConnection;

use crate::metrics::Metrics;
use crate::snapshotter::{MAX_CHAIN, Snapshotter};

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

/// Written by a daemon that handed its layers over cleanly, read (and removed) by the next: no
/// request was left unanswered, so nothing needs resending.
pub const HANDED_OVER: &str = "handed-over";

/// Serves every remote snapshot again before the socket accepts calls. Connections the holder
/// kept are taken over (their mounts never went away, running containers keep reading); after a
/// crash the kernel is asked to resend what the dead daemon took, and where it cannot (Linux
/// before 6.9, or `[fuse] kernel_features_off` lists `resend`) the layer is mounted afresh
/// instead. Snapshots without a kept connection are
/// mounted afresh. No layer's metadata is read here: each loads its saved index when its first
/// request comes, so this takes the same time whatever the images' sizes. A snapshot that
/// cannot be served is logged and left in place: containers using it fail to read, the rest of
/// the node works, and removing the image removes it. Returns the numbers served and failed.
pub fn remount_remote_snapshots(
    snapshotter: &Snapshotter,
    metrics: &Metrics,
) -> anyhow::Result<(usize, usize)> {
    let Some(remote) = &snapshotter.remote else {
        return Ok((0, 0));
    };
    let marker = snapshotter.root.join(HANDED_OVER);
    let clean = marker.exists();
    let _ = std::fs::remove_file(&marker);
    let mut held: HashMap<u64, FuseConnection> = HashMap::new();
    if let Some(holder) = remote.holder() {
        for kept in holder
            .list()
            .context("listing the connections the FUSE holder keeps")?
        {
            match FuseConnection::from_parts(kept.fd, kept.init) {
                Ok(connection) => {
                    held.insert(kept.id, connection);
                }
                Err(error) => {
                    tracing::warn!(id = kept.id, %error, "the FUSE holder kept an unusable connection")
                }
            }
        }
    }
    let mut cannot_resend_logged = false;
    let (mut mounted, mut failed) = (0, 0);
    // Layers below first: a merged layer's mount serves them too, and needs the ids of the
    // snapshots below it, nearest first (found in the listing, not read again).
    let records = snapshotter.store.list()?;
    let parents: HashMap<&str, (u64, Option<&str>)> = records
        .iter()
        .map(|(key, record)| (key.as_str(), (record.id, record.parent.as_deref())))
        .collect();
    let mut remote_records: Vec<_> = records
        .iter()
        .filter_map(|(key, record)| {
            let source = record.remote.as_ref()?;
            Some((
                key,
                record,
                source,
                below(&parents, record.parent.as_deref()),
            ))
        })
        .collect();
    remote_records.sort_by_key(|(_, _, _, (lowers, _))| lowers.len());
    for (key, record, source, (lowers, whole)) in remote_records {
        if source.merged && !whole {
            failed += 1;
            tracing::error!(
                key,
                "cannot serve a merged remote snapshot again: the snapshots below it are not all there"
            );
            continue;
        }
        let (connection, resend, kind) = match held.remove(&record.id) {
            Some(connection) if clean => (Some(connection), false, "graceful"),
            Some(connection) if connection.resend_supported() && remote.resend_allowed() => {
                (Some(connection), true, "crash")
            }
            Some(_) => {
                if !cannot_resend_logged && !remote.resend_allowed() {
                    tracing::warn!(
                        "[fuse] kernel_features_off lists resend: after this crash, layers are mounted afresh and containers that were reading them may see errors"
                    );
                    cannot_resend_logged = true;
                } else if !cannot_resend_logged {
                    tracing::warn!(
                        "this kernel cannot resend FUSE requests (Linux 6.9+ can): after a crash, layers are mounted afresh and containers that were reading them may see errors"
                    );
                    cannot_resend_logged = true;
                }
                if let Some(holder) = remote.holder() {
                    let _ = holder.remove(record.id);
                }
                (None, false, "remount")
            }
            None => (None, false, "remount"),
        };
        match remote.remount(
            record.id,
            &snapshotter.snapshot_dir(record.id),
            source,
            &lowers,
            connection,
            resend,
        ) {
            Ok(()) => {
                mounted += 1;
                metrics.handovers.with_label_values(&[kind]).inc();
            }
            Err(error) => {
                failed += 1;
                tracing::error!(key, error = %crate::error::chain(&error), "cannot serve a remote snapshot again");
            }
        }
    }
    // Connections of snapshots removed meanwhile: let them go.
    for (id, _) in held {
        if let Some(holder) = remote.holder() {
            let _ = holder.remove(id);
        }
        crate::mounter::detach_all_under(&snapshotter.snapshot_dir(id));
    }
    Ok((mounted, failed))
}

/// The ids of the snapshots below `parent` (itself first) in `parents` (key -> id and parent),
/// and whether they reach the image's first layer (false: a parent missing, or a chain deeper
/// than [`MAX_CHAIN`]).
fn below<'a>(
    parents: &HashMap<&'a str, (u64, Option<&'a str>)>,
    mut parent: Option<&'a str>,
) -> (Vec<u64>, bool) {
    let mut ids = Vec::new();
    while let Some(key) = parent {
        match parents.get(key) {
            Some(&(id, next)) if ids.len() < MAX_CHAIN => {
                ids.push(id);
                parent = next;
            }
            _ => return (ids, false),
        }
    }
    (ids, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshots_below_are_found_in_the_listing_and_a_gap_is_told() {
        let parents: HashMap<&str, (u64, Option<&str>)> = [
            ("base", (1, None)),
            ("mid", (2, Some("base"))),
            ("top", (3, Some("mid"))),
            ("orphan", (4, Some("gone"))),
        ]
        .into_iter()
        .collect();
        assert_eq!(below(&parents, Some("top")), (vec![3, 2, 1], true));
        assert_eq!(below(&parents, None), (vec![], true));
        assert_eq!(below(&parents, Some("orphan")), (vec![4], false));
        assert_eq!(below(&parents, Some("gone")), (vec![], false));
    }
}
