//! Binding of a streaming artifact to the image it is used for, end to end against the real
//! registry, containerd (CRI), runc and FUSE, with no signature policy: an artifact whose TOCs
//! claim the image's layer digests but another diff ID, or whose subject is another manifest, is
//! never mounted. The container sees the ORIGINAL files (containerd pulls the layers), and the
//! daemon's metric and log say why (`fallbacks_total{reason="artifact_mismatch"}`).
//!
//! The forged artifacts are made the way someone with push rights would: from a real conversion
//! of an "evil" image whose files differ, relabelled to claim the "good" image's layers, and
//! listed in the good image's referrers (the fallback tag, as distribution 2.8 has no API).
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use bytes::Bytes;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, ImageSpec, LayerBlob, OciLayout, Registry,
    STREAMING_NODE_TOOLS, Snapshotterd, SnapshotterdOptions, TarGen, require_root,
    require_root_tools, run_container_in, skopeo_push, workspace_bin,
};
use streamsnap_format::oci::{ImageIndex, ImageManifest};
use streamsnap_format::{Digest, Toc, encode_toc, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository, fallback_tag};

const FILE: &str = "/app/message";
const ORIGINAL: &str = "original\n";
const EVIL: &str = "evil\n";

fn preflight() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2"]].concat())?;
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    Ok(())
}

fn app_image(message: &str) -> anyhow::Result<ImageSpec> {
    let mut tar = TarGen::new();
    tar.dir("app", 0o755)
        .file("app/message", 0o644, message.as_bytes());
    ImageSpec::busybox(vec![LayerBlob::gzip(tar.finish())])
}

/// Pushes `spec` as `REGISTRY/trust/app:TAG` and converts it; returns the reference.
fn push_and_convert(registry: &Registry, spec: &ImageSpec, tag: &str) -> anyhow::Result<String> {
    let mut layout = OciLayout::new()?;
    layout.write_image(spec, tag)?;
    let reference = format!("{}/trust/app:{tag}", registry.addr());
    skopeo_push(layout.path(), tag, &reference)?;
    let status = Command::new(workspace_bin("streamsnap")?)
        .args(["artifact-streaming", "create", "--image", &reference])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    ensure!(status.success(), "converting {reference} failed");
    Ok(reference)
}

/// A registry client and what it needs to forge referrers.
struct Forger {
    client: Client,
    repo: Repository,
    rt: tokio::runtime::Runtime,
}

impl Forger {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let repo = Reference::parse(&format!("{}/trust/app:x", registry.addr()))?.repository;
        Ok(Self {
            client: Client::new(ClientConfig::default())?,
            repo,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    fn manifest_digest(&self, tag: &str) -> anyhow::Result<Digest> {
        Ok(self
            .rt
            .block_on(self.client.get_manifest(&self.repo, tag))?
            .digest)
    }

    fn manifest(&self, digest: &Digest) -> anyhow::Result<ImageManifest> {
        let fetched = self
            .rt
            .block_on(self.client.get_manifest(&self.repo, &digest.to_string()))?;
        Ok(serde_json::from_slice(&fetched.bytes)?)
    }

    /// The streaming artifact manifest of image manifest `subject` (its only referrer).
    fn artifact_of(&self, subject: &Digest) -> anyhow::Result<(Digest, ImageManifest)> {
        let referrers = self
            .rt
            .block_on(self.client.referrers(&self.repo, subject, None))?;
        let descriptor = referrers
            .manifests
            .iter()
            .find(|d| d.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE))
            .context("no streaming artifact")?;
        Ok((descriptor.digest, self.manifest(&descriptor.digest)?))
    }

    fn blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .rt
            .block_on(self.client.get_blob_bytes(&self.repo, digest, 64 << 20))?
            .to_vec())
    }

    fn push_blob(&self, data: Vec<u8>) -> anyhow::Result<Digest> {
        let digest = Digest::sha256(&data);
        self.rt.block_on(
            self.client
                .push_blob(&self.repo, &digest, Bytes::from(data)),
        )?;
        Ok(digest)
    }

    /// Pushes `manifest` by digest; returns its descriptor as a referrers list has it.
    fn push_manifest(
        &self,
        manifest: &ImageManifest,
    ) -> anyhow::Result<streamsnap_format::oci::Descriptor> {
        let bytes = serde_json::to_vec(manifest)?;
        let mut descriptor = streamsnap_format::oci::Descriptor::of(media::OCI_MANIFEST, &bytes);
        descriptor.artifact_type = manifest.artifact_type.clone();
        descriptor.annotations = manifest.annotations.clone();
        self.rt.block_on(self.client.put_manifest(
            &self.repo,
            &descriptor.digest.to_string(),
            media::OCI_MANIFEST,
            Bytes::from(bytes),
        ))?;
        Ok(descriptor)
    }

    /// Makes `subject`'s referrers exactly `descriptor` (the fallback tag's index).
    fn set_referrers(
        &self,
        subject: &Digest,
        descriptor: streamsnap_format::oci::Descriptor,
    ) -> anyhow::Result<()> {
        let mut index = ImageIndex::empty();
        index.manifests.push(descriptor);
        self.rt.block_on(self.client.put_manifest(
            &self.repo,
            &fallback_tag(subject),
            media::OCI_INDEX,
            Bytes::from(serde_json::to_vec(&index)?),
        ))?;
        Ok(())
    }
}

/// Pulls `image` through the CRI path on a fresh node, prints `FILE` in a container, and returns
/// what it printed, the daemon's `artifact_mismatch` fallbacks and its log.
fn start_on_fresh_node(registry: &Registry, image: &str, id: &str) -> anyhow::Result<Node> {
    let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_proxy_snapshotter(SNAPSHOTTER, daemon.socket())
            .with_cri(SNAPSHOTTER)
            .with_plain_http(&registry.addr()),
    )?;
    let socket = containerd.address().to_string_lossy().into_owned();
    let output = Command::new(workspace_bin("streamsnap")?)
        .args(["pull", "--containerd-socket", &socket, image])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "streamsnap pull failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.log_tail(40)
    );
    let printed = run_container_in(
        &containerd,
        CRI_NAMESPACE,
        SNAPSHOTTER,
        image,
        &format!("trust-{id}-{}", std::process::id()),
        &["cat", FILE],
    )?;
    let metrics = String::from_utf8(daemon.get("/metrics")?)?;
    let log = std::fs::read_to_string(daemon.log_path())?;
    Ok(Node {
        printed,
        mismatches: metric(
            &metrics,
            "streamsnap_snapshotter_fallbacks_total",
            &["reason=\"artifact_mismatch\""],
        ),
        remote_mounts: metric(&metrics, "streamsnap_snapshotter_remote_mounts_total", &[]),
        log,
    })
}

#[derive(Debug)]
struct Node {
    printed: String,
    mismatches: f64,
    remote_mounts: f64,
    log: String,
}

impl Node {
    fn ensure_fell_back(&self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.printed == ORIGINAL,
            "{what}: the container read {:?}, not the image's own file",
            self.printed
        );
        ensure!(
            self.mismatches >= 1.0,
            "{what}: no artifact_mismatch fallback counted; log:\n{}",
            self.log
        );
        // The busybox layer's TOC in the forged artifact is the genuine one and may be mounted
        // before the app layer's is found out; the app layer never is.
        ensure!(
            self.remote_mounts < 2.0,
            "{what}: {} layers were mounted from the forged artifact",
            self.remote_mounts
        );
        ensure!(
            self.log.contains("does not match the image"),
            "{what}: the log does not say why; log:\n{}",
            self.log
        );
        Ok(())
    }
}

/// The good and the evil image, both converted, in one repository.
struct Images {
    registry: Registry,
    forger: Forger,
    good: String,
    good_manifest: Digest,
    evil_manifest: Digest,
}

fn images() -> anyhow::Result<Images> {
    let registry = Registry::start()?;
    let good = push_and_convert(&registry, &app_image(ORIGINAL)?, "good")?;
    push_and_convert(&registry, &app_image(EVIL)?, "evil")?;
    let forger = Forger::new(&registry)?;
    let good_manifest = forger.manifest_digest("good")?;
    let evil_manifest = forger.manifest_digest("evil")?;
    Ok(Images {
        registry,
        forger,
        good,
        good_manifest,
        evil_manifest,
    })
}

#[test]
fn a_toc_claiming_another_diff_id_is_never_mounted() -> anyhow::Result<()> {
    preflight()?;
    let images = images()?;
    let f = &images.forger;
    let good_image = f.manifest(&images.good_manifest)?;
    let good_app = good_image.layers.last().context("no layers")?.digest;
    let (_, evil_artifact) = f.artifact_of(&images.evil_manifest)?;
    let (_, mut forged) = f.artifact_of(&images.good_manifest)?;
    // The evil app layer's TOC and data, relabelled as the good app layer: the TOC keeps the
    // evil layer's diff ID (nobody can make the files hash to the good one).
    let [.., evil_toc, evil_data] = evil_artifact.layers.as_slice() else {
        anyhow::bail!("the evil artifact has no layers");
    };
    let mut raw = Toc::decode(&f.blob(&evil_toc.digest)?)?.into_raw();
    raw.layer_digest = good_app.to_string();
    let toc_blob = encode_toc(&raw);
    let toc_size = toc_blob.len() as u64;
    let toc_digest = f.push_blob(toc_blob)?;
    let n = forged.layers.len();
    let good_diff_id = forged.layers[n - 2]
        .annotations
        .get(media::ANNOTATION_LAYER_DIFF_ID)
        .cloned()
        .context("no diff ID annotation")?;
    let mut toc_descriptor = evil_toc.clone();
    toc_descriptor.digest = toc_digest;
    toc_descriptor.size = toc_size;
    // The manifest's own claims are the good layer's: only the TOC gives it away.
    toc_descriptor
        .annotations
        .insert(media::ANNOTATION_LAYER_DIGEST.into(), good_app.to_string());
    toc_descriptor
        .annotations
        .insert(media::ANNOTATION_LAYER_DIFF_ID.into(), good_diff_id);
    forged.layers[n - 2] = toc_descriptor;
    forged.layers[n - 1] = evil_data.clone();
    let descriptor = f.push_manifest(&forged)?;
    f.set_referrers(&images.good_manifest, descriptor)?;

    let node = start_on_fresh_node(&images.registry, &images.good, "diffid")?;
    node.ensure_fell_back("a TOC with another diff ID")
}

#[test]
fn an_artifact_of_another_manifest_is_never_mounted() -> anyhow::Result<()> {
    preflight()?;
    let images = images()?;
    let f = &images.forger;
    // The evil image's real, untouched artifact, listed as a referrer of the good image.
    let (_, evil_artifact) = f.artifact_of(&images.evil_manifest)?;
    let descriptor = f.push_manifest(&evil_artifact)?;
    f.set_referrers(&images.good_manifest, descriptor)?;

    let node = start_on_fresh_node(&images.registry, &images.good, "subject")?;
    node.ensure_fell_back("an artifact whose subject is another manifest")
}

#[test]
fn the_untouched_artifact_streams() -> anyhow::Result<()> {
    preflight()?;
    let images = images()?;
    let node = start_on_fresh_node(&images.registry, &images.good, "control")?;
    ensure!(node.printed == ORIGINAL, "read {:?}", node.printed);
    ensure!(
        node.remote_mounts >= 2.0 && node.mismatches == 0.0,
        "the genuine artifact was not used: {node:?}"
    );
    Ok(())
}
