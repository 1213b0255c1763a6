//! The zone's pull-through mirror (the Debian `docker-registry` in proxy mode, `proxy:
//! remoteurl:` the origin through its link) behind a fast local link, its warm-up, and what the
//! registries' access logs say about the chunk reads (who served which data blob bytes); and
//! the range-caching mirror (nginx's slice cache, `streamsnap_e2e::nginx`, its upstream the
//! origin through the same link) behind the same kind of local link.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use streamsnap_e2e::nginx::{CacheAccess, SliceCache, SliceCacheOptions};
use streamsnap_e2e::{LinkShape, Registry, ShapingProxy};

/// How long the mirror may take to store the blobs it was asked for.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);
/// The registry client's User-Agent prefix: requests from nodes (the mirror's have another).
const NODE_AGENT: &str = "streamsnap/";

/// A proxy-mode registry and the link the nodes reach it by. Field order is drop order.
pub struct Mirror {
    pub link: ShapingProxy,
    pub registry: Registry,
}

impl Mirror {
    /// A cold mirror of `origin_url` (the origin as the mirror reaches it: through its link).
    pub fn start(origin_url: &str, shape: LinkShape) -> anyhow::Result<Self> {
        let registry =
            Registry::start_with_config_extra(&format!("proxy:\n  remoteurl: {origin_url}\n"))?;
        let link = ShapingProxy::start(&registry.addr(), shape)?;
        Ok(Self { link, registry })
    }

    /// Warms the mirror the cheapest way a deployment can: a one-byte range GET of each data
    /// blob, hung up on after the response headers. The proxy answers `200` and copies the whole
    /// blob into its storage in the background (the aborted stream costs the origin what the
    /// sockets buffered); then waits until every blob is stored.
    pub fn prefill(&self, repo: &str, blobs: &BTreeSet<String>) -> anyhow::Result<()> {
        for digest in blobs {
            let status = touch(&self.registry.addr(), repo, digest)?;
            ensure!(
                status == 200 || status == 206,
                "the mirror answered {status} to a range GET of {digest}"
            );
        }
        for digest in blobs {
            self.wait_stored(repo, digest)?;
        }
        Ok(())
    }

    /// Whether the mirror has stored `digest` in `repo` (committed and linked: from then on it
    /// serves ranges of it itself).
    pub fn stored(&self, repo: &str, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.registry
            .dir()
            .join(format!(
                "storage/docker/registry/v2/repositories/{repo}/_layers/sha256/{hex}/link"
            ))
            .exists()
    }

    pub fn wait_stored(&self, repo: &str, digest: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + FILL_TIMEOUT;
        while !self.stored(repo, digest) {
            ensure!(
                Instant::now() < deadline,
                "the mirror did not store {digest} within {FILL_TIMEOUT:?}"
            );
            thread::sleep(POLL);
        }
        Ok(())
    }
}

/// An nginx slice cache and the link the nodes reach it by. Field order is drop order.
pub struct SliceMirror {
    pub link: ShapingProxy,
    pub cache: SliceCache,
}

impl SliceMirror {
    /// A cold slice cache of `origin` (`127.0.0.1:PORT`: the origin's link).
    pub fn start(
        origin: &str,
        options: &SliceCacheOptions,
        shape: LinkShape,
    ) -> anyhow::Result<Self> {
        let cache = SliceCache::start_with(origin, options)?;
        let link = ShapingProxy::start(&cache.addr(), shape)?;
        Ok(Self { link, cache })
    }
}

/// Data blob bytes the slice cache served: `206` answers to nodes (and anything else to
/// nodes), and the bytes of those whose first slice was a cache hit.
pub fn slice_chunk_bytes(log: &[CacheAccess], blobs: &BTreeSet<String>) -> (ChunkBytes, u64) {
    let mut out = ChunkBytes::default();
    let mut hits = 0;
    for e in log {
        if !e.blob_get_digest().is_some_and(|d| blobs.contains(d)) {
            continue;
        }
        match (e.agent.starts_with(NODE_AGENT), e.status) {
            (true, 206) => out.to_nodes += e.bytes,
            (true, _) => out.whole_to_nodes += e.bytes,
            (false, _) => out.to_others += e.bytes,
        }
        if e.cache == "HIT" {
            hits += e.bytes;
        }
    }
    (out, hits)
}

/// `GET /v2/REPO/blobs/DIGEST` with `Range: bytes=0-0`; returns the status once the headers are
/// in, and closes the connection without reading the body.
fn touch(addr: &str, repo: &str, digest: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nRange: bytes=0-0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        ensure!(head.len() < 64 << 10, "no end of headers from {addr}");
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}: {text:?}"))
}

/// One access log line, with the client's User-Agent.
#[derive(Clone, Debug)]
pub struct Access {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub bytes: u64,
    pub agent: String,
}

impl Access {
    /// The digest of a GET of one of `blobs`.
    fn blob_get<'a>(&self, blobs: &'a BTreeSet<String>) -> Option<&'a String> {
        if self.method != "GET" {
            return None;
        }
        let digest = self.uri.rsplit_once("/blobs/")?.1;
        blobs.get(digest)
    }

    pub fn is_node(&self) -> bool {
        self.agent.starts_with(NODE_AGENT)
    }
}

/// Every access log line of `registry` so far (after a barrier: requests that completed are in).
pub fn access_log(registry: &Registry) -> anyhow::Result<Vec<Access>> {
    registry.access_log()?;
    let text = std::fs::read(registry.log_path())
        .with_context(|| format!("reading {}", registry.log_path().display()))?;
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter_map(parse_line)
        .collect())
}

/// `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 1000 "" "streamsnap/0.1.0"`
fn parse_line(line: &str) -> Option<Access> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let uri = request.next()?.to_owned();
    request.next()?.starts_with("HTTP/").then_some(())?;
    let mut fields = rest.splitn(3, ' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = match fields.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    let agent = fields
        .next()
        .and_then(|tail| tail.trim_end().strip_suffix('"'))
        .and_then(|tail| tail.rsplit_once('"'))
        .map(|(_, agent)| agent.to_owned())
        .unwrap_or_default();
    Some(Access {
        method,
        uri,
        status,
        bytes,
        agent,
    })
}

/// Data blob bytes in a slice of access log: what nodes got (`206`, and `200` read through),
/// and what other clients (the mirror filling itself) got.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkBytes {
    /// `206` answers to nodes: chunk bytes served.
    pub to_nodes: u64,
    /// `200` answers to nodes (whole-blob answers they hung up on or read a prefix of).
    pub whole_to_nodes: u64,
    /// What other clients got (the mirror's fill and its streams).
    pub to_others: u64,
}

pub fn chunk_bytes(log: &[Access], blobs: &BTreeSet<String>) -> ChunkBytes {
    let mut out = ChunkBytes::default();
    for e in log.iter().filter(|e| e.blob_get(blobs).is_some()) {
        match (e.is_node(), e.status) {
            (true, 206) => out.to_nodes += e.bytes,
            (true, _) => out.whole_to_nodes += e.bytes,
            (false, _) => out.to_others += e.bytes,
        }
    }
    out
}

/// The data blobs (`chunks` media type) the streaming artifact of `manifest` lists, read from
/// the registry's referrers fallback tag (distribution 2.8 has no referrers API).
pub fn data_blobs(addr: &str, repo: &str, manifest: &str) -> anyhow::Result<BTreeSet<String>> {
    let accept = [(
        "Accept",
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
    )];
    let get_json = |path: &str| -> anyhow::Result<serde_json::Value> {
        let r = streamsnap_e2e::http::get(addr, path, &accept)?;
        if r.status != 200 {
            bail!("GET {path} answered {}", r.status);
        }
        serde_json::from_slice(&r.body).with_context(|| format!("parsing {path}"))
    };
    let tag = manifest.replace(':', "-");
    let index = get_json(&format!("/v2/{repo}/manifests/{tag}"))?;
    let mut blobs = BTreeSet::new();
    for m in index["manifests"].as_array().context("no manifests")? {
        if m["artifactType"] != streamsnap_format::media::ARTIFACT_TYPE {
            continue;
        }
        let digest = m["digest"].as_str().context("no digest")?;
        let artifact = get_json(&format!("/v2/{repo}/manifests/{digest}"))?;
        for layer in artifact["layers"].as_array().context("no layers")? {
            if layer["mediaType"] == streamsnap_format::media::CHUNKS {
                blobs.insert(layer["digest"].as_str().context("no digest")?.to_owned());
            }
        }
    }
    ensure!(
        !blobs.is_empty(),
        "the artifact of {manifest} lists no data blob"
    );
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_user_agent() {
        let line = r#"127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/r/blobs/sha256:ab HTTP/1.1" 206 1000 "" "streamsnap/0.1.0""#;
        let e = parse_line(line).unwrap();
        assert_eq!((e.status, e.bytes), (206, 1000));
        assert!(e.is_node());
        let line = r#"127.0.0.1 - - [28/Nov/2026:10:25:17 +0000] "GET /v2/r/blobs/sha256:ab HTTP/1.1" 200 5 "" "docker-distribution/v2.8.2 (go1.19)""#;
        let e = parse_line(line).unwrap();
        assert!(!e.is_node());
        let blobs: BTreeSet<String> = ["sha256:ab".to_owned()].into();
        let c = chunk_bytes(&[e], &blobs);
        assert_eq!(c.to_others, 5);
    }
}
