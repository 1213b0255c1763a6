//! The service's domain: repository states, operations (create, show, cancel), and what
//! registry events do. The HTTP layer (`routes`) only translates to and from these calls; the
//! workers (`worker`) run the queued operations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamsnap_convert::{ConvertOptions, Progress};
use streamsnap_format::{Digest, MAX_CHUNK_SIZE, media};
use streamsnap_registry::{Client, Reference, Repository};
use tokio::sync::{Notify, watch};

use crate::api::{
    CreateOperation, Operation, OperationOptions, OperationState, Repository as RepositoryState,
    Streaming, Trigger, UpdateRepository, WebhookSummary,
};
use crate::auth::{ApiAuth, Secret};
use crate::error::{Error, Result, chain};
use crate::events::{self, Action, Envelope};
use crate::ids;
use crate::store::{Created, NewOperation, SettingsChange, Store, StoreConfig};

/// How often a cancel call looks whether the operation stopped (it may run on another
/// replica, whose worker sees the cancel at its next heartbeat).
const CANCEL_POLL: Duration = Duration::from_millis(200);

/// How `streamsnap serve` runs.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The registry served, `host[:port]`; repositories are named relative to it.
    pub registry: String,
    pub listen: SocketAddr,
    /// Holds `work/` (staging files of running conversions) and, with the embedded store,
    /// `state.redb`.
    pub state_dir: PathBuf,
    /// Where states and operations are kept: redb in `state_dir` (one service), or a
    /// PostgreSQL database shared by several replicas (`serve --store`).
    pub store: StoreConfig,
    /// A Running operation whose worker has not renewed its lease for this long is taken
    /// over (resumed elsewhere, or Failed after `max_interruptions`); `serve --operation-lease`.
    pub lease: Duration,
    /// How often idle workers look for queued operations even without a wake-up, and expired
    /// leases are looked for.
    pub poll_interval: Duration,
    pub auth: ApiAuth,
    pub webhook_secret: Secret,
    /// Conversions run at once.
    pub concurrency: usize,
    /// Defaults for conversions (an operation may ask for another chunk size or level).
    pub convert: ConvertOptions,
    /// A conversion the service (or its replica) died in this many times ends Failed instead
    /// of resuming.
    pub max_interruptions: u32,
    /// How long a graceful shutdown waits for running conversions to stop.
    pub shutdown_timeout: Duration,
    /// How long a cancel call waits for a running conversion to stop before answering.
    pub cancel_wait: Duration,
    /// Signs every artifact it pushes (`serve --sign-key`).
    pub sign: Option<Arc<streamsnap_trust::SigningKey>>,
    /// What one operation may cost (`serve --operation-timeout`, `--max-layer-size`,
    /// `--max-compression-ratio`).
    pub limits: OperationLimits,
    /// Registry event IDs are remembered this long, to recognize a redelivered event.
    pub event_ttl: Duration,
    /// At most this many event IDs are remembered (the newest).
    pub max_event_ids: u64,
    /// How often the service forgets event IDs past `event_ttl` (or beyond `max_event_ids`)
    /// while it runs; it also does at start.
    pub event_prune_interval: Duration,
}

/// Bounds on one operation, so that one push (a decompression bomb, a huge image, a registry
/// that stalls) cannot hold a worker for hours. A conversion over a bound ends Failed with the
/// reason and the flag to raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperationLimits {
    /// Longest an operation runs; past it the conversion is stopped (`--operation-timeout`).
    pub timeout: Duration,
    /// Largest uncompressed size of one layer, in bytes (`--max-layer-size`).
    pub max_layer_size: u64,
    /// Largest uncompressed size of a layer per byte of the image's largest compressed layer
    /// (`--max-compression-ratio`), above [`RATIO_FREE_BYTES`].
    pub max_compression_ratio: u64,
}

/// Any layer may decompress to this much whatever the ratio: tar padding gives a small layer a
/// high ratio, and a gigabyte is quick to convert.
pub const RATIO_FREE_BYTES: u64 = 1 << 30;

impl Default for OperationLimits {
    /// 1 hour, 16 GiB, 100.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3600),
            max_layer_size: 16 << 30,
            max_compression_ratio: 100,
        }
    }
}

impl OperationLimits {
    /// The most bytes any layer of an image may decompress to, when its largest layer is
    /// `largest_compressed` bytes: `max_layer_size`, or less by the ratio (but never less than
    /// [`RATIO_FREE_BYTES`] by it).
    pub fn uncompressed_limit(&self, largest_compressed: u64) -> u64 {
        let by_ratio = largest_compressed.saturating_mul(self.max_compression_ratio);
        self.max_layer_size.min(by_ratio.max(RATIO_FREE_BYTES))
    }
}

impl ServiceConfig {
    /// A configuration with the defaults: the embedded store, 2 conversions at once, leases
    /// of 30 s, 3 interruptions, 30 s to shut down, 10 s to cancel, [`OperationLimits::default`], event IDs kept 7 days (at most
    /// 100,000) and pruned every hour.
    pub fn new(
        registry: String,
        listen: SocketAddr,
        state_dir: PathBuf,
        auth: ApiAuth,
        webhook_secret: Secret,
    ) -> Self {
        Self {
            registry,
            listen,
            state_dir,
            store: StoreConfig::Embedded,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            auth,
            webhook_secret,
            concurrency: 2,
            convert: ConvertOptions::default(),
            max_interruptions: 3,
            shutdown_timeout: Duration::from_secs(30),
            cancel_wait: Duration::from_secs(10),
            sign: None,
            limits: OperationLimits::default(),
            event_ttl: Duration::from_secs(7 * 24 * 3600),
            max_event_ids: 100_000,
            event_prune_interval: Duration::from_secs(3600),
        }
    }
}

/// A running conversion, as the API and the shutdown see it.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub progress: Arc<Progress>,
    /// Set when the cancel came from a user (or a delete), not from a shutdown.
    pub user_cancel: AtomicBool,
}

impl Live {
    pub fn cancel(&self, by_user: bool) {
        if by_user {
            self.user_cancel.store(true, Ordering::SeqCst);
        }
        self.progress.cancel.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug)]
pub(crate) struct Service {
    pub config: ServiceConfig,
    pub client: Client,
    pub store: Store,
    /// This process's name as a worker (`HOSTNAME-PID-RANDOM`): operations it runs carry it.
    pub worker_id: String,
    pub live: Mutex<HashMap<String, Arc<Live>>>,
    /// Wakes idle workers: an operation was queued (here, or by another replica).
    pub wake: Arc<Notify>,
    /// True once shutdown began: workers take no more operations.
    pub stopping: watch::Sender<bool>,
    /// Bumped whenever an operation reaches its final state (or goes back to the queue).
    pub finished: watch::Sender<u64>,
    pub work_dir: PathBuf,
    pub metrics: crate::metrics::Metrics,
}

impl Service {
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// `name` as a repository of the served registry; refuses names the registry would not
    /// accept.
    pub fn repository(&self, name: &str) -> Result<Repository> {
        let bad = |reason: String| Error::BadRequest(format!("repository {name:?}: {reason}"));
        let parsed = Reference::parse(&format!("{}/{name}", self.config.registry))
            .map_err(|e| bad(e.to_string()))?;
        if parsed.tag.as_deref() != Some("latest") || parsed.digest.is_some() {
            return Err(bad("a repository name has no tag or digest".into()));
        }
        if parsed.repository.name != name {
            return Err(bad("not a valid repository name".into()));
        }
        Ok(parsed.repository)
    }

    /// A repository name as the API gives it, relative to the served registry: a leading
    /// `<registry>/` (as in a full image reference) is dropped.
    pub fn relative_name(&self, name: String) -> String {
        match name.strip_prefix(&format!("{}/", self.config.registry)) {
            Some(rest) => rest.to_owned(),
            None => name,
        }
    }

    /// Wakes the idle workers: an operation was queued. (The queue is the store's NotStarted
    /// operations; workers claim from it, here or on another replica.)
    pub fn enqueue(&self) {
        self.wake.notify_waiters();
    }

    /// The operation with live progress when it runs.
    pub fn with_live_progress(&self, mut op: Operation) -> Operation {
        if op.state == OperationState::Running
            && let Some(live) = self.live.lock().expect("live map lock").get(&op.id)
        {
            op.progress.done = live.progress.done.load(Ordering::Relaxed);
            op.progress.total = live.progress.total.load(Ordering::Relaxed);
        }
        op
    }

    pub async fn repositories(&self, only: Option<String>) -> Result<Vec<RepositoryState>> {
        if let Some(name) = &only {
            self.repository(name)?;
        }
        self.store.repositories(only.as_deref()).await
    }

    /// Sets a repository's streaming state, its artifact kind, or both (what the request
    /// leaves out stays as it is). A new kind applies to the conversions started afterwards.
    pub async fn update_repository(
        &self,
        name: &str,
        update: UpdateRepository,
    ) -> Result<RepositoryState> {
        self.repository(name)?;
        if update.streaming.is_none() && update.kind.is_none() {
            return Err(Error::BadRequest(
                "nothing to change: set streaming (Active or Inactive), kind (chunked or index), \
                 or both"
                    .into(),
            ));
        }
        let change = SettingsChange {
            streaming: update.streaming,
            kind: update.kind,
        };
        self.store.update_settings(name, change).await?;
        let repos = self.store.repositories(Some(name)).await?;
        tracing::info!(
            repository = name,
            streaming = update.streaming.map(tracing::field::display),
            kind = update.kind.map(tracing::field::display),
            "repository settings changed"
        );
        Ok(repos
            .into_iter()
            .next()
            .expect("the repository asked for is listed"))
    }

    /// Starts a conversion of `request.reference` (a tag, resolved now, or a digest) in
    /// `name`. Returns the operation and whether it is new (an existing NotStarted, Running
    /// or Succeeded operation of that manifest is returned instead of a new one).
    pub async fn create(&self, name: &str, request: CreateOperation) -> Result<(Operation, bool)> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let repo = self.repository(name)?;
        if let Some(size) = request.chunk_size
            && !(65536..=MAX_CHUNK_SIZE).contains(&size)
        {
            return Err(Error::BadRequest(format!(
                "chunk_size {size} is out of range: use 65536 to {MAX_CHUNK_SIZE}"
            )));
        }
        if let Some(level) = request.compression_level
            && !(1..=19).contains(&level)
        {
            return Err(Error::BadRequest(format!(
                "compression_level {level} is out of range: use 1 to 19"
            )));
        }
        let digest = self.resolve(&repo, &request.reference).await?;
        let kind = self.store.settings(name).await?.kind;
        let new = NewOperation {
            repository: name.to_owned(),
            reference: request.reference,
            manifest_digest: digest,
            trigger: Trigger::Api,
            options: OperationOptions {
                force: request.force,
                chunk_size: request.chunk_size,
                compression_level: request.compression_level,
            },
            kind,
            event_id: None,
        };
        match self.store.create_operation(new).await? {
            Created::New(op) => {
                tracing::info!(id = %op.id, image = %op.image(), digest = %op.manifest_digest, "operation created");
                self.enqueue();
                Ok((op, true))
            }
            Created::Existing(op) => Ok((self.with_live_progress(op), false)),
            Created::DuplicateEvent => unreachable!("API operations carry no event"),
        }
    }

    /// The digest a tag points at now, or the digest given; the manifest must exist.
    async fn resolve(&self, repo: &Repository, reference: &str) -> Result<Digest> {
        let image = format!(
            "{repo}{}{reference}",
            if reference.contains(':') { "@" } else { ":" }
        );
        let parsed = Reference::parse(&image).map_err(|e| Error::BadRequest(e.to_string()))?;
        if parsed.repository != *repo {
            return Err(Error::BadRequest(format!(
                "{reference:?} is not a tag or a digest"
            )));
        }
        match self.client.head_manifest(repo, reference).await? {
            Some(descriptor) => Ok(descriptor.digest),
            None => Err(Error::not_found(format!("manifest {image}"))),
        }
    }

    pub async fn operation(&self, name: &str, id: &str) -> Result<Operation> {
        self.repository(name)?;
        if !ids::is_id(id) {
            return Err(Error::not_found(format!("operation {id:?} in {name}")));
        }
        let owned = id.to_owned();
        match self.store.operation(&owned).await? {
            Some(op) if op.repository == name => Ok(self.with_live_progress(op)),
            _ => Err(Error::not_found(format!("operation {id} in {name}"))),
        }
    }

    /// Operations of `name`, newest first; with `reference`, those of the manifest it names
    /// now (a tag is resolved; if it no longer exists, operations asked for by that tag).
    pub async fn operations(
        &self,
        name: &str,
        reference: Option<String>,
    ) -> Result<Vec<Operation>> {
        let repo = self.repository(name)?;
        let digest = match &reference {
            None => None,
            Some(r) => match self.resolve(&repo, r).await {
                Ok(d) => Some(d),
                Err(Error::NotFound { .. }) => None,
                Err(e) => return Err(e),
            },
        };
        let ops = self
            .store
            .operations(name, move |op| match (&reference, &digest) {
                (None, _) => true,
                (Some(_), Some(d)) => op.manifest_digest == *d,
                (Some(r), None) => op.reference == *r,
            })
            .await?;
        Ok(ops
            .into_iter()
            .map(|op| self.with_live_progress(op))
            .collect())
    }

    /// Cancels operation `id` and waits (up to `cancel_wait`) until it has stopped. A
    /// NotStarted operation is Canceled at once; a finished one is a conflict.
    pub async fn cancel(&self, name: &str, id: &str) -> Result<Operation> {
        let op = self.operation(name, id).await?;
        if op.state.is_terminal() {
            return Err(Error::Conflict(format!(
                "operation {id} is {} already: there is nothing to cancel",
                op.state
            )));
        }
        let mut finished = self.finished.subscribe();
        self.request_cancel(id, "canceled").await?;
        let deadline = tokio::time::Instant::now() + self.config.cancel_wait;
        loop {
            let op = self.operation(name, id).await?;
            if op.state.is_terminal() {
                return Ok(op);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(op); // still stopping: cancel_requested tells
            }
            // Woken when a worker here finishes; a worker on another replica is only seen in
            // the store, so look again every little while.
            let _ =
                tokio::time::timeout_at(deadline.min(now + CANCEL_POLL), finished.changed()).await;
        }
    }

    /// Marks `id` for cancellation: a NotStarted operation ends Canceled with `reason` now, a
    /// Running one is told to stop (its worker ends it Canceled and removes any artifact it
    /// pushed).
    async fn request_cancel(&self, id: &str, reason: &'static str) -> Result<()> {
        let op = self
            .store
            .update(id, move |op| {
                if op.state.is_terminal() || op.cancel_requested {
                    return false;
                }
                op.cancel_requested = true;
                if op.state == OperationState::NotStarted {
                    op.state = OperationState::Canceled;
                    op.error = Some(format!("{reason} before it started"));
                }
                true
            })
            .await?;
        if let Some(live) = self.live.lock().expect("live map lock").get(id) {
            live.cancel(true);
        }
        if op.is_some_and(|op| op.state.is_terminal()) {
            self.finished.send_modify(|n| *n += 1);
        }
        tracing::info!(id, "cancel requested");
        Ok(())
    }

    /// Handles a notification envelope. An error (the registry or the store failed) makes the
    /// registry deliver the envelope again; everything else is answered 200.
    pub async fn handle_envelope(&self, envelope: Envelope) -> Result<WebhookSummary> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let mut summary = WebhookSummary::default();
        for event in envelope.events {
            match events::classify(&event) {
                Action::Ignore(reason) => {
                    tracing::trace!(id = %event.id, action = %event.action, reason, "event ignored");
                    summary.ignored += 1;
                }
                Action::Push {
                    event_id,
                    repository,
                    digest,
                    tag,
                } => match self.on_push(event_id, repository, digest, tag).await? {
                    PushOutcome::Created => summary.created += 1,
                    PushOutcome::Duplicate => summary.duplicates += 1,
                    PushOutcome::Ignored => summary.ignored += 1,
                },
                Action::Delete { repository, digest } => {
                    if self.on_delete(&repository, digest).await? > 0 {
                        summary.deleted += 1;
                    } else {
                        summary.ignored += 1;
                    }
                }
            }
        }
        self.metrics.webhook(&summary);
        Ok(summary)
    }

    async fn on_push(
        &self,
        event_id: String,
        name: String,
        digest: Digest,
        tag: String,
    ) -> Result<PushOutcome> {
        let Ok(repo) = self.repository(&name) else {
            return Ok(PushOutcome::Ignored);
        };
        let owned = name.clone();
        let settings = self.store.settings(&owned).await?;
        if settings.streaming != Streaming::Active {
            tracing::debug!(repository = %name, %tag, "push into an inactive repository");
            return Ok(PushOutcome::Ignored);
        }
        match self.client.get_manifest(&repo, &digest.to_string()).await {
            Ok(manifest) if events::is_artifact_manifest(&manifest.bytes) => {
                tracing::debug!(repository = %name, %digest, "push of an artifact, not converted");
                return Ok(PushOutcome::Ignored);
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(PushOutcome::Ignored),
            Err(e) => return Err(e.into()),
        }
        let new = NewOperation {
            repository: name,
            reference: tag,
            manifest_digest: digest,
            trigger: Trigger::Push,
            options: OperationOptions::default(),
            kind: settings.kind,
            event_id: Some(event_id),
        };
        Ok(match self.store.create_operation(new).await? {
            Created::New(op) => {
                tracing::info!(id = %op.id, image = %op.image(), digest = %op.manifest_digest, "operation created for a push");
                self.enqueue();
                PushOutcome::Created
            }
            Created::Existing(op) => {
                tracing::debug!(id = %op.id, "push of a manifest that has an operation");
                PushOutcome::Duplicate
            }
            Created::DuplicateEvent => {
                tracing::debug!("event delivered again");
                PushOutcome::Duplicate
            }
        })
    }

    /// A manifest was deleted: stop its queued or running operation, and delete its streaming
    /// artifacts and start-up profiles (found through the referrers API or the fallback tag,
    /// which outlives the manifest). Other referrers stay. Returns how many were deleted.
    async fn on_delete(&self, name: &str, digest: Digest) -> Result<usize> {
        let Ok(repo) = self.repository(name) else {
            return Ok(0);
        };
        let owned = name.to_owned();
        if let Some(op) = self.store.latest_for(&owned, &digest).await?
            && !op.state.is_terminal()
        {
            self.request_cancel(&op.id, "the image manifest was deleted")
                .await?;
        }
        let ours: Vec<_> = self
            .client
            .referrers(&repo, &digest, None)
            .await?
            .manifests
            .into_iter()
            .filter(|d| {
                matches!(
                    d.artifact_type.as_deref(),
                    Some(media::ARTIFACT_TYPE | media::PROFILE_ARTIFACT_TYPE)
                )
            })
            .collect();
        for artifact in &ours {
            self.client
                .remove_referrer(&repo, &digest, &artifact.digest)
                .await?;
            tracing::info!(repository = name, subject = %digest, artifact = %artifact.digest, artifact_type = artifact.artifact_type.as_deref().unwrap_or(""), "deleted a streaming referrer of a deleted manifest");
        }
        Ok(ours.len())
    }
}

enum PushOutcome {
    Created,
    Duplicate,
    Ignored,
}

/// Logs an error with its causes.
pub(crate) fn log_error(what: &str, error: &Error) {
    tracing::warn!(error = %chain(error), "{what}");
}
