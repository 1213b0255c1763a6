//! The HTTP/1.1 server (hyper), start-up and graceful shutdown.
//!
//! Start: open the store (applying migrations), take over what a previous run left (see
//! [`crate::store::Store::reap`]: with the embedded store every Running operation, with a
//! shared one those whose lease expired), clear the staging dir, bind, start the workers (they
//! claim queued operations from the store).
//! Shutdown: stop accepting connections and webhooks, tell running conversions to stop (they
//! go back to NotStarted, where another replica or the next start resumes them; nothing
//! half-pushed is left referenced), wait for them, then for open connections, each up to a
//! timeout.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use streamsnap_registry::Client;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::service::{Service, ServiceConfig};
use crate::store::{Reap, Store};
use crate::{console, routes};
use crate::{ids, worker};

/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish at shutdown.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(5);

/// A started service: listening, workers (and the event ID pruner) running. [`Server::run`]
/// serves until shutdown.
#[derive(Debug)]
pub struct Server {
    service: Arc<Service>,
    listener: TcpListener,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Opens the state, recovers, binds `config.listen` and starts the workers.
    pub async fn start(config: ServiceConfig, client: Client) -> Result<Self> {
        if config.auth.token.is_none() && !config.auth.loopback_without_token {
            return Err(Error::Config(
                "no API token: pass --token-file (or --insecure-dev-loopback for a local test)"
                    .into(),
            ));
        }
        if streamsnap_registry::Reference::parse(&format!("{}/probe", config.registry))
            .map_or(true, |r| r.repository.registry != config.registry)
        {
            return Err(Error::Config(format!(
                "--registry {:?} is not a registry host[:port]",
                config.registry
            )));
        }
        let state_dir = config.state_dir.clone();
        create_private_dir(&state_dir)?;
        let work_dir = state_dir.join("work");
        // Staging files of conversions a previous run did not finish.
        match std::fs::remove_dir_all(&work_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io {
                    what: "clearing the staging dir",
                    path: work_dir,
                    source: e,
                });
            }
            _ => {}
        }
        create_private_dir(&work_dir)?;
        let limits = config.limits;
        if limits.timeout.is_zero()
            || limits.max_layer_size == 0
            || limits.max_compression_ratio == 0
        {
            return Err(Error::Config(format!(
                "operation limits must be above zero (time limit {:?}, max layer size {}, \
                 max compression ratio {})",
                limits.timeout, limits.max_layer_size, limits.max_compression_ratio
            )));
        }
        if config.lease < Duration::from_secs(1) || config.poll_interval.is_zero() {
            return Err(Error::Config(format!(
                "the operation lease must be at least 1 s (it is {:?}) and the poll interval \
                 above zero",
                config.lease
            )));
        }
        if config.event_prune_interval.is_zero() {
            return Err(Error::Config(
                "the event ID prune interval must be above zero".into(),
            ));
        }
        let wake = Arc::new(Notify::new());
        let store = Store::open(&config.store, &state_dir, wake.clone()).await?;
        let store_name = Store::describe(&config.store, &state_dir);
        // The embedded store's file is locked by this process: whatever is Running was left
        // by a service that died. A shared store's Running operations may be other replicas'
        // work: only expired leases are taken over.
        let (scope, why) = if store.is_shared() {
            (Reap::Expired, "its replica stopped renewing its lease")
        } else {
            (Reap::AllRunning, "by the last stop")
        };
        let recovered = store.reap(scope, config.max_interruptions).await?;
        worker::log_recovered(&recovered, why);
        let (event_ttl_ms, max_event_ids) = (millis(config.event_ttl), config.max_event_ids);
        store.prune_events(event_ttl_ms, max_event_ids).await?;

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?;
        let service = Arc::new(Service {
            config,
            client,
            store,
            worker_id: worker_id(),
            live: Mutex::new(HashMap::new()),
            wake,
            stopping: watch::Sender::new(false),
            finished: watch::Sender::new(0),
            work_dir,
            metrics: crate::metrics::Metrics::new(),
        });
        let mut workers = worker::spawn(service.clone());
        workers.push(tokio::spawn(prune_events(service.clone())));
        tracing::info!(
            registry = %service.config.registry,
            store = %store_name,
            worker = %service.worker_id,
            concurrency = service.config.concurrency,
            "service started"
        );
        Ok(Self {
            service,
            listener,
            workers,
        })
    }

    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.service.config.listen)
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Self {
            service,
            listener,
            workers,
        } = self;
        let graceful = GracefulShutdown::new();
        let console = Arc::new(console::Console::new(&service));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (service, console) = (service.clone(), console.clone());
            let handler = hyper::service::service_fn(move |request| {
                let (service, console) = (service.clone(), console.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(if console::owns(request.uri().path()) {
                        console::handle(&service, &console, peer, request).await
                    } else {
                        routes::handle(&service, peer, request).await
                    })
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), handler);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }
        drop(listener);
        tracing::info!("shutting down: no new connections; stopping running conversions");
        service.stopping.send_replace(true);
        for live in service.live.lock().expect("live map lock").values() {
            live.cancel(false);
        }
        let timeout = service.config.shutdown_timeout;
        let all = futures_join(workers);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(
                ?timeout,
                "conversions did not stop in time; they are resumed at the next start"
            );
        }
        if tokio::time::timeout(CONNECTIONS_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("closing connections that did not finish");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Forgets old registry event IDs every `event_prune_interval` until the service stops, so the
/// deduplication table stays bounded however long the service runs.
async fn prune_events(service: Arc<Service>) {
    let mut stopping = service.stopping.subscribe();
    let config = &service.config;
    let (ttl_ms, max_ids) = (millis(config.event_ttl), config.max_event_ids);
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            () = tokio::time::sleep(config.event_prune_interval) => {}
        }
        match service.store.prune_events(ttl_ms, max_ids).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "forgot old registry event IDs"),
            Err(e) => crate::service::log_error("cannot forget old registry event IDs", &e),
        }
    }
}

/// This process as a worker: `HOSTNAME-PID-RANDOM` (a pod's name on Kubernetes), unique even
/// when a replica restarts with the same host name and PID.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "streamsnap".to_owned());
    format!("{host}-{}-{}", std::process::id(), &ids::new_id()[..6])
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

fn create_private_dir(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::Io {
            what: "creating the directory",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use streamsnap_registry::ClientConfig;

    use super::*;
    use crate::api::{OperationOptions, Trigger};
    use crate::auth::{ApiAuth, Secret};
    use crate::store::{Created, NewOperation};

    #[tokio::test]
    async fn old_event_ids_are_forgotten_while_the_service_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServiceConfig::new(
            "127.0.0.1:1".into(),
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("state"),
            ApiAuth {
                token: Secret::new("token"),
                loopback_without_token: false,
            },
            Secret::new("secret").unwrap(),
        );
        config.event_ttl = Duration::from_millis(200);
        config.event_prune_interval = Duration::from_millis(50);
        let server = Server::start(config, Client::new(ClientConfig::default()).unwrap())
            .await
            .unwrap();
        let service = server.service.clone();
        // What a push notification records (there is no registry to convert from: a worker
        // takes the operation and it fails).
        let created = service
            .store
            .create_operation(NewOperation {
                repository: "a/b".into(),
                reference: "v1".into(),
                manifest_digest: streamsnap_format::Digest::sha256(b"m"),
                trigger: Trigger::Push,
                options: OperationOptions::default(),
                kind: Default::default(),
                event_id: Some("event-1".into()),
            })
            .await
            .unwrap();
        assert!(matches!(created, Created::New(_)));
        assert_eq!(service.store.event_ids().await.unwrap(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while service.store.event_ids().await.unwrap() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the event ID is still remembered past its time to live"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.run(async {}).await.unwrap();
    }

    #[tokio::test]
    async fn the_api_sets_a_repository_kind_alone_or_with_the_streaming_state() {
        use crate::api::{ArtifactKind, Streaming, UpdateRepository};
        use crate::client::ServiceClient;
        use crate::error::ClientError;

        let dir = tempfile::tempdir().unwrap();
        let config = ServiceConfig::new(
            "127.0.0.1:1".into(),
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("state"),
            ApiAuth {
                token: Secret::new("token"),
                loopback_without_token: false,
            },
            Secret::new("secret").unwrap(),
        );
        let server = Server::start(config, Client::new(ClientConfig::default()).unwrap())
            .await
            .unwrap();
        let addr = server.listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let token = Secret::new("token").unwrap();
        let api = ServiceClient::new(&format!("http://{addr}"), Some(&token)).unwrap();

        // Never set: chunked.
        let repo = api.repository("team/app").await.unwrap();
        assert_eq!(repo.kind, ArtifactKind::Chunked);
        // The kind alone: the streaming state stays.
        let kind_only = UpdateRepository {
            kind: Some(ArtifactKind::Index),
            ..Default::default()
        };
        let repo = api.update_repository("team/app", &kind_only).await.unwrap();
        assert_eq!(
            (repo.streaming, repo.kind),
            (Streaming::Inactive, ArtifactKind::Index)
        );
        // What an older client sends (`{"streaming": ...}`): the kind stays.
        let streaming_only = UpdateRepository {
            streaming: Some(Streaming::Active),
            ..Default::default()
        };
        let repo = api
            .update_repository("team/app", &streaming_only)
            .await
            .unwrap();
        assert_eq!(
            (repo.streaming, repo.kind),
            (Streaming::Active, ArtifactKind::Index)
        );
        // Both at once, and the list shows it.
        let both = UpdateRepository {
            streaming: Some(Streaming::Inactive),
            kind: Some(ArtifactKind::Chunked),
        };
        api.update_repository("team/app", &both).await.unwrap();
        let listed = api.repositories().await.unwrap();
        assert_eq!(
            (listed[0].streaming, listed[0].kind),
            (Streaming::Inactive, ArtifactKind::Chunked)
        );
        // Nothing to change: refused, and says what to send.
        match api
            .update_repository("team/app", &UpdateRepository::default())
            .await
        {
            Err(ClientError::Status {
                status, message, ..
            }) => {
                assert_eq!(status, http::StatusCode::BAD_REQUEST);
                assert!(message.contains("kind (chunked or index)"), "{message}");
            }
            other => panic!("an empty update answered {other:?}"),
        }
        let _ = stop.send(());
        running.await.unwrap().unwrap();
    }
}
