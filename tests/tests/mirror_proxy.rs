//! Chunk reads through a real pull-through cache (issue 16): the Debian `docker-registry` in
//! proxy mode (`proxy: remoteurl:`) in front of an origin `docker-registry`, configured as the
//! origin's mirror on two nodes (each its own `streamsnap-snapshotterd` and containerd).
//!
//! The proxy answers a range GET of a blob it has not cached with `200` and the whole blob, and
//! fills its storage in the background; once it has the blob it answers `206`. The first node
//! starts a container that reads four small files spread through a 64 MiB layer at once (four
//! concurrent first requests to the cold mirror): the bytes must be right and the node must not
//! download the layer (it reads the chunks from the origin after the mirror's `200`). Once the
//! mirror has stored the blobs and the first node's pass-over of it ended, that node's next read
//! asks the mirror with a HEAD (`Accept-Ranges: bytes` now) and gets a `206`; a second node does
//! the same start as the first and every one of its chunk reads is a `206` from the mirror: the
//! origin serves neither node a blob byte from then on.
//!
//! What each node receives is counted by a counting proxy in front of each registry; what the
//! registries served, by their access logs. The binaries must be built first:
//! `cargo build -p streamsnap-snapshotter -p streamsnap-holder -p streamsnap-cli --bins`.

use std::collections::BTreeSet;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::mirror_node::MirrorNode;
use streamsnap_e2e::registry::AccessLogEntry;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::streaming_node::push_converted;
use streamsnap_e2e::targen::pseudo_random_bytes;
use streamsnap_e2e::{
    CountingProxy, Registry, STREAMING_NODE_TOOLS, TarGen, require_root, require_root_tools,
    run_container,
};
use streamsnap_format::Digest;

/// Filler files nobody reads, each followed by a small file the container reads.
const FILLER: usize = 16 << 20;
const SMALL: usize = 256 << 10;
const PAIRS: usize = 4;
/// More than the daemon passes over a mirror that answered a range with the whole blob, first
/// (2 s) and after one HEAD that found it still filling (4 s: a slow machine's start may
/// probe once before the mirror stored the layer).
const PASS_OVER: Duration = Duration::from_millis(4500);
/// How long the mirror may take to store the blobs it was asked for.
const FILL_TIMEOUT: Duration = Duration::from_secs(30);

struct Origin {
    registry: Registry,
    image_path: String,
    /// (path, sha256 hex) of the small files.
    files: Vec<(String, String)>,
}

/// The origin registry with a converted image: busybox and one layer of
/// `filler0 small0 filler1 small1 ...` (incompressible).
fn origin() -> anyhow::Result<Origin> {
    let registry = Registry::start()?;
    let mut tar = TarGen::new();
    tar.dir("data", 0o755);
    let mut files = Vec::new();
    for i in 0..PAIRS {
        tar.file(
            &format!("data/filler{i}.bin"),
            0o644,
            &pseudo_random_bytes(1600 + i as u64, FILLER),
        );
        let small = pseudo_random_bytes(1700 + i as u64, SMALL);
        let path = format!("data/small{i}.bin");
        tar.file(&path, 0o644, &small);
        files.push((format!("/{path}"), Digest::sha256(&small).hex()));
    }
    let image_path = "mirror/app:v1".to_owned();
    push_converted(&registry, &image_path, tar.finish(), &[])?;
    Ok(Origin {
        registry,
        image_path,
        files,
    })
}

fn blob_gets<'a>(log: &'a [AccessLogEntry], digests: &BTreeSet<String>) -> Vec<&'a AccessLogEntry> {
    log.iter()
        .filter(|e| e.blob_get_digest().is_some_and(|d| digests.contains(d)))
        .collect()
}

/// Waits until the proxy-mode registry has stored `digest` in `repo` (committed and linked:
/// from then on it serves ranges of it itself).
fn wait_stored(mirror: &Registry, repo: &str, digest: &str) -> anyhow::Result<()> {
    let hex = digest.strip_prefix("sha256:").context("a sha256 digest")?;
    let link = mirror.dir().join(format!(
        "storage/docker/registry/v2/repositories/{repo}/_layers/sha256/{hex}/link"
    ));
    let deadline = Instant::now() + FILL_TIMEOUT;
    while !Path::new(&link).exists() {
        ensure!(
            Instant::now() < deadline,
            "the mirror did not store {digest} within {FILL_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn a_cold_pull_through_mirror_costs_no_whole_blob_and_a_warm_one_serves_every_chunk() {
    require_root().unwrap();
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2"]].concat()).unwrap();
    let origin = origin().unwrap();
    let mirror = Registry::start_with_config_extra(&format!(
        "proxy:\n  remoteurl: {}\n",
        origin.registry.url()
    ))
    .unwrap();
    // What each node receives from each registry.
    let to_origin = CountingProxy::start(&origin.registry.addr()).unwrap();
    let to_mirror = CountingProxy::start(&mirror.addr()).unwrap();
    let image = format!("{}/{}", to_origin.addr(), origin.image_path);
    let repo = origin.image_path.split(':').next().unwrap();
    let origin_before = origin.registry.access_log().unwrap().len();

    // The first node, through the cold mirror.
    let first = MirrorNode::start(&to_origin.addr(), Some(&to_mirror.addr()), None).unwrap();
    let (o0, m0) = (to_origin.downstream_bytes(), to_mirror.downstream_bytes());
    first.start_reading(&image, "cold", &origin.files).unwrap();
    let (from_origin, from_mirror) = (
        to_origin.downstream_bytes() - o0,
        to_mirror.downstream_bytes() - m0,
    );
    let mirror_log = mirror.access_log().unwrap();
    // Only chunk reads go to mirrors: every blob it was asked for is a data blob.
    let data_blobs: BTreeSet<String> = mirror_log
        .iter()
        .filter_map(|e| e.blob_get_digest().map(str::to_owned))
        .collect();
    assert!(!data_blobs.is_empty(), "no chunk read went to the mirror");
    let cold = blob_gets(&mirror_log, &data_blobs);
    let statuses: Vec<u16> = cold.iter().map(|e| e.status).collect();
    eprintln!(
        "cold mirror: node received {from_origin} bytes from the origin and {from_mirror} from \
         the mirror; the mirror answered {statuses:?} ({} requests)",
        cold.len()
    );
    assert!(
        statuses.contains(&200),
        "the cold mirror never answered a whole blob: the test did not meet what it is about",
    );
    let layer_bytes = (PAIRS * (FILLER + SMALL)) as u64;
    assert!(
        from_origin + from_mirror < layer_bytes / 2,
        "{}",
        format!(
            "the node downloaded {} bytes for {} bytes of files: it read through whole blobs",
            from_origin + from_mirror,
            PAIRS * SMALL
        ),
    );

    let metrics = first.metrics().unwrap();
    let ignored = metric(
        &metrics,
        "streamsnap_registry_requests_total",
        &["kind=\"range\"", "outcome=\"range_ignored\""],
    );
    assert!(ignored >= 1.0, "no range_ignored counted:\n{metrics}");

    // The mirror fills itself in the background: each data blob once from the origin.
    for digest in &data_blobs {
        wait_stored(&mirror, repo, digest).unwrap();
    }
    let origin_log = origin.registry.access_log().unwrap();
    let origin_gets = blob_gets(&origin_log[origin_before..], &data_blobs);
    eprintln!(
        "origin data-blob GETs so far: {:?}",
        origin_gets
            .iter()
            .map(|e| (e.status, e.bytes))
            .collect::<Vec<_>>()
    );
    // The streams the node hung up on cost the origin a few MB each (what the proxy had
    // buffered); only the mirror's own copy is a whole download of the large layer.
    let whole = origin_gets
        .iter()
        .filter(|e| e.bytes > layer_bytes / 2)
        .count();
    assert_eq!(whole, 1, "{origin_gets:?}");

    // The first node passed the mirror over for this layer (2 s at first). After that, its
    // next read asks the mirror with a HEAD, which now says `Accept-Ranges: bytes`, and gets a
    // 206 from it. Reads that start before the first 206 is recorded (kernel readahead) each
    // ask: a HEAD per read at most, the first request a HEAD. The mirror logs a request when it
    // completes, so one read's HEAD may follow another read's GET.
    thread::sleep(PASS_OVER);
    let origin_mark = origin_log.len();
    let mirror_mark = mirror.access_log().unwrap().len();
    let expected = Digest::sha256(&pseudo_random_bytes(1602, FILLER)[..100_000]).hex();
    let out = run_container(
        &first.containerd,
        &image,
        "streamsnap",
        "probe",
        &["sh", "-c", "head -c 100000 /data/filler2.bin | sha256sum"],
    )
    .unwrap();
    assert!(out.contains(&expected), "wrong bytes: {out}");
    let mirror_log = mirror.access_log().unwrap();
    let probe: Vec<(String, u16)> = mirror_log[mirror_mark..]
        .iter()
        .filter(|e| e.uri.contains("/blobs/"))
        .map(|e| (e.method.clone(), e.status))
        .collect();
    eprintln!("after the pass-over, the first node's requests to the mirror: {probe:?}");
    let (asked, read): (Vec<_>, Vec<_>) = probe.iter().partition(|(m, _)| m == "HEAD");
    assert!(
        probe.first().is_some_and(|(m, _)| m == "HEAD")
            && asked.iter().all(|(_, s)| *s == 200)
            && !read.is_empty()
            && asked.len() <= read.len()
            && read.iter().all(|(m, s)| m == "GET" && *s == 206),
        "{probe:?}"
    );
    let origin_log = origin.registry.access_log().unwrap();
    let after = blob_gets(&origin_log[origin_mark..], &data_blobs);
    assert!(after.is_empty(), "the origin served the read: {after:?}");

    // A second node, after the mirror stored the blobs: every chunk read is a mirror hit.
    let origin_mark = origin_log.len();
    let mirror_mark = mirror_log.len();
    let second = MirrorNode::start(&to_origin.addr(), Some(&to_mirror.addr()), None).unwrap();
    second.start_reading(&image, "warm", &origin.files).unwrap();
    let origin_log = origin.registry.access_log().unwrap();
    let after = blob_gets(&origin_log[origin_mark..], &data_blobs);
    assert!(
        after.is_empty(),
        "{}",
        format!("the origin served the second node's chunks: {after:?}"),
    );
    let mirror_log = mirror.access_log().unwrap();
    let warm = blob_gets(&mirror_log[mirror_mark..], &data_blobs);
    assert!(
        !warm.is_empty(),
        "the second node read nothing from the mirror"
    );
    assert!(
        warm.iter().all(|e| e.status == 206),
        "{}",
        format!("the warm mirror answered something else than 206: {warm:?}"),
    );
    eprintln!(
        "warm mirror: {} range reads, all 206, {} bytes; the origin served none",
        warm.len(),
        warm.iter().map(|e| e.bytes).sum::<u64>()
    );
    drop(second);
    drop(first);
}
