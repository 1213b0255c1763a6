//! The demo: a private registry, an image shaped like a large application image, converted into
//! a streaming artifact; then a private containerd with streamsnap-snapshotterd runs a container
//! from it lazily, and the same container runs from a full pull on containerd's overlayfs
//! snapshotter for comparison. Bytes are counted by a proxy in front of the registry, outside
//! every program under test. Run by `deploy/demo.sh` (which installs the Debian packages and
//! builds everything).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::container::{pull, rpull, run_container};
use streamsnap_e2e::demo_image::{CONFIG, CONFIG_PATH, DemoShape, demo_image};
use streamsnap_e2e::image::OciLayout;
use streamsnap_e2e::{
    Containerd, ContainerdOptions, CountingProxy, Registry, Snapshotterd, SnapshotterdOptions,
    manifest_digest, require_root_tools, skopeo_push, workspace_bin,
};

fn main() -> anyhow::Result<()> {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "busybox",
        "containerd",
        "ctr",
        "ctr-remote",
        "runc",
    ])?;
    let streamsnap = workspace_bin("streamsnap")?;

    step("starting a private registry (docker-registry 2.8) behind a byte-counting proxy");
    let registry = Registry::start()?;
    let proxy = CountingProxy::start(&registry.addr())?;
    println!(
        "   registry at {}, proxy at {}",
        registry.addr(),
        proxy.addr()
    );

    step("building and pushing the demo image");
    let started = Instant::now();
    let spec = demo_image(DemoShape::default())?;
    let mut layout = OciLayout::new()?;
    let written = layout.write_image(&spec, "v1")?;
    let image = format!("{}/demo/app:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &image)?;
    let compressed: u64 = written.layers.iter().map(|l| l.size).sum();
    let uncompressed: usize = spec.layers.iter().map(|l| l.tar.len()).sum();
    println!(
        "   {image}: {} layers, {} compressed, {} uncompressed ({:.1} s)",
        written.layers.len(),
        mb(compressed),
        mb(uncompressed as u64),
        started.elapsed().as_secs_f64()
    );
    let before = manifest_digest(&image)?;

    step(&format!(
        "streamsnap artifact-streaming create --image {image}"
    ));
    let status = Command::new(&streamsnap)
        .args(["artifact-streaming", "create", "--image", &image])
        .status()
        .context("running streamsnap")?;
    ensure!(status.success(), "conversion failed");
    ensure!(
        manifest_digest(&image)? == before,
        "the original image changed"
    );
    let status = Command::new(&streamsnap)
        .args(["manifest", "list-referrers", "--image", &image])
        .status()
        .context("running streamsnap")?;
    ensure!(status.success(), "listing referrers failed");

    step("starting streamsnap-snapshotterd and a private containerd using it");
    let daemon = Snapshotterd::start(SnapshotterdOptions::default())?;
    let containerd = Containerd::start(
        ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
    )?;
    println!(
        "   snapshotter socket {}, containerd socket {}",
        daemon.socket().display(),
        containerd.address().display()
    );

    // Through the proxy, so every byte the node reads from the registry is counted.
    let lazy_image = format!("{}/demo/app:v1", proxy.addr());
    step("lazy: ctr-remote image rpull --snapshotter streamsnap, then ctr run");
    let lazy = measure(&proxy, || {
        rpull(&containerd, &lazy_image, "streamsnap", true)?;
        run_container(
            &containerd,
            &lazy_image,
            "streamsnap",
            "demo-lazy",
            &["cat", &format!("/{CONFIG_PATH}")],
        )
    })?;
    ensure!(
        lazy.output == CONFIG,
        "unexpected output: {:?}",
        lazy.output
    );
    print!("   container printed:\n{}", indent(&lazy.output));

    step("baseline: ctr images pull --snapshotter overlayfs (full pull), then ctr run");
    let baseline_containerd = Containerd::start(ContainerdOptions::default())?;
    let full = measure(&proxy, || {
        pull(&baseline_containerd, &lazy_image, "overlayfs", true)?;
        run_container(
            &baseline_containerd,
            &lazy_image,
            "overlayfs",
            "demo-full",
            &["cat", &format!("/{CONFIG_PATH}")],
        )
    })?;
    ensure!(full.output == lazy.output, "outputs differ");

    step("result");
    println!("   image size (compressed layers):      {}", mb(compressed));
    println!(
        "   streamsnap (lazy) fetched:           {} = {:.2}% of the image, ready in {:.2} s",
        mb(lazy.bytes),
        100.0 * lazy.bytes as f64 / compressed as f64,
        lazy.elapsed.as_secs_f64()
    );
    println!(
        "   overlayfs (full pull) fetched:       {} = {:.0}% of the image, ready in {:.2} s",
        mb(full.bytes),
        100.0 * full.bytes as f64 / compressed as f64,
        full.elapsed.as_secs_f64()
    );
    println!("   same container output on both: yes");
    println!(
        "\ndemo done; registry, containerd and snapshotter are stopped and their data removed"
    );
    Ok(())
}

struct Measured {
    output: String,
    bytes: u64,
    elapsed: Duration,
}

fn measure(
    proxy: &CountingProxy,
    f: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<Measured> {
    let bytes_before = proxy.downstream_bytes();
    let started = Instant::now();
    let output = f()?;
    Ok(Measured {
        output,
        bytes: proxy.downstream_bytes() - bytes_before,
        elapsed: started.elapsed(),
    })
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("     | {l}\n")).collect()
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
