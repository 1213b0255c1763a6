//! `streamsnap serve` bounds what one operation costs, against the real distribution registry:
//! a conversion past `--operation-timeout` is stopped and ends Failed saying so, a layer over
//! `--max-layer-size` ends Failed naming the flags (refused before download when even its
//! compressed size is over, by the converter when only its uncompressed size is), and an image
//! within the limits converts as before.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob};
use streamsnap_e2e::service::{ServiceHome, ServiceProcess};
use streamsnap_e2e::targen::XorShift;
use streamsnap_e2e::{Registry, TarGen, http, require_root_tools, workspace_bin};
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, ClientConfig, Reference};

const TOOLS: &[&str] = &["docker-registry"];
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// A registry and a service for it started with `flags`.
struct Env {
    home: ServiceHome,
    registry: Registry,
    service: ServiceProcess,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn start(flags: &[&str]) -> anyhow::Result<Self> {
        require_root_tools(TOOLS)?;
        let registry = Registry::start()?;
        let home = ServiceHome::new()?;
        let service = home.start(&registry.addr(), flags)?;
        Ok(Self {
            home,
            registry,
            service,
            client: Client::new(ClientConfig::default())?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Pushes `spec` as `repo:tag` with the registry client.
    fn push(&self, repo: &str, tag: &str, spec: &ImageSpec) -> anyhow::Result<Digest> {
        let repo = Reference::parse(&format!("{}/{repo}:x", self.registry.addr()))?.repository;
        self.rt.block_on(async {
            let mut layers = Vec::new();
            for layer in &spec.layers {
                let blob = layer.compressed()?;
                let descriptor = Descriptor::of(layer.media_type(), &blob);
                self.client
                    .push_blob(&repo, &descriptor.digest, blob.into())
                    .await?;
                layers.push(descriptor);
            }
            let diff_ids: Vec<Digest> = spec.layers.iter().map(LayerBlob::diff_id).collect();
            let config = spec.config_json(&diff_ids);
            let config_descriptor = Descriptor::of(media::OCI_CONFIG, &config);
            self.client
                .push_blob(&repo, &config_descriptor.digest, config.into())
                .await?;
            let manifest = ImageManifest {
                schema_version: 2,
                media_type: Some(media::OCI_MANIFEST.into()),
                artifact_type: None,
                config: config_descriptor,
                layers,
                subject: None,
                annotations: Default::default(),
            };
            let put = self
                .client
                .put_manifest(
                    &repo,
                    tag,
                    media::OCI_MANIFEST,
                    serde_json::to_vec(&manifest)?.into(),
                )
                .await?;
            Ok(put.digest)
        })
    }

    /// `streamsnap artifact-streaming create --image REGISTRY/REPO:TAG --no-wait ARGS`: the
    /// operation's ID.
    fn create(&self, repo: &str, tag: &str, args: &[&str]) -> anyhow::Result<String> {
        let image = format!("{}/{repo}:{tag}", self.registry.addr());
        let output = Command::new(workspace_bin("streamsnap")?)
            .arg("artifact-streaming")
            .args(["--server", &self.home.url()])
            .arg("--token-file")
            .arg(self.home.token_file())
            .args(["create", "--image", &image, "--no-wait", "--output", "json"])
            .args(args)
            .env_remove("STREAMSNAP_SERVER")
            .env_remove("STREAMSNAP_TOKEN")
            .output()?;
        ensure!(
            output.status.success(),
            "create {image} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let op: Value = serde_json::from_slice(&output.stdout)?;
        Ok(op["id"].as_str().context("no operation id")?.to_owned())
    }

    /// Polls the operation until it is Succeeded, Failed or Canceled.
    fn finished(&self, repo: &str, id: &str) -> anyhow::Result<Value> {
        let auth = format!("Bearer {}", self.home.token);
        let path = format!(
            "/v1/repositories/{}/operations/{id}",
            repo.replace('/', "%2F")
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let response = http::get(&self.home.addr(), &path, &[("Authorization", &auth)])?;
            ensure!(response.status == 200, "GET {path}: {}", response.status);
            let op: Value = serde_json::from_slice(&response.body)?;
            if matches!(
                op["state"].as_str(),
                Some("Succeeded" | "Failed" | "Canceled")
            ) {
                return Ok(op);
            }
            if Instant::now() > deadline {
                bail!(
                    "operation {id} did not finish within {WAIT:?}: {op:#}\nservice log:\n{}",
                    self.service.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

fn error_of(op: &Value) -> &str {
    op["error"].as_str().unwrap_or_default()
}

#[test]
fn a_conversion_past_the_time_limit_is_stopped_and_fails_saying_so() -> anyhow::Result<()> {
    let env = Env::start(&["--operation-timeout", "1"])?;
    // 24 MB of random lowercase text at zstd level 19: far more than a second of work.
    let mut rng = XorShift::new(7);
    let text: Vec<u8> = (0..24 << 20)
        .map(|_| b'a' + (rng.next_u64() % 26) as u8)
        .collect();
    let tar = TarGen::new().file("data.txt", 0o644, &text).finish();
    let spec = ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::None)]);
    env.push("slow", "v1", &spec)?;
    let started = Instant::now();
    let id = env.create(
        "slow",
        "v1",
        &["--compression-level", "19", "--chunk-size", "262144"],
    )?;
    let op = env.finished("slow", &id)?;
    ensure!(op["state"] == "Failed", "{op:#}");
    let error = error_of(&op);
    ensure!(
        error.contains("time limit of 1 s") && error.contains("--operation-timeout"),
        "{error}"
    );
    // Stopped at the limit, not after converting everything.
    ensure!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    ensure!(op["artifact_digest"].is_null(), "{op:#}");
    Ok(())
}

#[test]
fn layers_over_the_size_limit_fail_naming_the_flags_and_others_convert() -> anyhow::Result<()> {
    let env = Env::start(&["--max-layer-size", "1000000"])?;

    // 4 MiB of zeros, gzip: a few kilobytes compressed, over the limit once decompressed.
    let zeros = TarGen::new()
        .file("zeros", 0o644, &vec![0u8; 4 << 20])
        .finish();
    env.push(
        "bomb",
        "v1",
        &ImageSpec::linux_amd64(vec![LayerBlob::gzip(zeros)]),
    )?;
    // 2 MB of random bytes, uncompressed: over the limit before anything is downloaded.
    let mut rng = XorShift::new(11);
    let noise: Vec<u8> = (0..2_000_000).map(|_| rng.next_u64() as u8).collect();
    let big = TarGen::new().file("noise", 0o644, &noise).finish();
    env.push(
        "big",
        "v1",
        &ImageSpec::linux_amd64(vec![LayerBlob::new(big, Compression::None)]),
    )?;
    let small = TarGen::new().file("id", 0o644, b"small image").finish();
    env.push(
        "small",
        "v1",
        &ImageSpec::linux_amd64(vec![LayerBlob::gzip(small)]),
    )?;

    for repo in ["bomb", "big"] {
        let id = env.create(repo, "v1", &[])?;
        let op = env.finished(repo, &id)?;
        ensure!(op["state"] == "Failed", "{repo}: {op:#}");
        let error = error_of(&op);
        ensure!(
            error.contains("exceeds the limit of 1000000 bytes")
                && error.contains("--max-layer-size")
                && error.contains("--max-compression-ratio"),
            "{repo}: {error}"
        );
    }
    let id = env.create("small", "v1", &[])?;
    let op = env.finished("small", &id)?;
    ensure!(op["state"] == "Succeeded", "{op:#}");
    Ok(())
}
