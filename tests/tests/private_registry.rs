//! Private registries on real clusters, end to end: a TLS registry (a test CA no system trusts)
//! that wants credentials, a node with NO docker config, and each way the daemon can be given
//! credentials instead, against the real registry, containerd 1.6 (CRI), runc and FUSE:
//!
//! - a kubelet credential provider plugin (a `sh` script speaking the v1 JSON protocol);
//! - the CRI proxy: the pull secret of a `PullImage` streams that repository, and is never lent
//!   to another one;
//! - a docker credential helper (`credHelpers`), with the CA from `SSL_CERT_FILE` only;
//! - 10-second bearer tokens: a container reading new files 30 s after it started reads them
//!   through refreshed tokens.
//!
//! Lazy means the registry's own access log shows range reads (206) and no GET of the image's
//! layers. Each scenario ends by looking for the password and the tokens in every log, the
//! metrics, `/debug/profile`, the daemon's root and the command lines of the daemon and its
//! holder ([`find_secrets`]). A node without credentials is the control: there containerd
//! downloads the layers, so the lazy checks can fail.
//!
//! Converting uses the CLI over verified TLS (`--https`, the CA through `SSL_CERT_FILE`).
//! containerd gets the CA from its hosts dir and the credentials in `PullImageRequest.auth`
//! (`streamsnap pull --username --password-stdin`), as the kubelet passes a pull secret.
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::private_node::{
    CredentialHelper, CredentialPlugin, PrivateImage, blob_reads, cri_pull, daemon_host_config,
    find_secrets, no_docker_config, secrets_of, trust_registry,
};
use streamsnap_e2e::secure_registry::{RegistryAuth, SecureRegistry};
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, STREAMING_NODE_TOOLS, Snapshotterd,
    SnapshotterdOptions, require_root, require_root_tools, run_container_in, workspace_bin,
};

const USER: &str = "alice";
const REMOTE_MOUNTS: &str = "streamsnap_snapshotter_remote_mounts_total";
const FALLBACKS: &str = "streamsnap_snapshotter_fallbacks_total";
const TOKEN_FETCHES: &str = "streamsnap_registry_auth_token_fetches_total";
const RANGE_REQUESTS: &str = "streamsnap_registry_range_requests_total";

fn preflight() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(
        &[
            STREAMING_NODE_TOOLS,
            &["containerd-shim-runc-v2", "openssl", "htpasswd"],
        ]
        .concat(),
    )?;
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    Ok(())
}

/// A password no log line could contain by chance.
fn password(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("pw-{tag}-{}-{nanos:x}", std::process::id())
}

/// A daemon (metrics on, no docker config unless `options` brings one) and a containerd with
/// CRI on it that trusts the registry's CA.
struct Node {
    daemon: Snapshotterd,
    containerd: Containerd,
    _no_docker_config: tempfile::TempDir,
}

impl Node {
    fn start(
        registry: &SecureRegistry,
        mut options: SnapshotterdOptions,
        containerd: ContainerdOptions,
    ) -> anyhow::Result<Self> {
        let (dir, env) = no_docker_config()?;
        if !options.env.iter().any(|(k, _)| k == "DOCKER_CONFIG") {
            options.env.push(env);
        }
        let daemon = Snapshotterd::start(options.with_metrics())?;
        let containerd = Containerd::start(
            containerd
                .with_proxy_snapshotter(SNAPSHOTTER, daemon.socket())
                .with_cri(SNAPSHOTTER),
        )?;
        trust_registry(&containerd, registry)?;
        Ok(Self {
            daemon,
            containerd,
            _no_docker_config: dir,
        })
    }

    /// `streamsnap pull` through `socket` (containerd's, or the CRI proxy's), which must succeed.
    fn pull(&self, socket: &Path, image: &str, creds: Option<(&str, &str)>) -> anyhow::Result<()> {
        let output = cri_pull(socket, image, creds)?;
        ensure!(
            output.status.success(),
            "`streamsnap pull {image}` failed: {}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&output.stderr).trim_end(),
            self.daemon.log_tail(30)
        );
        Ok(())
    }

    /// Runs `sha256sum` of `files` in a container of `image` and checks every digest.
    fn check_files(
        &self,
        image: &PrivateImage,
        id: &str,
        files: &[(String, String)],
    ) -> anyhow::Result<()> {
        let check = streamsnap_e2e::sha256_check(files);
        run_container_in(
            &self.containerd,
            CRI_NAMESPACE,
            SNAPSHOTTER,
            &image.reference,
            &container_id(id),
            &["sh", "-c", &check],
        )?;
        Ok(())
    }

    fn metrics(&self) -> anyhow::Result<String> {
        Ok(String::from_utf8(self.daemon.get("/metrics")?)?)
    }

    /// No password, Basic header or token anywhere the daemon or containerd leaves text.
    fn ensure_no_secrets(&self, registry: &SecureRegistry) -> anyhow::Result<usize> {
        let secrets = secrets_of(registry)?;
        let scan = find_secrets(&self.daemon, &self.containerd, &secrets, &registry.addr())?;
        ensure!(
            scan.found.is_empty(),
            "secrets found ({} places, {} bytes searched): {:#?}",
            scan.places,
            scan.bytes,
            scan.found
        );
        ensure!(scan.places > 5, "the scan read only {} places", scan.places);
        Ok(scan.places)
    }
}

/// A container ID unique across the test processes sharing `/run/containerd/runc/k8s.io`.
fn container_id(name: &str) -> String {
    format!("private-{name}-{}", std::process::id())
}

/// Files `indexes` of the image.
fn pick(image: &PrivateImage, indexes: &[usize]) -> Vec<(String, String)> {
    indexes.iter().map(|&i| image.files[i].clone()).collect()
}

/// The image was streamed: range reads in `log`, no layer GET, no fallback, both layers
/// mounted remotely. Returns the range reads.
fn ensure_lazy(
    registry: &SecureRegistry,
    from: usize,
    image: &PrivateImage,
    metrics: &str,
) -> anyhow::Result<usize> {
    let log = registry.access_log()?.split_off(from);
    let reads = blob_reads(&log, image);
    ensure!(
        reads.layer_downloads == 0 && reads.range_reads > 0,
        "{} was not streamed: {reads:?} (layers were downloaded, so the daemon fell back)",
        image.reference
    );
    ensure!(
        metric(metrics, REMOTE_MOUNTS, &[]) >= 2.0 && metric(metrics, FALLBACKS, &[]) == 0.0,
        "remote mounts {} and fallbacks {}",
        metric(metrics, REMOTE_MOUNTS, &[]),
        metric(metrics, FALLBACKS, &[])
    );
    Ok(reads.range_reads)
}

// ---------------------------------------------------------------------------------------------
// (1) A kubelet credential provider plugin

#[test]
fn a_credential_provider_plugin_gives_the_daemon_credentials_to_stream() -> anyhow::Result<()> {
    preflight()?;
    let password = password("plugin");
    let registry = SecureRegistry::start(RegistryAuth::basic(USER, &password))?;
    let image = PrivateImage::push_and_convert(&registry, "team/app", 1)?;
    let plugin = CredentialPlugin::new(&registry.addr(), USER, &password, "5m")?;
    let node = Node::start(
        &registry,
        SnapshotterdOptions {
            extra_config: daemon_host_config(&registry, true),
            extra_args: plugin.daemon_args(),
            ..SnapshotterdOptions::default()
        },
        ContainerdOptions::default(),
    )?;
    let from = registry.access_log()?.len();
    node.pull(
        node.containerd.address(),
        &image.reference,
        registry.credentials(),
    )?;
    node.check_files(&image, "plugin", &pick(&image, &[0, 4, 7]))?;
    let range_reads = ensure_lazy(&registry, from, &image, &node.metrics()?)?;

    // The plugin got v1 requests for the image and ran once: its answer is cached per registry.
    let requests = plugin.requests()?;
    ensure!(
        plugin.runs() == 1,
        "the plugin ran {} times: {requests:#?}",
        plugin.runs()
    );
    for request in &requests {
        ensure!(
            request["kind"] == "CredentialProviderRequest"
                && request["apiVersion"] == "credentialprovider.kubelet.k8s.io/v1"
                && request["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&format!("{}/team/app", registry.addr()))),
            "not a v1 request for the image: {request}"
        );
    }
    let places = node.ensure_no_secrets(&registry)?;
    eprintln!(
        "plugin: {} run(s), {range_reads} range reads, no layer GET; {places} places free of secrets",
        plugin.runs()
    );
    Ok(())
}

/// The control: the same node with no credentials at all. containerd pulls with the credentials
/// of the pull, the daemon cannot read the artifact, falls back, and the layers are downloaded:
/// what the lazy checks above would see if the credential sources did not work.
#[test]
fn without_credentials_the_daemon_falls_back_and_the_layers_are_downloaded() -> anyhow::Result<()> {
    preflight()?;
    let password = password("none");
    let registry = SecureRegistry::start(RegistryAuth::basic(USER, &password))?;
    let image = PrivateImage::push_and_convert(&registry, "team/app", 5)?;
    let node = Node::start(
        &registry,
        SnapshotterdOptions {
            extra_config: daemon_host_config(&registry, true),
            ..SnapshotterdOptions::default()
        },
        ContainerdOptions::default(),
    )?;
    let from = registry.access_log()?.len();
    node.pull(
        node.containerd.address(),
        &image.reference,
        registry.credentials(),
    )?;
    node.check_files(&image, "nocreds", &pick(&image, &[0]))?;
    let reads = blob_reads(&registry.access_log()?.split_off(from), &image);
    let metrics = node.metrics()?;
    ensure!(
        reads.layer_downloads == image.written.layers.len() && reads.unauthorized > 0,
        "expected every layer downloaded after the daemon's requests were refused: {reads:?}"
    );
    ensure!(
        metric(&metrics, REMOTE_MOUNTS, &[]) == 0.0
            && metric(&metrics, FALLBACKS, &["reason=\"registry_error\""]) >= 1.0,
        "expected registry_error fallbacks and no remote mount:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("streamsnap_snapshotter_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (2) The CRI proxy

#[test]
fn the_cri_proxy_streams_with_a_pull_secret_and_never_lends_it_to_another_repository()
-> anyhow::Result<()> {
    preflight()?;
    let password = password("proxy");
    let registry = SecureRegistry::start(RegistryAuth::token(
        USER,
        &password,
        Duration::from_secs(60),
    ))?;
    let tokens = registry.token_server().context("no token server")?;
    let secret_image = PrivateImage::push_and_convert(&registry, "team/app", 2)?;
    let other_image = PrivateImage::push_and_convert(&registry, "other/app", 3)?;
    // The proxy's socket and containerd's, named before either runs: a symlink to containerd's
    // socket once it is up.
    let sockets = tempfile::Builder::new().prefix("ss-cri-").tempdir()?;
    let proxy = sockets.path().join("cri.sock");
    let containerd_link = sockets.path().join("containerd.sock");
    let extra_config = format!(
        "{}\n[cri_proxy]\naddress = {:?}\ncontainerd_address = {:?}\n",
        daemon_host_config(&registry, true),
        proxy.display().to_string(),
        containerd_link.display().to_string()
    );
    // containerd has the node's own login for the registry, used for pulls that bring none: an
    // image pulled so is not the daemon's to stream (it has no credentials for it).
    let node = Node::start(
        &registry,
        SnapshotterdOptions {
            extra_config,
            ..SnapshotterdOptions::default()
        },
        ContainerdOptions::default().with_registry_auth(&registry.addr(), USER, &password),
    )?;
    std::os::unix::fs::symlink(node.containerd.address(), &containerd_link)?;
    let token_requests_before = tokens.requests().len();

    // With the pull secret: streamed.
    let from = registry.access_log()?.len();
    node.pull(&proxy, &secret_image.reference, registry.credentials())?;
    node.check_files(&secret_image, "proxy-secret", &pick(&secret_image, &[1, 6]))?;
    let range_reads = ensure_lazy(&registry, from, &secret_image, &node.metrics()?)?;

    // Another repository, no pull secret: containerd pulls it with its own login; the daemon
    // asks for a token without credentials, is refused, and falls back.
    let from = registry.access_log()?.len();
    node.pull(&proxy, &other_image.reference, None)?;
    node.check_files(&other_image, "proxy-other", &pick(&other_image, &[2]))?;
    let reads = blob_reads(&registry.access_log()?.split_off(from), &other_image);
    let metrics = node.metrics()?;
    // The busybox layer is shared and already there: only the data layer is pulled.
    ensure!(
        reads.layer_downloads >= 1 && reads.range_reads == 0,
        "other/app was streamed or not pulled: {reads:?}"
    );
    ensure!(
        metric(&metrics, FALLBACKS, &["reason=\"registry_error\""]) >= 1.0,
        "no fallback for other/app"
    );
    // containerd asks for tokens by the OAuth2 password grant (POST); the daemon by GET with
    // Basic credentials. A GET with credentials for other/app would be a lent pull secret.
    let requests = tokens.requests().split_off(token_requests_before);
    let of = |repo: &'static str| {
        requests
            .iter()
            .filter(move |r| r.scopes.iter().any(|s| s.contains(&format!(":{repo}:"))))
    };
    let daemon_secret = of("team/app")
        .filter(|r| r.method == "GET" && r.granted && r.user.as_deref() == Some(USER))
        .count();
    let lent = of("other/app")
        .filter(|r| r.method == "GET" && r.user.is_some())
        .count();
    let anonymous = of("other/app")
        .filter(|r| r.method == "GET" && r.user.is_none() && !r.granted)
        .count();
    ensure!(
        daemon_secret >= 1 && lent == 0 && anonymous >= 1,
        "token requests: {daemon_secret} by the daemon with team/app's secret, {lent} with \
         credentials for other/app, {anonymous} anonymous refused: {requests:#?}"
    );
    ensure!(
        metric(&metrics, TOKEN_FETCHES, &["outcome=\"ok\""]) == daemon_secret as f64
            && metric(&metrics, TOKEN_FETCHES, &["outcome=\"unauthorized\""]) == anonymous as f64,
        "the daemon's token fetch metric disagrees with the token server:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with(TOKEN_FETCHES))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let places = node.ensure_no_secrets(&registry)?;
    eprintln!(
        "proxy: team/app {range_reads} range reads with {daemon_secret} token(s) from the pull \
         secret; other/app {} layer download(s), {anonymous} anonymous token request(s) refused, \
         0 lent; {places} places free of secrets",
        reads.layer_downloads
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (3) A docker credential helper, the CA from SSL_CERT_FILE

#[test]
fn a_docker_credential_helper_and_ssl_cert_file_let_the_daemon_stream() -> anyhow::Result<()> {
    preflight()?;
    let password = password("helper");
    let registry = SecureRegistry::start(RegistryAuth::token(
        USER,
        &password,
        Duration::from_secs(60),
    ))?;
    let image = PrivateImage::push_and_convert(&registry, "team/app", 4)?;
    // The CLI verifies the registry with the system roots: without SSL_CERT_FILE, refused.
    let no_ca = Command::new(workspace_bin("streamsnap")?)
        .args(["manifest", "list-referrers", "--https", "--image"])
        .arg(&image.reference)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&no_ca.stderr);
    ensure!(
        !no_ca.status.success() && stderr.to_lowercase().contains("certificate"),
        "the CLI reached the registry without its CA: {stderr}"
    );

    let helper = CredentialHelper::new(&registry.addr(), USER, &password)?;
    let mut env = helper.daemon_env();
    env.push((
        "SSL_CERT_FILE".into(),
        registry.ca_cert_path().display().to_string(),
    ));
    let node = Node::start(
        &registry,
        SnapshotterdOptions {
            extra_config: daemon_host_config(&registry, false),
            env,
            ..SnapshotterdOptions::default()
        },
        ContainerdOptions::default(),
    )?;
    let from = registry.access_log()?.len();
    node.pull(
        node.containerd.address(),
        &image.reference,
        registry.credentials(),
    )?;
    node.check_files(&image, "helper", &pick(&image, &[3, 5]))?;
    let range_reads = ensure_lazy(&registry, from, &image, &node.metrics()?)?;
    let runs = helper.runs();
    let expected = format!("get {}", registry.addr());
    ensure!(
        !runs.is_empty() && runs.iter().all(|r| *r == expected),
        "the helper was not run as `docker-credential-e2e get` with the registry: {runs:?}"
    );
    let places = node.ensure_no_secrets(&registry)?;
    eprintln!(
        "helper: {} run(s), {range_reads} range reads, no layer GET; {places} places free of \
         secrets",
        runs.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (4) Short-lived tokens

/// How long registry tokens live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// How long the container waits before reading the files it did not read at start.
const LATER: u64 = 30;

#[test]
fn a_container_reads_new_files_through_refreshed_ten_second_tokens() -> anyhow::Result<()> {
    preflight()?;
    let password = password("tokens");
    let registry = SecureRegistry::start(RegistryAuth::token(USER, &password, TOKEN_LIFETIME))?;
    let tokens = registry.token_server().context("no token server")?;
    let image = PrivateImage::push_and_convert(&registry, "team/app", 6)?;
    let plugin = CredentialPlugin::new(&registry.addr(), USER, &password, "10m")?;
    let node = Node::start(
        &registry,
        SnapshotterdOptions {
            extra_config: daemon_host_config(&registry, true),
            extra_args: plugin.daemon_args(),
            ..SnapshotterdOptions::default()
        },
        ContainerdOptions::default(),
    )?;
    // Every token the daemon gets from here on is a GET (containerd POSTs a password grant).
    let token_requests_before = tokens.requests().len();
    let from = registry.access_log()?.len();
    node.pull(
        node.containerd.address(),
        &image.reference,
        registry.credentials(),
    )?;

    // Reads f0 at start, then, LATER seconds on, files it never read (far from f0: the
    // daemon's readahead cannot have fetched them).
    let early = pick(&image, &[0]);
    let late = pick(&image, &[4, 6, 7]);
    let script = format!(
        "{} && sleep {LATER} && {}",
        streamsnap_e2e::sha256_check(&early[..1]),
        streamsnap_e2e::sha256_check(&late)
    );
    let started = Instant::now();
    let container = thread::scope(|scope| -> anyhow::Result<_> {
        let run = scope.spawn(|| {
            run_container_in(
                &node.containerd,
                CRI_NAMESPACE,
                SNAPSHOTTER,
                &image.reference,
                &container_id("tokens"),
                &["sh", "-c", &script],
            )
        });
        // Halfway through the sleep: the first token has expired, the late files are unread.
        thread::sleep(Duration::from_secs(LATER / 2 + 5).saturating_sub(started.elapsed()));
        let mid = node.metrics()?;
        run.join()
            .map_err(|_| anyhow::anyhow!("the container thread panicked"))??;
        Ok(mid)
    });
    let mid = container?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_secs(LATER),
        "the container did not wait"
    );
    let end = node.metrics()?;
    let range_reads = ensure_lazy(&registry, from, &image, &end)?;

    let late_ranges = metric(&end, RANGE_REQUESTS, &[]) - metric(&mid, RANGE_REQUESTS, &[]);
    let ok = |m: &str| metric(m, TOKEN_FETCHES, &["outcome=\"ok\""]);
    let late_tokens = ok(&end) - ok(&mid);
    ensure!(
        late_ranges >= 1.0 && late_tokens >= 1.0,
        "the late reads made {late_ranges} range requests with {late_tokens} new tokens: they \
         were not read from the registry with a refreshed token"
    );
    let daemon_tokens = tokens
        .requests()
        .split_off(token_requests_before)
        .iter()
        .filter(|r| r.method == "GET" && r.granted)
        .count();
    ensure!(
        daemon_tokens > 1 && ok(&end) == daemon_tokens as f64,
        "the token server issued {daemon_tokens} tokens to the daemon, its metric says {}",
        ok(&end)
    );
    ensure!(
        metric(&end, TOKEN_FETCHES, &["outcome=\"unauthorized\""]) == 0.0,
        "a token request was refused"
    );
    let places = node.ensure_no_secrets(&registry)?;
    eprintln!(
        "tokens: {daemon_tokens} tokens of {}s for the daemon ({late_tokens} after the first \
         expired), {range_reads} range reads ({late_ranges} after {LATER}s), {} plugin run(s), \
         {} tokens issued in all; {places} places free of secrets",
        TOKEN_LIFETIME.as_secs(),
        plugin.runs(),
        registry.tokens_issued()
    );
    Ok(())
}
