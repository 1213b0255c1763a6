//! The worker pool: `concurrency` tasks claim the oldest NotStarted operation from the store
//! (the queue is the store's, shared by every replica) and run it with the converter. A claimed
//! operation is Running under the worker's lease, which its heartbeat renews every second while
//! it also records progress and picks up a cancel asked for on any replica. A worker that loses
//! its lease (it could not renew it in time and another replica took the operation over) drops
//! the conversion and records nothing. A task of its own takes over operations whose lease
//! expired: their worker died.
//!
//! A conversion makes the artifact kind its repository has when the conversion starts (a kind
//! changed later applies to the conversions started afterwards); the operation records it.
//!
//! Ends of an operation:
//! - the conversion pushed an artifact: Succeeded (or, when a user canceled it just too late,
//!   the artifact is removed again and the operation is Canceled);
//! - the converter stopped on a user's cancel: Canceled, nothing pushed but unreferenced blobs;
//! - it stopped because the service shuts down: back to NotStarted, resumed by another replica
//!   or after the restart;
//! - it ran past the time limit: stopped, Failed with the limit and the flag that sets it;
//! - a layer over the size limits: Failed, with the limits and the flags that set them;
//! - a layer the index kind cannot index (not gzip): Failed, with the converter's reason and
//!   how to set the repository to the chunked kind;
//! - any other error: Failed, with the error and its causes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamsnap_convert::{ConvertOptions, CreateOptions, Created};
use streamsnap_format::Digest;
use streamsnap_registry::{Client, Reference, Repository};
use tokio::task::JoinHandle;

use crate::api::{ArtifactKind, Operation, OperationState, Progress};
use crate::error::chain;
use crate::metrics::Ended;
use crate::service::{Live, OperationLimits, Service, log_error};
use crate::store::{Lease, Reap, Recovered};

/// How often a running operation's worker renews its lease and writes its progress (more often
/// when the lease is shorter than 3 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a conversion told to stop at its time limit gets to stop (it checks between reads
/// and requests) before the worker drops it and takes the next operation.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Starts `concurrency` workers and the task that takes over operations whose worker is gone.
pub(crate) fn spawn(service: Arc<Service>) -> Vec<JoinHandle<()>> {
    let mut tasks: Vec<_> = (0..service.config.concurrency.max(1))
        .map(|_| tokio::spawn(work(service.clone())))
        .collect();
    tasks.push(tokio::spawn(reap_expired(service)));
    tasks
}

/// One worker: claims the oldest queued operation and runs it, until the service stops; idle,
/// it waits for a wake-up (an operation queued here, or a notification from the store) or the
/// poll interval.
async fn work(service: Arc<Service>) {
    let mut stopping = service.stopping.subscribe();
    loop {
        if service.is_stopping() {
            return;
        }
        // Registered before the claim, so a wake-up between the two is not missed.
        let notified = service.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match service
            .store
            .claim(&service.worker_id, service.config.lease)
            .await
        {
            Ok(Some(op)) => {
                run_guarded(&service, op).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => log_error("cannot take a queued operation", &e),
        }
        tokio::select! {
            biased;
            _ = stopping.wait_for(|s| *s) => return,
            () = &mut notified => {}
            () = tokio::time::sleep(service.config.poll_interval) => {}
        }
    }
}

/// Runs `op` in a task of its own, so that a panic (a bug) fails the operation instead of the
/// worker.
async fn run_guarded(service: &Arc<Service>, op: Operation) {
    let id = op.id.clone();
    let task = tokio::spawn({
        let service = service.clone();
        async move { run(&service, op).await }
    });
    if let Err(error) = task.await {
        tracing::error!(id, %error, "the conversion task panicked");
        service.live.lock().expect("live map lock").remove(&id);
        let failed = finish(service, &id, |op| {
            op.state = OperationState::Failed;
            op.error = Some(
                "internal error: the conversion panicked (a bug in streamsnap; see the service \
                 log)"
                    .into(),
            );
        })
        .await;
        if let Err(e) = failed {
            log_error("cannot record a failed operation", &e);
        }
        service.finished.send_modify(|n| *n += 1);
    }
}

/// Records the end of operation `id` if it is still Running for this worker (another replica
/// may have taken it over after this one failed to renew its lease). Returns whether it did.
async fn finish(
    service: &Service,
    id: &str,
    change: impl FnOnce(&mut Operation) + Send + 'static,
) -> crate::error::Result<bool> {
    let me = service.worker_id.clone();
    let applied = Arc::new(AtomicBool::new(false));
    let flag = applied.clone();
    service
        .store
        .update(id, move |op| {
            if op.state != OperationState::Running || op.worker.as_deref() != Some(me.as_str()) {
                return false;
            }
            change(op);
            op.cancel_requested = false;
            flag.store(true, Ordering::SeqCst);
            true
        })
        .await?;
    Ok(applied.load(Ordering::SeqCst))
}

/// Every poll interval: Running operations whose worker stopped renewing its lease (a replica
/// that died, or hangs) are resumed here or elsewhere, or end Failed or Canceled.
async fn reap_expired(service: Arc<Service>) {
    let mut stopping = service.stopping.subscribe();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            () = tokio::time::sleep(service.config.poll_interval) => {}
        }
        match service
            .store
            .reap(Reap::Expired, service.config.max_interruptions)
            .await
        {
            Ok(recovered) if recovered.is_empty() => {}
            Ok(recovered) => {
                log_recovered(&recovered, "its worker stopped renewing its lease");
                if !recovered.resumed.is_empty() {
                    service.enqueue();
                }
                service.finished.send_modify(|n| *n += 1);
            }
            Err(e) => log_error("cannot look for operations whose worker is gone", &e),
        }
    }
}

/// Logs what [`crate::store::Store::reap`] did; `why` the operations' worker is gone.
pub(crate) fn log_recovered(recovered: &Recovered, why: &str) {
    for id in &recovered.resumed {
        tracing::warn!(id, "operation interrupted ({why}); resuming it");
    }
    for id in &recovered.failed {
        tracing::warn!(
            id,
            "operation interrupted ({why}) too many times; marked Failed"
        );
    }
    for id in &recovered.canceled {
        tracing::info!(id, "operation canceled while it was interrupted ({why})");
    }
}

enum Outcome {
    Succeeded {
        artifact: Digest,
        subject: Digest,
    },
    Failed(String),
    Canceled(String),
    /// Stopped by the shutdown: queued again (another replica, or the next start, resumes it).
    Requeue,
}

async fn run(service: &Arc<Service>, op: Operation) {
    let id = op.id.as_str();
    let live = Arc::new(Live::default());
    service
        .live
        .lock()
        .expect("live map lock")
        .insert(id.to_owned(), live.clone());
    // A shutdown that began between the claim and the registration above (a cancel is seen at
    // the first heartbeat).
    if service.is_stopping() {
        live.cancel(false);
    }

    let kind = match start_kind(service, &op).await {
        Ok(kind) => kind,
        Err(e) => {
            log_error("cannot read the artifact kind of a repository", &e);
            service.live.lock().expect("live map lock").remove(id);
            let reason = format!(
                "reading the artifact kind of repository {} failed: {}",
                op.repository,
                chain(&e)
            );
            let failed = finish(service, id, move |op| {
                op.state = OperationState::Failed;
                op.error = Some(reason);
            })
            .await;
            if let Err(e) = failed {
                log_error("cannot record a failed operation", &e);
            }
            service.finished.send_modify(|n| *n += 1);
            return;
        }
    };
    let span = tracing::info_span!("operation", id, image = %op.image(), digest = %op.manifest_digest, %kind);
    tracing::info!(parent: &span, "conversion started");
    let started = Instant::now();
    let repo = Repository::new(service.config.registry.clone(), op.repository.clone());
    let reference = Reference {
        repository: repo.clone(),
        tag: None,
        digest: Some(op.manifest_digest),
    };
    let options = CreateOptions {
        kind,
        convert: ConvertOptions {
            max_chunk_size: op
                .options
                .chunk_size
                .unwrap_or(service.config.convert.max_chunk_size),
            compression_level: op
                .options
                .compression_level
                .unwrap_or(service.config.convert.compression_level),
            ..service.config.convert.clone()
        },
        force: op.options.force,
        work_dir: Some(service.work_dir.clone()),
        sign: service.config.sign.clone(),
    };
    let limits = service.config.limits;
    let create = create_within_size_limits(
        &service.client,
        &reference,
        options,
        live.progress.clone(),
        limits,
    );
    let renewed = Mutex::new(Instant::now());
    let timed = {
        use tracing::Instrument;
        within_time_limit(
            create.instrument(span.clone()),
            limits.timeout,
            STOP_GRACE,
            &live.progress.cancel,
            heartbeat_every(service.config.lease),
            || heartbeat(service, id, &live, &renewed),
        )
        .await
    };
    service.live.lock().expect("live map lock").remove(id);

    let by_user = live.user_cancel.load(Ordering::SeqCst);
    let (result, timed_out) = match timed {
        Timed::Done { result, timed_out } => (Some(result), timed_out),
        Timed::Abandoned => (None, true),
        Timed::Stopped => {
            // Not ours any more: whatever the conversion did, the worker that took it over
            // records the end (a conversion pushes the same artifact each time).
            tracing::warn!(parent: &span, "conversion dropped: this replica lost its lease on the operation (another replica takes it over)");
            service
                .metrics
                .conversion_ended(Ended::LostLease, started.elapsed());
            service.finished.send_modify(|n| *n += 1);
            return;
        }
    };
    let by_shutdown = !by_user && !timed_out && live.progress.cancel.load(Ordering::SeqCst);
    let outcome = match result {
        None if by_user => Outcome::Canceled("canceled".into()),
        None => Outcome::Failed(format!(
            "{}; it did not stop within {} s of being told to, and was abandoned",
            time_limit_reason(limits.timeout),
            STOP_GRACE.as_secs()
        )),
        Some(result) => match result {
            Ok(created) if by_user && !created.existing => {
                // Canceled after the last check: take the artifact back out.
                match service
                    .client
                    .remove_referrer(&repo, &created.subject.digest, &created.artifact.digest)
                    .await
                {
                    Ok(()) => Outcome::Canceled("canceled".into()),
                    Err(e) => Outcome::Failed(format!(
                        "canceled after the artifact {} was pushed, and removing it failed: {}; \
                     delete it from the registry by hand",
                        created.artifact.digest,
                        chain(&e)
                    )),
                }
            }
            Ok(created) => Outcome::Succeeded {
                artifact: created.artifact.digest,
                subject: created.subject.digest,
            },
            Err(_) if by_shutdown => Outcome::Requeue,
            Err(_) if timed_out && !by_user => Outcome::Failed(time_limit_reason(limits.timeout)),
            Err(streamsnap_convert::Error::Canceled) => Outcome::Canceled("canceled".into()),
            Err(e @ streamsnap_convert::Error::LayerTooLarge { .. }) => {
                Outcome::Failed(format!("{}; {}", chain(&e), size_limits_hint(&limits)))
            }
            Err(e @ streamsnap_convert::Error::IndexUnsupported { .. }) => Outcome::Failed(
                format!("{}; {}", chain(&e), index_unsupported_hint(&op.repository)),
            ),
            Err(e) => Outcome::Failed(chain(&e)),
        },
    };
    let ended = match &outcome {
        Outcome::Succeeded { .. } => Ended::Succeeded,
        Outcome::Failed(_) => Ended::Failed,
        Outcome::Canceled(_) => Ended::Canceled,
        Outcome::Requeue => Ended::Requeued,
    };
    service.metrics.conversion_ended(ended, started.elapsed());
    match &outcome {
        Outcome::Succeeded { artifact, .. } => {
            tracing::info!(parent: &span, %artifact, "conversion succeeded")
        }
        Outcome::Failed(error) => tracing::warn!(parent: &span, %error, "conversion failed"),
        Outcome::Canceled(_) => tracing::info!(parent: &span, "conversion canceled"),
        Outcome::Requeue => {
            tracing::info!(parent: &span, "conversion stopped by the shutdown; queued again")
        }
    }
    let done = live.progress.done.load(Ordering::Relaxed);
    let total = live.progress.total.load(Ordering::Relaxed);
    let saved = finish(service, id, move |op| {
        op.progress = Progress { done, total };
        match outcome {
            Outcome::Succeeded { artifact, subject } => {
                op.state = OperationState::Succeeded;
                op.artifact_digest = Some(artifact);
                op.subject_digest = Some(subject);
                op.progress.done = op.progress.total;
            }
            Outcome::Failed(error) => {
                op.state = OperationState::Failed;
                op.error = Some(error);
            }
            Outcome::Canceled(reason) => {
                op.state = OperationState::Canceled;
                op.error = Some(reason);
            }
            Outcome::Requeue => {
                op.state = OperationState::NotStarted;
                op.progress = Progress::default();
            }
        }
    })
    .await;
    match saved {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(parent: &span, "the operation was taken over by another replica meanwhile; its end is recorded there")
        }
        Err(e) => log_error("cannot record the end of an operation", &e),
    }
    service.finished.send_modify(|n| *n += 1);
}

/// The artifact kind `op` converts to: its repository's now. Recorded in the operation (if it
/// is still this worker's).
async fn start_kind(service: &Service, op: &Operation) -> crate::error::Result<ArtifactKind> {
    let kind = service.store.settings(&op.repository).await?.kind;
    let me = service.worker_id.clone();
    service
        .store
        .update(&op.id, move |op| {
            if op.state != OperationState::Running
                || op.worker.as_deref() != Some(me.as_str())
                || op.kind == Some(kind)
            {
                return false;
            }
            op.kind = Some(kind);
            true
        })
        .await?;
    Ok(kind)
}

/// Converts and pushes `reference` within the size limits: the image is resolved first, a
/// layer already over `max_layer_size` compressed is refused before anything is downloaded, and
/// the converter refuses a layer that decompresses to more than
/// [`OperationLimits::uncompressed_limit`] of the image's largest compressed layer.
async fn create_within_size_limits(
    client: &Client,
    reference: &Reference,
    mut options: CreateOptions,
    progress: Arc<streamsnap_convert::Progress>,
    limits: OperationLimits,
) -> streamsnap_convert::Result<Created> {
    let image = streamsnap_convert::resolve(client, reference).await?;
    let largest = image
        .layers
        .iter()
        .max_by_key(|l| l.descriptor.size)
        .map(|l| (l.descriptor.digest, l.descriptor.size));
    if let Some((digest, size)) = largest
        && size > limits.max_layer_size
    {
        return Err(streamsnap_convert::Error::LayerTooLarge {
            digest,
            limit: limits.max_layer_size,
        });
    }
    let limit = limits.uncompressed_limit(largest.map_or(0, |(_, size)| size));
    options.convert.max_layer_size = options.convert.max_layer_size.min(limit);
    streamsnap_convert::create(client, reference, &options, progress).await
}

/// How a conversion under a time limit ended.
enum Timed<T> {
    /// It returned; `timed_out` when it was told to stop at the limit first.
    Done { result: T, timed_out: bool },
    /// It was told to stop at the limit and did not within the grace: dropped.
    Abandoned,
    /// `tick` said to stop (the operation is no longer this worker's): dropped at once.
    Stopped,
}

/// Runs `work`, calling `tick` every `every` (it returns false when the work must be dropped at
/// once). At `timeout` it sets `cancel` (the converter stops at its next read or request); if
/// `work` still runs `grace` later, it is dropped.
async fn within_time_limit<T, Tick: Future<Output = bool>>(
    work: impl Future<Output = T>,
    timeout: Duration,
    grace: Duration,
    cancel: &AtomicBool,
    every: Duration,
    mut tick: impl FnMut() -> Tick,
) -> Timed<T> {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut timed_out = false;
    loop {
        tokio::select! {
            result = &mut work => return Timed::Done { result, timed_out },
            _ = ticks.tick() => if !tick().await {
                return Timed::Stopped;
            },
            () = &mut deadline => {
                if timed_out {
                    return Timed::Abandoned;
                }
                timed_out = true;
                cancel.store(true, Ordering::SeqCst);
                deadline.as_mut().reset(tokio::time::Instant::now() + grace);
            }
        }
    }
}

/// How often a worker renews a lease of `lease`: every second, or thrice per lease if shorter.
fn heartbeat_every(lease: Duration) -> Duration {
    HEARTBEAT_EVERY
        .min(lease / 3)
        .max(Duration::from_millis(50))
}

/// Renews the worker's lease on `id` and records its progress. A cancel asked for on any
/// replica stops the conversion. Returns false when the operation is no longer this worker's
/// (another replica took it over), or when the lease could not be renewed for a whole lease
/// (the store is unreachable: another replica may take it over now).
async fn heartbeat(service: &Service, id: &str, live: &Live, renewed: &Mutex<Instant>) -> bool {
    let progress = Progress {
        done: live.progress.done.load(Ordering::Relaxed),
        total: live.progress.total.load(Ordering::Relaxed),
    };
    let lease = service.config.lease;
    match service
        .store
        .heartbeat(id, &service.worker_id, lease, progress)
        .await
    {
        Ok(Lease::Held { cancel_requested }) => {
            *renewed.lock().expect("lease clock lock") = Instant::now();
            if cancel_requested {
                live.cancel(true);
            }
            true
        }
        Ok(Lease::Lost) => false,
        Err(e) => {
            log_error("cannot renew the lease of a running operation", &e);
            renewed.lock().expect("lease clock lock").elapsed() < lease
        }
    }
}

fn time_limit_reason(timeout: Duration) -> String {
    format!(
        "stopped at the time limit of {} s (streamsnap serve --operation-timeout): no artifact \
         was pushed; raise the limit for an image this large, or check the image for a layer \
         that decompresses to far more than its size",
        timeout.as_secs()
    )
}

fn index_unsupported_hint(repository: &str) -> String {
    format!(
        "repository {repository} makes index artifacts: set it to the chunked kind with \
         `streamsnap artifact-streaming update --repository {repository} --kind chunked` and \
         convert the image again"
    )
}

fn size_limits_hint(limits: &OperationLimits) -> String {
    format!(
        "streamsnap serve converts layers of at most {} bytes uncompressed (--max-layer-size) and \
         beyond 1 GiB, at most {} times the image's largest compressed layer \
         (--max-compression-ratio): raise them if the image is legitimate",
        limits.max_layer_size, limits.max_compression_ratio
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::service::RATIO_FREE_BYTES;

    #[tokio::test]
    async fn work_within_the_time_limit_is_left_alone() {
        let cancel = AtomicBool::new(false);
        let timed = within_time_limit(
            async { 7 },
            Duration::from_secs(5),
            Duration::from_secs(5),
            &cancel,
            Duration::from_secs(1),
            || async { true },
        )
        .await;
        assert!(matches!(
            timed,
            Timed::Done {
                result: 7,
                timed_out: false
            }
        ));
        assert!(!cancel.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn work_past_the_time_limit_is_told_to_stop() {
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        // Like the converter: runs until the cancel flag is set, then fails.
        let work = async move {
            while !flag.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err::<(), _>("canceled")
        };
        let started = std::time::Instant::now();
        let timed = within_time_limit(
            work,
            Duration::from_millis(100),
            Duration::from_secs(5),
            &cancel,
            Duration::from_secs(1),
            || async { true },
        )
        .await;
        assert!(matches!(
            timed,
            Timed::Done {
                result: Err("canceled"),
                timed_out: true
            }
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn work_that_ignores_the_stop_is_abandoned_after_the_grace() {
        let cancel = AtomicBool::new(false);
        let ticks = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let timed = within_time_limit(
            std::future::pending::<()>(),
            Duration::from_millis(100),
            Duration::from_millis(100),
            &cancel,
            Duration::from_secs(1),
            || {
                ticks.fetch_add(1, Ordering::SeqCst);
                async { true }
            },
        )
        .await;
        assert!(matches!(timed, Timed::Abandoned));
        assert!(cancel.load(Ordering::SeqCst));
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(200)..Duration::from_secs(2)).contains(&took),
            "{took:?}"
        );
    }

    #[test]
    fn the_uncompressed_limit_is_the_smaller_of_size_and_ratio() {
        let limits = OperationLimits {
            timeout: Duration::from_secs(60),
            max_layer_size: 1 << 30,
            max_compression_ratio: 100,
        };
        let limits = OperationLimits {
            max_layer_size: 64 << 30,
            ..limits
        };
        // Up to a gigabyte whatever the ratio (tar padding, small layers).
        assert_eq!(limits.uncompressed_limit(0), RATIO_FREE_BYTES);
        assert_eq!(limits.uncompressed_limit(1 << 20), RATIO_FREE_BYTES);
        // Beyond, the ratio: a 100 MiB bomb layer decompresses to at most 10 GiB.
        assert_eq!(limits.uncompressed_limit(100 << 20), 10_000 << 20);
        // And never past the size limit.
        assert_eq!(limits.uncompressed_limit(1 << 30), 64 << 30);
        assert_eq!(limits.uncompressed_limit(u64::MAX), 64 << 30);
        let small = OperationLimits {
            max_layer_size: 1 << 20,
            ..limits
        };
        assert_eq!(small.uncompressed_limit(1 << 10), 1 << 20);
        let reason = time_limit_reason(Duration::from_secs(90));
        assert!(
            reason.contains("90 s") && reason.contains("--operation-timeout"),
            "{reason}"
        );
        let hint = index_unsupported_hint("team/app");
        assert!(
            hint.contains("--repository team/app --kind chunked"),
            "{hint}"
        );
        let hint = size_limits_hint(&limits);
        assert!(
            hint.contains("--max-layer-size") && hint.contains("--max-compression-ratio"),
            "{hint}"
        );
    }
}
