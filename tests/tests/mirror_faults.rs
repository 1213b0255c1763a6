//! A failing mirror (issue 16, "Mirror failure"): a mirror that stalls, refuses connections or
//! serves wrong bytes costs a lazy start at most one timeout (`[fetch] timeout_seconds`) before
//! the node reads from the origin, and never wrong data.
//!
//! Each test has its own origin registry (`docker-registry`) with a converted image (busybox
//! and one layer of small incompressible files), a counting proxy in front of the origin (the
//! image's registry for the node) and a second one in front of the same origin, configured as
//! its mirror, which injects the fault; and its own node (`streamsnap-snapshotterd`, with
//! `timeout_seconds` set to [`TIMEOUT`], and containerd). A first container reads half of the
//! files (busybox's own blob is read too: both layers are lazy), a second one the other half:
//! the right bytes each time, the first start within one timeout and a margin, and the second
//! (new chunks, read after the mirror failed) without waiting for the mirror again.
//!
//! The binaries must be built first:
//! `cargo build -p streamsnap-snapshotter -p streamsnap-holder -p streamsnap-cli --bins`.

use std::fs;
use std::time::{Duration, Instant};

use streamsnap_e2e::mirror_node::MirrorNode;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::streaming_node::push_converted;
use streamsnap_e2e::targen::pseudo_random_bytes;
use streamsnap_e2e::{
    CountingProxy, Fault, Registry, STREAMING_NODE_TOOLS, TarGen, require_root, require_root_tools,
    rpull, run_container,
};
use streamsnap_format::Digest;

/// `[fetch] timeout_seconds` of the node: how long a request may wait for an answer.
const TIMEOUT: Duration = Duration::from_secs(3);
/// What a container start costs here besides its reads (runc, the shim, `ctr`), with room
/// for a loaded machine.
const MARGIN: Duration = Duration::from_secs(4);
/// Files in the layer, each read by one of the two containers.
const FILES: usize = 6;
const FILE_SIZE: usize = 256 << 10;

struct Origin {
    registry: Registry,
    image_path: String,
    /// (path, sha256 hex) of the files.
    files: Vec<(String, String)>,
}

/// The origin registry with a converted image: busybox and one layer of [`FILES`]
/// incompressible files (every chunk read is a response body of more than 8 KiB, which the
/// proxy's corruption needs).
fn origin(seed: u64) -> anyhow::Result<Origin> {
    let registry = Registry::start()?;
    let mut tar = TarGen::new();
    tar.dir("data", 0o755);
    let mut files = Vec::new();
    for i in 0..FILES {
        let content = pseudo_random_bytes(seed + i as u64, FILE_SIZE);
        let path = format!("data/file{i}.bin");
        tar.file(&path, 0o644, &content);
        files.push((format!("/{path}"), Digest::sha256(&content).hex()));
    }
    let image_path = "faults/app:v1".to_owned();
    push_converted(&registry, &image_path, tar.finish(), &[])?;
    Ok(Origin {
        registry,
        image_path,
        files,
    })
}

/// What one container start cost.
struct Start {
    took: Duration,
    from_origin: u64,
    from_mirror: u64,
}

/// A container reading `files` (`sha256sum`), timed; checks every digest.
fn read_files(rig: &Rig, id: &str, files: &[(String, String)]) -> anyhow::Result<Start> {
    let script = streamsnap_e2e::sha256_check(files);
    let (o0, m0) = (
        rig.to_origin.downstream_bytes(),
        rig.mirror.downstream_bytes(),
    );
    let started = Instant::now();
    run_container(
        &rig.node.containerd,
        &rig.image,
        "streamsnap",
        id,
        &["sh", "-c", &script],
    )?;
    let took = started.elapsed();
    Ok(Start {
        took,
        from_origin: rig.to_origin.downstream_bytes() - o0,
        from_mirror: rig.mirror.downstream_bytes() - m0,
    })
}

struct Rig {
    // Field order is drop order: the node before the proxies and the registry it reads.
    node: MirrorNode,
    mirror: CountingProxy,
    to_origin: CountingProxy,
    origin: Origin,
    image: String,
}

impl Rig {
    fn metrics(&self) -> String {
        self.node.metrics().unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.node.daemon.log_path()).unwrap_or_default()
    }
}

/// An origin, its mirror with `fault` set up by `set`, a node, and the image pulled lazily.
fn rig(seed: u64, set: impl FnOnce(&CountingProxy)) -> Rig {
    require_root().unwrap();
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2"]].concat()).unwrap();
    let origin = origin(seed).unwrap();
    let to_origin = CountingProxy::start(&origin.registry.addr()).unwrap();
    let mirror = CountingProxy::start(&origin.registry.addr()).unwrap();
    set(&mirror);
    let node = MirrorNode::start(
        &to_origin.addr(),
        Some(&mirror.addr()),
        Some(TIMEOUT.as_secs()),
    )
    .unwrap();
    let image = format!("{}/{}", to_origin.addr(), origin.image_path);
    rpull(&node.containerd, &image, "streamsnap", true).unwrap();
    Rig {
        node,
        mirror,
        to_origin,
        origin,
        image,
    }
}

/// The two starts: the first half of the files, then the other half.
fn two_starts(rig: &Rig, name: &str) -> (Start, Start) {
    let (a, b) = rig.origin.files.split_at(FILES / 2);
    let first = read_files(rig, &format!("{name}-1"), a).unwrap();
    let second = read_files(rig, &format!("{name}-2"), b).unwrap();
    for (which, start) in [("first", &first), ("second", &second)] {
        eprintln!(
            "{name}: {which} start took {:?}, {} bytes from the origin, {} from the mirror",
            start.took, start.from_origin, start.from_mirror
        );
    }
    (first, second)
}

#[test]
fn a_stalled_mirror_costs_one_timeout_then_nothing() {
    let rig = rig(4100, |mirror| mirror.set_blackhole(true));
    let (first, second) = two_starts(&rig, "stall");
    assert!(
        rig.mirror.connections() >= 1,
        "nothing went to the mirror: the test did not meet what it is about"
    );
    assert!(
        first.took >= TIMEOUT - Duration::from_millis(500),
        "the first start did not wait for the stalled mirror ({:?}): did it go there?",
        first.took
    );
    assert!(
        first.took < TIMEOUT + MARGIN,
        "the first start took {:?}: more than one timeout ({TIMEOUT:?}) and {MARGIN:?}",
        first.took
    );
    assert!(
        second.took < TIMEOUT,
        "the second start took {:?}: it waited for the mirror again",
        second.took
    );
    assert_eq!(first.from_mirror + second.from_mirror, 0);
    let log = rig.log();
    assert!(log.contains("mirror failed"), "no mirror failure logged");
    assert_mirror_counted_down(&rig);
}

/// The mirror's failure is in the metrics: found down at least once, and down now (it still
/// stalls or refuses; a background HEAD cannot have found it back).
fn assert_mirror_counted_down(rig: &Rig) {
    let metrics = rig.metrics();
    let label = format!("mirror=\"{}\"", rig.mirror.addr());
    let failures = metric(
        &metrics,
        "streamsnap_snapshotter_mirror_failures_total",
        &[&label],
    );
    assert!(failures >= 1.0, "no mirror failure counted:\n{metrics}");
    let down = metric(&metrics, "streamsnap_snapshotter_mirror_down", &[&label]);
    assert_eq!(down, 1.0, "the mirror is not shown down:\n{metrics}");
}

#[test]
fn a_refusing_mirror_costs_nothing() {
    let rig = rig(4200, |mirror| mirror.set_refuse(true));
    let (first, second) = two_starts(&rig, "refuse");
    assert!(
        rig.mirror.connections() >= 1,
        "nothing went to the mirror: the test did not meet what it is about"
    );
    for start in [&first, &second] {
        assert!(
            start.took < TIMEOUT,
            "a start took {:?}: it waited for a mirror that refuses",
            start.took
        );
    }
    assert!(
        rig.log().contains("mirror failed"),
        "no mirror failure logged"
    );
    assert_mirror_counted_down(&rig);
}

#[test]
fn wrong_bytes_from_the_mirror_are_read_again_from_the_origin() {
    let rig = rig(4300, |mirror| mirror.set_fault(Some(Fault::Corrupt), 1));
    let (first, second) = two_starts(&rig, "corrupt");
    assert!(
        rig.mirror.faults_injected() >= 1,
        "the mirror corrupted nothing: the test did not meet what it is about"
    );
    let metrics = rig.metrics();
    let failures = metric(
        &metrics,
        "streamsnap_cache_verify_failures_total",
        &["where=\"fetched\""],
    );
    let corrupt_reads = metric(
        &metrics,
        "streamsnap_cache_fetch_failures_total",
        &["reason=\"corrupt\""],
    );
    eprintln!(
        "corrupt: {} faults injected, {failures} verification failures, {corrupt_reads} reads \
         failed as corrupt",
        rig.mirror.faults_injected()
    );
    assert!(
        failures >= 1.0,
        "no verification failure counted:\n{metrics}"
    );
    assert_eq!(corrupt_reads, 0.0, "a read failed for the mirror's bytes");
    let log = rig.log();
    assert!(
        log.contains("failed verification"),
        "no verification failure logged"
    );
    for start in [&first, &second] {
        assert!(
            start.took < TIMEOUT + MARGIN,
            "a start took {:?}",
            start.took
        );
    }
}
