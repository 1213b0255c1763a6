//! The store's behaviour, run once per backend: redb in a temp dir, and PostgreSQL in a
//! private cluster of the test's own (`streamsnap_e2e::postgres`, needs root and Debian's
//! `postgresql`).

use std::sync::Arc;
use std::time::Duration;

use streamsnap_e2e::postgres::{DATABASE, PgCluster};
use tokio::sync::Notify;

use super::*;
use crate::api::{ArtifactKind, OperationState};
use crate::auth::Secret;

/// A store and what keeps it alive; `reopen` opens the same data again.
struct TestStore {
    store: Store,
    config: StoreConfig,
    dir: tempfile::TempDir,
    _cluster: Option<PgCluster>,
}

impl TestStore {
    async fn redb() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig::Embedded;
        let store = Store::open(&config, dir.path(), Arc::new(Notify::new()))
            .await
            .unwrap();
        Self {
            store,
            config,
            dir,
            _cluster: None,
        }
    }

    async fn postgres() -> Self {
        let cluster = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .unwrap()
            .expect("a private PostgreSQL cluster (run as root, with Debian's postgresql)");
        let password = Secret::new(cluster.password()).unwrap();
        let config = StoreConfig::Postgres(Box::new(
            PostgresStore::from_url(&cluster.url(DATABASE), Some(&password)).unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config, dir.path(), Arc::new(Notify::new()))
            .await
            .unwrap();
        Self {
            store,
            config,
            dir,
            _cluster: Some(cluster),
        }
    }

    /// Closes the store and opens its data again (a restart).
    async fn reopen(&mut self) {
        // redb's file lock goes with the last handle: drop this one first.
        let stand_in = placeholder(&self.dir).await;
        drop(std::mem::replace(&mut self.store, stand_in));
        self.store = Store::open(&self.config, self.dir.path(), Arc::new(Notify::new()))
            .await
            .unwrap();
    }

    /// Another replica on the same data (PostgreSQL only).
    async fn replica(&self) -> Store {
        Store::open(&self.config, self.dir.path(), Arc::new(Notify::new()))
            .await
            .unwrap()
    }
}

/// An embedded store in a dir of its own, to stand in while the real one is reopened.
async fn placeholder(dir: &tempfile::TempDir) -> Store {
    let other = dir.path().join("placeholder");
    std::fs::create_dir_all(&other).unwrap();
    Store::open(&StoreConfig::Embedded, &other, Arc::new(Notify::new()))
        .await
        .unwrap()
}

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
        kind: ArtifactKind::Chunked,
        event_id: event.map(str::to_owned),
    }
}

fn created(c: Created) -> Operation {
    match c {
        Created::New(op) => op,
        other => panic!("expected a new operation, got {other:?}"),
    }
}

async fn set_state(store: &Store, id: &str, state: OperationState) {
    store
        .update(id, move |op| {
            op.state = state;
            true
        })
        .await
        .unwrap();
}

const LEASE: Duration = Duration::from_secs(30);

fn streaming(streaming: Streaming) -> SettingsChange {
    SettingsChange {
        streaming: Some(streaming),
        kind: None,
    }
}

fn kind(kind: ArtifactKind) -> SettingsChange {
    SettingsChange {
        streaming: None,
        kind: Some(kind),
    }
}

async fn states_and_operations_survive_reopening(t: &mut TestStore) {
    t.store
        .update_settings("team/app", streaming(Streaming::Active))
        .await
        .unwrap();
    let id = created(
        t.store
            .create_operation(new("team/app", 1, None))
            .await
            .unwrap(),
    )
    .id;
    t.reopen().await;
    let store = &t.store;
    assert_eq!(
        store.settings("team/app").await.unwrap(),
        Settings {
            streaming: Streaming::Active,
            kind: ArtifactKind::Chunked
        }
    );
    assert_eq!(store.settings("other").await.unwrap(), Settings::default());
    let op = store.operation(&id).await.unwrap().unwrap();
    assert_eq!(op.state, OperationState::NotStarted);
    assert_eq!(op.reference, "v1");
    let repos = store.repositories(None).await.unwrap();
    assert_eq!(repos.len(), 1);
    assert_eq!(repos[0].operations.not_started, 1);
    assert!(repos[0].updated.is_some());
    let one = store.repositories(Some("nothing/here")).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].streaming, Streaming::Inactive);
    assert_eq!(one[0].kind, ArtifactKind::Chunked);
    // The queue survived too.
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, id);
}

async fn a_repository_kind_is_set_alone_and_kept_by_streaming_changes(t: &mut TestStore) {
    let store = &t.store;
    // A kind alone, on a repository the store never saw: streaming stays Inactive.
    store
        .update_settings("team/app", kind(ArtifactKind::Index))
        .await
        .unwrap();
    let expected = Settings {
        streaming: Streaming::Inactive,
        kind: ArtifactKind::Index,
    };
    assert_eq!(store.settings("team/app").await.unwrap(), expected);
    // A streaming change (what older clients send) keeps the kind.
    store
        .update_settings("team/app", streaming(Streaming::Active))
        .await
        .unwrap();
    let expected = Settings {
        streaming: Streaming::Active,
        ..expected
    };
    assert_eq!(store.settings("team/app").await.unwrap(), expected);
    // Both at once.
    let both = SettingsChange {
        streaming: Some(Streaming::Inactive),
        kind: Some(ArtifactKind::Chunked),
    };
    store.update_settings("other", both).await.unwrap();
    let repos = store.repositories(None).await.unwrap();
    let shown: Vec<_> = repos
        .iter()
        .map(|r| (r.name.as_str(), r.streaming, r.kind))
        .collect();
    assert_eq!(
        shown,
        [
            ("other", Streaming::Inactive, ArtifactKind::Chunked),
            ("team/app", Streaming::Active, ArtifactKind::Index),
        ]
    );
    t.reopen().await;
    assert_eq!(t.store.settings("team/app").await.unwrap(), expected);
    let one = t.store.repositories(Some("team/app")).await.unwrap();
    assert_eq!(one[0].kind, ArtifactKind::Index);
    // Concurrent changes of the two settings, from two stores (replicas, for PostgreSQL):
    // neither undoes the other.
    let other = match &t._cluster {
        Some(_) => t.replica().await,
        None => t.store.clone(),
    };
    let names: Vec<String> = (0..8).map(|i| format!("race/{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for name in names.clone() {
        let (a, b) = (t.store.clone(), other.clone());
        let n = name.clone();
        tasks.spawn(async move { a.update_settings(&n, kind(ArtifactKind::Index)).await });
        tasks.spawn(async move { b.update_settings(&name, streaming(Streaming::Active)).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    for name in &names {
        assert_eq!(
            t.store.settings(name).await.unwrap(),
            Settings {
                streaming: Streaming::Active,
                kind: ArtifactKind::Index
            },
            "{name}"
        );
    }
}

async fn a_succeeded_operation_stands_in_only_for_its_own_kind(t: &mut TestStore) {
    let store = &t.store;
    let first = created(store.create_operation(new("r", 1, None)).await.unwrap());
    // It converted chunked (an operation without a kind predates them: chunked too).
    set_state(store, &first.id, OperationState::Succeeded).await;
    assert!(matches!(
        store.create_operation(new("r", 1, None)).await.unwrap(),
        Created::Existing(op) if op.id == first.id
    ));
    // The repository's kind is now index: the manifest is converted again.
    let mut index = new("r", 1, None);
    index.kind = ArtifactKind::Index;
    let second = created(store.create_operation(index.clone()).await.unwrap());
    store
        .update(&second.id, |op| {
            op.state = OperationState::Succeeded;
            op.kind = Some(ArtifactKind::Index);
            true
        })
        .await
        .unwrap();
    let stored = store.operation(&second.id).await.unwrap().unwrap();
    assert_eq!(stored.kind, Some(ArtifactKind::Index));
    assert!(matches!(
        store.create_operation(index).await.unwrap(),
        Created::Existing(op) if op.id == second.id
    ));
    // And back to chunked: the newest (index) one does not stand in.
    created(store.create_operation(new("r", 1, None)).await.unwrap());
}

async fn live_or_succeeded_operations_are_not_created_twice(t: &mut TestStore) {
    let store = &t.store;
    let first = created(store.create_operation(new("r", 1, None)).await.unwrap());
    for state in [
        OperationState::NotStarted,
        OperationState::Running,
        OperationState::Succeeded,
    ] {
        set_state(store, &first.id, state).await;
        match store.create_operation(new("r", 1, None)).await.unwrap() {
            Created::Existing(op) => assert_eq!(op.id, first.id),
            other => panic!("{state}: {other:?}"),
        }
    }
    // Another repository, or another manifest, is another operation.
    created(store.create_operation(new("other", 1, None)).await.unwrap());
    created(store.create_operation(new("r", 2, None)).await.unwrap());
    // force converts a Succeeded manifest again, but never beside a live operation.
    let mut forced = new("r", 1, None);
    forced.options.force = true;
    let again = created(store.create_operation(forced.clone()).await.unwrap());
    assert!(matches!(
        store.create_operation(forced).await.unwrap(),
        Created::Existing(op) if op.id == again.id
    ));
    // After a failure or a cancel, a new operation may be created.
    for state in [OperationState::Failed, OperationState::Canceled] {
        let latest = store.latest_for("r", &digest(1)).await.unwrap().unwrap();
        set_state(store, &latest.id, state).await;
        let next = created(store.create_operation(new("r", 1, None)).await.unwrap());
        assert!(next.seq > latest.seq);
    }
    let all = store.operations("r", |_| true).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    let of_two = store
        .operations("r", |op| op.manifest_digest == digest(2))
        .await
        .unwrap();
    assert_eq!(of_two.len(), 1);
}

async fn a_redelivered_event_creates_nothing_even_after_a_failure(t: &mut TestStore) {
    let store = &t.store;
    let op = created(
        store
            .create_operation(new("r", 1, Some("ev-1")))
            .await
            .unwrap(),
    );
    set_state(store, &op.id, OperationState::Failed).await;
    assert_eq!(
        store
            .create_operation(new("r", 1, Some("ev-1")))
            .await
            .unwrap(),
        Created::DuplicateEvent
    );
    // A new event for the same failed manifest (a new push) tries again.
    created(
        store
            .create_operation(new("r", 1, Some("ev-2")))
            .await
            .unwrap(),
    );
}

async fn concurrent_creations_for_one_manifest_make_one_operation(t: &mut TestStore) {
    // With PostgreSQL, through three stores (replicas) at once.
    let mut stores = vec![t.store.clone()];
    if t.store.is_shared() {
        stores.push(t.replica().await);
        stores.push(t.replica().await);
    }
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move {
                // Every other one is the same event delivered again.
                let event = format!("ev-{}", i / 2);
                store
                    .create_operation(new("r", 7, Some(&event)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let new_ones = results
        .iter()
        .filter(|c| matches!(c, Created::New(_)))
        .count();
    let duplicates = results
        .iter()
        .filter(|c| matches!(c, Created::DuplicateEvent))
        .count();
    assert_eq!(new_ones, 1, "{results:?}");
    assert_eq!(duplicates, 6, "{results:?}");
    assert_eq!(t.store.operations("r", |_| true).await.unwrap().len(), 1);
}

async fn claims_take_the_oldest_once_and_leases_are_renewed_or_lost(t: &mut TestStore) {
    let store = &t.store;
    let a = created(store.create_operation(new("r", 1, None)).await.unwrap());
    let b = created(store.create_operation(new("r", 2, None)).await.unwrap());
    let c = created(store.create_operation(new("r", 3, None)).await.unwrap());
    // Canceled before it started: out of the queue.
    set_state(store, &b.id, OperationState::Canceled).await;
    let first = store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(
        (first.id.as_str(), first.state, first.worker.as_deref()),
        (a.id.as_str(), OperationState::Running, Some("w1"))
    );
    let second = store.claim("w2", LEASE).await.unwrap().unwrap();
    assert_eq!(second.id, c.id);
    assert!(store.claim("w3", LEASE).await.unwrap().is_none());

    // The owner renews and records progress; anyone else has lost it.
    let progress = Progress { done: 5, total: 9 };
    assert_eq!(
        store.heartbeat(&a.id, "w1", LEASE, progress).await.unwrap(),
        Lease::Held {
            cancel_requested: false
        }
    );
    assert_eq!(
        store.operation(&a.id).await.unwrap().unwrap().progress,
        progress
    );
    assert_eq!(
        store.heartbeat(&a.id, "w2", LEASE, progress).await.unwrap(),
        Lease::Lost
    );
    // A cancel asked for anywhere reaches the owner at its heartbeat.
    store
        .update(&a.id, |op| {
            op.cancel_requested = true;
            true
        })
        .await
        .unwrap();
    assert_eq!(
        store.heartbeat(&a.id, "w1", LEASE, progress).await.unwrap(),
        Lease::Held {
            cancel_requested: true
        }
    );
    // Back to the queue (a graceful stop): claimable again, in creation order.
    set_state(store, &c.id, OperationState::NotStarted).await;
    assert_eq!(
        store.heartbeat(&c.id, "w2", LEASE, progress).await.unwrap(),
        Lease::Lost
    );
    let again = store.claim("w3", LEASE).await.unwrap().unwrap();
    assert_eq!((again.id, again.worker.as_deref()), (c.id, Some("w3")));
}

async fn concurrent_claims_never_share_an_operation(t: &mut TestStore) {
    let mut stores = vec![t.store.clone()];
    if t.store.is_shared() {
        stores.push(t.replica().await);
        stores.push(t.replica().await);
    }
    for n in 0..20 {
        created(t.store.create_operation(new("r", n, None)).await.unwrap());
    }
    let tasks: Vec<_> = (0..6)
        .map(|w| {
            let store = stores[w % stores.len()].clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(op) = store.claim(&format!("w{w}"), LEASE).await.unwrap() {
                    mine.push(op.id);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let distinct: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), distinct.len()), (20, 20));
}

async fn expired_leases_are_taken_over_then_given_up(t: &mut TestStore) {
    let store = &t.store;
    let a = created(store.create_operation(new("r", 1, None)).await.unwrap());
    let b = created(store.create_operation(new("r", 2, None)).await.unwrap());
    let short = Duration::from_millis(300);
    assert_eq!(store.claim("dead", short).await.unwrap().unwrap().id, a.id);
    assert_eq!(store.claim("alive", LEASE).await.unwrap().unwrap().id, b.id);
    // Within the lease nothing is reaped.
    assert!(store.reap(Reap::Expired, 3).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = store.reap(Reap::Expired, 3).await.unwrap();
    assert_eq!(r.resumed, std::slice::from_ref(&a.id), "{r:?}");
    let op = store.operation(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (op.state, op.interruptions),
        (OperationState::NotStarted, 1)
    );
    assert_eq!(
        store
            .heartbeat(&a.id, "dead", short, op.progress)
            .await
            .unwrap(),
        Lease::Lost,
        "the dead worker's late heartbeat must not win it back"
    );
    // Taken over by another worker; it dies too, twice: Failed, naming the worker.
    for round in 2..=3 {
        let op = store
            .claim(&format!("dead{round}"), short)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(op.id, a.id);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = store.reap(Reap::Expired, 3).await.unwrap();
        if round < 3 {
            assert_eq!(r.resumed, std::slice::from_ref(&a.id));
        } else {
            assert_eq!(r.failed, std::slice::from_ref(&a.id));
        }
    }
    let op = store.operation(&a.id).await.unwrap().unwrap();
    assert_eq!(op.state, OperationState::Failed);
    let error = op.error.unwrap();
    assert!(
        error.starts_with("interrupted") && error.contains("dead3") && error.contains("3 times"),
        "{error}"
    );
    // The live one was never touched.
    assert_eq!(
        store.operation(&b.id).await.unwrap().unwrap().state,
        OperationState::Running
    );
}

async fn recovery_at_start_resumes_running_operations_and_cancels_asked_ones(t: &mut TestStore) {
    let store = &t.store;
    let a = created(store.create_operation(new("r", 1, None)).await.unwrap());
    let b = created(store.create_operation(new("r", 2, None)).await.unwrap());
    let c = created(store.create_operation(new("r", 3, None)).await.unwrap());
    store.claim("w", LEASE).await.unwrap();
    // b stays queued; c runs with a cancel asked for.
    set_state(store, &c.id, OperationState::Running).await;
    store
        .update(&c.id, |op| {
            op.cancel_requested = true;
            true
        })
        .await
        .unwrap();
    let r = store.reap(Reap::AllRunning, 3).await.unwrap();
    assert_eq!(r.resumed, std::slice::from_ref(&a.id));
    assert_eq!(r.canceled, std::slice::from_ref(&c.id));
    assert_eq!(
        store.operation(&c.id).await.unwrap().unwrap().state,
        OperationState::Canceled
    );
    // The queue is in creation order: a (resumed) before b.
    assert_eq!(store.claim("w", LEASE).await.unwrap().unwrap().id, a.id);
    assert_eq!(store.claim("w", LEASE).await.unwrap().unwrap().id, b.id);
    let counts = store.repositories(Some("r")).await.unwrap()[0].operations;
    assert_eq!((counts.running, counts.canceled), (2, 1));
}

async fn pruning_forgets_old_event_ids_and_keeps_only_the_newest_beyond_the_cap(t: &mut TestStore) {
    let store = &t.store;
    for n in 0..5u8 {
        created(
            store
                .create_operation(new("r", n, Some(&format!("ev{n}"))))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(store.event_ids().await.unwrap(), 5);
    assert_eq!(store.prune_events(60_000, 100).await.unwrap(), 0);
    // Over the cap: the oldest go first.
    assert_eq!(store.prune_events(60_000, 3).await.unwrap(), 2);
    assert_eq!(store.event_ids().await.unwrap(), 3);
    for (n, seen) in [(0u8, false), (1, false), (2, true), (4, true)] {
        let again = store
            .create_operation(new("r", n + 10, Some(&format!("ev{n}"))))
            .await
            .unwrap();
        assert_eq!(again == Created::DuplicateEvent, seen, "ev{n}");
    }
    // Past the time to live: all of them.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let left = store.event_ids().await.unwrap();
    assert_eq!(store.prune_events(1, 100).await.unwrap(), left);
    assert_eq!(store.event_ids().await.unwrap(), 0);
}

/// Runs each scenario once per backend: `redb_backend::NAME` and `postgres_backend::NAME`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod redb_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut t = super::TestStore::redb().await;
                    super::$name(&mut t).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut t = super::TestStore::postgres().await;
                    super::$name(&mut t).await;
                }
            )*
        }
    };
}

both_backends!(
    states_and_operations_survive_reopening,
    a_repository_kind_is_set_alone_and_kept_by_streaming_changes,
    a_succeeded_operation_stands_in_only_for_its_own_kind,
    live_or_succeeded_operations_are_not_created_twice,
    a_redelivered_event_creates_nothing_even_after_a_failure,
    concurrent_creations_for_one_manifest_make_one_operation,
    claims_take_the_oldest_once_and_leases_are_renewed_or_lost,
    concurrent_claims_never_share_an_operation,
    expired_leases_are_taken_over_then_given_up,
    recovery_at_start_resumes_running_operations_and_cancels_asked_ones,
    pruning_forgets_old_event_ids_and_keeps_only_the_newest_beyond_the_cap,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_apply_once_and_a_newer_schema_is_refused() {
    let t = TestStore::postgres().await;
    let cluster = t._cluster.as_ref().unwrap();
    // Opening again (another replica) applies nothing twice.
    let _replica = t.replica().await;
    let versions = cluster
        .psql(
            DATABASE,
            "SELECT version FROM streamsnap_schema_migrations ORDER BY version",
        )
        .unwrap();
    assert_eq!(versions.split_whitespace().collect::<Vec<_>>(), ["1", "2"]);
    // A database at version 1 with a repository of that version: migrated, the repository
    // is chunked and keeps its streaming state.
    cluster
        .psql(
            DATABASE,
            "ALTER TABLE repositories DROP COLUMN kind; \
             DELETE FROM streamsnap_schema_migrations WHERE version = 2; \
             INSERT INTO repositories (name, doc) VALUES ('old/app', \
             '{\"streaming\":\"Active\",\"updated\":\"2026-11-28T11:35:12.413Z\"}')",
        )
        .unwrap();
    let migrated = Store::open(&t.config, t.dir.path(), Arc::new(Notify::new()))
        .await
        .unwrap();
    assert_eq!(
        migrated.settings("old/app").await.unwrap(),
        Settings {
            streaming: Streaming::Active,
            kind: ArtifactKind::Chunked
        }
    );
    migrated
        .update_settings("old/app", kind(ArtifactKind::Index))
        .await
        .unwrap();
    let column = cluster
        .psql(
            DATABASE,
            "SELECT kind FROM repositories WHERE name = 'old/app'",
        )
        .unwrap();
    assert_eq!(column.trim(), "index");
    // The column accepts only the kinds.
    assert!(
        cluster
            .psql(DATABASE, "UPDATE repositories SET kind = 'zstd'")
            .is_err()
    );
    cluster
        .psql(
            DATABASE,
            "INSERT INTO streamsnap_schema_migrations (version, description) VALUES (99, 'x')",
        )
        .unwrap();
    let error = Store::open(&t.config, t.dir.path(), Arc::new(Notify::new()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("version 99") && error.contains("newer"),
        "{error}"
    );
}

#[test]
fn postgres_urls_carry_no_password_and_show_none() {
    let password = Secret::new("s3cret-pw").unwrap();
    let store =
        PostgresStore::from_url("postgres://app@db.example:5433/state", Some(&password)).unwrap();
    assert_eq!(store.to_string(), "postgres://app@db.example:5433/state");
    assert!(!format!("{store:?}").contains("s3cret"), "{store:?}");
    for (url, says) in [
        ("postgres://app:pw@db/state", "PGPASSWORD"),
        ("postgres://app@db/state?password=pw", "PGPASSWORD"),
        ("postgres://app@db/state?sslmode=require", "TLS"),
        ("postgres:///state", "no host"),
        ("postgres://db/state", "no user"),
        ("mysql://app@db/state", "not a PostgreSQL connection URL"),
    ] {
        let error = PostgresStore::from_url(url, None).unwrap_err().to_string();
        assert!(error.contains(says), "{url}: {error}");
        assert!(!error.contains(":pw@") && !error.contains("=pw"), "{error}");
    }
}
