//! Snapshot metadata in an embedded, transactional store (redb): one record per snapshot key,
//! and a counter for snapshot ids. Survives restarts; every mutation is one transaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use streamsnap_format::Digest;

use crate::error::{Error, Result};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }
    }
}

/// Disk usage of a snapshot's own directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Where a remote (FUSE-mounted) snapshot's content comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSource {
    /// Registry host and repository of the streaming artifact.
    pub registry: String,
    pub repository: String,
    /// The original layer this snapshot stands for.
    pub layer_digest: Digest,
    /// Its streaming layer: TOC and chunk data blob.
    pub toc_digest: Digest,
    pub data_digest: Digest,
    pub data_size: u64,
    /// The index kind: the artifact's checkpoints blob; the data blob is then the original
    /// layer itself (docs/format.md). Absent for the chunked kind (and in records of builds
    /// before the index kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointsBlob>,
    /// The layer's mount presents it merged with every layer below it (all remote, each merged
    /// in turn, down to the image's first): overlayfs takes this mount as the only lower
    /// directory from here down. False in records of builds before merged mounts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
}

/// The checkpoints blob of a layer of the index kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointsBlob {
    pub digest: Digest,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// Measured at commit.
    pub usage: Option<Usage>,
    pub remote: Option<RemoteSource>,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)
            .map_err(|e| Error::store("opening the metadata database")(e.into()))?;
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    /// Every snapshot, in key order.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (key, value) = item?;
            out.push((key.value().to_owned(), decode(key.value(), value.value())?));
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction, committed if `f` succeeds.
    pub fn write<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut tx = Txn {
                snapshots: txn.open_table(SNAPSHOTS)?,
                counters: txn.open_table(COUNTERS)?,
            };
            f(&mut tx)?
        };
        txn.commit()?;
        Ok(result)
    }
}

/// A write transaction's view of the tables.
pub struct Txn<'t> {
    snapshots: redb::Table<'t, &'static str, &'static [u8]>,
    counters: redb::Table<'t, &'static str, u64>,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn").finish_non_exhaustive()
    }
}

impl Txn<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let value = self.snapshots.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn put(&mut self, key: &str, record: &Record) -> Result<()> {
        let value = serde_json::to_vec(record).map_err(|source| Error::Record {
            key: key.to_owned(),
            source,
        })?;
        self.snapshots.insert(key, value.as_slice())?;
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<()> {
        self.snapshots.remove(key)?;
        Ok(())
    }

    /// Whether any snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool> {
        for item in self.snapshots.iter()? {
            let (child, value) = item?;
            if decode(child.value(), value.value())?.parent.as_deref() == Some(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A committed snapshot with `label`=`value` and this parent, if any.
    pub fn find_committed(
        &self,
        label: &str,
        value: &str,
        parent: Option<&str>,
    ) -> Result<Option<String>> {
        for item in self.snapshots.iter()? {
            let (key, raw) = item?;
            let record = decode(key.value(), raw.value())?;
            if record.kind == Kind::Committed
                && record.parent.as_deref() == parent
                && record.labels.get(label).map(String::as_str) == Some(value)
            {
                return Ok(Some(key.value().to_owned()));
            }
        }
        Ok(None)
    }

    /// A new snapshot id, never reused.
    pub fn next_id(&mut self) -> Result<u64> {
        let id = self.counters.get(NEXT_ID)?.map_or(1, |v| v.value());
        self.counters.insert(NEXT_ID, id + 1)?;
        Ok(id)
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Record> {
    serde_json::from_slice(value).map_err(|source| Error::Record {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: Option<&str>) -> Record {
        Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels: BTreeMap::new(),
            created: Timestamp::now(),
            updated: Timestamp::now(),
            usage: None,
            remote: None,
        }
    }

    #[test]
    fn records_and_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|tx| {
                    let id = tx.next_id()?;
                    tx.put("a", &record(id, Kind::Committed, None))?;
                    let id = tx.next_id()?;
                    tx.put("b", &record(id, Kind::Active, Some("a")))
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.get("b").unwrap().unwrap().parent.as_deref(),
            Some("a")
        );
        assert_eq!(store.list().unwrap().len(), 2);
        let next = store.write(|tx| tx.next_id()).unwrap();
        assert_eq!(next, 3, "ids are never reused");
        assert!(store.write(|tx| tx.has_children("a")).unwrap());
        assert!(!store.write(|tx| tx.has_children("b")).unwrap());
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.db")).unwrap();
        let result: Result<()> = store.write(|tx| {
            tx.put("x", &record(1, Kind::Active, None))?;
            Err(Error::InvalidArgument("abort".into()))
        });
        assert!(result.is_err());
        assert!(store.get("x").unwrap().is_none());
    }
}
