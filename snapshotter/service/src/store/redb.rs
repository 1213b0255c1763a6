//! The embedded store: redb, one file in the state dir, one process at a time (redb locks the
//! file). Records are JSON; the queue is a table ordered by creation sequence, kept in step with
//! the operations' states by every write.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use streamsnap_format::Digest;

use super::{
    Created, Lease, NewOperation, Reap, Recovered, Settings, SettingsChange, manifest_key, millis,
    reap_one, start,
};
use crate::api::{
    ArtifactKind, Counts, Operation, OperationState, Progress, Repository, Streaming, Timestamp,
};
use crate::error::{Error, Result};
use crate::ids;

const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
const REPOSITORIES: TableDefinition<&str, &[u8]> = TableDefinition::new("repositories");
/// `repository@digest` -> ID of the newest operation for that manifest.
const LATEST: TableDefinition<&str, &str> = TableDefinition::new("latest_by_manifest");
/// Registry event ID -> when it was first handled (ms since the epoch).
const EVENTS: TableDefinition<&str, u64> = TableDefinition::new("events");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Sequence number -> ID of every NotStarted operation: the queue.
const QUEUE: TableDefinition<u64, &str> = TableDefinition::new("queue");
/// ID of a Running operation -> when its worker's lease ends (ms since the epoch).
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases");
const NEXT_SEQ: &str = "next_seq";

/// A repository's stored state. Records written before the kind existed have none: chunked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RepositoryRecord {
    pub streaming: Streaming,
    #[serde(default)]
    pub kind: ArtifactKind,
    pub updated: Timestamp,
}

impl RepositoryRecord {
    pub fn settings(&self) -> Settings {
        Settings {
            streaming: self.streaming,
            kind: self.kind,
        }
    }

    /// The record of `before` (none: the defaults) changed by `change`, updated now.
    pub fn changed(before: Option<Settings>, change: SettingsChange) -> Self {
        let mut settings = before.unwrap_or_default();
        change.apply(&mut settings);
        Self {
            streaming: settings.streaming,
            kind: settings.kind,
            updated: Timestamp::now(),
        }
    }
}

#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

type Table<'t, K, V> = redb::Table<'t, K, V>;

impl RedbStore {
    /// Opens (or creates) the file and rebuilds the queue from the operations (a file written
    /// before the queue table existed has none).
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|e| Error::Store {
            context: "opening the database (is another `streamsnap serve` using this state dir?)",
            source: e.into(),
        })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(REPOSITORIES)?;
            txn.open_table(LATEST)?;
            txn.open_table(EVENTS)?;
            txn.open_table(COUNTERS)?;
            let ops = txn.open_table(OPERATIONS)?;
            let mut queue = txn.open_table(QUEUE)?;
            let mut leases = txn.open_table(LEASES)?;
            queue.retain(|_, _| false)?;
            for item in ops.iter()? {
                let (id, value) = item?;
                let op: Operation = decode(id.value(), value.value())?;
                if op.state == OperationState::NotStarted {
                    queue.insert(op.seq, op.id.as_str())?;
                }
            }
            // Leases of a previous process mean nothing now; reap(AllRunning) ends them.
            leases.retain(|_, _| false)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn settings(&self, name: &str) -> Result<Settings> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REPOSITORIES)?;
        let record = table
            .get(name)?
            .map(|v| decode::<RepositoryRecord>(name, v.value()))
            .transpose()?;
        Ok(record.map(|r| r.settings()).unwrap_or_default())
    }

    pub fn update_settings(&self, name: &str, change: SettingsChange) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(REPOSITORIES)?;
            let before = table
                .get(name)?
                .map(|v| decode::<RepositoryRecord>(name, v.value()))
                .transpose()?
                .map(|r| r.settings());
            let record = RepositoryRecord::changed(before, change);
            table.insert(name, encode(name, &record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn repositories(&self, only: Option<&str>) -> Result<Vec<Repository>> {
        let txn = self.db.begin_read()?;
        let mut out: BTreeMap<String, Repository> = BTreeMap::new();
        if let Some(name) = only {
            out.insert(name.to_owned(), blank_repository(name));
        }
        for item in txn.open_table(REPOSITORIES)?.iter()? {
            let (name, value) = item?;
            let name = name.value();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let record: RepositoryRecord = decode(name, value.value())?;
            let entry = out
                .entry(name.to_owned())
                .or_insert_with(|| blank_repository(name));
            entry.streaming = record.streaming;
            entry.kind = record.kind;
            entry.updated = Some(record.updated);
        }
        for item in txn.open_table(OPERATIONS)?.iter()? {
            let (id, value) = item?;
            let op: Operation = decode(id.value(), value.value())?;
            if only.is_some_and(|o| o != op.repository) {
                continue;
            }
            out.entry(op.repository.clone())
                .or_insert_with(|| blank_repository(&op.repository))
                .operations
                .add(op.state);
        }
        Ok(out.into_values().collect())
    }

    pub fn create_operation(&self, new: NewOperation) -> Result<Created> {
        let txn = self.db.begin_write()?;
        let created = {
            let mut ops = txn.open_table(OPERATIONS)?;
            let mut latest = txn.open_table(LATEST)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut counters = txn.open_table(COUNTERS)?;
            let mut queue = txn.open_table(QUEUE)?;
            let now = Timestamp::now();
            if let Some(event) = &new.event_id {
                if events.get(event.as_str())?.is_some() {
                    return Ok(Created::DuplicateEvent);
                }
                events.insert(event.as_str(), now.0)?;
            }
            let key = manifest_key(&new.repository, &new.manifest_digest);
            let previous = match latest.get(key.as_str())? {
                Some(id) => {
                    let id = id.value().to_owned();
                    ops.get(id.as_str())?
                        .map(|v| decode::<Operation>(&id, v.value()))
                        .transpose()?
                }
                None => None,
            };
            match previous {
                Some(op) if blocks_new(&op, &new) => Created::Existing(op),
                _ => {
                    let seq = counters.get(NEXT_SEQ)?.map_or(1, |v| v.value());
                    counters.insert(NEXT_SEQ, seq + 1)?;
                    let mut id = ids::new_id();
                    while ops.get(id.as_str())?.is_some() {
                        id = ids::new_id();
                    }
                    let op = new_operation(id, seq, new, now);
                    ops.insert(op.id.as_str(), encode(&op.id, &op)?.as_slice())?;
                    latest.insert(key.as_str(), op.id.as_str())?;
                    queue.insert(seq, op.id.as_str())?;
                    Created::New(op)
                }
            }
        };
        txn.commit()?;
        Ok(created)
    }

    pub fn operation(&self, id: &str) -> Result<Option<Operation>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OPERATIONS)?;
        let value = table.get(id)?;
        value.map(|v| decode(id, v.value())).transpose()
    }

    pub fn latest_for(&self, repository: &str, digest: &Digest) -> Result<Option<Operation>> {
        let txn = self.db.begin_read()?;
        let latest = txn.open_table(LATEST)?;
        let Some(id) = latest.get(manifest_key(repository, digest).as_str())? else {
            return Ok(None);
        };
        let ops = txn.open_table(OPERATIONS)?;
        let value = ops.get(id.value())?;
        value.map(|v| decode(id.value(), v.value())).transpose()
    }

    pub fn operations(
        &self,
        repository: &str,
        filter: impl Fn(&Operation) -> bool,
    ) -> Result<Vec<Operation>> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in txn.open_table(OPERATIONS)?.iter()? {
            let (id, value) = item?;
            let op: Operation = decode(id.value(), value.value())?;
            if op.repository == repository && filter(&op) {
                out.push(op);
            }
        }
        out.sort_by_key(|op| std::cmp::Reverse(op.seq));
        Ok(out)
    }

    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Operation) -> bool,
    ) -> Result<Option<Operation>> {
        let txn = self.db.begin_write()?;
        let op = {
            let mut tables = Tables::open(&txn)?;
            match tables.get(id)? {
                None => None,
                Some(mut op) => {
                    let before = op.state;
                    if change(&mut op) {
                        op.updated = Timestamp::now();
                        tables.put(&op, before, None)?;
                    }
                    Some(op)
                }
            }
        };
        txn.commit()?;
        Ok(op)
    }

    pub fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Operation>> {
        let txn = self.db.begin_write()?;
        let op = {
            let mut tables = Tables::open(&txn)?;
            let first = tables.queue.first()?.map(|(_, id)| id.value().to_owned());
            match first {
                None => None,
                Some(id) => match tables.get(&id)? {
                    Some(mut op) if op.state == OperationState::NotStarted => {
                        start(&mut op, worker);
                        let until = Timestamp::now().0.saturating_add(millis(lease));
                        tables.put(&op, OperationState::NotStarted, Some(until))?;
                        Some(op)
                    }
                    // Out of step (cannot happen: every write keeps it); drop the entry.
                    _ => {
                        tables.queue.retain(|_, v| v != id)?;
                        None
                    }
                },
            }
        };
        txn.commit()?;
        Ok(op)
    }

    pub fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease: Duration,
        progress: Progress,
    ) -> Result<Lease> {
        let txn = self.db.begin_write()?;
        let held = {
            let mut tables = Tables::open(&txn)?;
            match tables.get(id)? {
                Some(mut op)
                    if op.state == OperationState::Running
                        && op.worker.as_deref() == Some(worker) =>
                {
                    if op.progress != progress {
                        op.progress = progress;
                        op.updated = Timestamp::now();
                    }
                    let until = Timestamp::now().0.saturating_add(millis(lease));
                    tables.put(&op, OperationState::Running, Some(until))?;
                    Lease::Held {
                        cancel_requested: op.cancel_requested,
                    }
                }
                _ => Lease::Lost,
            }
        };
        txn.commit()?;
        Ok(held)
    }

    pub fn reap(&self, scope: Reap, max_interruptions: u32) -> Result<Recovered> {
        let txn = self.db.begin_write()?;
        let mut recovered = Recovered::default();
        {
            let mut tables = Tables::open(&txn)?;
            let now = Timestamp::now().0;
            let mut gone = Vec::new();
            for item in tables.ops.iter()? {
                let (id, value) = item?;
                let op: Operation = decode(id.value(), value.value())?;
                if op.state != OperationState::Running {
                    continue;
                }
                let expired = match scope {
                    Reap::AllRunning => true,
                    Reap::Expired => tables
                        .leases
                        .get(op.id.as_str())?
                        .is_none_or(|until| until.value() < now),
                };
                if expired {
                    gone.push(op);
                }
            }
            gone.sort_by_key(|op| op.seq);
            for mut op in gone {
                reap_one(&mut op, max_interruptions, &mut recovered);
                tables.put(&op, OperationState::Running, None)?;
            }
        }
        txn.commit()?;
        Ok(recovered)
    }

    pub fn prune_events(&self, ttl_ms: u64, max_ids: u64) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let pruned = {
            let mut events = txn.open_table(EVENTS)?;
            prune(&mut events, ttl_ms, max_ids)?
        };
        txn.commit()?;
        Ok(pruned)
    }

    #[cfg(test)]
    pub fn event_ids(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(EVENTS)?.len()?)
    }
}

/// The tables one operation's write touches.
struct Tables<'t> {
    ops: Table<'t, &'static str, &'static [u8]>,
    queue: Table<'t, u64, &'static str>,
    leases: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self> {
        Ok(Self {
            ops: txn.open_table(OPERATIONS)?,
            queue: txn.open_table(QUEUE)?,
            leases: txn.open_table(LEASES)?,
        })
    }

    fn get(&self, id: &str) -> Result<Option<Operation>> {
        self.ops
            .get(id)?
            .map(|v| decode::<Operation>(id, v.value()))
            .transpose()
    }

    /// Writes `op` (which was in state `before`), keeping the queue and the leases in step:
    /// queued while NotStarted, leased while Running (`lease` renews it).
    fn put(&mut self, op: &Operation, before: OperationState, lease: Option<u64>) -> Result<()> {
        self.ops
            .insert(op.id.as_str(), encode(&op.id, op)?.as_slice())?;
        let queued = op.state == OperationState::NotStarted;
        if queued != (before == OperationState::NotStarted) {
            if queued {
                self.queue.insert(op.seq, op.id.as_str())?;
            } else {
                self.queue.remove(op.seq)?;
            }
        }
        if op.state != OperationState::Running {
            self.leases.remove(op.id.as_str())?;
        } else if let Some(until) = lease {
            self.leases.insert(op.id.as_str(), until)?;
        }
        Ok(())
    }
}

/// Whether `previous` (the newest operation of the manifest) stands in for `new`: it is live,
/// or Succeeded with the kind asked now (an operation without a kind predates them: chunked)
/// and `force` was not asked.
pub(super) fn blocks_new(previous: &Operation, new: &NewOperation) -> bool {
    matches!(
        previous.state,
        OperationState::NotStarted | OperationState::Running
    ) || (previous.state == OperationState::Succeeded
        && !new.options.force
        && previous.kind.unwrap_or_default() == new.kind)
}

pub(super) fn new_operation(id: String, seq: u64, new: NewOperation, now: Timestamp) -> Operation {
    Operation {
        id,
        repository: new.repository,
        reference: new.reference,
        manifest_digest: new.manifest_digest,
        state: OperationState::NotStarted,
        progress: Progress::default(),
        error: None,
        artifact_digest: None,
        subject_digest: None,
        trigger: new.trigger,
        options: new.options,
        kind: None,
        interruptions: 0,
        cancel_requested: false,
        worker: None,
        created: now,
        updated: now,
        seq,
    }
}

pub(super) fn blank_repository(name: &str) -> Repository {
    Repository {
        name: name.to_owned(),
        streaming: Streaming::Inactive,
        kind: ArtifactKind::default(),
        updated: None,
        operations: Counts::default(),
    }
}

fn prune(events: &mut Table<'_, &str, u64>, ttl_ms: u64, max_ids: u64) -> Result<u64> {
    let before = events.len()?;
    let horizon = Timestamp::now().0.saturating_sub(ttl_ms);
    events.retain(|_, seen| seen >= horizon)?;
    let kept = events.len()?;
    if kept > max_ids {
        let mut by_age = Vec::with_capacity(usize::try_from(kept).unwrap_or(0));
        for item in events.iter()? {
            let (id, seen) = item?;
            by_age.push((seen.value(), id.value().to_owned()));
        }
        by_age.sort_unstable();
        let excess = usize::try_from(kept - max_ids).unwrap_or(usize::MAX);
        for (_, id) in by_age.into_iter().take(excess) {
            events.remove(id.as_str())?;
        }
    }
    Ok(before - events.len()?)
}

pub(super) fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Record {
        key: key.to_owned(),
        source,
    })
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| Error::Record {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_before_the_kind_existed_read_as_chunked() {
        let old = br#"{"streaming":"Active","updated":"2026-11-28T11:35:12.413Z"}"#;
        let record: RepositoryRecord = decode("team/app", old).unwrap();
        assert_eq!(record.streaming, Streaming::Active);
        assert_eq!(record.kind, ArtifactKind::Chunked);
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(REPOSITORIES)
                .unwrap()
                .insert("team/app", old.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let settings = store.settings("team/app").unwrap();
        assert_eq!(settings.kind, ArtifactKind::Chunked);
        assert_eq!(settings.streaming, Streaming::Active);
        let change = SettingsChange {
            kind: Some(ArtifactKind::Index),
            ..Default::default()
        };
        store.update_settings("team/app", change).unwrap();
        let repos = store.repositories(None).unwrap();
        assert_eq!(repos[0].kind, ArtifactKind::Index);
        assert_eq!(repos[0].streaming, Streaming::Active);
    }
}
