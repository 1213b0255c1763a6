//! Commit: an active snapshot becomes an immutable, named one.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::snapshotter::Snapshotter;
use crate::store::{Kind, Record, Timestamp};
use crate::usage::disk_usage;

impl Snapshotter {
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let active = self.record(key)?;
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        // Measured before the transaction: a commit must not hold the store while walking a tree.
        let usage = disk_usage(&self.fs_dir(active.id))?;
        self.store.write(|tx| {
            let current = tx.get(key)?.ok_or_else(|| Error::NotFound {
                key: key.to_owned(),
            })?;
            if current.kind != Kind::Active || current.id != active.id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed during commit"
                )));
            }
            if tx.get(name)?.is_some() {
                return Err(Error::AlreadyExists {
                    key: name.to_owned(),
                });
            }
            let now = Timestamp::now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                usage: Some(usage),
                ..current
            };
            tx.delete(key)?;
            tx.put(name, &committed)
        })
    }
}
