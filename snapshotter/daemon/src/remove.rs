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
    ///
    /// Races with snapshots being created: the directories are listed first, then the ids being
    /// created, then the records. A directory listed belongs to a snapshot that was created
    /// before (its record is found), is still being created (its id is found), or failed.
    pub fn cleanup(&self) -> Result<()> {
        let snapshots = self.root.join("snapshots");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&snapshots).map_err(Error::io("listing", &snapshots))? {
            let entry = entry.map_err(Error::io("listing", &snapshots))?;
            found.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ));
        }
        let mut known: HashSet<String> = self
            .creating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(u64::to_string)
            .collect();
        known.extend(
            self.store
                .list()?
                .into_iter()
                .map(|(_, r)| r.id.to_string()),
        );
        for (name, path) in found {
            if known.contains(&name) {
                continue;
            }
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
