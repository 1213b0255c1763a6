//! Test images as OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/…`),
//! built from generated layer tars, ready for `skopeo copy oci:DIR:TAG docker://…`
//! ([`crate::skopeo_push`]). Everything is deterministic: the same spec gives the same digests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use streamsnap_format::Digest;
use streamsnap_format::media;
use streamsnap_format::oci::{Annotations, Descriptor, ImageIndex, ImageManifest, Platform};
use tempfile::TempDir;

/// Annotation naming a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `PATH` of the images' config unless a spec sets its own environment.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a layer's tar is compressed in its blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// One layer: an uncompressed tar and how to compress it.
#[derive(Clone, PartialEq, Eq)]
pub struct LayerBlob {
    pub tar: Vec<u8>,
    pub compression: Compression,
}

impl std::fmt::Debug for LayerBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBlob")
            .field("tar_len", &self.tar.len())
            .field("compression", &self.compression)
            .finish()
    }
}

impl LayerBlob {
    pub fn new(tar: Vec<u8>, compression: Compression) -> Self {
        Self { tar, compression }
    }

    pub fn gzip(tar: Vec<u8>) -> Self {
        Self::new(tar, Compression::Gzip)
    }

    /// The blob as pushed: the tar compressed (deterministically: gzip header without mtime or
    /// name, fixed levels).
    pub fn compressed(&self) -> anyhow::Result<Vec<u8>> {
        match self.compression {
            Compression::None => Ok(self.tar.clone()),
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                encoder.write_all(&self.tar)?;
                encoder.finish().context("gzip-compressing a layer")
            }
            Compression::Zstd => {
                zstd::encode_all(self.tar.as_slice(), 3).context("zstd-compressing a layer")
            }
        }
    }

    pub fn media_type(&self) -> &'static str {
        self.compression.media_type()
    }

    /// sha256 of the uncompressed tar, as in the config's `rootfs.diff_ids`.
    pub fn diff_id(&self) -> Digest {
        Digest::sha256(&self.tar)
    }
}

/// An image to write: layers bottom first, platform and the parts of the config a container run
/// needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub layers: Vec<LayerBlob>,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// `config.Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `config.Env`; empty means just [`DEFAULT_PATH_ENV`].
    pub env: Vec<String>,
}

impl ImageSpec {
    pub fn new(os: &str, architecture: &str, layers: Vec<LayerBlob>) -> Self {
        Self {
            layers,
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
            cmd: None,
            env: Vec::new(),
        }
    }

    pub fn linux_amd64(layers: Vec<LayerBlob>) -> Self {
        Self::new("linux", "amd64", layers)
    }

    /// linux/arm64/v8.
    pub fn linux_arm64(layers: Vec<LayerBlob>) -> Self {
        Self {
            variant: Some("v8".to_owned()),
            ..Self::new("linux", "arm64", layers)
        }
    }

    /// Sets `config.Cmd`.
    pub fn with_cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = Some(cmd.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
            os_version: None,
        }
    }

    /// The image config JSON for layers with these diff IDs.
    pub fn config_json(&self, diff_ids: &[Digest]) -> Vec<u8> {
        let env = if self.env.is_empty() {
            vec![DEFAULT_PATH_ENV.to_owned()]
        } else {
            self.env.clone()
        };
        let mut config = json!({ "Env": env });
        if let Some(cmd) = &self.cmd {
            config["Cmd"] = json!(cmd);
        }
        let mut doc = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(variant) = &self.variant {
            doc["variant"] = json!(variant);
        }
        serde_json::to_vec(&doc).expect("a json value serializes")
    }
}

/// What [`OciLayout::write_image`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenImage {
    /// The manifest's descriptor, with the platform; its digest is what a registry serves.
    pub manifest: Descriptor,
    pub manifest_json: Vec<u8>,
    pub config: Descriptor,
    /// Layer blob descriptors, bottom first.
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<Digest>,
}

/// What [`OciLayout::write_index`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenIndex {
    pub index: Descriptor,
    pub index_json: Vec<u8>,
    /// One per spec, in order.
    pub images: Vec<WrittenImage>,
}

/// An OCI image layout in a temp dir, removed on drop. Tags accumulate in `index.json`.
#[derive(Debug)]
pub struct OciLayout {
    dir: TempDir,
    /// `index.json` entries, one per tag.
    refs: Vec<Descriptor>,
}

impl OciLayout {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-oci.")
            .tempdir()
            .context("creating a temp dir for an OCI layout")?;
        fs::create_dir_all(dir.path().join("blobs/sha256"))?;
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let layout = Self {
            dir,
            refs: Vec::new(),
        };
        layout.write_index_json()?;
        Ok(layout)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `oci:DIR:TAG`, the skopeo reference of a tag.
    pub fn reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.path().display())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.path().join("blobs/sha256").join(digest.hex())
    }

    pub fn read_blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Writes `data` as a blob (unless present) and returns its descriptor.
    pub fn write_blob(&self, media_type: &str, data: &[u8]) -> anyhow::Result<Descriptor> {
        let descriptor = Descriptor::of(media_type, data);
        let path = self.blob_path(&descriptor.digest);
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        }
        Ok(descriptor)
    }

    /// Writes an image (layers, config, manifest) and tags its manifest `tag`.
    pub fn write_image(&mut self, spec: &ImageSpec, tag: &str) -> anyhow::Result<WrittenImage> {
        let image = self.write_manifest(spec)?;
        self.tag(image.manifest.clone(), tag)?;
        Ok(image)
    }

    /// Writes one image per spec and an index of them (entries carry their platform), tagged
    /// `tag`.
    pub fn write_index(&mut self, specs: &[ImageSpec], tag: &str) -> anyhow::Result<WrittenIndex> {
        let images = specs
            .iter()
            .map(|spec| self.write_manifest(spec))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let index = ImageIndex {
            manifests: images.iter().map(|i| i.manifest.clone()).collect(),
            ..ImageIndex::empty()
        };
        let index_json = serde_json::to_vec(&index)?;
        let descriptor = self.write_blob(media::OCI_INDEX, &index_json)?;
        self.tag(descriptor.clone(), tag)?;
        Ok(WrittenIndex {
            index: descriptor,
            index_json,
            images,
        })
    }

    fn write_manifest(&self, spec: &ImageSpec) -> anyhow::Result<WrittenImage> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in &spec.layers {
            layers.push(self.write_blob(layer.media_type(), &layer.compressed()?)?);
            diff_ids.push(layer.diff_id());
        }
        let config = self.write_blob(media::OCI_CONFIG, &spec.config_json(&diff_ids))?;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config: config.clone(),
            layers: layers.clone(),
            subject: None,
            annotations: Annotations::new(),
        };
        let manifest_json = serde_json::to_vec(&manifest)?;
        let mut descriptor = self.write_blob(media::OCI_MANIFEST, &manifest_json)?;
        descriptor.platform = Some(spec.platform());
        Ok(WrittenImage {
            manifest: descriptor,
            manifest_json,
            config,
            layers,
            diff_ids,
        })
    }

    fn tag(&mut self, mut descriptor: Descriptor, tag: &str) -> anyhow::Result<()> {
        descriptor
            .annotations
            .insert(REF_NAME.to_owned(), tag.to_owned());
        self.refs
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        self.refs.push(descriptor);
        self.write_index_json()
    }

    fn write_index_json(&self) -> anyhow::Result<()> {
        let index = ImageIndex {
            manifests: self.refs.clone(),
            ..ImageIndex::empty()
        };
        let path = self.path().join("index.json");
        fs::write(&path, serde_json::to_vec(&index)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn layers_round_trip_through_every_compression() {
        let tar = crate::TarGen::new().file("a", 0o644, b"hello").finish();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let layer = LayerBlob::new(tar.clone(), compression);
            let blob = layer.compressed().unwrap();
            let plain = match compression {
                Compression::None => blob,
                Compression::Gzip => {
                    let mut out = Vec::new();
                    flate2::read::GzDecoder::new(blob.as_slice())
                        .read_to_end(&mut out)
                        .unwrap();
                    out
                }
                Compression::Zstd => zstd::decode_all(blob.as_slice()).unwrap(),
            };
            assert_eq!(plain, tar);
            assert_eq!(layer.compressed().unwrap(), layer.compressed().unwrap());
        }
    }

    #[test]
    fn layout_has_tagged_manifest_and_blobs() {
        let mut layout = OciLayout::new().unwrap();
        let tar = crate::TarGen::new().file("a", 0o644, b"hello").finish();
        let spec = ImageSpec::linux_amd64(vec![LayerBlob::gzip(tar)]).with_cmd(&["/bin/sh"]);
        let image = layout.write_image(&spec, "v1").unwrap();
        let index: ImageIndex =
            serde_json::from_slice(&fs::read(layout.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index.manifests.len(), 1);
        assert_eq!(index.manifests[0].digest, image.manifest.digest);
        assert_eq!(index.manifests[0].annotations[REF_NAME], "v1");
        let config: serde_json::Value =
            serde_json::from_slice(&layout.read_blob(&image.config.digest).unwrap()).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["/bin/sh"]));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            json!(image.diff_ids[0].to_string())
        );
        // Re-tagging replaces the entry.
        layout.write_image(&spec, "v1").unwrap();
        layout.write_image(&spec, "v2").unwrap();
        let index: ImageIndex =
            serde_json::from_slice(&fs::read(layout.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index.manifests.len(), 2);
    }
}
