//! The worker pool: `concurrency` tasks take operation IDs from the queue and run them with
//! the converter. The queue in memory only mirrors the store, where every NotStarted operation
//! is kept: a restart rebuilds it in creation order.
//!
//! Ends of an operation:
//! - the conversion pushed an artifact: Succeeded (or, when a user canceled it just too late,
//!   the artifact is removed again and the operation is Canceled);
//! - the converter stopped on a user's cancel: Canceled, nothing pushed but unreferenced blobs;
//! - it stopped because the service shuts down: back to NotStarted, resumed after the restart;
//! - any other error: Failed, with the error and its causes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use streamsnap_convert::{ConvertOptions, CreateOptions};
use streamsnap_format::Digest;
use streamsnap_registry::{Reference, Repository};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::{OperationState, Progress};
use crate::error::chain;
use crate::service::{Live, Service, log_error};

/// How often a running operation's progress is written to the store.
const PERSIST_PROGRESS_EVERY: Duration = Duration::from_secs(1);

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
    let create =
        streamsnap_convert::create(&service.client, &reference, &options, live.progress.clone());
    let result = {
        use tracing::Instrument;
        let create = create.instrument(span.clone());
        tokio::pin!(create);
        let mut tick = tokio::time::interval(PERSIST_PROGRESS_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                result = &mut create => break result,
                _ = tick.tick() => persist_progress(service, id, &live).await,
            }
        }
    };
    service.live.lock().expect("live map lock").remove(id);

    let by_user = live.user_cancel.load(Ordering::SeqCst);
    let by_shutdown = !by_user && live.progress.cancel.load(Ordering::SeqCst);
    let outcome = match result {
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
        Err(streamsnap_convert::Error::Canceled) => Outcome::Canceled("canceled".into()),
        Err(e) => Outcome::Failed(chain(&e)),
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
