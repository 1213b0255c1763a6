//! `streamsnap artifact-streaming create` and `manifest list-referrers` against the real
//! distribution registry (Debian docker-registry 2.8, which has no referrers API, so the
//! fallback tag is what these tests exercise).

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, ensure};
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::{
    Registry, TarGen, diff_views, every_entry_type_layer, manifest_digest, require_root_tools,
    skopeo_inspect_raw, skopeo_push, tar_views, toc_views, upper_layers, workspace_bin,
};
use streamsnap_format::oci::{Descriptor, ImageIndex, ImageManifest};
use streamsnap_format::{Digest, Toc, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository};

const TOOLS: &[&str] = &["docker-registry", "skopeo"];

fn streamsnap(args: &[&str]) -> anyhow::Result<Output> {
    let bin = workspace_bin("streamsnap")?;
    Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn create_json(image: &str) -> anyhow::Result<Descriptor> {
    let output = streamsnap(&[
        "artifact-streaming",
        "create",
        "--image",
        image,
        "--output",
        "json",
    ])?;
    ensure!(
        output.status.success(),
        "create {image} failed: {}",
        stderr_of(&output)
    );
    // stdout holds the descriptor and nothing else.
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("stdout is not one descriptor: {}", stdout_of(&output)))
}

fn list_referrers_json(image: &str) -> anyhow::Result<Vec<Descriptor>> {
    let output = streamsnap(&[
        "manifest",
        "list-referrers",
        "--image",
        image,
        "--output",
        "json",
    ])?;
    ensure!(
        output.status.success(),
        "list-referrers failed: {}",
        stderr_of(&output)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> anyhow::Result<Client> {
    Ok(Client::new(ClientConfig::default())?)
}

fn repository(registry: &Registry, name: &str) -> Repository {
    Reference::parse(&format!("{}/{name}:x", registry.addr()))
        .unwrap()
        .repository
}

/// Number of blob files in the registry's storage: what a failed conversion must not change.
fn stored_blobs(registry: &Registry) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count(&e.path())
                    } else {
                        usize::from(e.file_name() == "data")
                    }
                })
                .sum()
        })
    }
    count(&registry.dir().join("data/docker/registry/v2/blobs"))
}

/// Pushes an image the test layout holds, returns its manifest digest as the registry serves it.
fn push(registry: &Registry, layout: &OciLayout, tag: &str, repo: &str) -> anyhow::Result<Digest> {
    let dest = format!("{}/{repo}:{tag}", registry.addr());
    skopeo_push(layout.path(), tag, &dest)?;
    manifest_digest(&dest)
}

/// Reads every layer of an artifact back through the format reader, TOC and chunks fetched by
/// range from the registry, and compares each entry with the original layer tar.
async fn check_round_trip(
    client: &Client,
    repo: &Repository,
    artifact: &Descriptor,
    source: &ImageManifest,
    tars: &[Vec<u8>],
    diff_ids: &[Digest],
) -> anyhow::Result<()> {
    let manifest = client
        .get_manifest(repo, &artifact.digest.to_string())
        .await?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest.bytes)?;
    ensure!(manifest.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE));
    ensure!(
        manifest.layers.len() == 2 * tars.len(),
        "{} layer descriptors",
        manifest.layers.len()
    );
    for (i, tar) in tars.iter().enumerate() {
        let toc_descriptor = &manifest.layers[2 * i];
        let data_descriptor = &manifest.layers[2 * i + 1];
        ensure!(
            toc_descriptor.media_type == media::TOC && data_descriptor.media_type == media::CHUNKS
        );
        for descriptor in [toc_descriptor, data_descriptor] {
            let annotation =
                |key: &str| descriptor.annotations.get(key).cloned().unwrap_or_default();
            ensure!(
                annotation(media::ANNOTATION_LAYER_DIGEST) == source.layers[i].digest.to_string()
            );
            ensure!(annotation(media::ANNOTATION_LAYER_DIFF_ID) == diff_ids[i].to_string());
        }
        // get_blob_bytes checks the TOC against the digest the manifest pins.
        let toc_blob = client
            .get_blob_bytes(repo, &toc_descriptor.digest, 64 << 20)
            .await?;
        let toc = Toc::decode(&toc_blob)?;
        ensure!(
            toc.data_digest() == data_descriptor.digest && toc.data_size() == data_descriptor.size
        );
        ensure!(toc.layer_digest() == source.layers[i].digest && toc.diff_id() == diff_ids[i]);

        let mut frames = Vec::new();
        for chunk in toc.chunks() {
            let frame = client
                .read_range(
                    repo,
                    &data_descriptor.digest,
                    chunk.offset,
                    u64::from(chunk.compressed_size),
                )
                .await?;
            frames.push(frame);
        }
        let got = toc_views(&toc, |chunk| {
            let index = toc
                .chunks()
                .iter()
                .position(|c| c == chunk)
                .context("chunk not in table")?;
            Ok(frames[index].to_vec())
        })?;
        let differences = diff_views(&got, &tar_views(tar)?);
        ensure!(
            differences.is_empty(),
            "layer {i} differs from its original tar: {differences:#?}"
        );
    }
    Ok(())
}

#[test]
fn create_round_trips_every_entry_type_and_leaves_the_image_untouched() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let mut tars = vec![every_entry_type_layer()];
    tars.extend(upper_layers());
    let compressions = [
        Compression::Gzip,
        Compression::Zstd,
        Compression::None,
        Compression::Gzip,
    ];
    let layers = tars
        .iter()
        .zip(compressions)
        .map(|(t, c)| LayerBlob::new(t.clone(), c))
        .collect();
    let mut layout = OciLayout::new()?;
    let written = layout.write_image(&ImageSpec::linux_amd64(layers), "v1")?;
    let before = push(&registry, &layout, "v1", "rt/app")?;
    let raw_before = skopeo_inspect_raw(&format!("{}/rt/app:v1", registry.addr()))?;
    ensure!(before == written.manifest.digest);

    let image = format!("{}/rt/app:v1", registry.addr());
    let artifact = create_json(&image)?;
    ensure!(artifact.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE));
    ensure!(
        artifact.annotations.get(media::ANNOTATION_SOURCE_MANIFEST) == Some(&before.to_string())
    );

    // The original tag still resolves to the same manifest, byte for byte.
    ensure!(manifest_digest(&image)? == before, "the tag moved");
    ensure!(
        skopeo_inspect_raw(&image)? == raw_before,
        "the manifest changed"
    );

    // list-referrers shows it, in JSON and in text.
    let listed = list_referrers_json(&image)?;
    ensure!(
        listed.iter().any(|d| d.digest == artifact.digest),
        "not listed: {listed:?}"
    );
    let text = streamsnap(&["manifest", "list-referrers", "--image", &image])?;
    ensure!(text.status.success());
    let line = format!("{}\t{}", artifact.digest, media::ARTIFACT_TYPE);
    ensure!(
        stdout_of(&text).lines().any(|l| l == line),
        "text output: {}",
        stdout_of(&text)
    );

    // Distribution 2.8 has no referrers API: the fallback tag holds an index that lists it.
    let fallback = format!("{}/rt/app:sha256-{}", registry.addr(), before.hex());
    let index: ImageIndex = serde_json::from_slice(&skopeo_inspect_raw(&fallback)?)?;
    ensure!(
        index.manifests.iter().any(|d| d.digest == artifact.digest
            && d.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE))
    );

    // Reading back every entry through the TOC and range-fetched chunks gives the original tars.
    let client = client()?;
    let repo = repository(&registry, "rt/app");
    let source: ImageManifest = serde_json::from_slice(&written.manifest_json)?;
    runtime().block_on(check_round_trip(
        &client,
        &repo,
        &artifact,
        &source,
        &tars,
        &written.diff_ids,
    ))?;

    // A second create finds the artifact instead of converting again.
    let again = streamsnap(&["artifact-streaming", "create", "--image", &image])?;
    ensure!(
        again.status.success() && stdout_of(&again).contains("already has a streaming artifact")
    );
    ensure!(list_referrers_json(&image)?.len() == 1);
    Ok(())
}

#[test]
fn a_multi_arch_index_converts_only_its_amd64_image() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let tar = |name: &str| TarGen::new().file(name, 0o644, name.as_bytes()).finish();
    let mut layout = OciLayout::new()?;
    let written = layout.write_index(
        &[
            ImageSpec::linux_amd64(vec![LayerBlob::gzip(tar("amd64"))]),
            ImageSpec::linux_arm64(vec![LayerBlob::gzip(tar("arm64"))]),
        ],
        "multi",
    )?;
    let index_digest = push(&registry, &layout, "multi", "ma/app")?;
    let image = format!("{}/ma/app:multi", registry.addr());

    let artifact = create_json(&image)?;
    let amd64 = &written.images[0].manifest.digest;
    let arm64 = &written.images[1].manifest.digest;
    ensure!(
        artifact.annotations.get(media::ANNOTATION_SOURCE_MANIFEST) == Some(&amd64.to_string())
    );
    ensure!(
        manifest_digest(&image)? == index_digest,
        "the index tag moved"
    );

    let by_digest = |d: &Digest| format!("{}/ma/app@{d}", registry.addr());
    ensure!(list_referrers_json(&by_digest(amd64))?.len() == 1);
    ensure!(
        list_referrers_json(&by_digest(arm64))?.is_empty(),
        "arm64 must not be converted"
    );
    Ok(())
}

#[test]
fn unconvertible_images_fail_clearly_and_push_nothing() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = Registry::start()?;
    let client = client()?;
    let rt = runtime();

    // An arm64-only image.
    let mut layout = OciLayout::new()?;
    layout.write_image(
        &ImageSpec::linux_arm64(vec![LayerBlob::gzip(
            TarGen::new().file("f", 0o644, b"x").finish(),
        )]),
        "arm",
    )?;
    let arm = push(&registry, &layout, "arm", "bad/arm")?;
    // A layer whose gzip stream is corrupt (its digest matches the corrupt bytes, so only the
    // decompressor can tell), and one with a path-traversal entry.
    let good = every_entry_type_layer();
    let mut corrupt = LayerBlob::gzip(good.clone()).compressed()?;
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x5a;
    let traversal = {
        let mut tar = TarGen::new();
        tar.raw_entry(
            b"../../etc/cron.d/evil",
            tar::EntryType::Regular,
            4,
            b"evil",
        );
        tar.finish()
    };
    let cases: Vec<(&str, Vec<u8>, Digest, &str)> = vec![
        ("corrupt", corrupt, Digest::sha256(&good), "corrupt"),
        (
            "traversal",
            traversal.clone(),
            Digest::sha256(&traversal),
            "'..'",
        ),
    ];
    let mut images = vec![(
        format!("{}/bad/arm:arm", registry.addr()),
        arm,
        "linux/arm64".to_owned(),
    )];
    for (name, blob, diff_id, expected) in cases {
        let repo = repository(&registry, &format!("bad/{name}"));
        let media_type = if name == "corrupt" {
            Compression::Gzip.media_type()
        } else {
            Compression::None.media_type()
        };
        let digest = rt.block_on(push_raw_image(
            &client, &repo, name, media_type, blob, diff_id,
        ))?;
        images.push((
            format!("{}/bad/{name}:{name}", registry.addr()),
            digest,
            expected.to_owned(),
        ));
    }

    for (image, digest, expected) in images {
        let blobs_before = stored_blobs(&registry);
        let output = streamsnap(&[
            "artifact-streaming",
            "create",
            "--image",
            &image,
            "--output",
            "json",
        ])?;
        let stderr = stderr_of(&output);
        ensure!(!output.status.success(), "{image}: create succeeded");
        ensure!(
            stderr.contains(&expected),
            "{image}: error does not say {expected:?}: {stderr}"
        );
        ensure!(
            output.stdout.is_empty(),
            "{image}: stdout not empty on failure"
        );
        let by_digest = format!("{}@{digest}", image.rsplit_once(':').unwrap().0);
        ensure!(
            list_referrers_json(&by_digest)?.is_empty(),
            "{image}: a referrer is visible"
        );
        ensure!(
            stored_blobs(&registry) == blobs_before,
            "{image}: blobs were pushed"
        );
    }
    Ok(())
}

/// Pushes a one-layer linux/amd64 image with the layer blob as given (possibly corrupt).
async fn push_raw_image(
    client: &Client,
    repo: &Repository,
    tag: &str,
    layer_media_type: &str,
    layer: Vec<u8>,
    diff_id: Digest,
) -> anyhow::Result<Digest> {
    let layer_descriptor = Descriptor::of(layer_media_type, &layer);
    let config = ImageSpec::linux_amd64(Vec::new()).config_json(&[diff_id]);
    let config_descriptor = Descriptor::of(media::OCI_CONFIG, &config);
    client
        .push_blob(repo, &layer_descriptor.digest, layer.into())
        .await?;
    client
        .push_blob(repo, &config_descriptor.digest, config.into())
        .await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: None,
        config: config_descriptor,
        layers: vec![layer_descriptor],
        subject: None,
        annotations: Default::default(),
    };
    let put = client
        .put_manifest(
            repo,
            tag,
            media::OCI_MANIFEST,
            serde_json::to_vec(&manifest)?.into(),
        )
        .await?;
    Ok(put.digest)
}
