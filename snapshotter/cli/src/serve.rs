//! `streamsnap serve`: the conversion service for one registry.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use streamsnap_service::{
    ApiAuth, OperationLimits, PostgresStore, Secret, Server, ServiceConfig, StoreConfig,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The registry served (HOST[:PORT], no scheme; --plain-http for HTTP); repositories are
    /// named relative to it.
    #[arg(long, value_name = "HOST[:PORT]")]
    registry: String,
    /// Address of the HTTP API and webhook.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where staging files (and, without --store, the store state.redb) live; created with
    /// mode 0700. One `serve` per state dir.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Keep states and operations in this PostgreSQL database, shared by every replica of the
    /// service, instead of state.redb (one service on one machine). No password in the URL:
    /// the password comes from PGPASSWORD or --store-password-file.
    #[arg(
        long,
        env = "STREAMSNAP_STORE",
        value_name = "postgres://USER@HOST:PORT/DB"
    )]
    store: Option<String>,
    /// File holding the database password (with --store) [default: the PGPASSWORD variable].
    #[arg(long, value_name = "FILE", requires = "store")]
    store_password_file: Option<PathBuf>,
    /// A running operation whose replica has not renewed its lease (every second) for this
    /// many seconds is taken over: resumed by another replica, or Failed after 3 interruptions.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(3..=3600))]
    operation_lease: u64,
    /// File holding the API token that every /v1 call but the webhook and /v1/healthz needs.
    /// Required, unless --insecure-dev-loopback (a developer's machine) lets loopback callers
    /// in without one.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "insecure_dev_loopback"
    )]
    token_file: Option<PathBuf>,
    /// File holding the secret the registry sends as `Authorization: Bearer SECRET` with
    /// each notification (its endpoint's `headers`).
    #[arg(long, value_name = "FILE")]
    webhook_secret_file: PathBuf,
    /// Development only: API calls from loopback addresses need no token (then --token-file
    /// may be left out).
    #[arg(long)]
    insecure_dev_loopback: bool,
    /// Conversions run at once.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Stop a conversion that runs longer than this many seconds; it ends Failed, saying so.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    operation_timeout: u64,
    /// Refuse a layer whose tar stream (uncompressed) is larger than this many bytes (the
    /// default is 16 GiB).
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_layer_size: u64,
    /// Refuse a layer that decompresses to more than this many times the size of the image's
    /// largest compressed layer (a decompression bomb).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_compression_ratio: u64,
    /// Sign every artifact the service pushes with this private key (PKCS#8 PEM, ECDSA P-256,
    /// mode 0600; see `artifact-streaming create --sign-key`).
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    registry_args: RegistryArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some((scheme, rest)) = args.registry.split_once("://") {
        anyhow::bail!(
            "--registry {:?} has a scheme ({scheme}://): give HOST[:PORT] without one (here \
             {}); use --plain-http for a registry served over HTTP",
            args.registry,
            rest.trim_end_matches('/')
        );
    }
    let token = args
        .token_file
        .as_deref()
        .map(read_secret)
        .transpose()
        .context("reading --token-file")?;
    let webhook_secret =
        read_secret(&args.webhook_secret_file).context("reading --webhook-secret-file")?;
    if args.insecure_dev_loopback {
        tracing::warn!("--insecure-dev-loopback: API calls from loopback addresses need no token");
    }
    let store = match &args.store {
        None => StoreConfig::Embedded,
        Some(url) => {
            let password = match &args.store_password_file {
                Some(path) => Some(read_secret(path).context("reading --store-password-file")?),
                None => std::env::var(PASSWORD_ENV).ok().and_then(Secret::new),
            };
            StoreConfig::Postgres(Box::new(PostgresStore::from_url(url, password.as_ref())?))
        }
    };
    let client = args.registry_args.client_for_registry(&args.registry)?;
    let auth = ApiAuth {
        token,
        loopback_without_token: args.insecure_dev_loopback,
    };
    let mut config = ServiceConfig::new(
        args.registry.clone(),
        args.listen,
        args.state_dir.clone(),
        auth,
        webhook_secret,
    );
    config.concurrency = usize::from(args.concurrency);
    config.store = store;
    config.lease = Duration::from_secs(args.operation_lease);
    config.limits = OperationLimits {
        timeout: Duration::from_secs(args.operation_timeout),
        max_layer_size: args.max_layer_size,
        max_compression_ratio: args.max_compression_ratio,
    };
    config.sign = args
        .sign_key
        .as_deref()
        .map(crate::signing::load)
        .transpose()?;
    let state = match &config.store {
        StoreConfig::Postgres(pg) => pg.to_string(),
        StoreConfig::Embedded => args.state_dir.join("state.redb").display().to_string(),
    };
    let server = Server::start(config, client)
        .await
        .with_context(|| format!("starting the service with its state in {state}"))?;
    tracing::info!(registry = %args.registry, "listening on http://{}", server.local_addr());

    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    };
    server.run(shutdown).await?;
    Ok(())
}

/// The database password, as libpq reads it.
const PASSWORD_ENV: &str = "PGPASSWORD";

fn read_secret(path: &Path) -> anyhow::Result<Secret> {
    let secret = Secret::from_file(path)?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "{} can be read by other users: chmod 600 it",
            path.display()
        );
    }
    Ok(secret)
}
