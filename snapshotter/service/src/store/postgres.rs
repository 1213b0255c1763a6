//! The shared store: PostgreSQL, for several replicas of the service.
//!
//! - Schema: `migrations/NNNN_*.sql`, applied in order at start in one transaction under an
//!   advisory lock (replicas starting together apply them once); a database whose schema is
//!   newer than this build is refused.
//! - Claims: the oldest NotStarted operation is taken `FOR UPDATE SKIP LOCKED`, so two workers
//!   never take the same one; it is Running with a lease (database clock) that the worker's
//!   heartbeat renews. Expired leases are reaped by any replica.
//! - Deduplication: event IDs are a primary key; creating an operation for a manifest holds a
//!   transaction-scoped advisory lock on `repository@digest`, so one of concurrent creators
//!   creates and the others see its operation.
//! - Wake-ups: a change that queues an operation sends `NOTIFY streamsnap_queue`; every replica
//!   listens on a connection of its own (and polls as well, in case a notification is missed).
//! - Connections: a small pool (no TLS: see docs/service.md); the password never appears in a
//!   log line or an error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamsnap_format::Digest;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Transaction};

use super::redb::{RepositoryRecord, blank_repository, blocks_new, decode, encode, new_operation};
use super::{
    Created, Lease, NewOperation, Reap, Recovered, Settings, SettingsChange, manifest_key, millis,
    reap_one, start,
};
use crate::api::{ArtifactKind, Operation, OperationState, Progress, Repository, Timestamp};
use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::ids;

/// The schema, version by version. Never edit one that was released: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial schema",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "repository artifact kind",
        include_str!("../../migrations/0002_repository_kind.sql"),
    ),
];
/// Key of the advisory lock migrations hold (any constant; "streamsnap" in ASCII, shortened).
const MIGRATION_LOCK: i64 = 0x7374_7265_616d_736e;
const QUEUE_CHANNEL: &str = "streamsnap_queue";
/// The database's clock, in ms since the epoch: leases use it, so replicas' clocks may differ.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// Connections a replica opens at most (plus one that listens for notifications).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;

/// How to reach the database: `serve --store postgres://USER@HOST:PORT/DB` and the password
/// from `PGPASSWORD` or `--store-password-file`. `Debug` and `Display` show no password.
#[derive(Clone)]
pub struct PostgresStore {
    config: Config,
    /// Connections opened at most.
    pub max_connections: usize,
}

impl PostgresStore {
    /// Parses a `postgres://` (or `postgresql://`) URL, or a `key=value` connection string,
    /// that holds no password; `password` is set instead. TLS is refused (`sslmode=require`
    /// and stricter): this client speaks plain TCP or a Unix socket only.
    pub fn from_url(url: &str, password: Option<&Secret>) -> Result<Self> {
        let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
            // The parser's message names the part it could not read, never the whole string.
            Error::Config(format!(
                "--store is not a PostgreSQL connection URL ({e}): write \
                 postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_password().is_some() {
            return Err(Error::Config(
                "--store holds a password, and a command line is readable by every user \
                 (/proc/PID/cmdline): remove it from the URL and set PGPASSWORD or pass \
                 --store-password-file"
                    .into(),
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(Error::Config(
                "--store names no host: write postgres://USER@HOST:PORT/DATABASE".into(),
            ));
        }
        if config.get_user().is_none() {
            return Err(Error::Config(
                "--store names no user: write postgres://USER@HOST:PORT/DATABASE".into(),
            ));
        }
        match config.get_ssl_mode() {
            SslMode::Disable | SslMode::Prefer => {}
            _ => {
                return Err(Error::Config(
                    "--store asks for TLS (sslmode=require), which streamsnap serve does not \
                     speak to PostgreSQL yet: reach the database over a private network, a \
                     Unix socket or a local TLS proxy, and drop sslmode from the URL"
                        .into(),
                ));
            }
        }
        // Without TLS, "prefer" would only cost a refused SSLRequest per connection.
        config.ssl_mode(SslMode::Disable);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("streamsnap-serve");
        }
        if let Some(password) = password {
            config.password(password.expose());
        }
        Ok(Self {
            config,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }
}

impl fmt::Display for PostgresStore {
    /// `postgres://USER@HOST:PORT/DATABASE`, never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = c.get_ports().get(i).or(c.get_ports().first()).copied();
                let host = match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match port {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        write!(
            f,
            "postgres://{}@{}/{}",
            c.get_user().unwrap_or_default(),
            hosts.join(","),
            c.get_dbname().or(c.get_user()).unwrap_or_default()
        )
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.to_string())
            .field(
                "password",
                &self.config.get_password().map(|_| "[redacted]"),
            )
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// An open shared store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Postgres {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    listener: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Postgres {
    /// Connects, applies the migrations and starts listening for queue notifications.
    pub async fn open(store: &PostgresStore, wake: Arc<Notify>) -> Result<Self> {
        let pool = Pool::new(store.config.clone(), store.max_connections.max(1));
        {
            let mut conn = pool.get().await?;
            migrate(&mut conn).await?;
        }
        let listener = tokio::spawn(listen(store.config.clone(), wake));
        Ok(Self {
            inner: Arc::new(Inner { pool, listener }),
        })
    }

    async fn conn(&self) -> Result<Conn<'_>> {
        self.inner.pool.get().await
    }

    pub async fn settings(&self, name: &str) -> Result<Settings> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT doc::text, kind FROM repositories WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(match row {
            Some(row) => record(name, row.get(0), row.get(1))?.settings(),
            None => Settings::default(),
        })
    }

    pub async fn update_settings(&self, name: &str, change: SettingsChange) -> Result<()> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // One change of a repository at a time, across replicas (the row may not exist yet,
        // so a row lock would not do): the next one reads what the first committed.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('repository:' || $1, 0))",
            &[&name],
        )
        .await?;
        let before = tx
            .query_opt(
                "SELECT doc::text, kind FROM repositories WHERE name = $1",
                &[&name],
            )
            .await?
            .map(|row| record(name, row.get(0), row.get(1)))
            .transpose()?
            .map(|r| r.settings());
        let record = RepositoryRecord::changed(before, change);
        tx.execute(
            "INSERT INTO repositories (name, doc, kind) VALUES ($1, $2::text::jsonb, $3) \
             ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc, kind = EXCLUDED.kind",
            &[&name, &json(name, &record)?, &record.kind.as_str()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn repositories(&self, only: Option<&str>) -> Result<Vec<Repository>> {
        let conn = self.conn().await?;
        let mut out: BTreeMap<String, Repository> = BTreeMap::new();
        if let Some(name) = only {
            out.insert(name.to_owned(), blank_repository(name));
        }
        let states = conn
            .query(
                "SELECT name, doc::text, kind FROM repositories \
                 WHERE $1::text IS NULL OR name = $1",
                &[&only],
            )
            .await?;
        for row in states {
            let name: &str = row.get(0);
            let record = record(name, row.get(1), row.get(2))?;
            let entry = out
                .entry(name.to_owned())
                .or_insert_with(|| blank_repository(name));
            entry.streaming = record.streaming;
            entry.kind = record.kind;
            entry.updated = Some(record.updated);
        }
        let counts = conn
            .query(
                "SELECT repository, state, count(*) FROM operations \
                 WHERE $1::text IS NULL OR repository = $1 GROUP BY repository, state",
                &[&only],
            )
            .await?;
        for row in counts {
            let name: &str = row.get(0);
            let state = parse_state(row.get(1))?;
            let n: i64 = row.get(2);
            let entry = out
                .entry(name.to_owned())
                .or_insert_with(|| blank_repository(name));
            for _ in 0..n {
                entry.operations.add(state);
            }
        }
        Ok(out.into_values().collect())
    }

    pub async fn create_operation(&self, new: NewOperation) -> Result<Created> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let now = Timestamp::now();
        if let Some(event) = &new.event_id {
            let inserted = tx
                .execute(
                    "INSERT INTO events (id, seen) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[event, &to_i64(now.0)],
                )
                .await?;
            if inserted == 0 {
                return Ok(Created::DuplicateEvent);
            }
        }
        let key = manifest_key(&new.repository, &new.manifest_digest);
        // One creator per manifest at a time, across replicas; the next one sees what the
        // first committed (each statement reads the newest committed data).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&key],
        )
        .await?;
        let digest = new.manifest_digest.to_string();
        let previous = tx
            .query_opt(
                "SELECT o.doc::text FROM latest_by_manifest l \
                 JOIN operations o ON o.id = l.operation_id \
                 WHERE l.repository = $1 AND l.manifest_digest = $2",
                &[&new.repository, &digest],
            )
            .await?
            .map(|row| decode::<Operation>(&key, row.get::<_, &str>(0).as_bytes()))
            .transpose()?;
        let created = match previous {
            Some(op) if blocks_new(&op, &new) => Created::Existing(op),
            _ => {
                let seq: i64 = tx
                    .query_one("SELECT nextval('operation_seq')", &[])
                    .await?
                    .get(0);
                let seq = u64::try_from(seq).unwrap_or_default();
                let op = loop {
                    let op = new_operation(ids::new_id(), seq, new.clone(), now);
                    let inserted = tx
                        .execute(
                            "INSERT INTO operations \
                             (id, seq, repository, manifest_digest, state, doc) \
                             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb) \
                             ON CONFLICT (id) DO NOTHING",
                            &[
                                &op.id,
                                &to_i64(seq),
                                &op.repository,
                                &digest,
                                &op.state.as_str(),
                                &json(&op.id, &op)?,
                            ],
                        )
                        .await?;
                    if inserted == 1 {
                        break op;
                    }
                };
                tx.execute(
                    "INSERT INTO latest_by_manifest (repository, manifest_digest, operation_id) \
                     VALUES ($1, $2, $3) ON CONFLICT (repository, manifest_digest) \
                     DO UPDATE SET operation_id = EXCLUDED.operation_id",
                    &[&op.repository, &digest, &op.id],
                )
                .await?;
                notify_queue(&tx).await?;
                Created::New(op)
            }
        };
        tx.commit().await?;
        Ok(created)
    }

    pub async fn operation(&self, id: &str) -> Result<Option<Operation>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt("SELECT doc::text FROM operations WHERE id = $1", &[&id])
            .await?;
        row.map(|row| decode(id, row.get::<_, &str>(0).as_bytes()))
            .transpose()
    }

    pub async fn latest_for(&self, repository: &str, digest: &Digest) -> Result<Option<Operation>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT o.doc::text FROM latest_by_manifest l \
                 JOIN operations o ON o.id = l.operation_id \
                 WHERE l.repository = $1 AND l.manifest_digest = $2",
                &[&repository, &digest.to_string()],
            )
            .await?;
        row.map(|row| decode(repository, row.get::<_, &str>(0).as_bytes()))
            .transpose()
    }

    pub async fn operations(
        &self,
        repository: &str,
        filter: impl Fn(&Operation) -> bool,
    ) -> Result<Vec<Operation>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, doc::text FROM operations WHERE repository = $1 ORDER BY seq DESC",
                &[&repository],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let op: Operation = decode(row.get(0), row.get::<_, &str>(1).as_bytes())?;
            if filter(&op) {
                out.push(op);
            }
        }
        Ok(out)
    }

    pub async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Operation) -> bool,
    ) -> Result<Option<Operation>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT doc::text FROM operations WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut op: Operation = decode(id, row.get::<_, &str>(0).as_bytes())?;
        let before = op.state;
        if change(&mut op) {
            op.updated = Timestamp::now();
            write(&tx, &op, before, None).await?;
            tx.commit().await?;
        }
        Ok(Some(op))
    }

    pub async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Operation>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT id, doc::text FROM operations WHERE state = 'NotStarted' \
                 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut op: Operation = decode(row.get(0), row.get::<_, &str>(1).as_bytes())?;
        start(&mut op, worker);
        write(&tx, &op, OperationState::NotStarted, Some(lease)).await?;
        tx.commit().await?;
        Ok(Some(op))
    }

    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease: Duration,
        progress: Progress,
    ) -> Result<Lease> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT doc::text FROM operations \
                 WHERE id = $1 AND state = 'Running' AND worker = $2 FOR UPDATE",
                &[&id, &worker],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Lease::Lost);
        };
        let mut op: Operation = decode(id, row.get::<_, &str>(0).as_bytes())?;
        if op.progress != progress {
            op.progress = progress;
            op.updated = Timestamp::now();
        }
        write(&tx, &op, OperationState::Running, Some(lease)).await?;
        tx.commit().await?;
        Ok(Lease::Held {
            cancel_requested: op.cancel_requested,
        })
    }

    pub async fn reap(&self, scope: Reap, max_interruptions: u32) -> Result<Recovered> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Rows a heartbeat holds are skipped: their lease is being renewed.
        let query = match scope {
            Reap::Expired => format!(
                "SELECT id, doc::text FROM operations WHERE state = 'Running' \
                 AND (lease_until IS NULL OR lease_until < {NOW_MS}) \
                 ORDER BY seq FOR UPDATE SKIP LOCKED"
            ),
            Reap::AllRunning => "SELECT id, doc::text FROM operations WHERE state = 'Running' \
                                 ORDER BY seq FOR UPDATE"
                .to_owned(),
        };
        let rows = tx.query(&query, &[]).await?;
        let mut recovered = Recovered::default();
        for row in rows {
            let mut op: Operation = decode(row.get(0), row.get::<_, &str>(1).as_bytes())?;
            reap_one(&mut op, max_interruptions, &mut recovered);
            write(&tx, &op, OperationState::Running, None).await?;
        }
        tx.commit().await?;
        Ok(recovered)
    }

    pub async fn prune_events(&self, ttl_ms: u64, max_ids: u64) -> Result<u64> {
        let conn = self.conn().await?;
        let horizon = Timestamp::now().0.saturating_sub(ttl_ms);
        let old = conn
            .execute("DELETE FROM events WHERE seen < $1", &[&to_i64(horizon)])
            .await?;
        let excess = conn
            .execute(
                "DELETE FROM events WHERE id IN \
                 (SELECT id FROM events ORDER BY seen DESC, id OFFSET $1)",
                &[&to_i64(max_ids)],
            )
            .await?;
        Ok(old + excess)
    }

    #[cfg(test)]
    pub async fn event_ids(&self) -> Result<u64> {
        let conn = self.conn().await?;
        let n: i64 = conn
            .query_one("SELECT count(*) FROM events", &[])
            .await?
            .get(0);
        Ok(u64::try_from(n).unwrap_or_default())
    }
}

/// Writes `op` (which was `before`): its columns follow its document; the lease is renewed to
/// `lease` from now, kept, or dropped when it is no longer Running; an operation queued again
/// wakes the replicas.
async fn write(
    tx: &Transaction<'_>,
    op: &Operation,
    before: OperationState,
    lease: Option<Duration>,
) -> Result<()> {
    let lease_ms = lease.map(|d| to_i64(millis(d)));
    tx.execute(
        &format!(
            "UPDATE operations SET state = $2, worker = $3, doc = $4::text::jsonb, \
             lease_until = CASE WHEN $2 <> 'Running' THEN NULL \
                                WHEN $5::bigint IS NULL THEN lease_until \
                                ELSE {NOW_MS} + $5::bigint END \
             WHERE id = $1"
        ),
        &[
            &op.id,
            &op.state.as_str(),
            &op.worker,
            &json(&op.id, op)?,
            &lease_ms,
        ],
    )
    .await?;
    if op.state == OperationState::NotStarted && before != OperationState::NotStarted {
        notify_queue(tx).await?;
    }
    Ok(())
}

async fn notify_queue(tx: &Transaction<'_>) -> Result<()> {
    tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])
        .await?;
    Ok(())
}

/// Applies the migrations the database lacks, in order, in one transaction.
async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS streamsnap_schema_migrations (\
             version integer PRIMARY KEY, \
             description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM streamsnap_schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = applied.iter().max()
        && newest > known
    {
        return Err(Error::Config(format!(
            "the database's schema is at version {newest}, newer than this streamsnap knows \
             ({known}): run the newer streamsnap that migrated it, or point --store at another \
             database"
        )));
    }
    for (version, description, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO streamsnap_schema_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await?;
        tracing::info!(version, description, "applied a database schema migration");
    }
    tx.commit().await?;
    Ok(())
}

/// Listens for queue notifications on a connection of its own and wakes the workers; on a
/// lost connection it reconnects (the workers poll meanwhile).
async fn listen(config: Config, wake: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        match listen_once(&config, &wake).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %crate::error::chain(&error), "listening for queued operations failed; retrying");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen_once(config: &Config, wake: &Notify) -> Result<()> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(connect_error)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {QUEUE_CHANNEL}"))
        .await?;
    // Whatever was queued while this connection was down.
    wake.notify_waiters();
    while rx.recv().await.is_some() {
        wake.notify_waiters();
    }
    drop(client);
    match driver.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// A bounded pool of connections, opened on demand and reused while they are open.
struct Pool {
    config: Config,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Pool {
    fn new(config: Config, max: usize) -> Self {
        Self {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max),
        }
    }

    async fn get(&self) -> Result<Conn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the pool is never closed");
        loop {
            let idle = self.idle.lock().expect("pool lock").pop();
            match idle {
                Some(client) if !client.is_closed() => {
                    return Ok(Conn {
                        client: Some(client),
                        pool: self,
                        _permit: permit,
                    });
                }
                Some(_) => continue,
                None => break,
            }
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(connect_error)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "a database connection ended");
            }
        });
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

/// A connection taken from the pool; it goes back when dropped (unless it broke).
struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("taken only on drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("taken only on drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        // A dropped transaction sent its ROLLBACK ahead of anything the next user sends.
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            self.pool.idle.lock().expect("pool lock").push(client);
        }
    }
}

fn connect_error(source: tokio_postgres::Error) -> Error {
    Error::Postgres {
        context: "connecting to PostgreSQL (--store)",
        source,
    }
}

/// A repository's record from its document and its `kind` column (the column is what counts:
/// rows older than the column have it from the migration's default, chunked).
fn record(name: &str, doc: &str, kind: &str) -> Result<RepositoryRecord> {
    let mut record: RepositoryRecord = decode(name, doc.as_bytes())?;
    record.kind = kind
        .parse::<ArtifactKind>()
        .map_err(|e| Error::Config(format!("repository {name:?} in the database: {e}")))?;
    Ok(record)
}

fn parse_state(s: &str) -> Result<OperationState> {
    OperationState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| Error::Config(format!("unknown operation state {s:?} in the database")))
}

fn json<T: serde::Serialize>(key: &str, value: &T) -> Result<String> {
    encode(key, value).map(|bytes| String::from_utf8(bytes).expect("serde_json writes UTF-8"))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
