//! Stat, Update, Usage, List and Mounts: reads, and label updates.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::filter;
use crate::snapshotter::{Info, Mount, Snapshotter};
use crate::store::{Kind, Timestamp, Usage};
use crate::usage::disk_usage;

impl Snapshotter {
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(Info::from_record(key, &self.record(key)?))
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.mounts_of(&self.record(key)?)
    }

    /// Updates labels, the only mutable field. `fieldpaths` empty or `labels` replaces them all;
    /// `labels.<key>` sets or removes one.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Info> {
        self.store.write(|tx| {
            let mut record = tx.get(name)?.ok_or_else(|| Error::NotFound {
                key: name.to_owned(),
            })?;
            if fieldpaths.is_empty() {
                record.labels = labels.clone();
            }
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match labels.get(label) {
                        Some(value) => record.labels.insert(label.to_owned(), value.clone()),
                        None => record.labels.remove(label),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {path:?}: only labels can change"
                    )));
                }
            }
            record.updated = Timestamp::now();
            tx.put(name, &record)?;
            Ok(Info::from_record(name, &record))
        })
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.record(key)?;
        match (record.kind, record.usage) {
            (Kind::Committed, Some(usage)) => Ok(usage),
            _ => disk_usage(&self.fs_dir(record.id)),
        }
    }

    /// Snapshots matching any of `filters` (all when none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = filter::parse_all(filters)?;
        Ok(self
            .store
            .list()?
            .iter()
            .map(|(key, record)| Info::from_record(key, record))
            .filter(|info| filter::matches_any(&filters, info))
            .collect())
    }
}
