//! The service's store, behind one interface with two backends:
//!
//! - **redb** (the default): one file in the state dir, for one `streamsnap serve` on one
//!   machine. Its calls run on the blocking pool (commits wait for the disk).
//! - **PostgreSQL** (`serve --store postgres://...`): shared by several replicas of the service.
//!   Operations are claimed by one worker with `FOR UPDATE SKIP LOCKED`, kept by a lease the
//!   worker renews, and taken over when the lease expires; the queue wakes other replicas with
//!   `NOTIFY`.
//!
//! What is stored: repository settings (streaming state and artifact kind), operations (whose NotStarted entries are the
//! queue, in creation order), the newest operation per (repository, manifest digest) for
//! deduplication, and the IDs of registry events already handled. Every change is one
//! transaction, so a crash leaves all of it or none; both backends pass the same tests
//! (`tests.rs`).

mod postgres;
mod redb;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use streamsnap_format::Digest;
use tokio::sync::Notify;

pub use self::postgres::PostgresStore;
use self::redb::RedbStore;
use crate::api::{
    ArtifactKind, Operation, OperationOptions, Progress, Repository, Streaming, Trigger,
};
use crate::error::Result;

/// Which store `streamsnap serve` keeps its state in.
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// redb in `<state dir>/state.redb`: one service on one machine.
    #[default]
    Embedded,
    /// A PostgreSQL database shared by every replica.
    Postgres(Box<PostgresStore>),
}

/// A repository's settings (the defaults when never set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub streaming: Streaming,
    pub kind: ArtifactKind,
}

/// A change of a repository's settings: what is `None` stays as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettingsChange {
    pub streaming: Option<Streaming>,
    pub kind: Option<ArtifactKind>,
}

impl SettingsChange {
    fn apply(self, settings: &mut Settings) {
        if let Some(streaming) = self.streaming {
            settings.streaming = streaming;
        }
        if let Some(kind) = self.kind {
            settings.kind = kind;
        }
    }
}

/// An operation to create.
#[derive(Clone, Debug)]
pub struct NewOperation {
    pub repository: String,
    pub reference: String,
    pub manifest_digest: Digest,
    pub trigger: Trigger,
    pub options: OperationOptions,
    /// The repository's artifact kind now: a Succeeded operation of the manifest that made
    /// another kind does not stand in for this one.
    pub kind: ArtifactKind,
    /// The registry event that asked for it: an event seen before creates nothing.
    pub event_id: Option<String>,
}

/// What [`Store::create_operation`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    New(Operation),
    /// An operation for this manifest is NotStarted, Running or Succeeded with the same kind
    /// (Succeeded is not counted when `force` was asked): that one is returned, nothing is
    /// created.
    Existing(Operation),
    /// The event was handled before.
    DuplicateEvent,
}

/// What [`Store::reap`] found and did with Running operations whose worker is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Operations that go back to the queue (their `interruptions` counted).
    pub resumed: Vec<String>,
    /// Operations that were interrupted too many times: Failed.
    pub failed: Vec<String>,
    /// Operations whose cancel had been asked for: Canceled.
    pub canceled: Vec<String>,
}

impl Recovered {
    pub fn is_empty(&self) -> bool {
        self.resumed.is_empty() && self.failed.is_empty() && self.canceled.is_empty()
    }
}

/// Which Running operations [`Store::reap`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reap {
    /// Those whose lease expired: their worker stopped renewing it.
    Expired,
    /// All of them: no worker can be running (the embedded store at start; its file is locked
    /// by one process).
    AllRunning,
}

/// What a worker's [`Store::heartbeat`] learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// The operation is still this worker's, its lease renewed; a cancel may have been asked
    /// for (from any replica).
    Held { cancel_requested: bool },
    /// The operation is no longer Running for this worker (its lease expired and another
    /// replica took it over, or it ended): the worker must drop it without recording anything.
    Lost,
}

/// The store. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Redb(Arc<RedbStore>),
    Postgres(postgres::Postgres),
}

impl Store {
    /// Opens the store `config` names (the embedded one in `state_dir`), applying schema
    /// migrations. `wake` is notified when another replica queues an operation.
    pub async fn open(config: &StoreConfig, state_dir: &Path, wake: Arc<Notify>) -> Result<Self> {
        match config {
            StoreConfig::Embedded => {
                let path = state_dir.join("state.redb");
                blocking(move || RedbStore::open(&path).map(|s| Self::Redb(Arc::new(s)))).await
            }
            StoreConfig::Postgres(pg) => {
                Ok(Self::Postgres(postgres::Postgres::open(pg, wake).await?))
            }
        }
    }

    /// For the log: the file, or the database without credentials.
    pub fn describe(config: &StoreConfig, state_dir: &Path) -> String {
        match config {
            StoreConfig::Embedded => format!("redb {}", state_dir.join("state.redb").display()),
            StoreConfig::Postgres(pg) => pg.to_string(),
        }
    }

    /// Whether several services may share it (then the worker's lease is what keeps an
    /// operation to one worker).
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// The settings of `name` (Inactive and chunked when never set).
    pub async fn settings(&self, name: &str) -> Result<Settings> {
        match self {
            Self::Redb(s) => run(s, name.to_owned(), |s, name| s.settings(&name)).await,
            Self::Postgres(s) => s.settings(name).await,
        }
    }

    /// Changes the settings of `name` in one transaction (what `change` leaves out stays as
    /// it is, also against a concurrent change of the other setting).
    pub async fn update_settings(&self, name: &str, change: SettingsChange) -> Result<()> {
        match self {
            Self::Redb(s) => {
                run(s, name.to_owned(), move |s, name| {
                    s.update_settings(&name, change)
                })
                .await
            }
            Self::Postgres(s) => s.update_settings(name, change).await,
        }
    }

    /// Repositories with a state or an operation, by name; only `only` if given (then it is
    /// listed even when the store knows nothing of it).
    pub async fn repositories(&self, only: Option<&str>) -> Result<Vec<Repository>> {
        match self {
            Self::Redb(s) => {
                run(s, only.map(str::to_owned), |s, only| {
                    s.repositories(only.as_deref())
                })
                .await
            }
            Self::Postgres(s) => s.repositories(only).await,
        }
    }

    /// Creates an operation unless the event was seen or the manifest has a live or
    /// successful one (see [`Created`]). Atomic: concurrent calls for one manifest, from any
    /// replica, create one.
    pub async fn create_operation(&self, new: NewOperation) -> Result<Created> {
        match self {
            Self::Redb(s) => run(s, new, |s, new| s.create_operation(new)).await,
            Self::Postgres(s) => s.create_operation(new).await,
        }
    }

    pub async fn operation(&self, id: &str) -> Result<Option<Operation>> {
        match self {
            Self::Redb(s) => run(s, id.to_owned(), |s, id| s.operation(&id)).await,
            Self::Postgres(s) => s.operation(id).await,
        }
    }

    /// The newest operation for a manifest, if any.
    pub async fn latest_for(&self, repository: &str, digest: &Digest) -> Result<Option<Operation>> {
        let digest = *digest;
        match self {
            Self::Redb(s) => {
                run(s, repository.to_owned(), move |s, repository| {
                    s.latest_for(&repository, &digest)
                })
                .await
            }
            Self::Postgres(s) => s.latest_for(repository, &digest).await,
        }
    }

    /// Operations of `repository` matching `filter`, newest first.
    pub async fn operations(
        &self,
        repository: &str,
        filter: impl Fn(&Operation) -> bool + Send + 'static,
    ) -> Result<Vec<Operation>> {
        match self {
            Self::Redb(s) => {
                run(s, repository.to_owned(), move |s, repository| {
                    s.operations(&repository, filter)
                })
                .await
            }
            Self::Postgres(s) => s.operations(repository, filter).await,
        }
    }

    /// Changes operation `id` in one transaction: `change` returns false to leave it as it
    /// was. Returns the operation as stored afterwards (`None` if there is no such operation).
    /// An operation that goes back to NotStarted is queued again (and the replicas woken).
    pub async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Operation) -> bool + Send + 'static,
    ) -> Result<Option<Operation>> {
        match self {
            Self::Redb(s) => run(s, id.to_owned(), move |s, id| s.update(&id, change)).await,
            Self::Postgres(s) => s.update(id, change).await,
        }
    }

    /// Takes the oldest NotStarted operation for `worker`: it becomes Running, with a lease
    /// of `lease` that [`Store::heartbeat`] renews. Two workers never get the same operation.
    pub async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Operation>> {
        match self {
            Self::Redb(s) => {
                run(s, worker.to_owned(), move |s, worker| {
                    s.claim(&worker, lease)
                })
                .await
            }
            Self::Postgres(s) => s.claim(worker, lease).await,
        }
    }

    /// Renews `worker`'s lease on operation `id` and records its progress; tells whether a
    /// cancel was asked for, or that the operation is no longer this worker's.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease: Duration,
        progress: Progress,
    ) -> Result<Lease> {
        match self {
            Self::Redb(s) => {
                let worker = worker.to_owned();
                run(s, id.to_owned(), move |s, id| {
                    s.heartbeat(&id, &worker, lease, progress)
                })
                .await
            }
            Self::Postgres(s) => s.heartbeat(id, worker, lease, progress).await,
        }
    }

    /// Running operations whose worker is gone (see [`Reap`]) go back to the queue with their
    /// `interruptions` counted, or end Failed ("interrupted") once they were interrupted
    /// `max_interruptions` times, or end Canceled if a cancel was asked for.
    pub async fn reap(&self, scope: Reap, max_interruptions: u32) -> Result<Recovered> {
        match self {
            Self::Redb(s) => run(s, (), move |s, ()| s.reap(scope, max_interruptions)).await,
            Self::Postgres(s) => s.reap(scope, max_interruptions).await,
        }
    }

    /// Forgets the registry event IDs handled more than `ttl_ms` ago, then the oldest beyond
    /// the newest `max_ids`: the deduplication only has to outlast the registry's redelivery of
    /// an event, and the table must not grow with every push the registry ever sent. Returns
    /// how many it forgot.
    pub async fn prune_events(&self, ttl_ms: u64, max_ids: u64) -> Result<u64> {
        match self {
            Self::Redb(s) => run(s, (), move |s, ()| s.prune_events(ttl_ms, max_ids)).await,
            Self::Postgres(s) => s.prune_events(ttl_ms, max_ids).await,
        }
    }

    /// How many registry event IDs are remembered.
    #[cfg(test)]
    pub async fn event_ids(&self) -> Result<u64> {
        match self {
            Self::Redb(s) => run(s, (), |s, ()| s.event_ids()).await,
            Self::Postgres(s) => s.event_ids().await,
        }
    }
}

/// Runs a redb call on the blocking pool.
async fn run<A: Send + 'static, T: Send + 'static>(
    store: &Arc<RedbStore>,
    arg: A,
    f: impl FnOnce(&RedbStore, A) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    blocking(move || f(&store, arg)).await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task panicked")
}

/// Why an operation whose worker is gone ends Failed.
fn interrupted_reason(op: &Operation) -> String {
    let by = match &op.worker {
        Some(worker) => format!("the replica running it ({worker})"),
        None => "the service".to_owned(),
    };
    format!(
        "interrupted: {by} stopped during this conversion {} times, it is not resumed again; \
         start a new operation with `streamsnap artifact-streaming create`",
        op.interruptions
    )
}

/// What [`Store::reap`] does to one Running operation whose worker is gone.
fn reap_one(op: &mut Operation, max_interruptions: u32, recovered: &mut Recovered) {
    use crate::api::OperationState;
    if op.cancel_requested {
        op.state = OperationState::Canceled;
        op.error = Some("canceled (the service stopped before the cancel completed)".into());
        recovered.canceled.push(op.id.clone());
    } else {
        op.interruptions += 1;
        if op.interruptions >= max_interruptions {
            op.state = OperationState::Failed;
            op.error = Some(interrupted_reason(op));
            recovered.failed.push(op.id.clone());
        } else {
            op.state = OperationState::NotStarted;
            recovered.resumed.push(op.id.clone());
        }
    }
    op.updated = crate::api::Timestamp::now();
}

/// What [`Store::claim`] does to the operation it takes.
fn start(op: &mut Operation, worker: &str) {
    op.state = crate::api::OperationState::Running;
    op.error = None;
    op.progress = Progress::default();
    op.worker = Some(worker.to_owned());
    op.updated = crate::api::Timestamp::now();
}

fn manifest_key(repository: &str, digest: &Digest) -> String {
    format!("{repository}@{digest}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
