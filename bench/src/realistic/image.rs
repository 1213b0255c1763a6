//! The realistic image: software layers from the overlayfs upper dirs `bench/image/build-rootfs.sh`
//! leaves in the cache dir, an app layer (config and start-up script) and a data layer of a
//! given size, written as gzip layers into an OCI image layout kept in the cache dir, ready for
//! `skopeo copy oci:...`. Layer blobs are cached by what they are made from; the data layer is
//! generated (deterministic pseudo-random bytes, incompressible) and cached only at the sizes
//! asked to keep.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, bail};
use serde_json::json;
use streamsnap_e2e::image::{ImageSpec, REF_NAME};
use streamsnap_format::DigestHasher;
use streamsnap_format::media;
use streamsnap_format::oci::{Annotations, Descriptor, ImageIndex, ImageManifest};

/// Gzip layer media type.
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Bumped when the way a layer is written changes (invalidates cached blobs).
const RECIPE_VERSION: u32 = 1;
/// The data file in the image, and the bytes its header takes.
pub const DATA_PATH: &str = "data/dataset.bin";
pub const DATA_MAGIC: &[u8] = b"STREAMSNAP-BENCH-DATA v1\n";

/// The start-up: imports the scientific stack, reads its config and the data file's header,
/// prints "ready".
pub const START_PY: &str = r#"import json
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse
import scipy.stats
import sklearn
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

with open("/app/config.json") as f:
    config = json.load(f)
with open(config["data"], "rb") as f:
    header = f.read(65536)
assert header.startswith(b"STREAMSNAP-BENCH-DATA"), "unexpected data file"
model = make_pipeline(StandardScaler(), LogisticRegression(C=config["c"]))
frame = pd.DataFrame(np.zeros((4, 3)), columns=["a", "b", "c"])
print("ready", flush=True)
"#;

/// The command the image runs.
pub const WORKLOAD: &[&str] = &["python3", "/app/start.py"];

/// A layer blob in the layout.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub digest: String,
    pub diff_id: String,
    /// Compressed size.
    pub size: u64,
    /// Uncompressed tar size.
    pub tar_size: u64,
    pub files: u64,
    /// What it was made from: a change rebuilds it.
    pub recipe: String,
}

/// The image at one data size, as written to the layout.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub layers: Vec<LayerInfo>,
}

impl BuiltImage {
    pub fn compressed_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    pub fn unpacked_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.tar_size).sum()
    }

    pub fn files(&self) -> u64 {
        self.layers.iter().map(|l| l.files).sum()
    }
}

/// The OCI layout and layer cache under `CACHE_DIR/oci` and `CACHE_DIR/layers`.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    pub fn new(cache_dir: &Path) -> anyhow::Result<Self> {
        let dir = cache_dir.to_owned();
        fs::create_dir_all(dir.join("oci/blobs/sha256"))?;
        fs::create_dir_all(dir.join("layers"))?;
        fs::write(
            dir.join("oci/oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        Ok(Self { dir })
    }

    pub fn layout(&self) -> PathBuf {
        self.dir.join("oci")
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.layout()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// The software layers (base, python, stack) from the upper dirs under `CACHE_DIR/rootfs`.
    pub fn software_layers(&self) -> anyhow::Result<Vec<LayerInfo>> {
        let mut layers = Vec::new();
        for name in ["base", "python", "stack"] {
            let stage = self.dir.join("rootfs").join(name);
            let done = stage.join("done");
            let stamp = fs::metadata(&done)
                .with_context(|| {
                    format!(
                        "{} is missing: build the rootfs first (bench/image/build-rootfs.sh)",
                        done.display()
                    )
                })?
                .modified()?
                .duration_since(UNIX_EPOCH)?
                .as_nanos();
            let recipe = format!("v{RECIPE_VERSION} upper dir built {stamp}");
            let upper = stage.join("upper");
            layers.push(self.layer(name, &recipe, 6, |w| tar_upper_dir(&upper, w))?);
        }
        Ok(layers)
    }

    /// The app layer: config and start-up script.
    pub fn app_layer(&self) -> anyhow::Result<LayerInfo> {
        let config = json!({ "data": format!("/{DATA_PATH}"), "c": 1.0, "features": 3 });
        let config = serde_json::to_vec_pretty(&config)?;
        let recipe = format!(
            "v{RECIPE_VERSION} app {}",
            streamsnap_format::Digest::sha256([START_PY.as_bytes(), &config].concat().as_slice())
        );
        self.layer("app", &recipe, 6, |w| {
            let mut builder = tar::Builder::new(w);
            dir_entry(&mut builder, "app/")?;
            file_entry(&mut builder, "app/config.json", &config)?;
            file_entry(&mut builder, "app/start.py", START_PY.as_bytes())?;
            builder.into_inner()?;
            Ok(3)
        })
    }

    /// The data layer: one file of `bytes` pseudo-random bytes behind a short header
    /// (incompressible; with `compressible`, 512 random bytes per 4 KiB page and zeros). Gzip
    /// level 2, not 1: zlib-rs's level 1 (zlib-ng's "quick" strategy) writes the whole stream
    /// as one static-Huffman block, which expands random data by about 6% and has no block
    /// boundary for the index kind to start a span at; level 2 stores random data in stored
    /// blocks, as gzip at its default level (Docker's, containerd's) does.
    pub fn data_layer(&self, bytes: u64, compressible: bool) -> anyhow::Result<LayerInfo> {
        const LEVEL: u32 = 2;
        let (recipe, name) = if compressible {
            (
                format!("v{RECIPE_VERSION} data {bytes} compressible level {LEVEL}"),
                format!("data-{bytes}-compressible"),
            )
        } else {
            (
                format!("v{RECIPE_VERSION} data {bytes} level {LEVEL}"),
                format!("data-{bytes}"),
            )
        };
        self.layer(&name, &recipe, LEVEL, |w| {
            let mut builder = tar::Builder::new(w);
            dir_entry(&mut builder, "data/")?;
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(bytes);
            header.set_mtime(1_700_000_000);
            let data = DataReader::new(bytes, compressible);
            builder.append_data(&mut header, DATA_PATH, data)?;
            builder.into_inner()?;
            Ok(2)
        })
    }

    /// Deletes a layer's blob and its record (to free the disk).
    pub fn forget(&self, layer: &LayerInfo) {
        let _ = fs::remove_file(self.blob_path(&layer.digest));
        let _ = fs::remove_file(self.dir.join("layers").join(format!("{}.json", layer.name)));
    }

    /// A cached layer if its record matches `recipe` and its blob is there, else written now
    /// by `write` (which returns the number of entries).
    fn layer(
        &self,
        name: &str,
        recipe: &str,
        level: u32,
        write: impl FnOnce(&mut dyn Write) -> anyhow::Result<u64>,
    ) -> anyhow::Result<LayerInfo> {
        let record = self.dir.join("layers").join(format!("{name}.json"));
        if let Ok(text) = fs::read(&record)
            && let Ok(info) = serde_json::from_slice::<LayerInfo>(&text)
            && info.recipe == recipe
            && fs::metadata(self.blob_path(&info.digest)).is_ok_and(|m| m.len() == info.size)
        {
            return Ok(info);
        }
        eprintln!("writing layer {name} (gzip level {level})");
        let tmp = self.layout().join(format!("blobs/{name}.tmp"));
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let compressed = Hashing::new(BufWriter::with_capacity(1 << 20, file));
        let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::new(level));
        let mut tar = Hashing::new(gz);
        let files = write(&mut tar)?;
        let (tar_hash, gz) = tar.into_parts();
        let (gz_hash, mut file) = gz.finish()?.into_parts();
        file.flush()?;
        let info = LayerInfo {
            name: name.to_owned(),
            size: gz_hash.len(),
            digest: gz_hash.finish().to_string(),
            tar_size: tar_hash.len(),
            diff_id: tar_hash.finish().to_string(),
            files,
            recipe: recipe.to_owned(),
        };
        fs::rename(&tmp, self.blob_path(&info.digest))?;
        fs::write(&record, serde_json::to_vec_pretty(&info)?)?;
        Ok(info)
    }

    /// Writes config, manifest and the `tag` entry of `index.json` for these layers.
    pub fn tag_image(&self, tag: &str, layers: Vec<LayerInfo>) -> anyhow::Result<BuiltImage> {
        let diff_ids = layers
            .iter()
            .map(|l| l.diff_id.parse())
            .collect::<Result<Vec<_>, _>>()?;
        let spec = ImageSpec::linux_amd64(Vec::new()).with_cmd(WORKLOAD);
        let config = self.small_blob(media::OCI_CONFIG, &spec.config_json(&diff_ids))?;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config,
            layers: layers
                .iter()
                .map(|l| Ok(Descriptor::new(LAYER_GZIP, l.digest.parse()?, l.size)))
                .collect::<anyhow::Result<Vec<_>>>()?,
            subject: None,
            annotations: Annotations::new(),
        };
        let mut descriptor =
            self.small_blob(media::OCI_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        descriptor.platform = Some(spec.platform());
        descriptor
            .annotations
            .insert(REF_NAME.to_owned(), tag.to_owned());
        let index_path = self.layout().join("index.json");
        let mut index: ImageIndex = fs::read(&index_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(ImageIndex::empty);
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(descriptor);
        fs::write(&index_path, serde_json::to_vec(&index)?)?;
        Ok(BuiltImage { layers })
    }

    fn small_blob(&self, media_type: &str, data: &[u8]) -> anyhow::Result<Descriptor> {
        let descriptor = Descriptor::of(media_type, data);
        fs::write(self.blob_path(&descriptor.digest.to_string()), data)?;
        Ok(descriptor)
    }
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: DigestHasher,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: DigestHasher::new(),
        }
    }

    fn into_parts(self) -> (DigestHasher, W) {
        (self.hash, self.inner)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// SplitMix64's output for `x`: a stateless pseudo-random word.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes: [`DATA_MAGIC`], then xorshift64* output (incompressible, deterministic); with
/// `compressible`, only the first [`RANDOM_PER_PAGE`] bytes of each 4 KiB page of the file are
/// random, the rest zeros.
struct DataReader {
    left: u64,
    state: u64,
    header: &'static [u8],
    /// Offset in the file of the next byte.
    at: u64,
    compressible: bool,
}

/// Random bytes at the start of each 4 KiB page of compressible data.
const RANDOM_PER_PAGE: u64 = 512;
const PAGE: u64 = 4096;

impl DataReader {
    fn new(len: u64, compressible: bool) -> Self {
        Self {
            left: len,
            state: 0x9e37_79b9_7f4a_7c15,
            header: DATA_MAGIC,
            at: 0,
            compressible,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }
}

impl Read for DataReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let mut n = 0;
        if !self.header.is_empty() {
            n = self.header.len().min(want);
            buf[..n].copy_from_slice(&self.header[..n]);
            self.header = &self.header[n..];
            self.at += n as u64;
        }
        if self.compressible {
            // Each random byte is a function of its offset, so the bytes do not depend on the
            // sizes the reader is called with.
            for byte in &mut buf[n..want] {
                let in_page = self.at % PAGE;
                *byte = if in_page < RANDOM_PER_PAGE {
                    splitmix64(self.at / 8).to_le_bytes()[(self.at % 8) as usize]
                } else {
                    0
                };
                self.at += 1;
            }
        } else {
            for chunk in buf[n..want].chunks_mut(8) {
                let word = self.next_word();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            self.at += (want - n) as u64;
        }
        self.left -= want as u64;
        Ok(want)
    }
}

fn dir_entry<W: Write>(builder: &mut tar::Builder<W>, path: &str) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_mtime(1_700_000_000);
    builder.append_data(&mut header, path, io::empty())?;
    Ok(())
}

fn file_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    builder.append_data(&mut header, path, data)?;
    Ok(())
}

/// Writes an overlayfs upper dir as an OCI layer tar: 0/0 character devices become `.wh.NAME`
/// whiteouts, directories marked opaque get a `.wh..wh..opq` entry, hard links are kept. Returns
/// the number of entries.
fn tar_upper_dir(upper: &Path, w: &mut dyn Write) -> anyhow::Result<u64> {
    let mut builder = tar::Builder::new(w);
    builder.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut count = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        // pushed in reverse so that the walk is depth-first in name order
        let mut subdirs = Vec::new();
        for name in names {
            let rel_path = rel.join(&name);
            let full = upper.join(&rel_path);
            let meta = fs::symlink_metadata(&full)?;
            let ft = meta.file_type();
            let mut header = tar::Header::new_gnu();
            header.set_mode(meta.mode() & 0o7777);
            header.set_uid(u64::from(meta.uid()));
            header.set_gid(u64::from(meta.gid()));
            header.set_mtime(meta.mtime().max(0) as u64);
            header.set_size(0);
            count += 1;
            if ft.is_char_device() && meta.rdev() == 0 {
                let wh = rel.join(format!(".wh.{}", name.to_string_lossy()));
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                builder.append_data(&mut header, &wh, io::empty())?;
            } else if ft.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                builder.append_data(&mut header, &rel_path, io::empty())?;
                if xattr(&full, "trusted.overlay.opaque").as_deref() == Some(b"y") {
                    let mut opq = tar::Header::new_gnu();
                    opq.set_entry_type(tar::EntryType::Regular);
                    opq.set_mode(0o644);
                    opq.set_size(0);
                    builder.append_data(&mut opq, rel_path.join(".wh..wh..opq"), io::empty())?;
                    count += 1;
                }
                subdirs.push(rel_path);
            } else if ft.is_symlink() {
                header.set_entry_type(tar::EntryType::Symlink);
                let target = fs::read_link(&full)?;
                builder.append_link(&mut header, &rel_path, &target)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        header.set_entry_type(tar::EntryType::Link);
                        builder.append_link(&mut header, &rel_path, first)?;
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), rel_path.clone());
                }
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(meta.len());
                let file = File::open(&full)?;
                builder.append_data(&mut header, &rel_path, file)?;
            } else if ft.is_char_device() || ft.is_block_device() {
                header.set_entry_type(if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                let rdev = meta.rdev();
                header.set_device_major(libc::major(rdev))?;
                header.set_device_minor(libc::minor(rdev))?;
                builder.append_data(&mut header, &rel_path, io::empty())?;
            } else if ft.is_fifo() {
                header.set_entry_type(tar::EntryType::Fifo);
                builder.append_data(&mut header, &rel_path, io::empty())?;
            } else {
                bail!("{}: unsupported file type (socket?)", full.display());
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    builder.into_inner()?;
    Ok(count)
}

/// The value of xattr `name` of `path` (not following symlinks), if it has one.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = CString::new(name).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf` is writable for
    // `buf.len()` bytes, which is the size passed.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    usize::try_from(n).ok().map(|n| buf[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut reader: DataReader, buf_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0; buf_len];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn compressible_data_is_random_at_the_start_of_each_page_and_zeros_after() {
        let len = 5 * PAGE + 100;
        // Odd read sizes: the layout must not depend on how the reader is called.
        let data = read_all(DataReader::new(len, true), 1000);
        assert_eq!(data, read_all(DataReader::new(len, true), 4096 * 3 + 7));
        assert_eq!(data.len() as u64, len);
        assert!(data.starts_with(DATA_MAGIC));
        for (i, page) in data.chunks(PAGE as usize).enumerate() {
            let random = &page[..RANDOM_PER_PAGE.min(page.len() as u64) as usize];
            assert!(
                random.iter().filter(|&&b| b != 0).count() > random.len() * 3 / 4,
                "page {i}"
            );
            if page.len() > RANDOM_PER_PAGE as usize {
                assert!(
                    page[RANDOM_PER_PAGE as usize..].iter().all(|&b| b == 0),
                    "page {i}"
                );
            }
        }
        // The incompressible data is random after the header.
        let random = read_all(DataReader::new(len, false), 64 << 10);
        assert!(
            random[DATA_MAGIC.len()..]
                .iter()
                .filter(|&&b| b == 0)
                .count()
                < 200
        );
    }
}
