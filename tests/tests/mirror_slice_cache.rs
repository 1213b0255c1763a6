//! Chunk reads through a range-caching mirror (issue 16): nginx as a caching reverse proxy with
//! the slice module (`tests/src/nginx.rs`, the config of docs/snapshotter.md "Mirrors") in
//! front of an origin `docker-registry`, whose egress a counting proxy measures.
//!
//! - On the HTTP level: concurrent range GETs of a cold range cost the origin one GET per 1 MiB
//!   slice covering it, and each is answered `206` with exactly the bytes asked; HEAD, other
//!   paths and other methods behave as documented.
//! - With nodes: a node without a mirror starts an image lazily (one node's lazy start, what
//!   the origin serves it), then two nodes (each its own `streamsnap-snapshotterd` and
//!   containerd, the cache as the origin's mirror) do the same start one after the other: the
//!   bytes are right, the second start costs the origin metadata and at most a slice or two
//!   the first start did not touch, and both together cost it at most 1.5x one node's lazy
//!   start (1.2x measured: the start's reads rounded out to whole slices).
//!
//! The binaries must be built first:
//! `cargo build -p streamsnap-snapshotter -p streamsnap-holder -p streamsnap-cli --bins`.

use std::collections::BTreeSet;
use std::thread;

use streamsnap_e2e::mirror_node::MirrorNode;
use streamsnap_e2e::nginx::{CacheAccess, SliceCache, UPSTREAM_AGENT};
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::streaming_node::push_converted;
use streamsnap_e2e::targen::pseudo_random_bytes;
use streamsnap_e2e::{
    Compression, CountingProxy, ImageSpec, LayerBlob, OciLayout, Registry, STREAMING_NODE_TOOLS,
    TarGen, http, require_root, require_root_tools, skopeo_push,
};
use streamsnap_format::Digest;

const SLICE: u64 = 1 << 20;
/// Filler files nobody reads, each followed by a file the container reads.
const FILLER: usize = 12 << 20;
const READ: usize = 4 << 20;
const PAIRS: usize = 4;
const MB: f64 = 1e6;

/// A blob GET in the origin's log.
#[derive(Debug)]
struct BlobGet {
    digest: String,
    status: u16,
    bytes: u64,
    agent: String,
}

/// Blob GETs in the origin's log since line `mark`.
fn origin_blob_gets(origin: &Registry, mark: usize) -> anyhow::Result<Vec<BlobGet>> {
    origin.access_log()?;
    let text = std::fs::read_to_string(origin.log_path())?;
    let combined: Vec<&str> = text.lines().filter(|l| !l.starts_with("time=")).collect();
    Ok(combined[mark.min(combined.len())..]
        .iter()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let (request, rest) = l.split_once(" HTTP/1.1\" ")?;
            let digest = request.rsplit_once("/blobs/")?.1.to_owned();
            let mut f = rest.splitn(3, ' ');
            let status = f.next()?.parse().ok()?;
            let bytes = f.next()?.parse().ok()?;
            let agent = f.next()?.trim_end().trim_end_matches('"');
            let agent = agent.rsplit_once('"').map_or("", |(_, a)| a).to_owned();
            Some(BlobGet {
                digest,
                status,
                bytes,
                agent,
            })
        })
        .collect())
}

/// Combined access log lines of the origin so far (the mark for [`origin_blob_gets`]).
fn origin_mark(origin: &Registry) -> anyhow::Result<usize> {
    origin.access_log()?;
    let text = std::fs::read_to_string(origin.log_path())?;
    Ok(text.lines().filter(|l| !l.starts_with("time=")).count())
}

fn blob_lines(log: &[CacheAccess]) -> Vec<&CacheAccess> {
    log.iter()
        .filter(|e| e.blob_get_digest().is_some())
        .collect()
}

#[test]
fn a_cold_slice_cache_fetches_each_slice_of_a_range_once_and_answers_exactly_the_range() {
    require_root().unwrap();
    require_root_tools(&["docker-registry", "skopeo", "nginx"]).unwrap();
    let origin = Registry::start().unwrap();
    // One uncompressed layer of incompressible bytes: the blob is the tar.
    let mut tar = TarGen::new();
    tar.file("blob.bin", 0o644, &pseudo_random_bytes(1800, 6_500_000));
    let spec = ImageSpec::linux_amd64(vec![LayerBlob::new(tar.finish(), Compression::None)]);
    let mut layout = OciLayout::new().unwrap();
    let written = layout.write_image(&spec, "v1").unwrap();
    skopeo_push(
        layout.path(),
        "v1",
        &format!("{}/slice/blob:v1", origin.addr()),
    )
    .unwrap();
    let layer = &written.layers[0];
    let blob = layout.read_blob(&layer.digest).unwrap();
    let path = format!("/v2/slice/blob/blobs/{}", layer.digest);
    let to_origin = CountingProxy::start(&origin.addr()).unwrap();
    let cache = SliceCache::start(&to_origin.addr()).unwrap();
    eprintln!("nginx config:\n{}", cache.config().unwrap());

    // Six concurrent first reads of one range across three slices.
    let (first, last) = (1_500_000u64, 3_700_000u64);
    let range = format!("bytes={first}-{last}");
    let mark = origin_mark(&origin).unwrap();
    let answers: Vec<http::Response> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| http::get(&cache.addr(), &path, &[("Range", &range)])))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let expected = &blob[first as usize..=last as usize];
    for a in &answers {
        assert_eq!(a.status, 206);
        assert_eq!(
            a.header("Content-Range"),
            Some(format!("bytes {first}-{last}/{}", blob.len()).as_str())
        );
        assert!(a.body == expected, "wrong bytes ({} bytes)", a.body.len());
    }
    let gets = origin_blob_gets(&origin, mark).unwrap();
    let slices = last / SLICE - first / SLICE + 1;
    eprintln!(
        "six concurrent cold reads of {} bytes: the origin served {gets:?} ({} bytes through \
         the counting proxy); the cache said {:?}",
        last - first + 1,
        to_origin.downstream_bytes(),
        blob_lines(&cache.access_log().unwrap())
            .iter()
            .map(|e| e.cache.as_str())
            .collect::<Vec<_>>()
    );
    assert_eq!(gets.len() as u64, slices, "{gets:?}");
    assert!(
        gets.iter()
            .all(|g| g.status == 206 && g.bytes == SLICE && g.agent == UPSTREAM_AGENT),
        "{gets:?}"
    );

    // A range within those slices is a hit: the origin serves nothing.
    let mark = origin_mark(&origin).unwrap();
    let r = http::get(&cache.addr(), &path, &[("Range", "bytes=2097152-2097161")]).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &blob[2_097_152..2_097_162]);
    assert!(origin_blob_gets(&origin, mark).unwrap().is_empty());

    // HEAD: the blob's length and `Accept-Ranges`; nginx answers it from the first slice,
    // which it fetches with a GET when it has not cached it (proxy_cache_convert_head).
    let mark = origin_mark(&origin).unwrap();
    let head = http::request(&cache.addr(), "HEAD", &path, &[]).unwrap();
    let gets = origin_blob_gets(&origin, mark).unwrap();
    eprintln!("a HEAD of the blob cost the origin {gets:?}");
    assert!(gets.len() <= 1, "{gets:?}");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        Some(blob.len().to_string().as_str())
    );
    assert_eq!(head.header("Accept-Ranges"), Some("bytes"));
    // The tail: a range past the last slice boundary, and one past the end.
    let size = blob.len() as u64;
    let tail = http::get(
        &cache.addr(),
        &path,
        &[("Range", &format!("bytes={}-", size - 10))],
    )
    .unwrap();
    assert_eq!(
        (tail.status, tail.body.as_slice()),
        (206, &blob[blob.len() - 10..])
    );
    let past = http::get(
        &cache.addr(),
        &path,
        &[("Range", &format!("bytes={size}-{}", size + 10))],
    )
    .unwrap();
    assert_eq!(past.status, 416);
    // Nothing but blobs by digest, and only GET/HEAD.
    for (method, p, status) in [
        ("GET", "/v2/".to_owned(), 404),
        ("GET", "/v2/slice/blob/manifests/v1".to_owned(), 404),
        ("GET", "/v2/slice/blob/blobs/latest".to_owned(), 404),
        ("DELETE", path.clone(), 403),
        ("POST", "/v2/slice/blob/blobs/uploads/".to_owned(), 404),
    ] {
        let r = http::request(&cache.addr(), method, &p, &[]).unwrap();
        assert_eq!(r.status, status, "{method} {p}");
    }
}

struct Origin {
    registry: Registry,
    image_path: String,
    /// (path, sha256 hex) of the files the container reads.
    files: Vec<(String, String)>,
}

/// The origin with a converted image: busybox and one layer of
/// `filler0 read0 filler1 read1 ...` (incompressible).
fn origin() -> anyhow::Result<Origin> {
    let registry = Registry::start()?;
    let mut tar = TarGen::new();
    tar.dir("data", 0o755);
    let mut files = Vec::new();
    for i in 0..PAIRS {
        tar.file(
            &format!("data/filler{i}.bin"),
            0o644,
            &pseudo_random_bytes(1900 + i as u64, FILLER),
        );
        let read = pseudo_random_bytes(2000 + i as u64, READ);
        let path = format!("data/read{i}.bin");
        tar.file(&path, 0o644, &read);
        files.push((format!("/{path}"), Digest::sha256(&read).hex()));
    }
    let image_path = "slice/app:v1".to_owned();
    push_converted(&registry, &image_path, tar.finish(), &[])?;
    Ok(Origin {
        registry,
        image_path,
        files,
    })
}

fn range_ignored(node: &MirrorNode) -> f64 {
    let metrics = node.metrics().unwrap();
    metric(
        &metrics,
        "streamsnap_registry_requests_total",
        &["kind=\"range\"", "outcome=\"range_ignored\""],
    )
}

#[test]
fn two_nodes_through_a_slice_cache_cost_the_origin_about_one_lazy_start() {
    require_root().unwrap();
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2", "nginx"]].concat())
        .unwrap();
    let origin = origin().unwrap();
    // Everything the origin sends, to nodes and to the cache, crosses this proxy.
    let to_origin = CountingProxy::start(&origin.registry.addr()).unwrap();
    let cache = SliceCache::start(&to_origin.addr()).unwrap();
    let image = format!("{}/{}", to_origin.addr(), origin.image_path);

    // One node's lazy start, without a mirror.
    let alone = MirrorNode::start(&to_origin.addr(), None, None).unwrap();
    let e0 = to_origin.downstream_bytes();
    alone.start_reading(&image, "alone", &origin.files).unwrap();
    let one = to_origin.downstream_bytes() - e0;
    drop(alone);

    // The first node through the cold cache.
    let first = MirrorNode::start(&to_origin.addr(), Some(&cache.addr()), None).unwrap();
    let mark = origin_mark(&origin.registry).unwrap();
    let e1 = to_origin.downstream_bytes();
    first.start_reading(&image, "first", &origin.files).unwrap();
    let first_cost = to_origin.downstream_bytes() - e1;
    let first_gets = origin_blob_gets(&origin.registry, mark).unwrap();
    assert_eq!(range_ignored(&first), 0.0);

    // The second node, the cache warm from the first.
    let second = MirrorNode::start(&to_origin.addr(), Some(&cache.addr()), None).unwrap();
    let mark = origin_mark(&origin.registry).unwrap();
    let e2 = to_origin.downstream_bytes();
    second
        .start_reading(&image, "second", &origin.files)
        .unwrap();
    let second_cost = to_origin.downstream_bytes() - e2;
    let second_gets = origin_blob_gets(&origin.registry, mark).unwrap();
    assert_eq!(range_ignored(&second), 0.0);

    let log = cache.access_log().unwrap();
    let reads = blob_lines(&log);
    // The data blobs: what the nodes asked the mirror for (only chunk reads go to mirrors).
    let data: BTreeSet<&str> = reads.iter().filter_map(|e| e.blob_get_digest()).collect();
    let (first_data, first_meta): (Vec<&BlobGet>, Vec<&BlobGet>) = first_gets
        .iter()
        .partition(|g| data.contains(g.digest.as_str()));
    let second_data: Vec<&BlobGet> = second_gets
        .iter()
        .filter(|g| data.contains(g.digest.as_str()))
        .collect();
    let served: u64 = reads.iter().map(|e| e.bytes).sum();
    let hits = reads.iter().filter(|e| e.cache == "HIT").count();
    let fill: u64 = first_data.iter().map(|g| g.bytes).sum();
    let meta: u64 = first_meta.iter().map(|g| g.bytes).sum();
    let both = first_cost + second_cost;
    eprintln!(
        "one node alone: {:.2} MB from the origin; through the slice cache: first node {:.2} MB \
         ({} slice GETs of {:.2} MB by {:?}, {:.2} MB of metadata blobs), second node {:.2} MB \
         ({} data blob GETs); both {:.2} MB = {:.2}x one node; the cache answered {} chunk \
         reads ({:.2} MB, statuses {:?}, {hits} HIT at the first slice), {:.2} MB on its disk",
        one as f64 / MB,
        first_cost as f64 / MB,
        first_data.len(),
        fill as f64 / MB,
        first_data
            .iter()
            .map(|g| g.agent.as_str())
            .collect::<BTreeSet<_>>(),
        meta as f64 / MB,
        second_cost as f64 / MB,
        second_data.len(),
        both as f64 / MB,
        both as f64 / one as f64,
        reads.len(),
        served as f64 / MB,
        reads.iter().map(|e| e.status).collect::<BTreeSet<_>>(),
        cache.cache_bytes() as f64 / MB,
    );
    // Every chunk read went to the cache and was answered 206; the nodes read no data blob
    // byte from the origin themselves, the cache read 1 MiB slices.
    assert!(!reads.is_empty());
    assert!(reads.iter().all(|e| e.status == 206), "{reads:?}");
    assert!(
        first_data
            .iter()
            .all(|g| g.status == 206 && g.bytes <= SLICE && g.agent == UPSTREAM_AGENT),
        "{first_data:?}"
    );
    // The second start: metadata (manifests, referrers, configs, TOCs) and, at most, a slice
    // or two its reads touched and the first node's did not (the kernel's read-ahead and the
    // order of concurrent reads vary from start to start).
    assert!(second_data.len() <= 2, "{second_data:?}");
    assert!(
        second_cost * 5 <= one,
        "the second node cost the origin {second_cost} bytes, one node alone {one}"
    );
    // Both together: one fill of the slices the start touched (its reads rounded out to whole
    // slices) and twice the metadata.
    assert!(
        both * 2 <= one * 3,
        "both nodes cost the origin {both} bytes, more than 1.5x one node's {one}"
    );
    drop(second);
    drop(first);
}
