//! The remote snapshotter `streamsnap-snapshotterd` end to end (issue 3's acceptance), against
//! the real registry, containerd 1.6 (its CRI plugin included), runc and FUSE: converted images
//! pulled through the CRI path (`streamsnap pull`) and through `ctr-remote image rpull` run
//! without their layers being downloaded; whiteouts and opaque dirs give the same rootfs as
//! containerd's overlayfs snapshotter; an image without a streaming artifact falls back to a
//! normal pull; the chunk cache stays under its cap. Every scenario is checked against the same
//! image on containerd's overlayfs snapshotter (a second containerd), and what the registry
//! served is counted outside the daemon (a counting proxy, the registry's access log).
//!
//! The daemon binary must be built first: `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, ensure};
use streamsnap_e2e::demo_image::{self, DemoShape};
use streamsnap_e2e::image::{ImageSpec, LayerBlob, OciLayout, WrittenImage};
use streamsnap_e2e::layers::MergedView;
use streamsnap_e2e::registry::AccessLogEntry;
use streamsnap_e2e::snapshotterd::SNAPSHOTTER;
use streamsnap_e2e::streaming_node::metric;
use streamsnap_e2e::targen::pseudo_random_bytes;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, CountingProxy, Node, Registry,
    STREAMING_NODE_TOOLS, Snapshotterd, SnapshotterdOptions, TarGen, chain_id, diff_trees,
    every_entry_type_layer, mount_view, pull, require_root, require_root_tools, rpull,
    run_container_in, skopeo_push, upper_layers, upper_layers_view, walk_tree, workspace_bin,
};
use streamsnap_format::Digest;

const OVERLAYFS: &str = "overlayfs";
/// Most a lazy pull and start may take from the registry, as a share of the image's compressed
/// layers.
const MAX_LAZY_SHARE: f64 = 0.10;
/// The chunk size conversions use (the converter's default).
const CHUNK_SIZE: u64 = 1 << 20;

fn preflight() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&[STREAMING_NODE_TOOLS, &["containerd-shim-runc-v2"]].concat())?;
    ensure!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the snapshotter mounts layers through FUSE (modprobe fuse)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Images and conversion

/// Pushes `spec` as `REGISTRY/e2e/NAME:TAG`; returns the reference and what was written.
fn push(
    registry: &Registry,
    spec: &ImageSpec,
    name_tag: &str,
) -> anyhow::Result<(String, WrittenImage)> {
    let mut layout = OciLayout::new()?;
    let tag = name_tag.rsplit_once(':').map_or("latest", |(_, t)| t);
    let written = layout.write_image(spec, tag)?;
    let reference = format!("{}/e2e/{name_tag}", registry.addr());
    skopeo_push(layout.path(), tag, &reference)?;
    Ok((reference, written))
}

/// The chain ID of the image's top layer: the committed snapshot its rootfs is a view of.
fn top(image: &WrittenImage) -> anyhow::Result<Digest> {
    chain_id(&image.diff_ids).context("the image has no layers")
}

fn compressed_size(image: &WrittenImage) -> u64 {
    image.layers.iter().map(|l| l.size).sum()
}

fn streamsnap(args: &[&str]) -> anyhow::Result<Output> {
    let bin = workspace_bin("streamsnap")?;
    Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// `streamsnap artifact-streaming create --image IMAGE`.
fn convert(image: &str) -> anyhow::Result<()> {
    convert_kind(image, "chunked").map(drop)
}

/// `streamsnap artifact-streaming create --image IMAGE --kind KIND`: the pushed artifact's
/// descriptor.
fn convert_kind(image: &str, kind: &str) -> anyhow::Result<serde_json::Value> {
    let output = streamsnap(&[
        "artifact-streaming",
        "create",
        "--image",
        image,
        "--kind",
        kind,
        "--output",
        "json",
    ])?;
    ensure!(
        output.status.success(),
        "converting {image} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// `streamsnap pull --containerd-socket SOCK --output json IMAGE`: the parsed JSON on success,
/// an error quoting stderr otherwise.
fn streamsnap_pull(containerd: &Containerd, image: &str) -> anyhow::Result<serde_json::Value> {
    let output = streamsnap_pull_raw(containerd.address(), image)?;
    ensure!(
        output.status.success(),
        "`streamsnap pull {image}` failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "`streamsnap pull` printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn streamsnap_pull_raw(socket: &Path, image: &str) -> anyhow::Result<Output> {
    let socket = socket.to_string_lossy();
    streamsnap(&[
        "pull",
        "--containerd-socket",
        &socket,
        "--timeout",
        "300",
        "--output",
        "json",
        image,
    ])
}

/// The demo image, shaped so that 10% of it is a meaningful bound: ~10 MB of source files and
/// 96 MiB of incompressible model weights on top of busybox.
fn big_demo_image() -> anyhow::Result<ImageSpec> {
    demo_image::demo_image(DemoShape {
        source_files: 500,
        large_files: 2,
        large_file_size: 48 << 20,
    })
}

/// `REGISTRY_ADDR/...` as reached through `proxy`.
fn via_proxy(image: &str, registry: &Registry, proxy: &CountingProxy) -> String {
    image.replacen(&registry.addr(), &proxy.addr(), 1)
}

// ---------------------------------------------------------------------------------------------
// What the registry served

/// Access log entries after the first `from`.
fn access_log_since(registry: &Registry, from: usize) -> anyhow::Result<Vec<AccessLogEntry>> {
    Ok(registry.access_log()?.split_off(from))
}

/// Fails if any of `image`'s layer blobs was downloaded (a blob GET answered 200 or 206) in
/// `log`: the layers were not served lazily.
fn ensure_layers_not_downloaded(
    log: &[AccessLogEntry],
    image: &WrittenImage,
) -> anyhow::Result<()> {
    let layers: BTreeSet<String> = image.layers.iter().map(|l| l.digest.to_string()).collect();
    let downloaded: Vec<String> = log
        .iter()
        .filter(|e| e.is_served_blob() && e.blob_get_digest().is_some_and(|d| layers.contains(d)))
        .map(|e| format!("{} {} ({} bytes)", e.method, e.uri, e.status))
        .collect();
    ensure!(
        downloaded.is_empty(),
        "source layers were downloaded, so the snapshotter did not serve them lazily (it fell \
         back, or containerd unpacked them): {downloaded:#?}"
    );
    Ok(())
}

/// Fails unless every layer blob of `image` was downloaded whole in `log`.
fn ensure_layers_downloaded(log: &[AccessLogEntry], image: &WrittenImage) -> anyhow::Result<()> {
    for layer in &image.layers {
        let digest = layer.digest.to_string();
        let served: u64 = log
            .iter()
            .filter(|e| e.is_served_blob() && e.blob_get_digest() == Some(digest.as_str()))
            .map(|e| e.bytes)
            .sum();
        ensure!(
            served >= layer.size,
            "layer {digest} ({} bytes) was served {served} bytes: the fallback did not pull it",
            layer.size
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Containers

/// A container ID unique across the test processes sharing `/run/containerd/runc/k8s.io`.
fn container_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// What `args` prints in a container of `image` on containerd's overlayfs snapshotter (a
/// private containerd of its own, `ctr images pull`): the baseline.
fn overlayfs_output(image: &str, args: &[&str]) -> anyhow::Result<String> {
    let containerd = Containerd::start(ContainerdOptions::default())?;
    pull(&containerd, image, OVERLAYFS, true)?;
    run_container_in(
        &containerd,
        containerd.namespace(),
        OVERLAYFS,
        image,
        &container_id("baseline"),
        args,
    )
    .context("the overlayfs baseline")
}

/// Checks that `run` prints `baseline` (the output of `script` in `image` on overlayfs).
/// `ctr run` without a terminal can lose the last lines a container writes (its copy of the
/// output races the task's exit; seen once in CI on the overlayfs side): when one output is a
/// strict prefix of the other, both are taken again once. Different bytes fail at once.
fn same_as_baseline(
    label: &str,
    image: &str,
    script: &[&str],
    baseline: &str,
    mut run: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let output = run()?;
    if output == baseline {
        return Ok(());
    }
    let truncated = output.starts_with(baseline) || baseline.starts_with(output.as_str());
    ensure!(
        truncated,
        "{label}: the container printed {output:?}, on overlayfs {baseline:?}"
    );
    eprintln!("{label}: one output is cut short ({output:?} / {baseline:?}); running both again");
    let (output, baseline) = (run()?, overlayfs_output(image, script)?);
    ensure!(
        output == baseline,
        "{label}: the container printed {output:?}, on overlayfs {baseline:?}"
    );
    Ok(())
}

/// The rootfs tree of `image` on containerd's overlayfs snapshotter: the baseline.
fn overlayfs_tree(image: &str, written: &WrittenImage) -> anyhow::Result<BTreeMap<PathBuf, Node>> {
    let containerd = Containerd::start(ContainerdOptions::default())?;
    pull(&containerd, image, OVERLAYFS, true)?;
    let rootfs = mount_view(&containerd, OVERLAYFS, &top(written)?, "baseline")?;
    walk_tree(rootfs.path()).context("walking the overlayfs baseline rootfs")
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// A daemon and a containerd that has it as proxy snapshotter `streamsnap` (with the CRI
/// plugin on it when `cri`). Fields drop in order: containerd (and its containers) first.
struct StreamsnapNode {
    containerd: Containerd,
    daemon: Snapshotterd,
}

impl StreamsnapNode {
    fn start(opts: SnapshotterdOptions, cri: bool, plain_http: &[String]) -> anyhow::Result<Self> {
        let daemon = Snapshotterd::start(opts)?;
        let mut containerd_opts =
            ContainerdOptions::default().with_proxy_snapshotter(SNAPSHOTTER, daemon.socket());
        if cri {
            containerd_opts = containerd_opts.with_cri(SNAPSHOTTER);
        }
        for host in plain_http {
            containerd_opts = containerd_opts.with_plain_http(host);
        }
        let containerd = Containerd::start(containerd_opts)?;
        Ok(Self { containerd, daemon })
    }

    /// Runs `steps`; on an error, prints the tails of the daemon's and containerd's logs (a test
    /// returning `Err` does not panic, so the drops would not) and checks the daemon still runs.
    fn diagnose<T>(&self, steps: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let result = steps().and_then(|value| {
            ensure!(
                self.daemon.is_running(),
                "the snapshotter daemon exited during the test"
            );
            Ok(value)
        });
        if result.is_err() {
            eprintln!(
                "--- last lines of the snapshotter daemon log {} ---\n{}",
                self.daemon.log_path().display(),
                self.daemon.log_tail(60)
            );
            eprintln!(
                "--- last lines of the containerd log {} ---\n{}",
                self.containerd.log_path().display(),
                tail(self.containerd.log_path(), 40)
            );
        }
        result
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Checks the lazy run's registry traffic: through `proxy` at most [`MAX_LAZY_SHARE`] of the
/// image's compressed layers, and no layer blob downloaded.
fn ensure_lazy(
    what: &str,
    proxy: &CountingProxy,
    log: &[AccessLogEntry],
    image: &WrittenImage,
) -> anyhow::Result<()> {
    let total = compressed_size(image);
    let downstream = proxy.downstream_bytes();
    eprintln!(
        "{what}: the registry sent {downstream} bytes through the proxy ({} connections) for an \
         image of {total} compressed bytes ({:.2}%)",
        proxy.connections(),
        100.0 * downstream as f64 / total as f64
    );
    ensure!(
        proxy.connections() > 0 && downstream > 0,
        "{what}: nothing went through the proxy"
    );
    ensure_layers_not_downloaded(log, image).with_context(|| what.to_owned())?;
    ensure!(
        downstream as f64 <= MAX_LAZY_SHARE * total as f64,
        "{what}: the registry sent {downstream} bytes, more than {:.0}% of the image's {total} \
         compressed bytes",
        MAX_LAZY_SHARE * 100.0
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `streamsnap pull` itself, on containerd's overlayfs snapshotter (no daemon needed): a pull
/// through the CRI image service, and its errors.
#[test]
fn pull_command_pulls_through_cri_and_explains_failures() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &ImageSpec::busybox(Vec::new())?, "pull:v1")?;

    let no_cri = Containerd::start(ContainerdOptions::default())?;
    let output = streamsnap_pull_raw(no_cri.address(), &image)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("containerd's CRI plugin is disabled"),
        "a pull from a containerd without CRI: {output:?}"
    );
    drop(no_cri);

    let missing = streamsnap_pull_raw(Path::new("/nonexistent/containerd.sock"), &image)?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    ensure!(
        !missing.status.success()
            && stderr.contains(
                "containerd socket /nonexistent/containerd.sock not found: is containerd \
                 running? pass --containerd-socket"
            ),
        "{missing:?}"
    );

    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_cri(OVERLAYFS)
            .with_plain_http(&registry.addr()),
    )?;
    let pulled = streamsnap_pull(&containerd, &image)?;
    ensure!(pulled["image"] == image.as_str(), "{pulled}");
    ensure!(
        pulled["imageRef"] == written.config.digest.to_string().as_str(),
        "imageRef is not the image ID (config digest {}): {pulled}",
        written.config.digest
    );
    ensure!(
        pulled["seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{pulled}"
    );
    let output = run_container_in(
        &containerd,
        CRI_NAMESPACE,
        OVERLAYFS,
        &image,
        &container_id("cri-pulled"),
        &["cat", "/etc/hostname"],
    )?;
    ensure!(output == streamsnap_e2e::busybox::HOSTNAME, "{output:?}");

    let absent = format!("{}/e2e/pull:no-such-tag", registry.addr());
    let failed = streamsnap_pull_raw(containerd.address(), &absent)?;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    ensure!(
        !failed.status.success()
            && stderr.contains(&format!("containerd could not pull {absent}"))
            && stderr.contains("not found"),
        "{failed:?}"
    );
    Ok(())
}

/// Acceptance 1: the CRI path. A converted image pulled with `streamsnap pull` through
/// containerd's CRI plugin (snapshotter streamsnap) runs a container printing a small file: the
/// same output as on overlayfs, with at most 10% of the image's compressed bytes served.
#[test]
fn cri_pull_runs_a_converted_image_lazily() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &big_demo_image()?, "demo:cri")?;
    convert(&image)?;
    let cat = ["cat", &format!("/{}", demo_image::CONFIG_PATH)];
    let baseline = overlayfs_output(&image, &cat)?;
    ensure!(
        baseline == demo_image::CONFIG,
        "the baseline printed {baseline:?}"
    );

    let proxy = CountingProxy::start(&registry.addr())?;
    let lazy = via_proxy(&image, &registry, &proxy);
    let node = StreamsnapNode::start(SnapshotterdOptions::default(), true, &[proxy.addr()])?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        let pulled = streamsnap_pull(&node.containerd, &lazy).context("the CRI pull")?;
        ensure!(
            pulled["imageRef"] == written.config.digest.to_string().as_str(),
            "{pulled}"
        );
        let output = run_container_in(
            &node.containerd,
            CRI_NAMESPACE,
            SNAPSHOTTER,
            &lazy,
            &container_id("cri-lazy"),
            &cat,
        )?;
        ensure!(
            output == baseline,
            "the container printed {output:?}, on overlayfs {baseline:?}"
        );
        ensure_lazy(
            "CRI pull and run",
            &proxy,
            &access_log_since(&registry, log_start)?,
            &written,
        )
    })
}

/// Acceptance 2: `ctr-remote image rpull --snapshotter streamsnap` and `ctr run`, lazily; then a
/// large file read in full gives the same bytes as on overlayfs.
#[test]
fn rpull_runs_a_converted_image_lazily() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &big_demo_image()?, "demo:rpull")?;
    convert(&image)?;
    let cat = ["cat", &format!("/{}", demo_image::CONFIG_PATH)];
    let sum = ["sha256sum", "/app/models/weights-1.bin"];
    let baseline = overlayfs_output(&image, &cat)?;
    ensure!(
        baseline == demo_image::CONFIG,
        "the baseline printed {baseline:?}"
    );

    let proxy = CountingProxy::start(&registry.addr())?;
    let lazy = via_proxy(&image, &registry, &proxy);
    let node = StreamsnapNode::start(SnapshotterdOptions::default(), false, &[])?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        rpull(&node.containerd, &lazy, SNAPSHOTTER, true)?;
        let ns = node.containerd.namespace();
        let output =
            run_container_in(&node.containerd, ns, SNAPSHOTTER, &lazy, "rpull-lazy", &cat)?;
        ensure!(
            output == baseline,
            "the container printed {output:?}, on overlayfs {baseline:?}"
        );
        ensure_lazy(
            "rpull and run",
            &proxy,
            &access_log_since(&registry, log_start)?,
            &written,
        )?;
        // Reading a whole 48 MiB file lazily gives the right bytes.
        let want = format!(
            "{}  /app/models/weights-1.bin\n",
            Digest::sha256(&pseudo_random_bytes(8, 48 << 20)).hex()
        );
        let got = run_container_in(&node.containerd, ns, SNAPSHOTTER, &lazy, "rpull-sum", &sum)?;
        ensure!(got == want, "sha256sum printed {got:?}, expected {want:?}");
        Ok(())
    })
}

/// busybox; a layer with what the next one deletes; a layer with every entry type (owners,
/// modes, xattrs, devices, hardlinks, long names; its `whiteouts/.wh.deleted` and opaque
/// `opaque/` hide the files of the layer below); then the three layers of [`upper_layers`]
/// (whiteouts, opaque dirs, replaced files).
///
/// The layer below the every-entry layer matters: overlayfs lists the whiteout of a directory
/// that exists in one layer only (its readdir passes through) while lookups fail, so the
/// whiteouts must sit in merged directories.
fn layered_image() -> anyhow::Result<ImageSpec> {
    let below = TarGen::new()
        .dir("whiteouts", 0o755)
        .file("whiteouts/deleted", 0o644, b"deleted by the layer above\n")
        .dir("opaque", 0o755)
        .file(
            "opaque/hidden.txt",
            0o644,
            b"hidden by the opaque dir above\n",
        )
        .finish();
    let mut layers = vec![
        LayerBlob::gzip(below),
        LayerBlob::gzip(every_entry_type_layer()),
    ];
    layers.extend(upper_layers().into_iter().map(LayerBlob::gzip));
    ImageSpec::busybox(layers)
}

/// Checks a walked tree against the merged view of [`upper_layers`].
fn check_view(tree: &BTreeMap<PathBuf, Node>, view: &MergedView) -> anyhow::Result<()> {
    let at = |p: &str| tree.get(&Path::new("/").join(p));
    for (path, content) in &view.files {
        let node = at(path).with_context(|| format!("/{path} is missing"))?;
        let want = Some(Digest::sha256(content));
        // A symlink's content is its target's.
        let got = if node.link_target.is_some() {
            view.files
                .iter()
                .find(|(p, _)| Some(Path::new(p)) == node.link_target.as_deref())
                .map(|(_, c)| Digest::sha256(c))
        } else {
            node.sha256
        };
        ensure!(got == want, "/{path} has the wrong content");
    }
    for dir in &view.dirs {
        ensure!(at(dir).is_some(), "/{dir} is missing");
    }
    for (link, target) in &view.symlinks {
        let node = at(link).with_context(|| format!("/{link} is missing"))?;
        ensure!(
            node.link_target.as_deref() == Some(Path::new(target)),
            "/{link}: {node:?}"
        );
    }
    for path in &view.absent {
        ensure!(at(path).is_none(), "/{path} should be gone");
    }
    Ok(())
}

/// Checks that the overlayfs baseline shows what the comparison is about, so that an equal
/// tree means something: whiteouts applied, owners, xattrs, devices and hardlinks visible.
fn check_baseline(tree: &BTreeMap<PathBuf, Node>) -> anyhow::Result<()> {
    let at = |p: &str| {
        tree.get(Path::new(p))
            .with_context(|| format!("the overlayfs baseline lacks {p}"))
    };
    for gone in ["/whiteouts/deleted", "/opaque/hidden.txt"] {
        ensure!(
            !tree.contains_key(Path::new(gone)),
            "the overlayfs baseline shows {gone}"
        );
    }
    let xattrs = &at("/files/xattrs")?.xattrs;
    ensure!(
        xattrs.contains_key("user.comment") && xattrs.contains_key("security.capability"),
        "the overlayfs baseline shows the xattrs {:?}",
        xattrs.keys()
    );
    ensure!(at("/files/owned-1000")?.uid == 1000);
    ensure!(at("/files/setuid")?.mode == 0o4755);
    ensure!(at("/dev/char-null")?.rdev == Some((1, 3)));
    ensure!(at("/links/hardlink")?.hardlink_group.is_some());
    ensure!(tree.len() > 350, "the baseline has {} entries", tree.len());
    Ok(())
}

/// Acceptance 3: every entry of a multi-layer image with whiteouts and opaque dirs compares
/// equal between the streamsnap rootfs and the overlayfs rootfs: with the layers mounted merged
/// (the default: the view is the top layer's mount alone) and one mount per layer
/// (`[fuse] merge_layers = false`: an overlay of every layer's mount).
#[test]
fn layered_rootfs_matches_overlayfs_entry_for_entry() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &layered_image()?, "layered:v1")?;
    convert(&image)?;
    let baseline = overlayfs_tree(&image, &written)?;
    check_view(&baseline, &upper_layers_view()).context("the overlayfs baseline")?;
    check_baseline(&baseline)?;
    for merged in [true, false] {
        compare_layered(&registry, &image, &written, &baseline, merged)
            .with_context(|| format!("with merge_layers = {merged}"))?;
    }
    Ok(())
}

fn compare_layered(
    registry: &Registry,
    image: &str,
    written: &WrittenImage,
    baseline: &BTreeMap<PathBuf, Node>,
    merged: bool,
) -> anyhow::Result<()> {
    let options = SnapshotterdOptions {
        extra_config: format!("[fuse]\nmerge_layers = {merged}\n"),
        ..SnapshotterdOptions::default().with_metrics()
    };
    let node = StreamsnapNode::start(options, false, &[])?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        rpull(&node.containerd, image, SNAPSHOTTER, true)?;
        // The first Prepare resolved every other layer ahead; each later Prepare took its own.
        let metrics = String::from_utf8(node.daemon.get("/metrics")?)?;
        let ahead = metric(
            &metrics,
            "streamsnap_snapshotter_layers_resolved_ahead_total",
            &[],
        );
        ensure!(
            ahead == (written.layers.len() - 1) as f64,
            "{ahead} of {} layers were resolved ahead of their Prepare",
            written.layers.len()
        );
        let rootfs = mount_view(&node.containerd, SNAPSHOTTER, &top(written)?, "lazy")?;
        let mounts = rootfs.mounts().to_vec();
        let tree = walk_tree(rootfs.path()).context("walking the streamsnap rootfs")?;
        drop(rootfs);
        if merged {
            ensure!(
                mounts.len() == 1 && mounts[0].0 == "bind",
                "the view of a merged image is not its top layer's mount alone: {mounts:?}"
            );
        } else {
            let lowers = mounts
                .iter()
                .flat_map(|(_, options)| options)
                .find_map(|o| o.strip_prefix("lowerdir="))
                .map(|l| l.split(':').count());
            ensure!(
                lowers == Some(written.layers.len()),
                "the view of an image mounted one layer at a time has {lowers:?} lower \
                 directories for {} layers: {mounts:?}",
                written.layers.len()
            );
        }
        ensure_layers_not_downloaded(&access_log_since(registry, log_start)?, written)?;
        let diff = diff_trees(&tree, baseline);
        eprintln!(
            "compared {} entries of the streamsnap rootfs with {} of overlayfs: {} differences",
            tree.len(),
            baseline.len(),
            diff.len()
        );
        ensure!(
            diff.is_empty(),
            "the streamsnap rootfs (a) differs from the overlayfs rootfs (b) in {} entries: \
             {diff:#?}",
            diff.len()
        );
        check_view(&tree, &upper_layers_view())
    })
}

/// Acceptance 4: an image with no streaming artifact runs through the fallback, on the CRI path
/// and with `ctr-remote rpull`: the same output as on overlayfs, its layers pulled in full.
#[test]
fn image_without_artifact_falls_back_to_a_full_pull() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let data = TarGen::new()
        .dir("data", 0o755)
        .file("data/hello.txt", 0o644, b"hello from a plain image\n")
        .file("data/blob.bin", 0o600, &pseudo_random_bytes(77, 3 << 20))
        .symlink("data/link", "hello.txt")
        .finish();
    let spec = ImageSpec::busybox(vec![LayerBlob::gzip(data)])?;
    let (image, written) = push(&registry, &spec, "plain:v1")?;
    let script = [
        "sh",
        "-c",
        "cat /data/link && sha256sum /data/blob.bin /bin/busybox && ls -ln /data",
    ];
    let baseline = overlayfs_output(&image, &script)?;
    ensure!(
        baseline.starts_with("hello from a plain image\n"),
        "{baseline:?}"
    );

    let node = StreamsnapNode::start(SnapshotterdOptions::default(), true, &[registry.addr()])?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        streamsnap_pull(&node.containerd, &image).context("the CRI pull")?;
        ensure_layers_downloaded(&access_log_since(&registry, log_start)?, &written)?;
        same_as_baseline("CRI fallback", &image, &script, &baseline, || {
            run_container_in(
                &node.containerd,
                CRI_NAMESPACE,
                SNAPSHOTTER,
                &image,
                &container_id("fallback-cri"),
                &script,
            )
        })?;

        rpull(&node.containerd, &image, SNAPSHOTTER, true)?;
        let ns = node.containerd.namespace();
        same_as_baseline("rpull fallback", &image, &script, &baseline, || {
            run_container_in(
                &node.containerd,
                ns,
                SNAPSHOTTER,
                &image,
                "fallback-rpull",
                &script,
            )
        })?;
        Ok(())
    })
}

/// Acceptance 5: reading more than the cache cap evicts, and the cache's disk use never goes
/// past the cap by more than one chunk, while every byte read is right.
#[test]
fn reading_past_the_cache_cap_evicts_and_stays_under_it() -> anyhow::Result<()> {
    const CAP: u64 = 8 << 20;
    const FILES: u64 = 8;
    const FILE_SIZE: usize = 8 << 20;
    preflight()?;
    let registry = Registry::start()?;
    let mut tar = TarGen::new();
    tar.dir("data", 0o755);
    for i in 0..FILES {
        tar.file(
            &format!("data/blob-{i}.bin"),
            0o644,
            &pseudo_random_bytes(500 + i, FILE_SIZE),
        );
    }
    let spec = ImageSpec::busybox(vec![LayerBlob::gzip(tar.finish())])?;
    let (image, written) = push(&registry, &spec, "cache:v1")?;
    convert(&image)?;

    let node = StreamsnapNode::start(
        SnapshotterdOptions::default().with_cache_max_bytes(CAP),
        false,
        &[],
    )?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        rpull(&node.containerd, &image, SNAPSHOTTER, true)?;
        let rootfs = mount_view(&node.containerd, SNAPSHOTTER, &top(&written)?, "read-all")?;
        let stop = AtomicBool::new(false);
        let max_seen = AtomicU64::new(0);
        let samples = AtomicU64::new(0);
        let read = thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    max_seen.fetch_max(node.daemon.cache_disk_bytes(), Ordering::SeqCst);
                    samples.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(20));
                }
            });
            let result = (|| {
                for i in 0..FILES {
                    let path = rootfs.path().join(format!("data/blob-{i}.bin"));
                    let data = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    ensure!(
                        data.len() == FILE_SIZE
                            && Digest::sha256(&data)
                                == Digest::sha256(&pseudo_random_bytes(500 + i, FILE_SIZE)),
                        "{} read back {} bytes that differ from what the image holds",
                        path.display(),
                        data.len()
                    );
                }
                Ok(())
            })();
            stop.store(true, Ordering::SeqCst);
            result
        });
        drop(rootfs);
        read?;
        let (max, after) = (
            max_seen.load(Ordering::SeqCst),
            node.daemon.cache_disk_bytes(),
        );
        eprintln!(
            "cache {}: at most {max} bytes on disk over {} samples, {after} after reading {} \
             bytes (cap {CAP})",
            node.daemon.cache_dir().display(),
            samples.load(Ordering::SeqCst),
            FILES * FILE_SIZE as u64
        );
        ensure_layers_not_downloaded(&access_log_since(&registry, log_start)?, &written)?;
        ensure!(
            max > 0,
            "the cache dir {} stayed empty while {} bytes were read: does the daemon cache \
             chunks elsewhere?",
            node.daemon.cache_dir().display(),
            FILES * FILE_SIZE as u64
        );
        ensure!(
            max.max(after) <= CAP + CHUNK_SIZE,
            "the cache held {} bytes on disk, over the cap of {CAP} plus one chunk",
            max.max(after)
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The index kind (issue 18): no second copy of the layers

/// The blobs of the index artifact `descriptor` (TOCs and checkpoints), by digest, with their
/// sizes.
fn artifact_blobs(
    registry: &Registry,
    image: &str,
    descriptor: &serde_json::Value,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let digest = descriptor["digest"]
        .as_str()
        .context("the artifact has no digest")?;
    let repo = image
        .split_once('/')
        .and_then(|(_, rest)| rest.rsplit_once(':'))
        .map(|(repo, _)| repo)
        .context("image reference")?;
    let response = streamsnap_e2e::http::get(
        &registry.addr(),
        &format!("/v2/{repo}/manifests/{digest}"),
        &[("Accept", streamsnap_format::media::OCI_MANIFEST)],
    )?;
    ensure!(
        response.status == 200,
        "manifest {digest}: {}",
        response.status
    );
    let manifest: serde_json::Value = serde_json::from_slice(&response.body)?;
    ensure!(
        manifest["artifactType"] == streamsnap_format::media::INDEX_ARTIFACT_TYPE,
        "the artifact is {:?}",
        manifest["artifactType"]
    );
    let mut blobs = BTreeMap::new();
    for layer in manifest["layers"].as_array().context("no layers")? {
        blobs.insert(
            layer["digest"].as_str().context("digest")?.to_owned(),
            layer["size"].as_u64().context("size")?,
        );
    }
    Ok(blobs)
}

/// Acceptance of issue 18: a container starts lazily from an index-only artifact; the registry
/// served range reads of the ORIGINAL layer blobs and the index blobs, never a whole layer; a
/// 48 MiB file read through the gzip spans has the right bytes. Prints the index's share of the
/// image's bytes.
#[test]
fn index_artifact_runs_lazily_from_the_original_gzip_layers() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &big_demo_image()?, "demo:index")?;
    let artifact = convert_kind(&image, "index")?;
    let index_blobs = artifact_blobs(&registry, &image, &artifact)?;
    let index_bytes: u64 = index_blobs.values().sum();
    let total = compressed_size(&written);
    eprintln!(
        "index artifact: {index_bytes} bytes in {} blobs for {total} compressed bytes of layers \
         ({:.2}%)",
        index_blobs.len(),
        100.0 * index_bytes as f64 / total as f64
    );
    ensure!(
        (index_bytes as f64) < 0.03 * total as f64,
        "the index is {index_bytes} bytes, more than 3% of the image's {total}"
    );
    let cat = ["cat", &format!("/{}", demo_image::CONFIG_PATH)];
    let sum = ["sha256sum", "/app/models/weights-1.bin"];

    let proxy = CountingProxy::start(&registry.addr())?;
    let lazy = via_proxy(&image, &registry, &proxy);
    let node = StreamsnapNode::start(SnapshotterdOptions::default(), false, &[])?;
    node.diagnose(|| {
        let log_start = registry.access_log()?.len();
        rpull(&node.containerd, &lazy, SNAPSHOTTER, true)?;
        let ns = node.containerd.namespace();
        let output =
            run_container_in(&node.containerd, ns, SNAPSHOTTER, &lazy, "index-lazy", &cat)?;
        ensure!(
            output == demo_image::CONFIG,
            "the container printed {output:?}"
        );
        let log = access_log_since(&registry, log_start)?;
        let layers: BTreeSet<String> = written
            .layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect();
        let mut ranged = 0;
        for entry in log.iter().filter(|e| e.is_served_blob()) {
            let digest = entry.blob_get_digest().unwrap_or_default();
            if layers.contains(digest) {
                ensure!(
                    entry.status == 206,
                    "layer blob {digest} was downloaded whole: {} {} {}",
                    entry.method,
                    entry.uri,
                    entry.status
                );
                ranged += entry.bytes;
            } else {
                ensure!(
                    index_blobs.contains_key(digest) || digest == written.config.digest.to_string(),
                    "a blob of neither the image's layers, its config nor the index was read: {}",
                    entry.uri
                );
            }
        }
        let downstream = proxy.downstream_bytes();
        eprintln!(
            "lazy start: {ranged} bytes of range reads of the original layers, {downstream} \
             bytes through the proxy in all, for {total} compressed bytes ({:.2}%)",
            100.0 * downstream as f64 / total as f64
        );
        ensure!(ranged > 0, "no range read of the original layers");
        ensure!(
            downstream as f64 <= MAX_LAZY_SHARE * total as f64,
            "the lazy start read {downstream} bytes, more than {:.0}% of {total}",
            MAX_LAZY_SHARE * 100.0
        );
        let want = format!(
            "{}  /app/models/weights-1.bin\n",
            Digest::sha256(&pseudo_random_bytes(8, 48 << 20)).hex()
        );
        let got = run_container_in(&node.containerd, ns, SNAPSHOTTER, &lazy, "index-sum", &sum)?;
        ensure!(got == want, "sha256sum printed {got:?}, expected {want:?}");
        Ok(())
    })
}

/// Acceptance of issue 18: every entry of a multi-layer image (every entry type, whiteouts,
/// opaque dirs) read through an index artifact, by range from the original gzip layers,
/// compares equal with containerd's overlayfs rootfs of the same image.
#[test]
fn layered_rootfs_from_an_index_artifact_matches_overlayfs() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (image, written) = push(&registry, &layered_image()?, "layered:index")?;
    convert_kind(&image, "index")?;
    let baseline = overlayfs_tree(&image, &written)?;
    check_baseline(&baseline)?;
    let node = StreamsnapNode::start(SnapshotterdOptions::default(), false, &[])?;
    node.diagnose(|| {
        rpull(&node.containerd, &image, SNAPSHOTTER, true)?;
        let rootfs = mount_view(&node.containerd, SNAPSHOTTER, &top(&written)?, "lazy-index")?;
        let tree = walk_tree(rootfs.path()).context("walking the streamsnap rootfs")?;
        drop(rootfs);
        let diff = diff_trees(&tree, &baseline);
        eprintln!(
            "index kind: compared {} entries with {} of overlayfs: {} differences",
            tree.len(),
            baseline.len(),
            diff.len()
        );
        ensure!(
            diff.is_empty(),
            "the rootfs differs from overlayfs: {diff:#?}"
        );
        check_view(&tree, &upper_layers_view())
    })
}
