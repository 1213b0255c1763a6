//! Tests of the harness itself, against the real registry and skopeo.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::thread;

use anyhow::{Context, ensure};
use streamsnap_e2e::http;
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::{
    Registry, TarGen, layers, manifest_digest, require_root, require_root_tools, run,
    skopeo_inspect_raw, skopeo_pull_dir, skopeo_push,
};
use streamsnap_format::oci::{ImageIndex, ImageManifest};

const TOOLS: &[&str] = &["docker-registry", "skopeo"];

fn two_layer_image() -> ImageSpec {
    let bottom = TarGen::new()
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"streamsnap\n")
        .finish();
    let top = TarGen::new()
        .dir("data", 0o755)
        .file("data/blob", 0o644, &layers::small_file(1).1)
        .finish();
    ImageSpec::linux_amd64(vec![
        LayerBlob::new(bottom, Compression::Gzip),
        LayerBlob::new(top, Compression::Zstd),
    ])
    .with_cmd(&["/bin/true"])
}

#[test]
fn two_registries_run_at_once() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let starts: Vec<_> = (0..2).map(|_| thread::spawn(Registry::start)).collect();
    let registries = starts
        .into_iter()
        .map(|t| t.join().expect("start thread panicked"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(registries[0].addr() != registries[1].addr());
    ensure!(registries[0].dir() != registries[1].dir());
    for registry in &registries {
        let response = http::get(&registry.addr(), "/v2/", &[])?;
        ensure!(
            response.status == 200,
            "GET /v2/ answered {}",
            response.status
        );
    }
    Ok(())
}

#[test]
fn push_keeps_manifest_and_blobs_byte_for_byte() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    let spec = two_layer_image();
    let image = layout.write_image(&spec, "v1")?;
    let dest = format!("{}/harness/push:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &dest)?;

    let raw = skopeo_inspect_raw(&dest)?;
    ensure!(
        raw == image.manifest_json,
        "the registry serves a different manifest:\n{}\nwrote:\n{}",
        String::from_utf8_lossy(&raw),
        String::from_utf8_lossy(&image.manifest_json)
    );
    ensure!(manifest_digest(&dest)? == image.manifest.digest);
    let manifest: ImageManifest = serde_json::from_slice(&raw)?;
    ensure!(manifest.layers.len() == 2);
    ensure!(manifest.layers[1].media_type == Compression::Zstd.media_type());
    for descriptor in image.layers.iter().chain([&image.config]) {
        let path = format!("/v2/harness/push/blobs/{}", descriptor.digest);
        let response = http::get(&registry.addr(), &path, &[])?;
        ensure!(
            response.status == 200,
            "GET {path} answered {}",
            response.status
        );
        ensure!(response.body == layout.read_blob(&descriptor.digest)?);
    }
    Ok(())
}

#[test]
fn push_keeps_uncompressed_layers_uncompressed() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    let tar = TarGen::new().file("plain", 0o644, b"plain\n").finish();
    let image = layout.write_image(
        &ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::None)]),
        "plain",
    )?;
    let dest = format!("{}/harness/plain:plain", registry.addr());
    skopeo_push(layout.path(), "plain", &dest)?;
    ensure!(manifest_digest(&dest)? == image.manifest.digest);
    Ok(())
}

#[test]
fn push_of_a_multi_arch_index_keeps_the_index() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    let arm_layer = TarGen::new().file("arch", 0o644, b"arm64\n").finish();
    let specs = [
        two_layer_image(),
        ImageSpec::linux_arm64(vec![LayerBlob::gzip(arm_layer)]),
    ];
    let written = layout.write_index(&specs, "multi")?;
    let dest = format!("{}/harness/multi:multi", registry.addr());
    skopeo_push(layout.path(), "multi", &dest)?;

    let raw = skopeo_inspect_raw(&dest)?;
    ensure!(
        raw == written.index_json,
        "the registry serves a different index"
    );
    ensure!(manifest_digest(&dest)? == written.index.digest);
    let index: ImageIndex = serde_json::from_slice(&raw)?;
    let platforms: Vec<String> = index
        .manifests
        .iter()
        .map(|d| {
            d.platform
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        })
        .collect();
    ensure!(
        platforms == ["linux/amd64", "linux/arm64/v8"],
        "{platforms:?}"
    );
    for image in &written.images {
        let by_digest = format!(
            "{}/harness/multi@{}",
            registry.addr(),
            image.manifest.digest
        );
        ensure!(skopeo_inspect_raw(&by_digest)? == image.manifest_json);
    }
    Ok(())
}

#[test]
fn served_blob_bytes_count_pulls_and_ranges() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let mut layout = OciLayout::new()?;
    let image = layout.write_image(&two_layer_image(), "v1")?;
    let dest = format!("{}/harness/pull:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &dest)?;

    let before = registry.served_blob_bytes()?;
    let pulled = tempfile::tempdir()?;
    skopeo_pull_dir(&dest, pulled.path())?;
    let after = registry.served_blob_bytes()?;
    let blobs: u64 = image.layers.iter().map(|d| d.size).sum::<u64>() + image.config.size;
    ensure!(
        after - before == blobs,
        "a pull served {} blob bytes, the image has {blobs}",
        after - before
    );
    ensure!(fs::read(pulled.path().join("manifest.json"))? == image.manifest_json);

    let layer = &image.layers[0];
    let path = format!("/v2/harness/pull/blobs/{}", layer.digest);
    let response = http::get(&registry.addr(), &path, &[("Range", "bytes=10-109")])?;
    ensure!(
        response.status == 206,
        "a range GET answered {}",
        response.status
    );
    ensure!(response.body == layout.read_blob(&layer.digest)?[10..110]);
    let ranged = registry.served_blob_bytes()?;
    ensure!(
        ranged - after == 100,
        "a 100 byte range counted {}",
        ranged - after
    );

    // A HEAD and a manifest GET serve no blob bytes.
    http::request(&registry.addr(), "HEAD", &path, &[])?;
    skopeo_inspect_raw(&dest)?;
    ensure!(registry.served_blob_bytes()? == ranged);
    Ok(())
}

#[test]
fn drop_kills_the_registry_and_removes_its_dir() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let pid = registry.pid();
    let dir = registry.dir().to_owned();
    ensure!(Path::new(&format!("/proc/{pid}")).exists());
    ensure!(dir.join("config.yml").exists() && registry.log_path().exists());
    drop(registry);
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
    ensure!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}

#[test]
fn start_with_config_extra_appends_top_level_yaml() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let extra = "notifications:\n  endpoints:\n    - name: harness\n      \
                 url: http://127.0.0.1:9/events\n      timeout: 1s\n      threshold: 1\n      \
                 backoff: 1s\n      disabled: true\n";
    let registry = Registry::start_with_config_extra(extra)?;
    let config = fs::read_to_string(registry.dir().join("config.yml"))?;
    ensure!(config.ends_with(&format!("{extra}\n")), "{config}");
    ensure!(http::get(&registry.addr(), "/v2/", &[])?.status == 200);
    Ok(())
}

/// GNU tar, as root, extracts the generated layer with every entry type intact: the generator
/// writes what real tools read.
#[test]
fn gnu_tar_extracts_every_entry_type() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&["tar"])?;
    let work = tempfile::tempdir()?;
    let tar_path = work.path().join("layer.tar");
    fs::write(&tar_path, layers::every_entry_type_layer())?;
    let root = work.path().join("root");
    fs::create_dir(&root)?;
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--same-owner", "-xpf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(&root))?;

    let meta = |p: &str| fs::symlink_metadata(root.join(p)).with_context(|| p.to_owned());
    ensure!(meta("files/setuid")?.mode() & 0o7777 == 0o4755);
    ensure!(meta("files/setgid")?.mode() & 0o7777 == 0o2755);
    ensure!(meta("modes/sticky")?.mode() & 0o7777 == 0o1777);
    ensure!(meta("modes/private")?.mode() & 0o7777 == 0o700);
    let owned = meta("files/owned-100000")?;
    ensure!((owned.uid(), owned.gid()) == (100_000, 100_000));
    ensure!(meta("files/owned-1000")?.uid() == 1000);
    ensure!(meta("files/mtime-epoch")?.mtime() == 0);
    ensure!(meta("files/mtime-2038")?.mtime() == 1 << 31);
    let char_dev = meta("dev/char-null")?;
    ensure!(char_dev.file_type().is_char_device() && char_dev.rdev() == libc_makedev(1, 3));
    let block_dev = meta("dev/block-loop0")?;
    ensure!(block_dev.file_type().is_block_device() && block_dev.rdev() == libc_makedev(7, 0));
    ensure!(meta("dev/fifo")?.file_type().is_fifo());
    ensure!(meta("links/hardlink")?.ino() == meta("files/hello.txt")?.ino());
    ensure!(fs::read_link(root.join("links/absolute"))? == Path::new("/files/hello.txt"));
    ensure!(fs::read(root.join("links/long-target"))? == b"hello, streamsnap\n");
    ensure!(fs::read(root.join(layers::pax_long_path()))? == b"a pax long name\n");
    ensure!(fs::read(root.join(layers::gnu_long_path()))? == b"a gnu long name\n");
    ensure!(fs::read(root.join("unicode/日本語/ファイル.txt"))? == "ファイル\n".as_bytes());
    ensure!(meta("files/large.bin")?.len() == layers::LARGE_FILE_SIZE as u64);
    ensure!(
        meta("opaque/.wh..wh..opq")?.is_file(),
        "tar keeps whiteouts as plain files"
    );

    // Extended attributes, listed by tar from the archive itself.
    let listing = run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-tvvf"])
        .arg(&tar_path)
        .arg("files/xattrs"))?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for name in ["user.comment", "user.binary", "security.capability"] {
        ensure!(listing.contains(name), "no {name} in {listing}");
    }
    Ok(())
}

/// `makedev` as glibc encodes it, for comparing `st_rdev`.
fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}
