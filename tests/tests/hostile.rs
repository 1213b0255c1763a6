//! Hostile streaming artifacts against the real daemon, end to end (docker-registry, containerd
//! with its CRI image service, runc, FUSE): whatever a registry serves, the daemon's peak RSS
//! grows by a bounded amount, each hostile input gets a clear refusal or a bounded read, and the
//! daemon keeps serving a good image throughout.
//!
//! The hostile artifacts are made the way someone with push rights to a repository would: an
//! image is converted normally, then the artifact's TOC and data blob for its app layer are
//! replaced by hand-made ones that claim the same layer, and the image's referrers (the fallback
//! tag: distribution 2.8 has no referrers API) list only the forged artifact.
//!
//! - a TOC of 4 million empty entries, 1-2 KB compressed (800 MB once decoded all at once);
//! - a data blob of 48 frames of a few hundred bytes that each inflate to 16 MiB, with a file of
//!   48 bytes from 48 chunks, a file of 100,000 one-byte extents cycling over them, and a 768 MiB
//!   file read sequentially (read-ahead);
//! - the same layer with a start-up profile listing every chunk (prefetch).
//!
//! Each case's growth is the daemon's `VmHWM` after it minus its `VmRSS` before it, the peak
//! being reset to the current RSS first (`/proc/PID/clear_refs`, 5).
//!
//! The workspace binaries must be built first: `cargo build --workspace --bins`. To check this
//! test against another build of the daemon, name its binary in
//! `STREAMSNAP_E2E_HOSTILE_DAEMON`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::forge::Forger;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::targen::pseudo_random_bytes;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, ImageSpec, LayerBlob, OciLayout, Registry,
    STREAMING_NODE_TOOLS, Snapshotterd, SnapshotterdOptions, TarGen, require_root,
    require_root_tools, run_container_in, skopeo_push, workspace_bin,
};
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_format::{
    Digest, DigestHasher, FORMAT_VERSION, LayerProfile, Profile, Toc, compress_chunk, encode_toc,
    media,
};

/// The most one hostile input may add to the daemon's peak RSS.
const BOUND: u64 = 64 << 20;
const FRAMES: u32 = 48;
const FRAME_SIZE: u32 = 16 << 20;
/// One-byte extents of `hostile/many`.
const MANY: u32 = 100_000;
/// What the container reads of `hostile/big` (16 of its 48 chunks).
const BIG_READ: u64 = 16 * FRAME_SIZE as u64;
const GOOD_FILES: usize = 2;
const GOOD_FILE_SIZE: usize = 3 << 20;
const DAEMON_ENV: &str = "STREAMSNAP_E2E_HOSTILE_DAEMON";

#[test]
fn hostile_artifacts_cost_the_daemon_bounded_memory_and_it_keeps_serving() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2"]].concat())?;
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let registry = Registry::start()?;
    let forger = Forger::new(&registry.addr(), "hostile/app")?;

    let (good, good_files) = push_good_image(&registry)?;
    let toc_bomb = push_and_convert(&registry, "toc-bomb", "toc bomb\n")?;
    forger.forge_app_layer(&toc_bomb, |_| {
        Ok((
            zstd::bulk::compress(&[0x42u8, 0x00].repeat(4_000_000), 19)?,
            None,
        ))
    })?;
    let frame_bomb = push_and_convert(&registry, "frame-bomb", "frame bomb\n")?;
    forger.forge_app_layer(&frame_bomb, |toc| frame_bomb_layer(0, toc))?;
    let profiled = push_and_convert(&registry, "profiled", "profiled frame bomb\n")?;
    let forged = forger.forge_app_layer(&profiled, |toc| frame_bomb_layer(1, toc))?;
    forger.add_profile(&profiled, forged, (0..FRAMES).collect())?;

    let other = std::env::var_os(DAEMON_ENV);
    let mut options = SnapshotterdOptions::default().with_metrics();
    if other.is_some() {
        // Another build may not speak this build's holder protocol.
        options.extra_config = "[fuse]\nholder = false\n".into();
    }
    let mut daemon = Snapshotterd::start(options)?;
    if let Some(binary) = other {
        daemon.terminate(Duration::from_secs(10))?;
        daemon.set_binary(&PathBuf::from(binary));
        daemon.restart()?;
    }
    let pid = daemon.pid();
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_proxy_snapshotter(SNAPSHOTTER, daemon.socket())
            .with_cri(SNAPSHOTTER)
            .with_plain_http(&registry.addr()),
    )?;
    let node = Node {
        daemon: &daemon,
        containerd: &containerd,
    };
    let result = run_cases(&node, &good, &good_files, &toc_bomb, &frame_bomb, &profiled);
    if result.is_err() {
        eprintln!("--- daemon log ---\n{}", daemon.log_tail(60));
    }
    let Outcome { growths, problems } = result?;
    for (case, growth) in &growths {
        eprintln!("{case}: daemon VmHWM +{} MiB", growth >> 20);
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(
        daemon.pid() == pid && daemon.is_running(),
        "the daemon did not survive"
    );
    let over: Vec<_> = growths.iter().filter(|(_, g)| *g >= BOUND).collect();
    ensure!(
        over.is_empty(),
        "the daemon's peak RSS grew by more than {} MiB: {over:?}",
        BOUND >> 20
    );
    Ok(())
}

fn run_cases(
    node: &Node,
    good: &str,
    good_files: &[(String, String)],
    toc_bomb: &str,
    frame_bomb: &str,
    profiled: &str,
) -> anyhow::Result<Outcome> {
    // The good image first, lazily, so the daemon is warm and serving.
    node.pull(good)?;
    node.check_digests(good, "good-1", good_files)?;
    ensure!(node.metric("streamsnap_snapshotter_remote_mounts_total", &[])? >= 2.0);
    let mut growths = Vec::new();
    let mut problems = Vec::new();

    // The TOC bomb: refused before it is decoded; containerd pulls the image normally.
    let (_, growth) = node.measure("toc bomb", || {
        node.pull(toc_bomb)?;
        let printed = node.run(toc_bomb, "toc-bomb", &["cat", "/app/message"])?;
        ensure!(printed == "toc bomb\n", "the container read {printed:?}");
        Ok(())
    })?;
    growths.push(("TOC of 4 million entries", growth));
    ensure!(
        node.metric(
            "streamsnap_snapshotter_fallbacks_total",
            &["reason=\"invalid_artifact\""]
        )? >= 1.0,
        "the TOC bomb did not make the layer fall back"
    );
    let log = std::fs::read_to_string(node.daemon.log_path())?;
    if !log.contains("toc: estimated decoded size in memory") {
        problems.push("the log does not say which limit refused the TOC".to_string());
    }

    // The frame bomb, mounted: a read of bytes from 48 chunks, a read over 100,000 extents
    // cycling over them, a sequential read with read-ahead.
    let mounts = node.metric("streamsnap_snapshotter_remote_mounts_total", &[])?;
    node.pull(frame_bomb)?;
    ensure!(
        node.metric("streamsnap_snapshotter_remote_mounts_total", &[])? > mounts,
        "the forged layer was not mounted"
    );
    let (_, growth) = node.measure("48 bytes from 48 chunks", || {
        node.check_digests(frame_bomb, "spread", &[spread_digest(0)])
    })?;
    growths.push(("read of 48 bytes from 48 chunks of 16 MiB", growth));
    let (_, growth) = node.measure("100,000 extents", || {
        node.check_digests(frame_bomb, "many", &[many_digest(0)])
    })?;
    growths.push(("read over 100,000 one-byte extents", growth));
    let (_, growth) = node.measure("sequential read", || {
        let script = format!("head -c {BIG_READ} /hostile/big | sha256sum");
        let printed = node.run(frame_bomb, "big", &["sh", "-c", &script])?;
        let want = big_prefix_digest(0).hex();
        ensure!(printed.starts_with(&want), "sha256sum said {printed:?}");
        Ok(())
    })?;
    growths.push(("sequential read of 256 MiB (read-ahead)", growth));

    // The same layer with a profile listing all 48 chunks: prefetched as it is mounted.
    let (_, growth) = node.measure("profile", || {
        node.pull(profiled)?;
        node.wait_for_prefetch()?;
        node.check_digests(profiled, "profiled", &[spread_digest(1)])
    })?;
    growths.push(("start-up profile of every chunk", growth));

    // And the good image is still served, from the same daemon.
    node.check_digests(good, "good-2", good_files)?;
    Ok(Outcome { growths, problems })
}

/// Each case's growth of the daemon's peak RSS, and what was wrong besides.
struct Outcome {
    growths: Vec<(&'static str, u64)>,
    problems: Vec<String>,
}

/// The daemon and the containerd using it.
struct Node<'a> {
    daemon: &'a Snapshotterd,
    containerd: &'a Containerd,
}

impl Node<'_> {
    /// Pulls `image` through the CRI image service, as the kubelet does.
    fn pull(&self, image: &str) -> anyhow::Result<()> {
        let socket = self.containerd.address().to_string_lossy().into_owned();
        let output = Command::new(workspace_bin("streamsnap")?)
            .args(["pull", "--containerd-socket", &socket, image])
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            output.status.success(),
            "streamsnap pull {image} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn run(&self, image: &str, id: &str, args: &[&str]) -> anyhow::Result<String> {
        let id = format!("hostile-{id}-{}", std::process::id());
        run_container_in(
            self.containerd,
            CRI_NAMESPACE,
            SNAPSHOTTER,
            image,
            &id,
            args,
        )
    }

    /// Checks every digest of `files` (path, hex digest) in a container of `image`.
    fn check_digests(
        &self,
        image: &str,
        id: &str,
        files: &[(String, String)],
    ) -> anyhow::Result<()> {
        let check = streamsnap_e2e::sha256_check(files);
        self.run(image, id, &["sh", "-c", &check])?;
        Ok(())
    }

    fn metric(&self, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
        let text = String::from_utf8(self.daemon.get("/metrics")?)?;
        Ok(metric(&text, name, labels))
    }

    /// Waits until the prefetch has brought in what it will (its bytes stop growing).
    fn wait_for_prefetch(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = -1.0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.metric("streamsnap_snapshotter_prefetch_bytes_total", &[])?;
            if now > 0.0 && now == last {
                return Ok(());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "the prefetch did not settle"
            );
            last = now;
        }
    }

    /// Runs `case`, returning its outcome and how much it raised the daemon's peak RSS.
    fn measure<T>(
        &self,
        what: &str,
        case: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, u64)> {
        let pid = self.daemon.pid();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .context("resetting the daemon's peak RSS")?;
        let before = status_bytes(pid, "VmRSS")?;
        let outcome = case().with_context(|| what.to_owned())?;
        let growth = status_bytes(pid, "VmHWM")?.saturating_sub(before);
        eprintln!("hostile: {what}: daemon VmHWM +{} MiB", growth >> 20);
        Ok((outcome, growth))
    }
}

/// A `kB` field of /proc/PID/status, in bytes.
fn status_bytes(pid: i32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb << 10)
}

/// Busybox and data files, converted: a good image the daemon must keep serving.
fn push_good_image(registry: &Registry) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let mut tar = TarGen::new();
    tar.dir("data", 0o755);
    let mut files = Vec::new();
    for i in 0..GOOD_FILES {
        let data = pseudo_random_bytes(300 + i as u64, GOOD_FILE_SIZE);
        let path = format!("data/f{i}.bin");
        tar.file(&path, 0o644, &data);
        files.push((format!("/{path}"), Digest::sha256(&data).hex()));
    }
    let reference = push_spec(
        registry,
        "good",
        ImageSpec::busybox(vec![LayerBlob::gzip(tar.finish())])?,
    )?;
    Ok((reference, files))
}

/// Busybox and an app layer with one small file, pushed as `REGISTRY/hostile/app:TAG` and
/// converted; returns the reference.
fn push_and_convert(registry: &Registry, tag: &str, message: &str) -> anyhow::Result<String> {
    let mut tar = TarGen::new();
    tar.dir("app", 0o755)
        .file("app/message", 0o644, message.as_bytes());
    push_spec(
        registry,
        tag,
        ImageSpec::busybox(vec![LayerBlob::gzip(tar.finish())])?,
    )
}

fn push_spec(registry: &Registry, tag: &str, spec: ImageSpec) -> anyhow::Result<String> {
    let mut layout = OciLayout::new()?;
    layout.write_image(&spec, tag)?;
    let reference = format!("{}/hostile/app:{tag}", registry.addr());
    skopeo_push(layout.path(), tag, &reference)?;
    streamsnap_e2e::run(Command::new(workspace_bin("streamsnap")?).args([
        "artifact-streaming",
        "create",
        "--image",
        &reference,
    ]))?;
    Ok(reference)
}

/// Chunk `c` of frame bomb `seed`: one byte value, 16 MiB of it (each bomb its own chunks).
fn bomb_chunk(seed: u32, c: u32) -> Vec<u8> {
    vec![bomb_byte(seed, c); FRAME_SIZE as usize]
}

fn bomb_byte(seed: u32, c: u32) -> u8 {
    (seed * FRAMES + c + 1) as u8
}

/// Where byte `i` of `hostile/many` is: a chunk that changes with every byte.
fn many_extent(i: u32) -> (u32, u32) {
    (i % FRAMES, i.wrapping_mul(2_654_435_761) % FRAME_SIZE)
}

fn spread_digest(seed: u32) -> (String, String) {
    let content: Vec<u8> = (0..FRAMES).map(|c| bomb_byte(seed, c)).collect();
    ("/hostile/spread".into(), Digest::sha256(&content).hex())
}

fn many_digest(seed: u32) -> (String, String) {
    let content: Vec<u8> = (0..MANY)
        .map(|i| bomb_byte(seed, many_extent(i).0))
        .collect();
    ("/hostile/many".into(), Digest::sha256(&content).hex())
}

fn big_prefix_digest(seed: u32) -> Digest {
    let mut hasher = DigestHasher::new();
    for c in 0..(BIG_READ / u64::from(FRAME_SIZE)) as u32 {
        hasher.update(&bomb_chunk(seed, c));
    }
    hasher.finish()
}

/// Frame bomb `seed` for the genuine TOC `genuine` (whose claims it copies): its TOC blob and
/// data blob.
fn frame_bomb_layer(seed: u32, genuine: &api::Toc) -> anyhow::Result<(Vec<u8>, Option<Vec<u8>>)> {
    let mut data = Vec::new();
    let mut chunks = Vec::new();
    for c in 0..FRAMES {
        let content = bomb_chunk(seed, c);
        let frame = compress_chunk(&content, 19)?;
        chunks.push(api::Chunk {
            offset: data.len() as u64,
            compressed_size: frame.len() as u32,
            size: FRAME_SIZE,
            sha256: Digest::sha256(&content).as_bytes().to_vec(),
        });
        data.extend_from_slice(&frame);
    }
    ensure!(data.len() < 32 << 10, "the bomb is {} bytes", data.len());
    let extent = |(chunk, offset), length| api::Extent {
        chunk,
        offset,
        length,
    };
    let dir = |path: &str| api::Entry {
        path: path.as_bytes().to_vec(),
        r#type: EntryType::Directory as i32,
        mode: 0o755,
        ..Default::default()
    };
    let file = |path: &str, extents: Vec<api::Extent>| api::Entry {
        path: path.as_bytes().to_vec(),
        r#type: EntryType::Regular as i32,
        mode: 0o644,
        size: extents.iter().map(|e| u64::from(e.length)).sum(),
        extents,
        ..Default::default()
    };
    let raw = api::Toc {
        version: FORMAT_VERSION,
        layer_digest: genuine.layer_digest.clone(),
        diff_id: genuine.diff_id.clone(),
        data_digest: Digest::sha256(&data).to_string(),
        data_size: data.len() as u64,
        max_chunk_size: FRAME_SIZE,
        chunks,
        entries: vec![
            dir(""),
            dir("hostile"),
            file(
                "hostile/spread",
                (0..FRAMES).map(|c| extent((c, c * 1000), 1)).collect(),
            ),
            file(
                "hostile/many",
                (0..MANY).map(|i| extent(many_extent(i), 1)).collect(),
            ),
            file(
                "hostile/big",
                (0..FRAMES).map(|c| extent((c, 0), FRAME_SIZE)).collect(),
            ),
        ],
        ..Default::default()
    };
    Toc::from_raw(raw.clone()).context("the forged TOC must be valid")?;
    Ok((encode_toc(&raw), Some(data)))
}

/// A registry client and what it needs to forge referrers.
/// What these tests forge, on top of the harness's [`Forger`].
trait HostileForger {
    fn forge_app_layer(
        &self,
        image: &str,
        forge: impl FnOnce(&api::Toc) -> anyhow::Result<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> anyhow::Result<Digest>;
    fn add_profile(&self, image: &str, layer: Digest, chunks: Vec<u32>) -> anyhow::Result<()>;
}

impl HostileForger for Forger {
    /// Replaces the TOC (and, if given, the data blob) of `image`'s last layer in its streaming
    /// artifact by what `forge` makes of the genuine TOC, and makes the forged artifact the
    /// image's only referrer. Returns the forged TOC's layer digest claim.
    fn forge_app_layer(
        &self,
        image: &str,
        forge: impl FnOnce(&api::Toc) -> anyhow::Result<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> anyhow::Result<Digest> {
        let subject = self.manifest_digest(tag_of(image)?)?;
        let (_, mut forged) = self.artifact_of(&subject)?;
        let n = forged.layers.len();
        ensure!(n >= 2, "the artifact has no layers");
        let genuine = Toc::decode(&self.blob(&forged.layers[n - 2].digest)?)?;
        let layer = genuine.layer_digest();
        let (toc, data) = forge(genuine.raw())?;
        forged.layers[n - 2].size = toc.len() as u64;
        forged.layers[n - 2].digest = self.push_blob(toc)?;
        if let Some(data) = data {
            forged.layers[n - 1].size = data.len() as u64;
            forged.layers[n - 1].digest = self.push_blob(data)?;
        }
        let descriptor = self.push_manifest(&forged)?;
        self.set_referrers(&subject, vec![descriptor])?;
        Ok(layer)
    }

    /// Adds a start-up profile listing `chunks` of layer `layer` to `image`'s referrers.
    fn add_profile(&self, image: &str, layer: Digest, chunks: Vec<u32>) -> anyhow::Result<()> {
        let subject = self.manifest_digest(tag_of(image)?)?;
        let blob = Profile::new(vec![LayerProfile {
            layer,
            chunks,
            ranks: Vec::new(),
        }])
        .encode()?;
        let layer_descriptor = Descriptor::of(media::PROFILE, &blob);
        self.push_blob(blob)?;
        self.push_blob(media::OCI_EMPTY_CONTENT.to_vec())?;
        let fetched = self
            .rt
            .block_on(self.client.get_manifest(&self.repo, &subject.to_string()))?;
        let mut manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: Some(media::PROFILE_ARTIFACT_TYPE.into()),
            config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
            layers: vec![layer_descriptor],
            subject: Some(Descriptor::new(
                fetched.media_type.clone(),
                subject,
                fetched.bytes.len() as u64,
            )),
            annotations: Default::default(),
        };
        manifest.annotations.insert(
            "org.opencontainers.image.created".into(),
            "2026-01-01T00:00:00Z".into(),
        );
        let descriptor = self.push_manifest(&manifest)?;
        let mut referrers = self
            .rt
            .block_on(self.client.referrers(&self.repo, &subject, None))?
            .manifests;
        referrers.push(descriptor);
        self.set_referrers(&subject, referrers)
    }
}

/// The tag of `REGISTRY/REPO:TAG`.
fn tag_of(image: &str) -> anyhow::Result<&str> {
    image.rsplit(':').next().context("a tag")
}
