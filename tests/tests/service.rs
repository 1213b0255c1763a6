//! The conversion service (`streamsnap serve`) against the real distribution registry (Debian
//! docker-registry 2.8) sending it push and delete notifications: repository streaming states,
//! auto-conversion, operations with show and cancel, restarts, cascade delete, concurrency
//! with redelivered events, and authentication. Verbs go through the `streamsnap` CLI;
//! what the registry holds is checked with the registry client. Every scenario runs twice:
//! with the embedded store (`redb::NAME`) and with PostgreSQL in a private cluster
//! (`postgres::NAME`).

use std::collections::HashSet;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::postgres::{DATABASE, PgCluster};
use streamsnap_e2e::service::{
    FailFirst, ServiceHome, ServiceProcess, WebhookRelay, digest_field as digest_of,
    encode_segment as encode, op_state as state, push_image, request_with_body, small_spec,
};
use streamsnap_e2e::targen::XorShift;
use streamsnap_e2e::{Registry, TarGen, http, require_root_tools, skopeo_push, workspace_bin};
use streamsnap_format::oci::{Descriptor, ImageIndex, ImageManifest};
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository};

const TOOLS: &[&str] = &["docker-registry", "skopeo"];
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);

/// Where the service keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Redb,
    Postgres,
}

/// A registry notifying a service (directly, or through a relay).
struct Env {
    home: ServiceHome,
    /// The service's database (PostgreSQL backend); dropped after the service.
    _postgres: Option<PgCluster>,
    /// Flags every start of the service gets (a short lease with PostgreSQL, so a killed
    /// service's operation is taken over within seconds).
    base_flags: Vec<&'static str>,
    registry: Registry,
    service: Option<ServiceProcess>,
    relay: Option<WebhookRelay>,
    client: Client,
    rt: tokio::runtime::Runtime,
    barriers: AtomicU64,
}

impl Env {
    fn start(
        backend: Backend,
        extra: &[&str],
        fail_first: Option<FailFirst>,
    ) -> anyhow::Result<Self> {
        require_root_tools(TOOLS)?;
        let mut home = ServiceHome::new()?;
        let (postgres, base_flags) = match backend {
            Backend::Redb => (None, vec![]),
            Backend::Postgres => {
                let cluster = PgCluster::start()?;
                home.use_postgres(cluster.url(DATABASE), cluster.password_file());
                (Some(cluster), vec!["--operation-lease", "3"])
            }
        };
        let mut flags = base_flags.clone();
        flags.extend(extra);
        let relay = fail_first
            .map(|f| WebhookRelay::start(&home.addr(), f))
            .transpose()?;
        let url = relay
            .as_ref()
            .map_or_else(|| home.webhook_url(), WebhookRelay::url);
        let registry = Registry::start_with_config_extra(&home.notifications_yaml(&url))?;
        let service = home.start(&registry.addr(), &flags)?;
        let env = Self {
            home,
            _postgres: postgres,
            base_flags,
            registry,
            service: Some(service),
            relay,
            client: Client::new(ClientConfig::default())?,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            barriers: AtomicU64::new(0),
        };
        env.cli_ok(&[
            "update",
            "--repository",
            "barrier",
            "--enable-streaming",
            "true",
        ])?;
        Ok(env)
    }

    fn service(&mut self) -> &mut ServiceProcess {
        self.service.as_mut().expect("the service runs")
    }

    fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let mut flags = self.base_flags.clone();
        flags.extend(extra);
        self.service = Some(self.home.start(&self.registry.addr(), &flags)?);
        Ok(())
    }

    fn repo(&self, name: &str) -> Repository {
        Reference::parse(&format!("{}/{name}:x", self.registry.addr()))
            .unwrap()
            .repository
    }

    /// `streamsnap artifact-streaming --server URL --token-file FILE ARGS...`
    fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let bin = workspace_bin("streamsnap")?;
        Command::new(&bin)
            .arg("artifact-streaming")
            .args(["--server", &self.home.url()])
            .arg("--token-file")
            .arg(self.home.token_file())
            .args(args)
            .env_remove("STREAMSNAP_SERVER")
            .env_remove("STREAMSNAP_TOKEN")
            .output()
            .with_context(|| format!("running {}", bin.display()))
    }

    fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli(args)?;
        ensure!(
            output.status.success(),
            "streamsnap {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let stdout = self.cli_ok(&all)?;
        serde_json::from_str(&stdout).with_context(|| format!("stdout is not JSON: {stdout}"))
    }

    /// `GET` an API path with the token, as JSON.
    fn api(&self, path: &str) -> anyhow::Result<Value> {
        let auth = format!("Bearer {}", self.home.token);
        let response = http::get(&self.home.addr(), path, &[("Authorization", &auth)])?;
        ensure!(
            response.status == 200,
            "GET {path}: {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
        Ok(serde_json::from_slice(&response.body)?)
    }

    fn operations(&self, repo: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.api(&format!("/v1/repositories/{}/operations", encode(repo)))?;
        Ok(list["operations"].as_array().cloned().unwrap_or_default())
    }

    fn operation(&self, repo: &str, id: &str) -> anyhow::Result<Value> {
        self.api(&format!(
            "/v1/repositories/{}/operations/{id}",
            encode(repo)
        ))
    }

    /// Polls operation `id` until `done` holds for it.
    fn wait_op(
        &self,
        repo: &str,
        id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let op = self.operation(repo, id)?;
            if done(&op) {
                return Ok(op);
            }
            if Instant::now() > deadline {
                bail!("operation {id} never got {what}: {op:#}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls until `reference` in `repo` has an operation, and returns the newest.
    fn wait_op_for(&self, repo: &str, reference: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT;
        let path = format!(
            "/v1/repositories/{}/operations?reference={}",
            encode(repo),
            encode(reference)
        );
        loop {
            if let Some(op) = self.api(&path)?["operations"].get(0) {
                return Ok(op.clone());
            }
            if Instant::now() > deadline {
                bail!("no operation for {repo}:{reference} within {WAIT:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Returns once every notification the registry queued before this call was delivered:
    /// it pushes a new image into the Active repository `barrier` and waits for its operation
    /// (the registry delivers one endpoint's events in order).
    fn barrier(&self) -> anyhow::Result<()> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let tag = format!("b{n}");
        let content = format!("barrier {n} {}", self.home.url());
        self.rt.block_on(push_small(
            &self.client,
            &self.repo("barrier"),
            &tag,
            &content,
        ))?;
        self.wait_op_for("barrier", &tag).map(drop)
    }

    fn referrers(&self, repo: &str, subject: &Digest) -> anyhow::Result<Vec<Descriptor>> {
        let referrers = self
            .rt
            .block_on(self.client.referrers(&self.repo(repo), subject, None))?;
        Ok(referrers.manifests)
    }

    fn push(&self, repo: &str, tag: &str, spec: &ImageSpec) -> anyhow::Result<Digest> {
        self.rt
            .block_on(push_image(&self.client, &self.repo(repo), tag, spec))
    }
}

async fn push_small(
    client: &Client,
    repo: &Repository,
    tag: &str,
    content: &str,
) -> anyhow::Result<Digest> {
    push_image(client, repo, tag, &small_spec(content)).await
}

/// An image whose conversion at zstd level 19 takes seconds: 10 MB of random lowercase text
/// in an uncompressed layer.
fn slow_spec(seed: u64) -> ImageSpec {
    let mut rng = XorShift::new(seed);
    let text: Vec<u8> = (0..10 << 20)
        .map(|_| b'a' + (rng.next_u64() % 26) as u8)
        .collect();
    let tar = TarGen::new().file("data.txt", 0o644, &text).finish();
    ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::None)])
}

/// Starts a slow conversion through the CLI and returns the operation's ID once it is
/// Running with some progress.
fn start_slow_conversion(env: &Env, image: &str) -> anyhow::Result<String> {
    let op = env.cli_json(&[
        "create",
        "--image",
        image,
        "--no-wait",
        "--compression-level",
        "19",
        "--chunk-size",
        "262144",
    ])?;
    let id = op["id"].as_str().context("no id")?.to_owned();
    let repo = image.split(':').next().unwrap();
    env.wait_op(repo, &id, "Running with progress", |op| {
        state(op) == "Running" && op["progress"]["done"].as_u64() > Some(0)
    })?;
    Ok(id)
}

fn a_new_repository_is_inactive_and_enabling_it_converts_only_new_pushes(
    backend: Backend,
) -> anyhow::Result<()> {
    let env = Env::start(backend, &["-v"], None)?;
    let v1 = env.push("app", "v1", &small_spec("one"))?;
    env.barrier()?;
    let shown = env.cli_json(&["show", "--repository", "app"])?;
    ensure!(shown["streaming"] == "Inactive", "{shown:#}");
    ensure!(
        shown["operations"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n == 0),
        "a push into an inactive repository made an operation: {shown:#}"
    );
    ensure!(env.referrers("app", &v1)?.is_empty());

    let updated = env.cli_json(&[
        "update",
        "--repository",
        "app",
        "--enable-streaming",
        "true",
    ])?;
    ensure!(updated["streaming"] == "Active", "{updated:#}");
    let table = env.cli_ok(&["show"])?;
    ensure!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .starts_with("REPOSITORY")
            && table
                .lines()
                .any(|l| l.starts_with("app ") && l.contains("Active")),
        "show table: {table}"
    );

    let v2 = env.push("app", "v2", &small_spec("two"))?;
    let op = env.wait_op_for("app", "v2")?;
    let id = op["id"].as_str().unwrap().to_owned();
    let op = env.wait_op("app", &id, "Succeeded", |op| state(op) == "Succeeded")?;
    ensure!(digest_of(&op["manifest_digest"])? == v2 && op["trigger"] == "push");
    let artifact = digest_of(&op["artifact_digest"])?;
    let referrers = env.referrers("app", &v2)?;
    ensure!(
        referrers.len() == 1
            && referrers[0].digest == artifact
            && referrers[0].artifact_type.as_deref() == Some(media::ARTIFACT_TYPE),
        "referrers of v2: {referrers:?}"
    );

    // operation show, by image (relative or with the registry host) and by ID.
    let text = env.cli_ok(&["operation", "show", "--image", "app:v2"])?;
    ensure!(
        text.lines()
            .any(|l| l.starts_with("STATE") && l.ends_with("Succeeded"))
            && text.contains(&artifact.to_string()),
        "operation show text: {text}"
    );
    let full = format!("{}/app:v2", env.registry.addr());
    let by_image = env.cli_json(&["operation", "show", "--image", &full])?;
    let by_id = env.cli_json(&["operation", "show", "--repository", "app", "--id", &id])?;
    ensure!(by_image["id"] == id.as_str() && by_id["id"] == id.as_str());
    ensure!(by_id["state"] == "Succeeded");

    // The image pushed before enabling stays unconverted; the artifact's own pushes (its
    // manifest, the fallback tag index) made no operation.
    env.barrier()?;
    ensure!(env.referrers("app", &v1)?.is_empty(), "v1 was converted");
    let ops = env.operations("app")?;
    ensure!(ops.len() == 1, "operations of app: {ops:#?}");
    let missing = env.cli(&["operation", "show", "--image", "app:v1"])?;
    ensure!(
        !missing.status.success()
            && String::from_utf8_lossy(&missing.stderr).contains("has no operation")
    );

    // Disabling stops auto-conversion and keeps the artifacts made.
    env.cli_ok(&[
        "update",
        "--repository",
        "app",
        "--enable-streaming",
        "false",
    ])?;
    let v3 = env.push("app", "v3", &small_spec("three"))?;
    env.barrier()?;
    ensure!(env.operations("app")?.len() == 1 && env.referrers("app", &v3)?.is_empty());
    ensure!(
        env.referrers("app", &v2)?.len() == 1,
        "v2's artifact is gone"
    );
    let shown = env.cli_json(&["show", "--repository", "app"])?;
    ensure!(shown["streaming"] == "Inactive" && shown["operations"]["Succeeded"] == 1);

    // The metrics, without a token: this replica's conversions and events, and the store's
    // counts (the harness's barrier repository adds conversions of its own: compare the two).
    let metrics = http::get(&env.home.addr(), "/metrics", &[])?;
    let text = String::from_utf8_lossy(&metrics.body);
    ensure!(metrics.status == 200, "GET /metrics: {}", metrics.status);
    let value = |series: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no {series} in /metrics:\n{text}"))
    };
    let succeeded = value("streamsnap_service_conversions_total{outcome=\"succeeded\"}")?;
    ensure!(
        succeeded >= 1
            && succeeded == value("streamsnap_service_operations{state=\"Succeeded\"}")?
            && value("streamsnap_service_conversions_total{outcome=\"failed\"}")? == 0
            && value("streamsnap_service_webhook_events_total{result=\"created\"}")? >= 1
            && value("streamsnap_service_repositories{streaming=\"inactive\"}")? >= 1,
        "/metrics:\n{text}"
    );

    // The artifact kind: set alone (the streaming state stays), kept by streaming changes,
    // shown, and used by the conversions started afterwards.
    let nothing = env.cli(&["update", "--repository", "app"])?;
    ensure!(
        !nothing.status.success()
            && String::from_utf8_lossy(&nothing.stderr).contains("--kind chunked|index"),
        "update without a change: {nothing:?}"
    );
    let updated = env.cli_json(&["update", "--repository", "app", "--kind", "index"])?;
    ensure!(
        updated["kind"] == "index" && updated["streaming"] == "Inactive",
        "{updated:#}"
    );
    let updated = env.cli_json(&[
        "update",
        "--repository",
        "app",
        "--enable-streaming",
        "true",
    ])?;
    ensure!(
        updated["kind"] == "index" && updated["streaming"] == "Active",
        "{updated:#}"
    );
    let table = env.cli_ok(&["show"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header.get(..3) == Some(&["REPOSITORY", "STREAMING", "KIND"][..])
            && table.lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>().get(..3)
                    == Some(&["app", "Active", "index"][..])
            }),
        "show table: {table}"
    );
    // A gzip image pushed now gets an index artifact (over its original layer).
    let v4 = env.push("app", "v4", &small_spec("four"))?;
    let op = env.wait_op_for("app", "v4")?;
    let op = env.wait_op("app", op["id"].as_str().unwrap(), "Succeeded", |op| {
        state(op) == "Succeeded"
    })?;
    ensure!(op["kind"] == "index", "{op:#}");
    let referrers = env.referrers("app", &v4)?;
    ensure!(
        referrers.len() == 1
            && referrers[0].digest == digest_of(&op["artifact_digest"])?
            && referrers[0].artifact_type.as_deref() == Some(media::INDEX_ARTIFACT_TYPE),
        "referrers of v4: {referrers:?}"
    );
    // v2 has a chunked artifact: asked again, it is converted to the index kind too (its
    // chunked operation does not stand in for it).
    let again = env.cli_json(&["create", "--image", "app:v2"])?;
    ensure!(
        state(&again) == "Succeeded" && again["kind"] == "index" && again["id"] != id.as_str(),
        "{again:#}"
    );
    let mut types: Vec<_> = env
        .referrers("app", &v2)?
        .into_iter()
        .filter_map(|d| d.artifact_type)
        .collect();
    types.sort();
    let mut expected = [media::ARTIFACT_TYPE, media::INDEX_ARTIFACT_TYPE];
    expected.sort();
    ensure!(types == expected, "referrers of v2: {types:?}");
    // A layer the index kind cannot read fails the operation, saying what to do.
    let plain = ImageSpec::linux_amd64(vec![LayerBlob::new(
        TarGen::new().file("id", 0o644, b"plain").finish(),
        Compression::None,
    )]);
    env.push("app", "plain", &plain)?;
    let op = env.wait_op_for("app", "plain")?;
    let op = env.wait_op("app", op["id"].as_str().unwrap(), "Failed", |op| {
        state(op) == "Failed"
    })?;
    let error = op["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("gzip layers only")
            && error.contains("--repository app --kind chunked")
            && op["kind"] == "index",
        "unclear error {error:?}"
    );
    Ok(())
}

fn cancel_stops_a_conversion_and_leaves_no_referrer(backend: Backend) -> anyhow::Result<()> {
    let env = Env::start(backend, &["-v", "--concurrency", "1"], None)?;
    let first = env.push("big", "v1", &slow_spec(1))?;
    let second = env.push("big", "v2", &slow_spec(2))?;
    let running = start_slow_conversion(&env, "big:v1")?;
    // With one worker busy, the second waits: canceled before it starts.
    let queued = env.cli_json(&["create", "--image", "big:v2", "--no-wait"])?;
    ensure!(queued["state"] == "NotStarted", "{queued:#}");
    let queued_id = queued["id"].as_str().unwrap();
    let canceled = env.cli_json(&[
        "operation",
        "cancel",
        "--repository",
        "big",
        "--id",
        queued_id,
    ])?;
    ensure!(canceled["state"] == "Canceled", "{canceled:#}");

    let started = Instant::now();
    let canceled = env.cli_json(&[
        "operation",
        "cancel",
        "--repository",
        "big",
        "--id",
        &running,
    ])?;
    if canceled["state"] != "Canceled" {
        // The service waits 10 s for the conversion to stop; a loaded machine may need more.
        ensure!(
            canceled["state"] == "Running" && canceled["cancel_requested"] == true,
            "{canceled:#}"
        );
        env.wait_op("big", &running, "Canceled", |op| state(op) == "Canceled")?;
    }
    eprintln!(
        "cancel of a running conversion took {:?}",
        started.elapsed()
    );

    // Nothing refers to either image, now or a moment later (no late push).
    for _ in 0..2 {
        for digest in [&first, &second] {
            ensure!(
                env.referrers("big", digest)?.is_empty(),
                "a referrer appeared"
            );
            let fallback = format!("sha256-{}", digest.hex());
            let tag = env
                .rt
                .block_on(env.client.head_manifest(&env.repo("big"), &fallback))?;
            ensure!(tag.is_none(), "the fallback tag {fallback} exists");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    ensure!(state(&env.operation("big", &running)?) == "Canceled");
    let again = env.cli(&[
        "operation",
        "cancel",
        "--repository",
        "big",
        "--id",
        &running,
    ])?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("409"),
        "a second cancel: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let shown = env.cli_json(&["show", "--repository", "big"])?;
    ensure!(shown["operations"]["Canceled"] == 2, "{shown:#}");
    Ok(())
}

fn a_conversion_interrupted_by_kill_or_sigterm_is_resumed_after_restart(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut env = Env::start(backend, &["-v"], None)?;
    env.cli_ok(&[
        "update",
        "--repository",
        "keep",
        "--enable-streaming",
        "true",
    ])?;
    let digest = env.push("slow", "v1", &slow_spec(3))?;
    let id = start_slow_conversion(&env, "slow:v1")?;

    // kill -9 mid-conversion: after the restart it is not left Running, it runs again (at
    // once with the embedded store; with PostgreSQL once the dead worker's lease expired).
    env.service().kill9()?;
    env.restart(&["-v"])?;
    let op = env.wait_op("slow", &id, "taken over", |op| op["interruptions"] == 1)?;
    ensure!(
        matches!(state(&op), "NotStarted" | "Running"),
        "after a kill -9 and a restart: {op:#}"
    );
    env.wait_op("slow", &id, "Running again", |op| {
        state(op) == "Running" && op["progress"]["done"].as_u64() > Some(0)
    })?;
    ensure!(
        env.service().log().contains("resuming"),
        "the restart did not say it resumed the operation"
    );

    // SIGTERM mid-conversion: a clean exit, nothing pushed, resumed after the next start.
    let status = env.service().terminate()?;
    ensure!(
        status.success(),
        "streamsnap serve exited with {status} on SIGTERM"
    );
    ensure!(
        env.referrers("slow", &digest)?.is_empty(),
        "a referrer after SIGTERM"
    );
    env.restart(&["-v"])?;
    let op = env.wait_op("slow", &id, "Succeeded", |op| state(op) == "Succeeded")?;
    ensure!(
        op["interruptions"] == 1,
        "a graceful stop counted as a crash: {op:#}"
    );
    let referrers = env.referrers("slow", &digest)?;
    ensure!(
        referrers.len() == 1 && referrers[0].digest == digest_of(&op["artifact_digest"])?,
        "{referrers:?}"
    );

    // The repository states survived both stops.
    let keep = env.cli_json(&["show", "--repository", "keep"])?;
    ensure!(keep["streaming"] == "Active", "{keep:#}");
    ensure!(env.cli_json(&["show", "--repository", "slow"])?["streaming"] == "Inactive");
    Ok(())
}

fn deleting_an_original_manifest_deletes_its_streaming_artifact_and_profile(
    backend: Backend,
) -> anyhow::Result<()> {
    let env = Env::start(backend, &["-v"], None)?;
    env.cli_ok(&[
        "update",
        "--repository",
        "del",
        "--enable-streaming",
        "true",
    ])?;
    let digest = env.push("del", "v1", &small_spec("to delete"))?;
    let op = env.wait_op_for("del", "v1")?;
    let op = env.wait_op("del", op["id"].as_str().unwrap(), "Succeeded", |op| {
        state(op) == "Succeeded"
    })?;
    let artifact = digest_of(&op["artifact_digest"])?;
    // Another referrer of the image (a signature, say) shares the fallback index.
    let repo = env.repo("del");
    let subject = env
        .rt
        .block_on(env.client.head_manifest(&repo, &digest.to_string()))?
        .context("v1 is missing")?;
    let signature = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some("application/vnd.example.signature".into()),
        config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
        layers: vec![],
        subject: Some(subject.clone()),
        annotations: Default::default(),
    };
    let signature = env.rt.block_on(async {
        env.client
            .push_blob(
                &repo,
                &signature.config.digest,
                media::OCI_EMPTY_CONTENT.into(),
            )
            .await?;
        env.client.push_referrer(&repo, &signature).await
    })?;
    // And a start-up profile of it.
    let profile_blob = br#"{"version":1,"layers":[]}"#;
    let profile = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(media::PROFILE_ARTIFACT_TYPE.into()),
        config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
        layers: vec![Descriptor::of(media::PROFILE, profile_blob)],
        subject: Some(subject),
        annotations: Default::default(),
    };
    let profile = env.rt.block_on(async {
        env.client
            .push_blob(
                &repo,
                &profile.layers[0].digest,
                profile_blob.as_slice().into(),
            )
            .await?;
        env.client.push_referrer(&repo, &profile).await
    })?;
    ensure!(env.referrers("del", &digest)?.len() == 3);

    env.rt
        .block_on(env.client.delete_manifest(&repo, &digest))?;
    let deadline = Instant::now() + WAIT;
    loop {
        let gone = env
            .rt
            .block_on(env.client.head_manifest(&repo, &artifact.to_string()))?
            .is_none();
        if gone {
            break;
        }
        ensure!(Instant::now() < deadline, "the artifact was not deleted");
        std::thread::sleep(POLL);
    }
    ensure!(
        env.rt
            .block_on(env.client.head_manifest(&repo, &profile.digest.to_string()))?
            .is_none(),
        "the start-up profile was not deleted"
    );
    // The fallback index lists the other referrer only.
    let index = env.rt.block_on(
        env.client
            .get_manifest(&repo, &format!("sha256-{}", digest.hex())),
    )?;
    let index: ImageIndex = serde_json::from_slice(&index.bytes)?;
    let listed: Vec<Digest> = index.manifests.iter().map(|d| d.digest).collect();
    ensure!(
        listed == [signature.digest],
        "fallback index after the delete: {listed:?}"
    );
    env.barrier()?;
    ensure!(
        env.operations("del")?.len() == 1,
        "the deletes made operations"
    );
    Ok(())
}

fn fifty_concurrent_pushes_make_fifty_operations_even_when_events_are_redelivered(
    backend: Backend,
) -> anyhow::Result<()> {
    // The relay answers 500 to the first delivery of every manifest push, after the service
    // handled it: the registry delivers each of those events a second time.
    let fail_first: FailFirst = Box::new(|event: &Value| {
        event["action"] == "push"
            && event["target"]["mediaType"]
                .as_str()
                .is_some_and(|t| t.contains("manifest") || t.contains("index"))
    });
    let env = Env::start(backend, &["-v"], Some(fail_first))?;
    env.cli_ok(&[
        "update",
        "--repository",
        "many",
        "--enable-streaming",
        "true",
    ])?;
    let repo = env.repo("many");
    let pushed: Vec<Digest> = env.rt.block_on(async {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let client = env.client.clone();
                let repo = repo.clone();
                tokio::spawn(async move {
                    push_small(&client, &repo, &format!("t{i}"), &format!("image {i}")).await
                })
            })
            .collect();
        let mut digests = Vec::new();
        for task in tasks {
            digests.push(task.await??);
        }
        Ok::<_, anyhow::Error>(digests)
    })?;
    ensure!(pushed.iter().collect::<HashSet<_>>().len() == 50);

    let deadline = Instant::now() + WAIT;
    loop {
        let ops = env.operations("many")?;
        if ops.len() >= 50 && ops.iter().all(|op| state(op) == "Succeeded") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not 50 Succeeded operations: {:?}",
            ops.iter().map(state).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every event is in (redeliveries included): still 50, all Succeeded.
    env.barrier()?;
    let ops = env.operations("many")?;
    ensure!(ops.iter().all(|op| state(op) == "Succeeded"));
    let converted: HashSet<Digest> = ops
        .iter()
        .map(|op| digest_of(&op["manifest_digest"]))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        ops.len() == 50 && converted == pushed.iter().copied().collect(),
        "{} operations for {} distinct manifests",
        ops.len(),
        converted.len()
    );
    for digest in &pushed {
        let referrers = env.referrers("many", digest)?;
        ensure!(
            referrers.len() == 1,
            "{digest} has {} referrers",
            referrers.len()
        );
    }

    // The registry really delivered every tagged push twice.
    let relay = env.relay.as_ref().unwrap();
    let deliveries = relay.deliveries();
    let envelopes = relay.envelopes();
    let mut tagged_pushes = Vec::new();
    for (authorization, body) in &envelopes {
        let envelope: Value = serde_json::from_slice(body)?;
        for event in envelope["events"].as_array().into_iter().flatten() {
            let tagged = event["target"]["tag"]
                .as_str()
                .is_some_and(|t| t.starts_with('t'));
            if event["action"] == "push" && event["target"]["repository"] == "many" && tagged {
                tagged_pushes.push((authorization.clone(), body.clone(), event.clone()));
            }
        }
    }
    let ids: HashSet<&str> = tagged_pushes
        .iter()
        .map(|(_, _, e)| e["id"].as_str().unwrap())
        .collect();
    ensure!(ids.len() == 50, "{} distinct push events", ids.len());
    ensure!(
        ids.iter()
            .all(|id| deliveries.get(*id).copied().unwrap_or(0) >= 2),
        "some push events were delivered once: {deliveries:?}"
    );

    // Replaying an envelope, or a new event for a converted manifest, creates nothing.
    let (authorization, body, event) = &tagged_pushes[0];
    let post = |body: &[u8]| {
        request_with_body(
            &env.home.addr(),
            "POST",
            "/v1/registry-events",
            &[
                ("Authorization", authorization),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let replay = post(body)?;
    ensure!(replay.status == 200, "replay: {}", replay.status);
    let summary: Value = serde_json::from_slice(&replay.body)?;
    ensure!(
        summary["created"] == 0 && summary["duplicates"] == 1,
        "{summary}"
    );
    let mut fresh = event.clone();
    fresh["id"] = Value::from("a-new-event-id");
    let retag = post(&serde_json::to_vec(
        &serde_json::json!({ "events": [fresh] }),
    )?)?;
    let summary: Value = serde_json::from_slice(&retag.body)?;
    ensure!(
        summary["created"] == 0 && summary["duplicates"] == 1,
        "{summary}"
    );
    ensure!(env.operations("many")?.len() == 50);
    Ok(())
}

fn calls_without_the_token_or_the_webhook_secret_are_rejected(
    backend: Backend,
) -> anyhow::Result<()> {
    let env = Env::start(backend, &["-vv"], None)?;
    let addr = env.home.addr();
    let token = format!("Bearer {}", env.home.token);
    let secret = format!("Bearer {}", env.home.secret);
    let update = br#"{"streaming":"Active"}"#;
    let create = br#"{"reference":"v1"}"#;
    let id = "0123456789abcdef";
    let calls: &[(&str, String, &[u8])] = &[
        ("PUT", "/v1/repositories/app".into(), update),
        ("POST", "/v1/repositories/app/operations".into(), create),
        (
            "POST",
            format!("/v1/repositories/app/operations/{id}/cancel"),
            b"",
        ),
        ("GET", "/v1/repositories".into(), b""),
    ];
    for (method, path, body) in calls {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer wrong")],
            vec![("Authorization", secret.as_str())],
        ] {
            let response = request_with_body(&addr, method, path, &headers, body)?;
            ensure!(
                response.status == 401 && response.header("www-authenticate") == Some("Bearer"),
                "{method} {path} with {headers:?}: {}",
                response.status
            );
        }
    }
    let with_token = request_with_body(
        &addr,
        "PUT",
        "/v1/repositories/app",
        &[("Authorization", &token)],
        update,
    )?;
    ensure!(
        with_token.status == 200,
        "with the token: {}",
        with_token.status
    );
    ensure!(http::get(&addr, "/v1/healthz", &[])?.status == 200);

    let envelope = br#"{"events":[]}"#;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", token.as_str())],
    ] {
        let response = request_with_body(&addr, "POST", "/v1/registry-events", &headers, envelope)?;
        ensure!(
            response.status == 401,
            "webhook with {headers:?}: {}",
            response.status
        );
    }
    let response = request_with_body(
        &addr,
        "POST",
        "/v1/registry-events",
        &[("Authorization", &secret)],
        envelope,
    )?;
    ensure!(
        response.status == 200,
        "webhook with the secret: {}",
        response.status
    );

    // The CLI says what is wrong.
    let bad_token = env.home.state_dir().with_file_name("bad-token");
    std::fs::write(&bad_token, "nope\n")?;
    let output = Command::new(workspace_bin("streamsnap")?)
        .args([
            "artifact-streaming",
            "--server",
            &env.home.url(),
            "--token-file",
        ])
        .arg(&bad_token)
        .args([
            "update",
            "--repository",
            "app",
            "--enable-streaming",
            "true",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("401") && stderr.contains("token"),
        "{stderr}"
    );

    // Real deliveries carry the secret (the barrier needs one), and nothing logs secrets.
    env.barrier()?;
    let log = env.service.as_ref().unwrap().log();
    ensure!(
        log.contains("request"),
        "the service did not log requests at -vv"
    );
    ensure!(
        !log.contains(&env.home.token) && !log.contains(&env.home.secret),
        "a secret is in the log"
    );

    // Dev mode: loopback callers need no token (and still no webhook secret is skipped).
    let dev = ServiceHome::new()?;
    let _dev_service = dev.start(&env.registry.addr(), &["--insecure-dev-loopback"])?;
    let response = request_with_body(&dev.addr(), "PUT", "/v1/repositories/app", &[], update)?;
    ensure!(
        response.status == 200,
        "dev loopback without a token: {}",
        response.status
    );
    let response = request_with_body(&dev.addr(), "POST", "/v1/registry-events", &[], envelope)?;
    ensure!(
        response.status == 401,
        "dev mode webhook without the secret: {}",
        response.status
    );
    Ok(())
}

fn incompatible_pushes_fail_clearly_and_an_index_converts_its_amd64_entry(
    backend: Backend,
) -> anyhow::Result<()> {
    let env = Env::start(backend, &["-v"], None)?;
    env.cli_ok(&[
        "update",
        "--repository",
        "mixed",
        "--enable-streaming",
        "true",
    ])?;
    let layer = |s: &str| LayerBlob::gzip(TarGen::new().file("f", 0o644, s.as_bytes()).finish());
    env.push("mixed", "arm", &ImageSpec::linux_arm64(vec![layer("arm")]))?;
    env.push(
        "mixed",
        "win",
        &ImageSpec::new("windows", "amd64", vec![layer("win")]),
    )?;
    for (tag, platform) in [("arm", "linux/arm64"), ("win", "windows/amd64")] {
        let op = env.wait_op_for("mixed", tag)?;
        let op = env.wait_op("mixed", op["id"].as_str().unwrap(), "Failed", |op| {
            state(op) == "Failed"
        })?;
        let error = op["error"].as_str().unwrap_or_default();
        ensure!(
            error.contains("linux/amd64") && error.contains(platform),
            "{tag}: unclear error {error:?}"
        );
    }

    let mut layout = OciLayout::new()?;
    let written = layout.write_index(
        &[
            ImageSpec::linux_amd64(vec![layer("amd64")]),
            ImageSpec::linux_arm64(vec![layer("arm64")]),
        ],
        "multi",
    )?;
    skopeo_push(
        layout.path(),
        "multi",
        &format!("{}/mixed:multi", env.registry.addr()),
    )?;
    let op = env.wait_op_for("mixed", "multi")?;
    let op = env.wait_op("mixed", op["id"].as_str().unwrap(), "Succeeded", |op| {
        state(op) == "Succeeded"
    })?;
    let amd64 = written.images[0].manifest.digest;
    ensure!(digest_of(&op["manifest_digest"])? == written.index.digest);
    ensure!(digest_of(&op["subject_digest"])? == amd64, "{op:#}");
    ensure!(env.referrers("mixed", &amd64)?.len() == 1);
    ensure!(
        env.referrers("mixed", &written.images[1].manifest.digest)?
            .is_empty()
    );
    // The index's entries, pushed by digest, made no operations of their own.
    env.barrier()?;
    ensure!(env.operations("mixed")?.len() == 3);
    Ok(())
}

/// Runs each scenario once per backend: `redb::NAME` and `postgres::NAME`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    super::$name(super::Backend::Redb)
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    super::$name(super::Backend::Postgres)
                }
            )*
        }
    };
}

both_backends!(
    a_new_repository_is_inactive_and_enabling_it_converts_only_new_pushes,
    cancel_stops_a_conversion_and_leaves_no_referrer,
    a_conversion_interrupted_by_kill_or_sigterm_is_resumed_after_restart,
    deleting_an_original_manifest_deletes_its_streaming_artifact_and_profile,
    fifty_concurrent_pushes_make_fifty_operations_even_when_events_are_redelivered,
    calls_without_the_token_or_the_webhook_secret_are_rejected,
    incompatible_pushes_fail_clearly_and_an_index_converts_its_amd64_entry,
);
