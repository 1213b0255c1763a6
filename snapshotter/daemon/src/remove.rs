//! Remove and Cleanup.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::snapshotter::Snapshotter;

impl Snapshotter {
    /// Removes a snapshot without children. Its directory goes right after (a leftover, e.g.
    /// after a crash, is removed by Cleanup).
    pub fn remove(&self, key: &str) -> Result<()> {
        let record = self.store.write(|tx| {
            let record = tx.get(key)?.ok_or_else(|| Error::NotFound {
                key: key.to_owned(),
            })?;
            if tx.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has children: remove them first"
                )));
            }
            tx.delete(key)?;
            Ok(record)
        })?;
        if record.remote.is_some()
            && let Some(remote) = &self.remote
        {
            remote.unmount(record.id);
        }
        let dir = self.snapshot_dir(record.id);
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), %error, "removing a snapshot directory failed; cleanup will retry");
        }
        Ok(())
    }

    /// Removes snapshot directories no record refers to (and unmounts what is mounted there).
    pub fn cleanup(&self) -> Result<()> {
        let known: HashSet<String> = self
            .store
            .list()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(Error::io("listing", &snapshots))?;
        for entry in entries {
            let entry = entry.map_err(Error::io("listing", &snapshots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            let path = entry.path();
            if let (Ok(id), Some(remote)) = (name.parse::<u64>(), &self.remote) {
                remote.unmount(id);
            }
            crate::mounter::detach_all_under(&path);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed an unused snapshot directory")
                }
                Err(error) => {
                    tracing::warn!(dir = %path.display(), %error, "cleanup could not remove a directory")
                }
            }
        }
        Ok(())
    }
}
