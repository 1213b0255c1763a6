//! The fleet's nodes: each its own `streamsnap-snapshotterd` (own root, own chunk cache) and its
//! own containerd, set up one per thread, then started together on one barrier.

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::container::rpull;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::{Containerd, ContainerdOptions, Snapshotterd, SnapshotterdOptions};

use crate::realistic::runner::{Scrape, run_until_ready};

/// Attempts at starting a node.
const START_ATTEMPTS: u32 = 3;

/// One node. Field order is drop order: containerd before the daemon it uses.
pub struct Node {
    pub containerd: Containerd,
    pub daemon: Snapshotterd,
}

/// What one node's start took.
#[derive(Clone, Copy, Debug)]
pub struct NodeStart {
    /// From the common start to the container's "ready".
    pub ready: Duration,
    /// From the common start to the end of the lazy pull.
    pub pulled: Duration,
    /// Range reads a mirror answered with the whole blob and the node hung up on.
    pub range_ignored: f64,
    /// Bytes the start-up profile's prefetch fetched.
    pub prefetch_bytes: f64,
    /// Body bytes of range reads, from every source.
    pub range_bytes: f64,
}

/// Starts `n` nodes with the daemon config `options`, each on its own thread. `fetch`: more
/// `[fetch]` keys (the harness generates that section): the daemon is started, stopped, given
/// them and started again.
pub fn start_nodes(
    n: usize,
    options: &SnapshotterdOptions,
    fetch: Option<&str>,
) -> anyhow::Result<Vec<Node>> {
    let started: Vec<anyhow::Result<Node>> = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    // The harness picks the metrics port by binding and releasing it: with the
                    // links' many connections on loopback, another socket may take it first.
                    let mut attempt = 1;
                    loop {
                        match start_node(options, fetch) {
                            Err(e) if attempt < START_ATTEMPTS => {
                                let why = format!("{e:#}");
                                let why = why.lines().last().unwrap_or_default();
                                eprintln!("a node did not start (attempt {attempt}): {why}");
                                attempt += 1;
                            }
                            result => break result,
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("node setup thread panicked"))
            .collect()
    });
    started.into_iter().collect()
}

fn start_node(options: &SnapshotterdOptions, fetch: Option<&str>) -> anyhow::Result<Node> {
    let mut daemon = Snapshotterd::start(options.clone())?;
    if let Some(keys) = fetch {
        daemon.terminate(Duration::from_secs(10))?;
        let path = daemon.dir().join("config.toml");
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text.contains("[fetch]\n"),
            "no [fetch] in {}",
            path.display()
        );
        let text = text.replacen("[fetch]\n", &format!("[fetch]\n{keys}\n"), 1);
        std::fs::write(&path, text)?;
        daemon.restart()?;
    }
    let containerd = Containerd::start(
        ContainerdOptions::default().with_proxy_snapshotter(SNAPSHOTTER, daemon.socket()),
    )?;
    Ok(Node { containerd, daemon })
}

/// Every node pulls `image` lazily and runs `cmd` in a container, all released at the same
/// instant; returns each node's figures, in node order.
pub fn start_together(
    nodes: &[Node],
    image: &str,
    cmd: &[&str],
    run_id: &str,
) -> anyhow::Result<Vec<NodeStart>> {
    let barrier = Barrier::new(nodes.len() + 1);
    let (t0, ends) = thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<(Instant, Instant)> {
                    barrier.wait();
                    rpull(&node.containerd, image, SNAPSHOTTER, true)?;
                    let pulled = Instant::now();
                    let ready = run_until_ready(
                        &node.containerd,
                        image,
                        SNAPSHOTTER,
                        &format!("{run_id}-n{i}"),
                        cmd,
                    )?;
                    Ok((pulled, ready))
                })
            })
            .collect();
        barrier.wait();
        // Every node thread is past the barrier: the clock starts.
        let t0 = Instant::now();
        let ends: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("node thread panicked"))
            .collect();
        (t0, ends)
    });
    let mut out = Vec::with_capacity(nodes.len());
    for (i, (node, end)) in nodes.iter().zip(ends).enumerate() {
        let (pulled, ready) = end.with_context(|| format!("node {i}"))?;
        let metrics = scrape(node)?;
        out.push(NodeStart {
            ready: ready.saturating_duration_since(t0),
            pulled: pulled.saturating_duration_since(t0),
            range_ignored: metrics.sum(
                "streamsnap_registry_requests_total",
                &["kind=\"range\"", "outcome=\"range_ignored\""],
            ),
            prefetch_bytes: metrics.sum("streamsnap_snapshotter_prefetch_bytes_total", &[]),
            range_bytes: metrics.sum("streamsnap_registry_range_bytes_total", &[]),
        });
    }
    Ok(out)
}

/// The node's registry figures from its `/metrics`.
fn scrape(node: &Node) -> anyhow::Result<Scrape> {
    let addr = node
        .daemon
        .metrics_address()
        .context("the fleet's daemons serve metrics")?;
    Scrape::fetch(addr)
}

/// Stops every node, one thread each (containerd first, then its daemon).
pub fn teardown(nodes: Vec<Node>) {
    thread::scope(|s| {
        for node in nodes {
            s.spawn(move || drop(node));
        }
    });
}
