//! `streamsnap-snapshotterd --address SOCKET --root DIR [--config FILE]`

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use streamsnap_cache::{CacheConfig, ChunkCache};
use streamsnap_holder::HolderClient;
use streamsnap_registry::{Client, ClientConfig, CredentialSource, CredentialStore};
use streamsnap_snapshotter::Snapshotter;
use streamsnap_snapshotter::config::{Config, RegistrySection};
use streamsnap_snapshotter::credentials::KubeletProviders;
use streamsnap_snapshotter::cri_proxy::{self, PullSecrets};
use streamsnap_snapshotter::http::Endpoints;
use streamsnap_snapshotter::metrics::Metrics;
use streamsnap_snapshotter::mounter::FuseMounter;
use streamsnap_snapshotter::remote::{BackgroundConfig, RemoteLayers};
use streamsnap_snapshotter::service::Service;
use streamsnap_snapshotter::startup::{RootLock, remount_remote_snapshots};

#[derive(Debug, Parser)]
#[command(
    name = "streamsnap-snapshotterd",
    version,
    about = "containerd remote snapshotter for streaming images"
)]
struct Args {
    /// Unix socket to serve the snapshots API on [default: the config's address, else
    /// /run/streamsnap/snapshotter.sock]
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// State directory: snapshots, chunk cache, metadata [default: the config's root, else
    /// /var/lib/streamsnap]
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// TOML config file (see docs/snapshotter.md); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus /metrics and /healthz (and /debug/profile with `[debug] profile`) on
    /// HOST:PORT [default: the config's metrics_address; off when unset].
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// The kubelet's CredentialProviderConfig (same flag as the kubelet's): run its credential
    /// provider plugins for the images they match [default: the config's
    /// registry.image_credential_provider_config].
    #[arg(long, value_name = "FILE")]
    image_credential_provider_config: Option<PathBuf>,
    /// Where the plugins are (same flag as the kubelet's) [default: the config's
    /// registry.image_credential_provider_bin_dir].
    #[arg(long, value_name = "DIR")]
    image_credential_provider_bin_dir: Option<PathBuf>,
    /// Log filter: a level (error, warn, info, debug, trace) or target=level pairs separated
    /// by commas, e.g. info,streamsnap_cache=debug.
    #[arg(
        long,
        value_name = "FILTER",
        env = "STREAMSNAP_LOG",
        default_value = "info"
    )]
    log_level: String,
}

/// Buffers this large (decoded chunks, up to 16 MiB) are mapped and unmapped on their own, so
/// the daemon's RSS follows what it holds. By default glibc raises this threshold as such
/// buffers are freed and then keeps up to twice as much free memory in each malloc arena.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

fn main() -> std::process::ExitCode {
    // SAFETY: mallopt only tunes malloc, and runs before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    };
    let args = Args::parse();
    init_logging(&args.log_level);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Once: as a log line like the others (journald, `kubectl logs`), or on plain
            // stderr when the log filter hides errors.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{error:#}");
            } else {
                eprintln!("error: {error:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(address) = args.address {
        config.address = address;
    }
    if let Some(root) = args.root {
        config.root = root;
    }
    if let Some(address) = args.metrics_address {
        config.metrics_address = Some(address);
    }
    if let Some(file) = args.image_credential_provider_config {
        config.registry.image_credential_provider_config = Some(file);
    }
    if let Some(dir) = args.image_credential_provider_bin_dir {
        config.registry.image_credential_provider_bin_dir = Some(dir);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("streamsnap")
        .build()?;
    let _lock = RootLock::acquire(&config.root)?;
    let metrics = Metrics::new()?;
    let pull_secrets = config
        .cri_proxy
        .address
        .as_ref()
        .map(|_| Arc::new(PullSecrets::default()));
    let remote = build_remote(
        &config,
        runtime.handle().clone(),
        metrics.clone(),
        pull_secrets.clone(),
    )?;
    let snapshotter = Arc::new(Snapshotter::open(&config.root, Some(remote.clone()))?);
    let restoring = std::time::Instant::now();
    let (restored, failed) = remount_remote_snapshots(&snapshotter, &metrics)?;
    let took = restoring.elapsed();
    metrics.mounts_restored.set(restored as i64);
    metrics.mounts_restore_failures.set(failed as i64);
    metrics.mounts_restore_duration.set(took.as_secs_f64());
    if restored + failed > 0 {
        tracing::info!(restored, failed, ?took, "remote snapshots mounted again");
    }
    let stopped = runtime.block_on(serve(&config, snapshotter, metrics, pull_secrets))?;
    match stopped {
        // A restart or an upgrade: the next daemon takes the connections from the holder.
        Stop::Handover if remote.holder().is_some() => {
            remote.handover_all(Duration::from_secs(config.fuse.handover_timeout_seconds));
            let marker = config
                .root
                .join(streamsnap_snapshotter::startup::HANDED_OVER);
            if let Err(error) = std::fs::write(&marker, b"") {
                tracing::warn!(%error, "cannot record the clean handover; the next daemon will ask the kernel to resend");
            }
        }
        // Stopping for good (SIGINT): nothing will take the connections back, so the holder
        // lets what is left go and exits.
        _ => {
            remote.unmount_all();
            if let Some(holder) = remote.holder() {
                match holder.stop() {
                    Ok(0) => tracing::info!("the FUSE holder exits"),
                    Ok(released) => tracing::warn!(
                        released,
                        "the FUSE holder still kept connections of layers that could not be unmounted; it closed them and exits"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "cannot ask the FUSE holder to exit; it exits on its own once idle"
                    ),
                }
            }
        }
    }
    drop(runtime);
    Ok(())
}

fn build_remote(
    config: &Config,
    handle: tokio::runtime::Handle,
    metrics: Metrics,
    pull_secrets: Option<Arc<PullSecrets>>,
) -> anyhow::Result<Arc<RemoteLayers>> {
    let trust = config.verify.policy()?;
    if trust.is_enforced() {
        tracing::info!(keys = ?trust, "[verify]: only artifacts and profiles signed by these keys are used");
    } else {
        tracing::warn!(
            "no [verify] policy: this node streams any artifact bound to its image, so it trusts \
             whoever can push referrers to the repositories it pulls from (docs/trust.md)"
        );
    }
    let registry = &config.registry;
    let credentials = load_credentials(registry)?;
    let mut plain_http = registry.plain_http.clone();
    let mut https = Vec::new();
    let mut ca_files = Vec::new();
    let mut mirrors = HashMap::new();
    for (host, settings) in &registry.hosts {
        match settings.plain_http {
            Some(true) => plain_http.push(host.clone()),
            Some(false) => https.push(host.clone()),
            None => {}
        }
        if let Some(file) = &settings.ca_file {
            ca_files.push((host.clone(), file.clone()));
        }
        if !settings.mirrors.is_empty() {
            mirrors.insert(host.clone(), settings.mirrors.clone());
        }
    }
    // Asked before the docker config, per repository: the pull secret of the image's own pull,
    // then the kubelet's plugins.
    let mut sources: Vec<Arc<dyn CredentialSource>> = Vec::new();
    if let Some(secrets) = pull_secrets {
        sources.push(secrets);
    }
    match (
        &registry.image_credential_provider_config,
        &registry.image_credential_provider_bin_dir,
    ) {
        (Some(file), Some(dir)) => {
            let providers = KubeletProviders::load(file, dir)?;
            tracing::info!(?providers, config = %file.display(), "running the kubelet's credential provider plugins for the images they match");
            sources.push(Arc::new(providers));
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "--image-credential-provider-config and --image-credential-provider-bin-dir go \
             together (as for the kubelet): give both or neither"
        ),
    }
    let registry_metrics = streamsnap_registry::Metrics::register(&metrics.registry)?;
    let cache_metrics = streamsnap_cache::Metrics::register(&metrics.registry)?;
    let fs_metrics = streamsnap_fs::Metrics::register(&metrics.registry)?;
    let client = Client::new(ClientConfig {
        credentials,
        sources,
        metrics: Some(Arc::new(registry_metrics)),
        plain_http,
        https,
        ca_files,
        request_timeout: Duration::from_secs(config.fetch.timeout_seconds),
        retries: config.fetch.retries,
        ..ClientConfig::default()
    })?;
    let capacity = config.cache.max_size_bytes;
    let cache = ChunkCache::open(CacheConfig {
        memory_bytes: config.cache.memory_bytes,
        max_request_bytes: config.cache.max_request_bytes,
        fetch_deadline: Duration::from_secs(config.fetch.deadline_seconds),
        verify_attempts: config.fetch.verify_attempts,
        metrics: Some(Arc::new(cache_metrics)),
        ..CacheConfig::new(config.root.join("cache"), capacity)
    })
    .context("opening the chunk cache")?;
    let metadata = streamsnap_fs::MetadataCache::new(config.fuse.metadata(), fs_metrics.clone());
    metadata.start_sweeper(&handle);
    let fs_metrics = Arc::new(fs_metrics);
    let passthrough = match config.fuse.passthrough(&config.root) {
        Some(passthrough) => {
            let store = streamsnap_fs::PassthroughStore::open(passthrough, Arc::clone(&fs_metrics))
                .context("opening the passthrough directory ([fuse] passthrough_max_bytes)")?;
            Some(store)
        }
        None => None,
    };
    let mounter = FuseMounter::new(
        handle,
        streamsnap_fs::MountOptions {
            threads: config.fuse.threads,
            ttl: Duration::from_secs(config.fuse.attr_timeout_seconds),
            readahead_bytes: config.fuse.readahead_bytes,
            metrics: Some(fs_metrics),
            kernel_features: config.fuse.kernel_features(),
            passthrough,
            ..Default::default()
        },
    );
    let background = BackgroundConfig {
        enabled: config.background_fetch.enabled,
        batch_bytes: config.background_fetch.batch_bytes,
        max_layer_bytes: (capacity as f64 * config.background_fetch.max_cache_share) as u64,
    };
    let mut remote = RemoteLayers::new(
        client,
        Arc::new(cache),
        Arc::new(mounter),
        mirrors,
        background,
        metrics.clone(),
    )
    .with_readahead(config.fetch.readahead_bytes)
    .with_readahead_after_miss(config.fetch.readahead_after_miss_bytes)
    .with_mirror_max_skip(config.fetch.mirror_max_skip_bytes)
    .with_prefetch(
        config.fetch.prefetch_profile,
        config.fetch.prefetch_max_bytes,
        config.fetch.prefetch_in_flight_bytes,
    )
    .with_metadata(metadata)
    .with_trust(trust)
    .with_kernel_features(config.fuse.kernel_features())
    .with_profile_wait(Duration::from_secs(config.fetch.profile_wait_seconds))
    .with_merged_mounts(
        config.fuse.merge_layers,
        config
            .fuse
            .passthrough(&config.root)
            .map(|passthrough| passthrough.min_file_bytes),
    );
    // What the kernel offers is known at the first mount, which logs what is really used.
    tracing::info!(
        "fuse kernel features: {}",
        config.fuse.kernel_features().describe(None)
    );
    if config.fuse.holder {
        let socket = config
            .fuse
            .holder_socket
            .clone()
            .unwrap_or_else(|| config.root.join("fuse-holder.sock"));
        let idle_timeout = (config.fuse.holder_idle_timeout_seconds > 0)
            .then(|| Duration::from_secs(config.fuse.holder_idle_timeout_seconds));
        match connect_holder(&socket, &config.root, idle_timeout) {
            Ok(holder) => {
                metrics.fuse_holder.set(1);
                remote = remote.with_holder(holder);
            }
            Err(error) => tracing::warn!(
                "{error:#}; layer mounts will not survive a restart of the daemon (containers reading them see errors)"
            ),
        }
    }
    Ok(Arc::new(remote))
}

/// The docker config's credentials, with each host's `credentials_file` entry over them. A file
/// the config names must exist and hold an entry for its host.
fn load_credentials(registry: &RegistrySection) -> anyhow::Result<CredentialStore> {
    let mut credentials = CredentialStore::from_docker_config(registry.docker_config.as_deref())
        .with_context(|| match &registry.docker_config {
            Some(_) => "reading registry credentials (registry.docker_config of the config)",
            None => "reading registry credentials (the default docker config)",
        })?;
    for (host, settings) in &registry.hosts {
        let Some(file) = &settings.credentials_file else {
            continue;
        };
        let store = CredentialStore::from_docker_config_file(file)
            .with_context(|| format!("registry.hosts.\"{host}\".credentials_file of the config"))?;
        let found = store.get(host).with_context(|| {
            format!(
                "registry.hosts.\"{host}\".credentials_file {} has no \"auths\" entry for \
                 {host}: add one ({{\"auths\": {{\"{host}\": {{\"auth\": \"<base64 of \
                 user:password>\"}}}}}}) or name the file that has it",
                file.display()
            )
        })?;
        credentials.insert(host, found.clone());
    }
    Ok(credentials)
}

/// Connects to the FUSE holder on `socket`, starting one (detached, so it outlives this process)
/// when none answers.
fn connect_holder(
    socket: &std::path::Path,
    root: &std::path::Path,
    idle_timeout: Option<Duration>,
) -> anyhow::Result<HolderClient> {
    if let Ok(holder) = HolderClient::connect(socket) {
        tracing::info!(socket = %socket.display(), "using the running FUSE holder");
        return Ok(holder);
    }
    let binary = std::env::current_exe()
        .context("finding the daemon's own path")?
        .with_file_name("streamsnap-fuse-holder");
    anyhow::ensure!(
        binary.exists(),
        "the FUSE holder {} is missing (install it next to the daemon)",
        binary.display()
    );
    let log = root.join("fuse-holder.log");
    let pid = streamsnap_holder::spawn_holder(&binary, socket, &log, idle_timeout)
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match HolderClient::connect(socket) {
            Ok(holder) => {
                tracing::info!(pid, socket = %socket.display(), "started the FUSE holder");
                return Ok(holder);
            }
            Err(error) if std::time::Instant::now() > deadline => {
                return Err(anyhow::anyhow!(error).context(format!(
                    "the FUSE holder {pid} does not answer on {}",
                    socket.display()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

async fn serve(
    config: &Config,
    snapshotter: Arc<Snapshotter>,
    metrics: Metrics,
    pull_secrets: Option<Arc<PullSecrets>>,
) -> anyhow::Result<Stop> {
    let address = &config.address;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The root lock proves no other daemon of this root runs; a socket file left by a crash is
    // removed. A socket of another daemon (another root) is refused, not stolen.
    if address.exists() {
        if tokio::net::UnixStream::connect(address).await.is_ok() {
            anyhow::bail!(
                "{} is in use by another process; pass another --address",
                address.display()
            );
        }
        std::fs::remove_file(address)
            .with_context(|| format!("removing stale socket {}", address.display()))?;
    }
    let serving = Arc::new(AtomicBool::new(false));
    let _metrics_server = match config.metrics_address {
        Some(metrics_address) => {
            let endpoints = Arc::new(Endpoints {
                metrics: metrics.clone(),
                snapshotter: snapshotter.clone(),
                serving: serving.clone(),
                profile: config.debug.profile,
            });
            Some(
                streamsnap_snapshotter::http::serve(metrics_address, endpoints)
                    .await
                    .with_context(|| format!("binding the metrics address {metrics_address}"))?,
            )
        }
        None => None,
    };
    let listener = bind_api_socket(address)?;
    tracing::info!(address = %address.display(), root = %config.root.display(), "serving the containerd snapshots API");
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let _proxy = match (&config.cri_proxy.address, pull_secrets) {
        (Some(proxy_address), Some(secrets)) => {
            let (proxy_address, containerd) = (
                proxy_address.clone(),
                config.cri_proxy.containerd_address.clone(),
            );
            let shutdown = async move {
                let _ = proxy_stopped.await;
            };
            Some(tokio::spawn(async move {
                if let Err(error) =
                    cri_proxy::serve(&proxy_address, containerd, secrets, shutdown).await
                {
                    tracing::error!(error = %format!("{error:#}"), "the CRI image proxy stopped");
                }
            }))
        }
        _ => None,
    };
    let _stop_proxy = stop_proxy;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_service(Service::new(snapshotter, metrics).into_server())
        .serve_with_incoming(incoming);
    serving.store(true, Ordering::Relaxed);
    // containerd keeps its connection open, so a graceful shutdown would wait forever: race the
    // server with the signal and stop serving when it comes.
    tokio::select! {
        result = server => result.context("serving gRPC")?,
        stop = shutdown_signal() => {
            tracing::info!(?stop, "shutting down");
            let _ = std::fs::remove_file(address);
            return Ok(stop);
        }
    }
    let _ = std::fs::remove_file(address);
    Ok(Stop::Unmount)
}

/// The mode of the snapshots API socket: the daemon's user and group (root and root's group on a
/// node), like containerd's own socket; the umask plays no part.
const API_SOCKET_MODE: u32 = 0o660;

/// Binds the snapshots API socket at `address` with [`API_SOCKET_MODE`]: bound under a
/// temporary name beside it, given its mode, then renamed into place, so no client ever finds
/// it with the umask's mode.
fn bind_api_socket(address: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut name = address.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let temporary = address.with_file_name(name);
    let _ = std::fs::remove_file(&temporary);
    let listener = tokio::net::UnixListener::bind(&temporary)
        .with_context(|| format!("binding {}", temporary.display()))?;
    let placed =
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(API_SOCKET_MODE))
            .with_context(|| format!("setting the mode of {}", temporary.display()))
            .and_then(|()| {
                std::fs::rename(&temporary, address).with_context(|| {
                    format!("moving the socket into place at {}", address.display())
                })
            });
    if let Err(error) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    Ok(listener)
}

/// How the daemon was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM (a restart, an upgrade, a rollout): hand the mounts over to the next daemon.
    Handover,
    /// SIGINT (an operator at a terminal, uninstall): unmount everything.
    Unmount,
}

async fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => Stop::Handover,
        _ = int.recv() => Stop::Unmount,
    }
}

fn init_logging(filter: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let parsed = streamsnap_log::parse_filter(filter);
    let invalid = parsed.is_none();
    let mut targets = parsed.unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    // A bare level ("debug") is about streamsnap: keep the HTTP/2 and gRPC plumbing at info.
    if !filter.contains('=') {
        for noisy in ["h2", "hyper", "hyper_util", "tonic", "tower"] {
            targets = targets.with_target(noisy, LevelFilter::INFO);
        }
    }
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(streamsnap_log::colour_on_stderr()),
        )
        .with(targets)
        .init();
    if invalid {
        tracing::warn!(
            "--log-level {filter:?} is not a log filter (write a level such as info or debug, \
             or target=level pairs separated by commas): logging at info"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_api_socket_has_its_mode_whatever_the_umask() {
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let address = dir.path().join("s.sock");
        let listener = bind_api_socket(&address).unwrap();
        let meta = std::fs::symlink_metadata(&address).unwrap();
        assert!(meta.file_type().is_socket());
        // The umask alone would give 0755 (022) or 0775 (002): the mode is set, not inherited.
        assert_eq!(meta.permissions().mode() & 0o7777, API_SOCKET_MODE);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "no temporary name is left behind");
        let (_client, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&address), listener.accept());
        accepted.unwrap();
    }

    #[test]
    fn a_credentials_file_that_is_missing_or_lacks_the_host_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, r#"{"auths": {}}"#).unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"auths": {"reg.example:5000": {"auth": "dTpw"}}}"#,
        )
        .unwrap();
        let config = |file: &std::path::Path| {
            Config::parse(&format!(
                "[registry]\ndocker_config = {:?}\n[registry.hosts.\"reg.example:5000\"]\n\
                 credentials_file = {:?}\n",
                empty.display().to_string(),
                file.display().to_string()
            ))
            .unwrap()
        };

        let error = format!(
            "{:#}",
            load_credentials(&config(&missing).registry).unwrap_err()
        );
        assert!(
            error.contains("credentials_file")
                && error.contains(&*missing.to_string_lossy())
                && error.contains("not found"),
            "{error}"
        );
        assert!(!error.contains("auths"), "{error}");

        let error = format!(
            "{:#}",
            load_credentials(&config(&empty).registry).unwrap_err()
        );
        assert!(
            error.contains("no \"auths\" entry for reg.example:5000"),
            "{error}"
        );

        let store = load_credentials(&config(&good).registry).unwrap();
        assert_eq!(store.get("reg.example:5000").unwrap().password(), "p");
    }
}
