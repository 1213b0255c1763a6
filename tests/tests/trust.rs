//! What a node trusts (docs/trust.md), end to end against the real registry, containerd (CRI),
//! runc and FUSE.
//!
//! Binding, always on: an artifact whose TOCs claim the image's layer digests but another diff
//! ID, or whose subject is another manifest, is never mounted. The container sees the ORIGINAL
//! files (containerd pulls the layers), and the daemon's metric and log say why
//! (`fallbacks_total{reason="artifact_mismatch"}`).
//!
//! Signatures, with a `[verify]` key: an artifact whose every claim matches the image but which
//! is unsigned, signed by another key, or changed after signing is not used (ORIGINAL files,
//! `reason="unsigned"`); a signed one streams; an unsigned or tampered start-up profile is
//! ignored. Without a policy the fully forged artifact IS streamed: that is the hole the
//! signature closes, shown so the forgery is known to work.
//!
//! The forged artifacts are made the way someone with push rights would: from a real conversion
//! of an "evil" image whose files differ, relabelled to claim the "good" image's layers, and
//! listed in the good image's referrers (the fallback tag, as distribution 2.8 has no API).
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use streamsnap_e2e::forge::Forger;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, ImageSpec, LayerBlob, OciLayout, Registry,
    STREAMING_NODE_TOOLS, Snapshotterd, SnapshotterdOptions, TarGen, require_root,
    require_root_tools, run_container_in, skopeo_push, workspace_bin,
};
use streamsnap_format::oci::Descriptor;
use streamsnap_format::oci::ImageManifest;
use streamsnap_format::{Digest, LayerProfile, Profile, Toc, encode_toc, media};
use streamsnap_trust::{SIGNATURE_ARTIFACT_TYPE, SigningKey};

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

/// Pushes `spec` as `REGISTRY/trust/app:TAG` and converts it (signed with `sign_key` if
/// given); returns the reference.
fn push_and_convert(
    registry: &Registry,
    spec: &ImageSpec,
    tag: &str,
    sign_key: Option<&Path>,
) -> anyhow::Result<String> {
    let mut layout = OciLayout::new()?;
    layout.write_image(spec, tag)?;
    let reference = format!("{}/trust/app:{tag}", registry.addr());
    skopeo_push(layout.path(), tag, &reference)?;
    let mut args = vec!["artifact-streaming", "create", "--image", &reference];
    let key = sign_key.map(|k| k.to_string_lossy().into_owned());
    if let Some(key) = &key {
        args.extend(["--sign-key", key]);
    }
    streamsnap_ok(&args)?;
    Ok(reference)
}

/// `streamsnap ARGS`, which must succeed.
fn streamsnap_ok(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(workspace_bin("streamsnap")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "`streamsnap {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A P-256 key pair made with openssl, the private key mode 0600 as `--sign-key` wants it.
struct KeyPair {
    _dir: tempfile::TempDir,
    private: std::path::PathBuf,
    public: std::path::PathBuf,
}

impl KeyPair {
    fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let private = dir.path().join("key.pem");
        let public = dir.path().join("key.pub");
        streamsnap_e2e::run(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                ])
                .arg(&private),
        )?;
        streamsnap_e2e::run(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            _dir: dir,
            private,
            public,
        })
    }

    fn signing_key(&self) -> anyhow::Result<SigningKey> {
        Ok(SigningKey::from_pem(&std::fs::read(&self.private)?)?)
    }
}

/// What these tests forge, on top of the harness's [`Forger`].
trait TrustForger {
    fn sign(&self, key: &SigningKey, subject: &Descriptor) -> anyhow::Result<Descriptor>;
    fn copy_signatures(&self, from: &Digest, to: &Descriptor) -> anyhow::Result<()>;
    fn forge_all_claims(&self, good: &Digest, evil: &Digest) -> anyhow::Result<ImageManifest>;
}

impl TrustForger for Forger {
    /// Signs `subject` with `key` and pushes the signature referrer (its descriptor back).
    fn sign(&self, key: &SigningKey, subject: &Descriptor) -> anyhow::Result<Descriptor> {
        let reference = format!("{}/{}", self.repo.registry, self.repo.name);
        let signature = streamsnap_trust::sign(key, &reference, subject)?;
        self.push_blob(signature.payload.clone())?;
        self.push_blob(b"{}".to_vec())?;
        let descriptor = self.push_manifest(&signature.manifest)?;
        let mut referrers = self.referrers(&subject.digest, SIGNATURE_ARTIFACT_TYPE)?;
        referrers.push(descriptor.clone());
        self.set_referrers(&subject.digest, referrers)?;
        Ok(descriptor)
    }

    /// Copies the signature referrers of `from` to `to`, subject rewritten: what someone who
    /// changed a signed manifest would try.
    fn copy_signatures(&self, from: &Digest, to: &Descriptor) -> anyhow::Result<()> {
        let mut copies = Vec::new();
        for signature in self.referrers(from, SIGNATURE_ARTIFACT_TYPE)? {
            let mut manifest = self.manifest(&signature.digest)?;
            manifest.subject = Some(Descriptor::new(to.media_type.clone(), to.digest, to.size));
            copies.push(self.push_manifest(&manifest)?);
        }
        ensure!(!copies.is_empty(), "{from} has no signature to copy");
        self.set_referrers(&to.digest, copies)
    }

    /// An artifact for `good` made of `evil`'s app layer whose every claim (manifest
    /// annotations, TOC layer digest and diff ID) is the good image's: only its files differ.
    fn forge_all_claims(&self, good: &Digest, evil: &Digest) -> anyhow::Result<ImageManifest> {
        let (_, evil_artifact) = self.artifact_of(evil)?;
        let (_, mut forged) = self.artifact_of(good)?;
        let [.., evil_toc, evil_data] = evil_artifact.layers.as_slice() else {
            anyhow::bail!("the evil artifact has no layers");
        };
        let n = forged.layers.len();
        let good_toc = forged.layers[n - 2].clone();
        let good_raw = Toc::decode(&self.blob(&good_toc.digest)?)?.into_raw();
        let mut raw = Toc::decode(&self.blob(&evil_toc.digest)?)?.into_raw();
        raw.layer_digest = good_raw.layer_digest;
        raw.diff_id = good_raw.diff_id;
        let blob = encode_toc(&raw);
        let mut toc = good_toc;
        toc.size = blob.len() as u64;
        toc.digest = self.push_blob(blob)?;
        forged.layers[n - 2] = toc;
        forged.layers[n - 1] = evil_data.clone();
        Ok(forged)
    }
}

/// Pulls `image` through the CRI path on a fresh node (trusting `key` when given), prints `FILE`
/// in a container, and returns what it printed, the daemon's counters and its log.
fn start_on_fresh_node(
    registry: &Registry,
    image: &str,
    id: &str,
    key: Option<&Path>,
) -> anyhow::Result<Node> {
    let mut options = SnapshotterdOptions::default().with_metrics();
    if let Some(key) = key {
        options.extra_config = format!(
            "\n[verify]\npublic_keys = [{:?}]\n",
            key.display().to_string()
        );
    }
    let daemon = Snapshotterd::start(options)?;
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
        unsigned: metric(
            &metrics,
            "streamsnap_snapshotter_fallbacks_total",
            &["reason=\"unsigned\""],
        ),
        prefetch_layers: metric(
            &metrics,
            "streamsnap_snapshotter_prefetch_layers_total",
            &[],
        ),
        remote_mounts: metric(&metrics, "streamsnap_snapshotter_remote_mounts_total", &[]),
        log,
    })
}

struct Node {
    printed: String,
    mismatches: f64,
    unsigned: f64,
    prefetch_layers: f64,
    remote_mounts: f64,
    log: String,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("printed", &self.printed)
            .field("mismatches", &self.mismatches)
            .field("unsigned", &self.unsigned)
            .field("prefetch_layers", &self.prefetch_layers)
            .field("remote_mounts", &self.remote_mounts)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// The image's own file, no layer mounted, an `unsigned` fallback logged with its reason.
    fn ensure_unsigned_fallback(&self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.printed == ORIGINAL,
            "{what}: the container read {:?}, not the image's own file",
            self.printed
        );
        ensure!(
            self.unsigned >= 1.0 && self.remote_mounts == 0.0,
            "{what}: expected an unsigned fallback and no remote mount: {self:?}"
        );
        ensure!(
            self.log.contains("is not signed by a trusted key"),
            "{what}: the log does not say why; log:\n{}",
            self.log
        );
        Ok(())
    }

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

fn images(good_key: Option<&Path>) -> anyhow::Result<Images> {
    let registry = Registry::start()?;
    let good = push_and_convert(&registry, &app_image(ORIGINAL)?, "good", good_key)?;
    push_and_convert(&registry, &app_image(EVIL)?, "evil", None)?;
    let forger = Forger::new(&registry.addr(), "trust/app")?;
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
    let images = images(None)?;
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
    f.set_referrers(&images.good_manifest, vec![descriptor])?;

    let node = start_on_fresh_node(&images.registry, &images.good, "diffid", None)?;
    node.ensure_fell_back("a TOC with another diff ID")
}

#[test]
fn an_artifact_of_another_manifest_is_never_mounted() -> anyhow::Result<()> {
    preflight()?;
    let images = images(None)?;
    let f = &images.forger;
    // The evil image's real, untouched artifact, listed as a referrer of the good image.
    let (_, evil_artifact) = f.artifact_of(&images.evil_manifest)?;
    let descriptor = f.push_manifest(&evil_artifact)?;
    f.set_referrers(&images.good_manifest, vec![descriptor])?;

    let node = start_on_fresh_node(&images.registry, &images.good, "subject", None)?;
    node.ensure_fell_back("an artifact whose subject is another manifest")
}

#[test]
fn the_untouched_artifact_streams() -> anyhow::Result<()> {
    preflight()?;
    let images = images(None)?;
    let node = start_on_fresh_node(&images.registry, &images.good, "control", None)?;
    ensure!(node.printed == ORIGINAL, "read {:?}", node.printed);
    ensure!(
        node.remote_mounts >= 2.0 && node.mismatches == 0.0,
        "the genuine artifact was not used: {node:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Signatures

#[test]
fn without_a_policy_a_forgery_whose_claims_all_match_is_streamed() -> anyhow::Result<()> {
    preflight()?;
    let images = images(None)?;
    let f = &images.forger;
    let forged = f.forge_all_claims(&images.good_manifest, &images.evil_manifest)?;
    let descriptor = f.push_manifest(&forged)?;
    f.set_referrers(&images.good_manifest, vec![descriptor])?;
    let node = start_on_fresh_node(&images.registry, &images.good, "nopolicy", None)?;
    ensure!(
        node.printed == EVIL && node.mismatches == 0.0,
        "the forgery did not work, so the signature tests below prove nothing: {node:?}"
    );
    ensure!(
        node.log.contains("no [verify] policy"),
        "the daemon did not say at start that it trusts whoever can push referrers"
    );
    Ok(())
}

#[test]
fn with_a_policy_only_an_artifact_signed_by_a_trusted_key_streams() -> anyhow::Result<()> {
    preflight()?;
    let trusted = KeyPair::generate()?;
    let other = KeyPair::generate()?;
    let images = images(Some(&trusted.private))?;
    let f = &images.forger;
    let (signed_digest, signed) = f.artifact_of(&images.good_manifest)?;
    let signed_descriptor = f.push_manifest(&signed)?;
    ensure!(
        signed_descriptor.digest == signed_digest,
        "re-pushing changed the artifact"
    );

    // The conversion signed with the trusted key: it streams.
    let node = start_on_fresh_node(
        &images.registry,
        &images.good,
        "signed",
        Some(&trusted.public),
    )?;
    ensure!(node.printed == ORIGINAL, "read {:?}", node.printed);
    ensure!(
        node.remote_mounts >= 2.0 && node.unsigned == 0.0,
        "the signed artifact was not streamed: {node:?}\n{}",
        node.log
    );

    let forged = f.forge_all_claims(&images.good_manifest, &images.evil_manifest)?;
    let forged_descriptor = f.push_manifest(&forged)?;
    // Unsigned.
    f.set_referrers(&images.good_manifest, vec![forged_descriptor.clone()])?;
    start_on_fresh_node(
        &images.registry,
        &images.good,
        "unsigned",
        Some(&trusted.public),
    )?
    .ensure_unsigned_fallback("an unsigned forgery")?;
    // Signed, by a key the node does not trust.
    f.sign(&other.signing_key()?, &forged_descriptor)?;
    start_on_fresh_node(
        &images.registry,
        &images.good,
        "other",
        Some(&trusted.public),
    )?
    .ensure_unsigned_fallback("a forgery signed by another key")?;
    // The signed artifact with its TOC changed after signing, the signature copied over.
    f.copy_signatures(&signed_digest, &forged_descriptor)?;
    start_on_fresh_node(
        &images.registry,
        &images.good,
        "tampered",
        Some(&trusted.public),
    )?
    .ensure_unsigned_fallback("a signed artifact changed after signing")?;
    Ok(())
}

/// Pushes a profile of the good image's app layer (its first chunk) with the CLI, signed with
/// `key` if given.
fn push_profile(images: &Images, key: Option<&Path>) -> anyhow::Result<()> {
    let f = &images.forger;
    let app = f
        .manifest(&images.good_manifest)?
        .layers
        .last()
        .context("no layers")?
        .digest;
    let profile = Profile::new(vec![LayerProfile {
        layer: app,
        chunks: vec![0],
        ranks: vec![0],
    }]);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), profile.encode()?)?;
    let path = file.path().to_string_lossy().into_owned();
    let mut args = vec![
        "artifact-streaming",
        "profile",
        "--image",
        &images.good,
        "--file",
        &path,
    ];
    let key = key.map(|k| k.to_string_lossy().into_owned());
    if let Some(key) = &key {
        args.extend(["--sign-key", key]);
    }
    streamsnap_ok(&args)
}

#[test]
fn with_a_policy_unsigned_and_tampered_profiles_are_ignored() -> anyhow::Result<()> {
    preflight()?;
    let trusted = KeyPair::generate()?;
    let images = images(Some(&trusted.private))?;
    let f = &images.forger;

    push_profile(&images, None)?;
    let node = start_on_fresh_node(
        &images.registry,
        &images.good,
        "p-unsigned",
        Some(&trusted.public),
    )?;
    ensure!(
        node.remote_mounts >= 2.0 && node.prefetch_layers == 0.0,
        "an unsigned profile was followed: {node:?}"
    );
    ensure!(
        node.log.contains("ignoring the image's start-up profile"),
        "the log does not say the profile was ignored:\n{}",
        node.log
    );

    // Signed by the trusted key (the newest profile now): followed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    push_profile(&images, Some(&trusted.private))?;
    let node = start_on_fresh_node(
        &images.registry,
        &images.good,
        "p-signed",
        Some(&trusted.public),
    )?;
    ensure!(
        node.prefetch_layers >= 1.0,
        "the signed profile was not followed: {node:?}\n{}",
        node.log
    );

    // A newer profile with the signed one's signature copied onto it: ignored.
    let signed = f
        .referrers(&images.good_manifest, media::PROFILE_ARTIFACT_TYPE)?
        .into_iter()
        .max_by(|a, b| {
            a.annotations
                .get("org.opencontainers.image.created")
                .cmp(&b.annotations.get("org.opencontainers.image.created"))
        })
        .context("no profile")?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    push_profile(&images, None)?;
    let newest = f
        .referrers(&images.good_manifest, media::PROFILE_ARTIFACT_TYPE)?
        .into_iter()
        .find(|d| {
            d.digest != signed.digest
                && d.annotations.get("org.opencontainers.image.created")
                    > signed.annotations.get("org.opencontainers.image.created")
        })
        .context("the new profile is not listed")?;
    f.copy_signatures(&signed.digest, &newest)?;
    let node = start_on_fresh_node(
        &images.registry,
        &images.good,
        "p-tampered",
        Some(&trusted.public),
    )?;
    ensure!(
        node.remote_mounts >= 2.0 && node.prefetch_layers == 0.0,
        "a profile with a copied signature was followed: {node:?}"
    );
    Ok(())
}
