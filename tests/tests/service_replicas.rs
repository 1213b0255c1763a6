//! Three replicas of `streamsnap serve` on their own ports sharing one PostgreSQL store (a
//! private cluster per test, tests/src/postgres.rs), against the real distribution registry
//! (Debian docker-registry 2.8): twenty pushes into an Active repository converted once each,
//! a replica killed (-9) in the middle of a conversion, and a cancel sent to a replica other
//! than the one converting. Verbs go through the `streamsnap` CLI, each to the replica the test
//! names; what the registry holds is checked with the registry client.
//!
//! Each replica runs with `--operation-lease 3`, so a dead replica's operation is taken over
//! within seconds (the reaper looks every 2 s). Every test has its own cluster, registry,
//! ports and dirs, and stops its processes by PID: they run in parallel with the others.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob};
use streamsnap_e2e::postgres::{DATABASE, PgCluster};
use streamsnap_e2e::service::{
    ServiceHome, ServiceProcess, WebhookRelay, digest_field as digest_of, encode_segment as encode,
    op_state as state, push_image, small_spec,
};
use streamsnap_e2e::targen::XorShift;
use streamsnap_e2e::{Registry, TarGen, http, require_root_tools, workspace_bin};
use streamsnap_format::oci::ImageIndex;
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository};

const TOOLS: &[&str] = &["docker-registry"];
const REPLICAS: usize = 3;
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);
/// `serve --operation-lease`: the shortest the flag takes.
const LEASE: &str = "3";

/// Three replicas, the registry and the database. Fields drop in this order: the services
/// (SIGKILL by PID), the relays, the registry, then the database they used.
struct Replicas {
    services: Vec<Option<ServiceProcess>>,
    homes: Vec<ServiceHome>,
    relays: Vec<WebhookRelay>,
    registry: Registry,
    _postgres: PgCluster,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Replicas {
    /// Starts the database, the registry and `REPLICAS` services at once (they apply the
    /// schema migrations together). With `notify`, the registry notifies every replica, each
    /// through a relay that records the deliveries (see `twenty_pushes_...` for why every
    /// replica); without, the registry sends no notifications.
    fn start(notify: bool, extra: &[&str]) -> anyhow::Result<Self> {
        require_root_tools(TOOLS)?;
        let postgres = PgCluster::start()?;
        let mut first = ServiceHome::new()?;
        first.use_postgres(postgres.url(DATABASE), postgres.password_file());
        let mut homes = vec![first];
        for _ in 1..REPLICAS {
            homes.push(homes[0].replica()?);
        }
        let relays = if notify {
            homes
                .iter()
                .map(|home| WebhookRelay::start(&home.addr(), Box::new(|_: &Value| false)))
                .collect::<anyhow::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let urls: Vec<String> = relays.iter().map(WebhookRelay::url).collect();
        let registry = if notify {
            Registry::start_with_config_extra(&homes[0].notifications_yaml_for_all(&urls))?
        } else {
            Registry::start()?
        };
        let mut flags = vec!["-v", "--operation-lease", LEASE];
        flags.extend(extra);
        let addr = registry.addr();
        let started: Vec<anyhow::Result<ServiceProcess>> = std::thread::scope(|scope| {
            let starts: Vec<_> = homes
                .iter()
                .map(|home| scope.spawn(|| home.start(&addr, &flags)))
                .collect();
            starts
                .into_iter()
                .map(|s| s.join().expect("a start thread panicked"))
                .collect()
        });
        let services = started
            .into_iter()
            .map(|s| s.map(Some))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            services,
            homes,
            relays,
            registry,
            _postgres: postgres,
            client: Client::new(ClientConfig::default())?,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        })
    }

    fn repo(&self, name: &str) -> Repository {
        Reference::parse(&format!("{}/{name}:x", self.registry.addr()))
            .unwrap()
            .repository
    }

    fn push(&self, repo: &str, tag: &str, spec: &ImageSpec) -> anyhow::Result<Digest> {
        self.rt
            .block_on(push_image(&self.client, &self.repo(repo), tag, spec))
    }

    /// `streamsnap artifact-streaming --server <replica i> --token-file FILE ARGS... --output
    /// json`
    fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        let bin = workspace_bin("streamsnap")?;
        Command::new(&bin)
            .arg("artifact-streaming")
            .args(["--server", &self.homes[i].url()])
            .arg("--token-file")
            .arg(self.homes[i].token_file())
            .args(args)
            .args(["--output", "json"])
            .env_remove("STREAMSNAP_SERVER")
            .env_remove("STREAMSNAP_TOKEN")
            .output()
            .with_context(|| format!("running {}", bin.display()))
    }

    fn cli_json(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        let output = self.cli(i, args)?;
        ensure!(
            output.status.success(),
            "streamsnap {args:?} on replica {i} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "stdout is not JSON: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// `GET` an API path of replica `i` with the token, as JSON.
    fn api(&self, i: usize, path: &str) -> anyhow::Result<Value> {
        let auth = format!("Bearer {}", self.homes[i].token);
        let response = http::get(&self.homes[i].addr(), path, &[("Authorization", &auth)])?;
        ensure!(
            response.status == 200,
            "GET {path} on replica {i}: {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
        Ok(serde_json::from_slice(&response.body)?)
    }

    fn operations(&self, i: usize, repo: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.api(i, &format!("/v1/repositories/{}/operations", encode(repo)))?;
        Ok(list["operations"].as_array().cloned().unwrap_or_default())
    }

    fn operation(&self, i: usize, repo: &str, id: &str) -> anyhow::Result<Value> {
        self.api(
            i,
            &format!("/v1/repositories/{}/operations/{id}", encode(repo)),
        )
    }

    /// Polls operation `id` on replica `i` until `done` holds for it.
    fn wait_op(
        &self,
        i: usize,
        repo: &str,
        id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let op = self.operation(i, repo, id)?;
            if done(&op) {
                return Ok(op);
            }
            if Instant::now() > deadline {
                bail!("operation {id} never got {what}: {op:#}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// The replica whose process runs operation `op` (its `worker` is `HOST-PID-RANDOM`).
    fn replica_running(&self, op: &Value) -> anyhow::Result<usize> {
        let worker = op["worker"]
            .as_str()
            .context("the operation has no worker")?;
        let pid: u32 = worker
            .rsplit('-')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no PID in the worker {worker:?}"))?;
        self.services
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.pid() == pid))
            .with_context(|| format!("no running replica has PID {pid} ({worker})"))
    }

    /// Creates a conversion of `image` that takes seconds (zstd level 19, 256 KiB chunks)
    /// through replica `via`, and returns its ID once it is Running with some progress.
    fn start_slow_conversion(&self, via: usize, image: &str) -> anyhow::Result<(String, Value)> {
        let op = self.cli_json(
            via,
            &[
                "create",
                "--image",
                image,
                "--no-wait",
                "--compression-level",
                "19",
                "--chunk-size",
                "262144",
            ],
        )?;
        let id = op["id"].as_str().context("no id")?.to_owned();
        let repo = image.split(':').next().unwrap();
        let op = self.wait_op(via, repo, &id, "Running with progress", |op| {
            state(op) == "Running" && op["progress"]["done"].as_u64() > Some(0)
        })?;
        Ok((id, op))
    }

    /// Checks that nothing but `expected` refers to `digest`: the referrers as the nodes read
    /// them, and the fallback tag `sha256-<hex>` itself (absent when nothing is expected).
    fn only_referrer(
        &self,
        repo: &str,
        digest: &Digest,
        expected: Option<&Digest>,
    ) -> anyhow::Result<()> {
        let referrers = self
            .rt
            .block_on(self.client.referrers(&self.repo(repo), digest, None))?
            .manifests;
        let listed: Vec<Digest> = referrers.iter().map(|d| d.digest).collect();
        ensure!(
            listed == expected.into_iter().copied().collect::<Vec<_>>(),
            "referrers of {digest}: {listed:?}, expected {expected:?}"
        );
        ensure!(
            referrers
                .iter()
                .all(|d| d.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE)),
            "{referrers:?}"
        );
        let fallback = format!("sha256-{}", digest.hex());
        let tag = self
            .rt
            .block_on(self.client.head_manifest(&self.repo(repo), &fallback))?;
        match (expected, tag) {
            (None, None) => {}
            (Some(_), Some(_)) => {
                let index = self
                    .rt
                    .block_on(self.client.get_manifest(&self.repo(repo), &fallback))?;
                let index: ImageIndex = serde_json::from_slice(&index.bytes)?;
                let listed: Vec<Digest> = index.manifests.iter().map(|d| d.digest).collect();
                ensure!(
                    listed == expected.into_iter().copied().collect::<Vec<_>>(),
                    "the fallback tag {fallback} lists {listed:?}"
                );
            }
            (None, Some(_)) => bail!("the fallback tag {fallback} exists"),
            (Some(_), None) => bail!("the fallback tag {fallback} is missing"),
        }
        Ok(())
    }
}

/// An image whose conversion at zstd level 19 takes seconds: 128 MB of random lowercase text
/// in an uncompressed layer (about 6 s on 2 idle cores). It must outlast the first heartbeat
/// (progress reaches the shared store once a second) by enough to act on the replica running
/// it: 40 MB once converted in 1.8 s in CI, before a cancel sent right after the first
/// progress arrived.
fn slow_spec(seed: u64) -> ImageSpec {
    let mut rng = XorShift::new(seed);
    let text: Vec<u8> = (0..128 << 20)
        .map(|_| b'a' + (rng.next_u64() % 26) as u8)
        .collect();
    let tar = TarGen::new().file("data.txt", 0o644, &text).finish();
    ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::None)])
}

/// Acceptance of issue 17: 20 images pushed at once into an Active repository, each converted
/// exactly once (one operation, one referrer) by replicas that all hear of every push.
///
/// Which replica hears of a push: a registry sends its notifications to one URL; in front of
/// replicas that is a load balancer (a Kubernetes Service), which gives each delivery to one
/// replica, and a retried delivery (a timeout, a 5xx, a replica that died mid-answer) to
/// whichever replica it picks then, so the same event can reach several replicas, even at the
/// same time. Here the registry has one endpoint per replica instead, so that this worst case
/// of a load balancer happens for every push: all three replicas get each event at about the
/// same moment and must still make one operation of it. Every replica also gets events that a
/// balancer would have sent elsewhere, which a balancer never makes it miss.
#[test]
fn twenty_pushes_into_an_active_repository_are_converted_once_each_by_three_replicas()
-> anyhow::Result<()> {
    let started = Instant::now();
    let replicas = Replicas::start(true, &[])?;
    eprintln!(
        "database, registry and {REPLICAS} replicas up in {:?}",
        started.elapsed()
    );
    // States are shared: set on one replica, seen on another.
    replicas.cli_json(
        1,
        &[
            "update",
            "--repository",
            "team/app",
            "--enable-streaming",
            "true",
        ],
    )?;
    let shown = replicas.cli_json(2, &["show", "--repository", "team/app"])?;
    ensure!(shown["streaming"] == "Active", "{shown:#}");

    let repo = replicas.repo("team/app");
    // Every artifact's config is the empty blob `{}`, missing at first: conversions at once all
    // upload it, which distribution 2.8 may answer a manifest PUT with DIGEST_INVALID for a
    // moment (the client tries again: registry/src/manifest.rs, blob_race).
    let pushing = Instant::now();
    let pushed: Vec<Digest> = replicas.rt.block_on(async {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let client = replicas.client.clone();
                let repo = repo.clone();
                tokio::spawn(async move {
                    push_image(
                        &client,
                        &repo,
                        &format!("v{i}"),
                        &small_spec(&format!("image {i}")),
                    )
                    .await
                })
            })
            .collect();
        let mut digests = Vec::new();
        for task in tasks {
            digests.push(task.await??);
        }
        Ok::<_, anyhow::Error>(digests)
    })?;
    let pushed_set: HashSet<Digest> = pushed.iter().copied().collect();
    ensure!(pushed_set.len() == 20);

    let deadline = Instant::now() + WAIT;
    loop {
        let ops = replicas.operations(0, "team/app")?;
        if ops.len() >= 20 && ops.iter().all(|op| state(op) == "Succeeded") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not 20 Succeeded operations: {:?}",
            ops.iter().map(state).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("20 pushes converted in {:?}", pushing.elapsed());

    // Wait until every replica got every event: the registry delivers one endpoint's events in
    // order, so once each relay forwarded the push of a marker image, each replica had all the
    // pushes before it. Late deliveries cannot make operations after the checks below.
    let marker = replicas.push("marker", "last", &small_spec("marker"))?;
    let deadline = Instant::now() + WAIT;
    for (i, relay) in replicas.relays.iter().enumerate() {
        loop {
            let delivered = relay.envelopes().iter().any(|(_, body)| {
                let envelope: Value = serde_json::from_slice(body).unwrap_or_default();
                envelope["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| {
                        e["action"] == "push"
                            && e["target"]["digest"] == marker.to_string().as_str()
                    })
            });
            if delivered {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "replica {i} never got the marker's push"
            );
            std::thread::sleep(POLL);
        }
    }
    // Each replica got each of the 20 tagged pushes.
    for (i, relay) in replicas.relays.iter().enumerate() {
        let mut heard = HashSet::new();
        for (_, body) in relay.envelopes() {
            let envelope: Value = serde_json::from_slice(&body)?;
            for event in envelope["events"].as_array().into_iter().flatten() {
                if event["action"] == "push"
                    && event["target"]["repository"] == "team/app"
                    && let Ok(digest) = digest_of(&event["target"]["digest"])
                {
                    heard.insert(digest);
                }
            }
        }
        ensure!(
            pushed_set.is_subset(&heard),
            "replica {i} heard of {} of the 20 pushes",
            pushed_set.intersection(&heard).count()
        );
    }

    // One operation per image, the same list from every replica, all Succeeded at the first
    // try; one referrer per image, the operation's artifact.
    let ops = replicas.operations(0, "team/app")?;
    let ids: Vec<&str> = ops.iter().filter_map(|op| op["id"].as_str()).collect();
    for i in 1..REPLICAS {
        let other = replicas.operations(i, "team/app")?;
        let other_ids: Vec<&str> = other.iter().filter_map(|op| op["id"].as_str()).collect();
        ensure!(
            other_ids == ids,
            "replica {i} lists other operations: {other_ids:?} vs {ids:?}"
        );
    }
    let converted: HashSet<Digest> = ops
        .iter()
        .map(|op| digest_of(&op["manifest_digest"]))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        ops.len() == 20 && converted == pushed_set,
        "{} operations for {} distinct manifests",
        ops.len(),
        converted.len()
    );
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for op in &ops {
        ensure!(
            state(op) == "Succeeded" && op["interruptions"] == 0 && op["trigger"] == "push",
            "{op:#}"
        );
        let digest = digest_of(&op["manifest_digest"])?;
        let artifact = digest_of(&op["artifact_digest"])?;
        let referrers = replicas
            .rt
            .block_on(replicas.client.referrers(&repo, &digest, None))?
            .manifests;
        ensure!(
            referrers.len() == 1
                && referrers[0].digest == artifact
                && referrers[0].artifact_type.as_deref() == Some(media::ARTIFACT_TYPE),
            "referrers of {digest}: {referrers:?}"
        );
        *by_worker
            .entry(op["worker"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    eprintln!("operations per replica: {by_worker:?}");
    ensure!(
        by_worker.len() >= 2,
        "one replica converted everything: {by_worker:?}"
    );
    let shown = replicas.cli_json(2, &["show", "--repository", "team/app"])?;
    ensure!(shown["operations"]["Succeeded"] == 20, "{shown:#}");
    ensure!(
        replicas.operations(1, "marker")?.is_empty(),
        "a push into an inactive repository made an operation"
    );
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}

/// Acceptance of issue 17: the replica converting an image is killed with SIGKILL. Its lease
/// expires and another replica takes the operation over: it ends Succeeded there (or Failed
/// with a reason), is never left Running, and the image has one referrer, the operation's (none
/// if it failed): the dead replica's half-done work is visible nowhere.
#[test]
fn a_conversion_whose_replica_is_killed_completes_on_another_and_leaves_no_orphan()
-> anyhow::Result<()> {
    let started = Instant::now();
    let mut replicas = Replicas::start(false, &["--concurrency", "1"])?;
    let digest = replicas.push("slow", "v1", &slow_spec(17))?;
    let (id, op) = replicas.start_slow_conversion(0, "slow:v1")?;
    let victim = replicas.replica_running(&op)?;
    let dead_worker = op["worker"].as_str().unwrap().to_owned();
    let watcher = (victim + 1) % REPLICAS;
    eprintln!("replica {victim} converts {id}: killing it with SIGKILL");
    let killed = Instant::now();
    replicas.services[victim]
        .as_mut()
        .expect("the replica runs")
        .kill9()?;
    replicas.services[victim] = None;

    // Taken over once the lease (3 s) expired: counted as an interruption, queued again or
    // already Running on another replica.
    let op = replicas.wait_op(watcher, "slow", &id, "taken over", |op| {
        op["interruptions"] == 1 || op["worker"] != dead_worker.as_str()
    })?;
    let taken_over = killed.elapsed();
    eprintln!("taken over {taken_over:?} after the kill: {}", state(&op));
    ensure!(
        taken_over < Duration::from_secs(20),
        "the dead replica's lease held {taken_over:?}"
    );
    ensure!(op["interruptions"] == 1, "{op:#}");
    let op = replicas.wait_op(watcher, "slow", &id, "a final state", |op| {
        matches!(state(op), "Succeeded" | "Failed")
    })?;
    eprintln!(
        "{} {:?} after the kill, on {}",
        state(&op),
        killed.elapsed(),
        op["worker"]
    );
    match state(&op) {
        "Succeeded" => {
            let survivor = replicas.replica_running(&op)?;
            ensure!(survivor != victim, "{op:#}");
            let artifact = digest_of(&op["artifact_digest"])?;
            replicas.only_referrer("slow", &digest, Some(&artifact))?;
        }
        _ => {
            let error = op["error"].as_str().unwrap_or_default();
            ensure!(!error.is_empty(), "Failed without a reason: {op:#}");
            replicas.only_referrer("slow", &digest, None)?;
        }
    }
    // The surviving replicas agree; nothing is Running in the repository.
    for i in (0..REPLICAS).filter(|i| *i != victim) {
        let seen = replicas.operation(i, "slow", &id)?;
        ensure!(state(&seen) == state(&op), "replica {i}: {seen:#}");
        let shown = replicas.cli_json(i, &["show", "--repository", "slow"])?;
        ensure!(
            shown["operations"]["Running"] == 0 && shown["operations"]["NotStarted"] == 0,
            "{shown:#}"
        );
    }
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}

/// Acceptance of issue 17: a cancel sent to a replica that is not running the conversion stops
/// it on the replica that is (it sees the cancel at its next heartbeat): Canceled, and no
/// referrer, now or a moment later.
#[test]
fn a_cancel_sent_to_another_replica_stops_the_conversion_and_leaves_no_referrer()
-> anyhow::Result<()> {
    let started = Instant::now();
    let replicas = Replicas::start(false, &["--concurrency", "1"])?;
    let digest = replicas.push("big", "v1", &slow_spec(18))?;
    let (id, op) = replicas.start_slow_conversion(0, "big:v1")?;
    let converting = replicas.replica_running(&op)?;
    let other = (converting + 1) % REPLICAS;
    eprintln!("replica {converting} converts {id}: canceling it through replica {other}");
    let asked = Instant::now();
    let canceled = replicas.cli_json(
        other,
        &["operation", "cancel", "--repository", "big", "--id", &id],
    )?;
    if state(&canceled) != "Canceled" {
        // The replica asked waits 10 s for the conversion to stop; a loaded machine may need
        // more.
        ensure!(
            state(&canceled) == "Running" && canceled["cancel_requested"] == true,
            "{canceled:#}"
        );
        replicas.wait_op(other, "big", &id, "Canceled", |op| state(op) == "Canceled")?;
    }
    eprintln!("canceled {:?} after the call", asked.elapsed());
    // Nothing refers to the image, now or a moment later (no late push); every replica says
    // Canceled; the replica that converted is still serving.
    for _ in 0..2 {
        replicas.only_referrer("big", &digest, None)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    for i in 0..REPLICAS {
        let op = replicas.operation(i, "big", &id)?;
        ensure!(
            state(&op) == "Canceled" && op["cancel_requested"] == false,
            "replica {i}: {op:#}"
        );
    }
    ensure!(
        http::get(&replicas.homes[converting].addr(), "/v1/healthz", &[])?.status == 200,
        "the converting replica stopped serving"
    );
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}
