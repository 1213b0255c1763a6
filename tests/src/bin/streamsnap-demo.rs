//! The demo: a private registry, an image shaped like a large application image, converted into
//! a streaming artifact with `streamsnap artifact-streaming create`, and what the registry then
//! holds. Run by `deploy/demo.sh` (which installs the Debian packages and builds everything).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, ensure};
use streamsnap_e2e::demo_image::{DemoShape, demo_image};
use streamsnap_e2e::image::OciLayout;
use streamsnap_e2e::{Registry, manifest_digest, require_root_tools, skopeo_push, workspace_bin};

fn main() -> anyhow::Result<()> {
    require_root_tools(&["docker-registry", "skopeo", "busybox"])?;
    let streamsnap = workspace_bin("streamsnap")?;

    step("starting a private registry (docker-registry 2.8)");
    let registry = Registry::start()?;
    println!("   registry at {}", registry.addr());

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
    println!("   the original tag still points at {before}");

    step(&format!(
        "streamsnap manifest list-referrers --image {image}"
    ));
    let status = Command::new(&streamsnap)
        .args(["manifest", "list-referrers", "--image", &image])
        .status()
        .context("running streamsnap")?;
    ensure!(status.success(), "listing referrers failed");

    println!("\ndemo done: the image is converted; the registry and its data are removed on exit");
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
