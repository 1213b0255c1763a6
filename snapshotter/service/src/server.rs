//! The HTTP/1.1 server (hyper), start-up and graceful shutdown.
//!
//! Start: open the store, recover what a previous run left (see [`crate::store::Store::recover`]),
//! clear the staging dir, bind, start the workers, queue every NotStarted operation.
//! Shutdown: stop accepting connections and webhooks, tell running conversions to stop (they
//! go back to NotStarted and are resumed at the next start; nothing half-pushed is left
//! referenced), wait for them, then for open connections, each up to a timeout.

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
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::routes;
use crate::service::{Service, ServiceConfig};
use crate::store::Store;
use crate::worker;

/// Registry event IDs are remembered this long (the registry redelivers within minutes).
const EVENT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish at shutdown.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(5);

/// A started service: listening, workers running. [`Server::run`] serves until shutdown.
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
        let db_path = state_dir.join("state.redb");
        let max_interruptions = config.max_interruptions;
        let (store, recovered) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&db_path)?;
            let recovered = store.recover(max_interruptions, EVENT_TTL_MS)?;
            Ok::<_, Error>((store, recovered))
        })
        .await
        .expect("store task panicked")?;
        for id in &recovered.resumed {
            tracing::warn!(id, "operation interrupted by the last stop; resuming it");
        }
        for id in &recovered.failed {
            tracing::warn!(id, "operation interrupted too many times; marked Failed");
        }
        for id in &recovered.canceled {
            tracing::info!(id, "operation canceled during the last stop");
        }

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?;
        let (queue, queue_rx) = mpsc::unbounded_channel();
        let service = Arc::new(Service {
            config,
            client,
            store: Arc::new(store),
            live: Mutex::new(HashMap::new()),
            queue,
            stopping: watch::Sender::new(false),
            finished: watch::Sender::new(0),
            work_dir,
        });
        let workers = worker::spawn(service.clone(), queue_rx);
        for id in &recovered.queue {
            service.enqueue(id);
        }
        tracing::info!(
            registry = %service.config.registry,
            queued = recovered.queue.len(),
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
            let service = service.clone();
            let handler = hyper::service::service_fn(move |request| {
                let service = service.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(routes::handle(&service, peer, request).await)
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
