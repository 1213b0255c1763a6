//! The embedded, transactional store (redb, one file in the state dir): repository streaming
//! states, operations (whose NotStarted entries are the persisted queue), the latest operation
//! per (repository, manifest digest) for deduplication, and the IDs of registry events already
//! handled. Every change is one write transaction, so a crash leaves either all of it or none.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use streamsnap_format::Digest;

use crate::api::{
    Counts, Operation, OperationOptions, OperationState, Progress, Repository, Streaming,
    Timestamp, Trigger,
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
const NEXT_SEQ: &str = "next_seq";

/// A repository's stored state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RepositoryRecord {
    streaming: Streaming,
    updated: Timestamp,
}

/// An operation to create.
#[derive(Clone, Debug)]
pub struct NewOperation {
    pub repository: String,
    pub reference: String,
    pub manifest_digest: Digest,
    pub trigger: Trigger,
    pub options: OperationOptions,
    /// The registry event that asked for it: an event seen before creates nothing.
    pub event_id: Option<String>,
}

/// What [`Store::create_operation`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    New(Operation),
    /// An operation for this manifest is NotStarted, Running or Succeeded (or Succeeded is not
    /// counted when `force` was asked): that one is returned, nothing is created.
    Existing(Operation),
    /// The event was handled before.
    DuplicateEvent,
}

/// What a restart found and did, from [`Store::recover`].
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// Operations that were Running and go back to the queue.
    pub resumed: Vec<String>,
    /// Operations that were Running too many times when the service died.
    pub failed: Vec<String>,
    /// Operations that were Running with a cancel asked for.
    pub canceled: Vec<String>,
    /// Every NotStarted operation, in queue order.
    pub queue: Vec<String>,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|e| Error::Store {
            context: "opening the database (is another `streamsnap serve` using this state dir?)",
            source: e.into(),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(OPERATIONS)?;
        txn.open_table(REPOSITORIES)?;
        txn.open_table(LATEST)?;
        txn.open_table(EVENTS)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// The streaming state of `name` (Inactive when never set).
    pub fn streaming(&self, name: &str) -> Result<Streaming> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REPOSITORIES)?;
        let record = table
            .get(name)?
            .map(|v| decode::<RepositoryRecord>(name, v.value()))
            .transpose()?;
        Ok(record.map(|r| r.streaming).unwrap_or_default())
    }

    pub fn set_streaming(&self, name: &str, streaming: Streaming) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(REPOSITORIES)?;
            let record = RepositoryRecord {
                streaming,
                updated: Timestamp::now(),
            };
            table.insert(name, encode(name, &record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Repositories with a state or an operation, by name; only `only` if given (then it is
    /// listed even when the store knows nothing of it).
    pub fn repositories(&self, only: Option<&str>) -> Result<Vec<Repository>> {
        let txn = self.db.begin_read()?;
        let mut out: BTreeMap<String, Repository> = BTreeMap::new();
        let blank = |name: &str| Repository {
            name: name.to_owned(),
            streaming: Streaming::Inactive,
            updated: None,
            operations: Counts::default(),
        };
        if let Some(name) = only {
            out.insert(name.to_owned(), blank(name));
        }
        for item in txn.open_table(REPOSITORIES)?.iter()? {
            let (name, value) = item?;
            let name = name.value();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let record: RepositoryRecord = decode(name, value.value())?;
            let entry = out.entry(name.to_owned()).or_insert_with(|| blank(name));
            entry.streaming = record.streaming;
            entry.updated = Some(record.updated);
        }
        for item in txn.open_table(OPERATIONS)?.iter()? {
            let (id, value) = item?;
            let op: Operation = decode(id.value(), value.value())?;
            if only.is_some_and(|o| o != op.repository) {
                continue;
            }
            out.entry(op.repository.clone())
                .or_insert_with(|| blank(&op.repository))
                .operations
                .add(op.state);
        }
        Ok(out.into_values().collect())
    }

    /// Creates an operation unless the event was seen or the manifest has a live or
    /// successful one (see [`Created`]). Atomic: concurrent calls for one manifest create one.
    pub fn create_operation(&self, new: NewOperation) -> Result<Created> {
        let txn = self.db.begin_write()?;
        let created = {
            let mut ops = txn.open_table(OPERATIONS)?;
            let mut latest = txn.open_table(LATEST)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut counters = txn.open_table(COUNTERS)?;
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
                Some(op)
                    if matches!(
                        op.state,
                        OperationState::NotStarted | OperationState::Running
                    ) || (op.state == OperationState::Succeeded && !new.options.force) =>
                {
                    Created::Existing(op)
                }
                _ => {
                    let seq = counters.get(NEXT_SEQ)?.map_or(1, |v| v.value());
                    counters.insert(NEXT_SEQ, seq + 1)?;
                    let mut id = ids::new_id();
                    while ops.get(id.as_str())?.is_some() {
                        id = ids::new_id();
                    }
                    let op = Operation {
                        id: id.clone(),
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
                        interruptions: 0,
                        cancel_requested: false,
                        created: now,
                        updated: now,
                        seq,
                    };
                    ops.insert(id.as_str(), encode(&id, &op)?.as_slice())?;
                    latest.insert(key.as_str(), id.as_str())?;
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

    /// The newest operation for a manifest, if any.
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

    /// Operations of `repository` matching `filter`, newest first.
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

    /// Changes operation `id` in one transaction: `change` returns false to leave it as it
    /// was. Returns the operation as stored afterwards (`None` if there is no such operation).
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Operation) -> bool,
    ) -> Result<Option<Operation>> {
        let txn = self.db.begin_write()?;
        let op = {
            let mut table = txn.open_table(OPERATIONS)?;
            let current = table
                .get(id)?
                .map(|v| decode::<Operation>(id, v.value()))
                .transpose()?;
            match current {
                None => None,
                Some(mut op) => {
                    if change(&mut op) {
                        op.updated = Timestamp::now();
                        table.insert(id, encode(id, &op)?.as_slice())?;
                    }
                    Some(op)
                }
            }
        };
        txn.commit()?;
        Ok(op)
    }

    /// At start: operations left Running by a service that died go back to the queue (their
    /// `interruptions` counted), or end Failed ("interrupted") once they were interrupted
    /// `max_interruptions` times, or end Canceled if a cancel was asked for. Forgets event IDs
    /// as [`Store::prune_events`] does. Returns what it did and the queue.
    pub fn recover(
        &self,
        max_interruptions: u32,
        event_ttl_ms: u64,
        max_event_ids: u64,
    ) -> Result<Recovered> {
        let txn = self.db.begin_write()?;
        let mut recovered = Recovered::default();
        {
            let mut table = txn.open_table(OPERATIONS)?;
            let mut changed = Vec::new();
            let mut queue = Vec::new();
            for item in table.iter()? {
                let (id, value) = item?;
                let mut op: Operation = decode(id.value(), value.value())?;
                if op.state == OperationState::Running {
                    if op.cancel_requested {
                        op.state = OperationState::Canceled;
                        op.error = Some(
                            "canceled (the service stopped before the cancel completed)".into(),
                        );
                        recovered.canceled.push(op.id.clone());
                    } else {
                        op.interruptions += 1;
                        if op.interruptions >= max_interruptions {
                            op.state = OperationState::Failed;
                            op.error = Some(format!(
                                "interrupted: the service stopped during this conversion {} \
                                 times, it is not resumed again; start a new operation with \
                                 `streamsnap artifact-streaming create`",
                                op.interruptions
                            ));
                            recovered.failed.push(op.id.clone());
                        } else {
                            op.state = OperationState::NotStarted;
                            recovered.resumed.push(op.id.clone());
                        }
                    }
                    op.updated = Timestamp::now();
                    changed.push(op.clone());
                }
                if op.state == OperationState::NotStarted {
                    queue.push((op.seq, op.id.clone()));
                }
            }
            for op in changed {
                table.insert(op.id.as_str(), encode(&op.id, &op)?.as_slice())?;
            }
            queue.sort();
            recovered.queue = queue.into_iter().map(|(_, id)| id).collect();

            let mut events = txn.open_table(EVENTS)?;
            prune(&mut events, event_ttl_ms, max_event_ids)?;
        }
        txn.commit()?;
        Ok(recovered)
    }

    /// Forgets the registry event IDs handled more than `ttl_ms` ago, then the oldest beyond
    /// the newest `max_ids`: the deduplication only has to outlast the registry's redelivery of
    /// an event, and the table must not grow with every push the registry ever sent. Returns
    /// how many it forgot.
    pub fn prune_events(&self, ttl_ms: u64, max_ids: u64) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let pruned = {
            let mut events = txn.open_table(EVENTS)?;
            prune(&mut events, ttl_ms, max_ids)?
        };
        txn.commit()?;
        Ok(pruned)
    }

    /// How many registry event IDs are remembered.
    #[cfg(test)]
    pub fn event_ids(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(EVENTS)?.len()?)
    }
}

fn prune(events: &mut redb::Table<'_, &str, u64>, ttl_ms: u64, max_ids: u64) -> Result<u64> {
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

fn manifest_key(repository: &str, digest: &Digest) -> String {
    format!("{repository}@{digest}")
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Record {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| Error::Record {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    fn new(repo: &str, n: u8, event: Option<&str>) -> NewOperation {
        NewOperation {
            repository: repo.into(),
            reference: format!("v{n}"),
            manifest_digest: digest(n),
            trigger: Trigger::Push,
            options: OperationOptions::default(),
            event_id: event.map(str::to_owned),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        (dir, store)
    }

    fn created(c: Created) -> Operation {
        match c {
            Created::New(op) => op,
            other => panic!("expected a new operation, got {other:?}"),
        }
    }

    fn set_state(store: &Store, id: &str, state: OperationState) {
        store
            .update(id, |op| {
                op.state = state;
                true
            })
            .unwrap();
    }

    #[test]
    fn states_and_operations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let id = {
            let store = Store::open(&path).unwrap();
            store.set_streaming("team/app", Streaming::Active).unwrap();
            created(store.create_operation(new("team/app", 1, None)).unwrap()).id
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.streaming("team/app").unwrap(), Streaming::Active);
        assert_eq!(store.streaming("other").unwrap(), Streaming::Inactive);
        let op = store.operation(&id).unwrap().unwrap();
        assert_eq!(op.state, OperationState::NotStarted);
        assert_eq!(op.reference, "v1");
        let repos = store.repositories(None).unwrap();
        assert_eq!(repos.len(), 1);
        assert_eq!(repos[0].operations.not_started, 1);
        let one = store.repositories(Some("nothing/here")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].streaming, Streaming::Inactive);
    }

    #[test]
    fn live_or_succeeded_operations_are_not_created_twice() {
        let (_dir, store) = open();
        let first = created(store.create_operation(new("r", 1, None)).unwrap());
        for state in [
            OperationState::NotStarted,
            OperationState::Running,
            OperationState::Succeeded,
        ] {
            set_state(&store, &first.id, state);
            match store.create_operation(new("r", 1, None)).unwrap() {
                Created::Existing(op) => assert_eq!(op.id, first.id),
                other => panic!("{state}: {other:?}"),
            }
        }
        // Another repository, or another manifest, is another operation.
        created(store.create_operation(new("other", 1, None)).unwrap());
        created(store.create_operation(new("r", 2, None)).unwrap());
        // force converts a Succeeded manifest again, but never beside a live operation.
        let mut forced = new("r", 1, None);
        forced.options.force = true;
        let again = created(store.create_operation(forced.clone()).unwrap());
        assert!(matches!(
            store.create_operation(forced).unwrap(),
            Created::Existing(op) if op.id == again.id
        ));
        // After a failure or a cancel, a new operation may be created.
        for state in [OperationState::Failed, OperationState::Canceled] {
            let latest = store.latest_for("r", &digest(1)).unwrap().unwrap();
            set_state(&store, &latest.id, state);
            let next = created(store.create_operation(new("r", 1, None)).unwrap());
            assert!(next.seq > latest.seq);
        }
        assert_eq!(store.operations("r", |_| true).unwrap().len(), 5);
    }

    #[test]
    fn a_redelivered_event_creates_nothing_even_after_a_failure() {
        let (_dir, store) = open();
        let op = created(store.create_operation(new("r", 1, Some("ev-1"))).unwrap());
        set_state(&store, &op.id, OperationState::Failed);
        assert_eq!(
            store.create_operation(new("r", 1, Some("ev-1"))).unwrap(),
            Created::DuplicateEvent
        );
        // A new event for the same failed manifest (a new push) tries again.
        created(store.create_operation(new("r", 1, Some("ev-2"))).unwrap());
    }

    #[test]
    fn concurrent_creations_for_one_manifest_make_one_operation() {
        let (_dir, store) = open();
        let store = std::sync::Arc::new(store);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .create_operation(new("r", 7, Some(&format!("ev-{i}"))))
                        .unwrap()
                })
            })
            .collect();
        let new_ones = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|c| matches!(c, Created::New(_)))
            .count();
        assert_eq!(new_ones, 1);
        assert_eq!(store.operations("r", |_| true).unwrap().len(), 1);
    }

    #[test]
    fn recovery_resumes_running_operations_then_gives_up() {
        let (_dir, store) = open();
        let a = created(store.create_operation(new("r", 1, None)).unwrap());
        let b = created(store.create_operation(new("r", 2, None)).unwrap());
        let c = created(store.create_operation(new("r", 3, None)).unwrap());
        set_state(&store, &a.id, OperationState::Running);
        set_state(&store, &c.id, OperationState::Running);
        store
            .update(&c.id, |op| {
                op.cancel_requested = true;
                true
            })
            .unwrap();
        let r = store.recover(3, 1000, u64::MAX).unwrap();
        assert_eq!(r.resumed, std::slice::from_ref(&a.id));
        assert_eq!(r.canceled, std::slice::from_ref(&c.id));
        assert_eq!(
            r.queue,
            [a.id.clone(), b.id.clone()],
            "queue order is creation order"
        );
        let op = store.operation(&a.id).unwrap().unwrap();
        assert_eq!(
            (op.state, op.interruptions),
            (OperationState::NotStarted, 1)
        );
        assert_eq!(
            store.operation(&c.id).unwrap().unwrap().state,
            OperationState::Canceled
        );
        for round in 2..=3 {
            set_state(&store, &a.id, OperationState::Running);
            let r = store.recover(3, 1000, u64::MAX).unwrap();
            if round < 3 {
                assert_eq!(r.resumed, std::slice::from_ref(&a.id));
            } else {
                assert_eq!(r.failed, std::slice::from_ref(&a.id));
            }
        }
        let op = store.operation(&a.id).unwrap().unwrap();
        assert_eq!(op.state, OperationState::Failed);
        assert!(op.error.unwrap().starts_with("interrupted"));
        assert!(
            store
                .repositories(None)
                .unwrap()
                .iter()
                .all(|r| r.operations.running == 0)
        );
    }

    #[test]
    fn pruning_forgets_old_event_ids_and_keeps_only_the_newest_beyond_the_cap() {
        let (_dir, store) = open();
        for n in 0..5u8 {
            created(
                store
                    .create_operation(new("r", n, Some(&format!("ev{n}"))))
                    .unwrap(),
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(store.event_ids().unwrap(), 5);
        assert_eq!(store.prune_events(60_000, 100).unwrap(), 0);
        // Over the cap: the oldest go first.
        assert_eq!(store.prune_events(60_000, 3).unwrap(), 2);
        assert_eq!(store.event_ids().unwrap(), 3);
        for (n, seen) in [(0u8, false), (1, false), (2, true), (4, true)] {
            let again = store
                .create_operation(new("r", n + 10, Some(&format!("ev{n}"))))
                .unwrap();
            assert_eq!(again == Created::DuplicateEvent, seen, "ev{n}");
        }
        // Past the time to live: all of them.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let left = store.event_ids().unwrap();
        assert_eq!(store.prune_events(1, 100).unwrap(), left);
        assert_eq!(store.event_ids().unwrap(), 0);
    }

    #[test]
    fn old_event_ids_are_forgotten_at_recovery() {
        let (_dir, store) = open();
        created(store.create_operation(new("r", 1, Some("ev"))).unwrap());
        store.recover(3, 60_000, u64::MAX).unwrap();
        assert_eq!(
            store.create_operation(new("r", 2, Some("ev"))).unwrap(),
            Created::DuplicateEvent
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.recover(3, 1, u64::MAX).unwrap();
        created(store.create_operation(new("r", 2, Some("ev"))).unwrap());
    }
}
