//! The worker pool: `concurrency` tasks take operation IDs from the queue and run them with
//! the converter. The queue in memory only mirrors the store, where every NotStarted operation
//! is kept: a restart rebuilds it in creation order.
//!
//! Ends of an operation:
//! - the conversion pushed an artifact: Succeeded (or, when a user canceled it just too late,
//!   the artifact is removed again and the operation is Canceled);
//! - the converter stopped on a user's cancel: Canceled, nothing pushed but unreferenced blobs;
//! - it stopped because the service shuts down: back to NotStarted, resumed after the restart;
//! - it ran past the time limit: stopped, Failed with the limit and the flag that sets it;
//! - a layer over the size limits: Failed, with the limits and the flags that set them;
//! - any other error: Failed, with the error and its causes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use streamsnap_convert::{ConvertOptions, CreateOptions, Created};
use streamsnap_format::Digest;
use streamsnap_registry::{Client, Reference, Repository};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::{OperationState, Progress};
use crate::error::chain;
use crate::service::{Live, OperationLimits, Service, log_error};

/// How often a running operation's progress is written to the store.
const PERSIST_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a conversion told to stop at its time limit gets to stop (it checks between reads
/// and requests) before the worker drops it and takes the next operation.
const STOP_GRACE: Duration = Duration::from_secs(30);

pub(crate) fn spawn(
    service: Arc<Service>,
    queue: mpsc::UnboundedReceiver<String>,
) -> Vec<JoinHandle<()>> {
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    (0..service.config.concurrency.max(1))
        .map(|_| tokio::spawn(work(service.clone(), queue.clone())))
        .collect()
}

async fn work(
    service: Arc<Service>,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
) {
    let mut stopping = service.stopping.subscribe();
    loop {
        let next = {
            let mut queue = queue.lock().await;
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => None,
                id = queue.recv() => id,
            }
        };
        let Some(id) = next else { return };
        // Its own task, so that a panic (a bug) fails the operation instead of the worker.
        let task = tokio::spawn({
            let service = service.clone();
            let id = id.clone();
            async move { run(&service, &id).await }
        });
        if let Err(error) = task.await {
            tracing::error!(id, %error, "the conversion task panicked");
            service.live.lock().expect("live map lock").remove(&id);
            let failed = service
                .store(move |s| {
                    s.update(&id, |op| {
                        op.state = OperationState::Failed;
                        op.error = Some(
                            "internal error: the conversion panicked (a bug in streamsnap;                              see the service log)"
                                .into(),
                        );
                        true
                    })
                })
                .await;
            if let Err(e) = failed {
                log_error("cannot record a failed operation", &e);
            }
            service.finished.send_modify(|n| *n += 1);
        }
    }
}

enum Outcome {
    Succeeded {
        artifact: Digest,
        subject: Digest,
    },
    Failed(String),
    Canceled(String),
    /// Stopped by the shutdown: queue it again at the next start.
    Requeue,
}

async fn run(service: &Arc<Service>, id: &str) {
    // NotStarted -> Running, only by this worker; anything else (canceled meanwhile, or
    // already finished) is skipped.
    let owned = id.to_owned();
    let started = service
        .store(move |s| {
            let mut mine = false;
            let op = s.update(&owned, |op| {
                if op.state != OperationState::NotStarted {
                    return false;
                }
                op.state = OperationState::Running;
                op.error = None;
                op.progress = Progress::default();
                mine = true;
                true
            })?;
            Ok(op.filter(|_| mine))
        })
        .await;
    let op = match started {
        Ok(Some(op)) => op,
        Ok(None) => return,
        Err(e) => return log_error("cannot start an operation", &e),
    };
    let live = Arc::new(Live::default());
    service
        .live
        .lock()
        .expect("live map lock")
        .insert(id.to_owned(), live.clone());
    // A cancel or a shutdown that came between the start and the registration above.
    let owned = id.to_owned();
    if let Ok(Some(now)) = service.store(move |s| s.operation(&owned)).await
        && now.cancel_requested
    {
        live.cancel(true);
    }
    if service.is_stopping() {
        live.cancel(false);
    }

    let span =
        tracing::info_span!("operation", id, image = %op.image(), digest = %op.manifest_digest);
    tracing::info!(parent: &span, "conversion started");
    let repo = Repository::new(service.config.registry.clone(), op.repository.clone());
    let reference = Reference {
        repository: repo.clone(),
        tag: None,
        digest: Some(op.manifest_digest),
    };
    let options = CreateOptions {
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
    let timed = {
        use tracing::Instrument;
        within_time_limit(
            create.instrument(span.clone()),
            limits.timeout,
            STOP_GRACE,
            &live.progress.cancel,
            || persist_progress(service, id, &live),
        )
        .await
    };
    service.live.lock().expect("live map lock").remove(id);

    let by_user = live.user_cancel.load(Ordering::SeqCst);
    let (result, timed_out) = match timed {
        Timed::Done { result, timed_out } => (Some(result), timed_out),
        Timed::Abandoned => (None, true),
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
            Err(e) => Outcome::Failed(chain(&e)),
        },
    };
    match &outcome {
        Outcome::Succeeded { artifact, .. } => {
            tracing::info!(parent: &span, %artifact, "conversion succeeded")
        }
        Outcome::Failed(error) => tracing::warn!(parent: &span, %error, "conversion failed"),
        Outcome::Canceled(_) => tracing::info!(parent: &span, "conversion canceled"),
        Outcome::Requeue => {
            tracing::info!(parent: &span, "conversion stopped by the shutdown; resumed at the next start")
        }
    }
    let done = live.progress.done.load(Ordering::Relaxed);
    let total = live.progress.total.load(Ordering::Relaxed);
    let owned = id.to_owned();
    let saved = service
        .store(move |s| {
            s.update(&owned, |op| {
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
                op.cancel_requested = false;
                true
            })
        })
        .await;
    if let Err(e) = saved {
        log_error("cannot record the end of an operation", &e);
    }
    service.finished.send_modify(|n| *n += 1);
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
}

/// Runs `work`, calling `tick` every [`PERSIST_PROGRESS_EVERY`]. At `timeout` it sets `cancel`
/// (the converter stops at its next read or request); if `work` still runs `grace` later, it is
/// dropped.
async fn within_time_limit<T, Tick: Future<Output = ()>>(
    work: impl Future<Output = T>,
    timeout: Duration,
    grace: Duration,
    cancel: &AtomicBool,
    mut tick: impl FnMut() -> Tick,
) -> Timed<T> {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval(PERSIST_PROGRESS_EVERY);
    ticks.tick().await;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut timed_out = false;
    loop {
        tokio::select! {
            result = &mut work => return Timed::Done { result, timed_out },
            _ = ticks.tick() => tick().await,
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

fn time_limit_reason(timeout: Duration) -> String {
    format!(
        "stopped at the time limit of {} s (streamsnap serve --operation-timeout): no artifact \
         was pushed; raise the limit for an image this large, or check the image for a layer \
         that decompresses to far more than its size",
        timeout.as_secs()
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

async fn persist_progress(service: &Service, id: &str, live: &Live) {
    let progress = Progress {
        done: live.progress.done.load(Ordering::Relaxed),
        total: live.progress.total.load(Ordering::Relaxed),
    };
    let owned = id.to_owned();
    let saved = service
        .store(move |s| {
            s.update(&owned, |op| {
                let changed = op.state == OperationState::Running && op.progress != progress;
                if changed {
                    op.progress = progress;
                }
                changed
            })
        })
        .await;
    if let Err(e) = saved {
        log_error("cannot record progress", &e);
    }
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
            || async {},
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
            || async {},
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
            || {
                ticks.fetch_add(1, Ordering::SeqCst);
                async {}
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
        let hint = size_limits_hint(&limits);
        assert!(
            hint.contains("--max-layer-size") && hint.contains("--max-compression-ratio"),
            "{hint}"
        );
    }
}
