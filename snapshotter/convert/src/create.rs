//! `create`: convert an image and push its streaming artifact as an OCI referrer.
//!
//! Order of effects, so that a failure or interruption at any point leaves no visible artifact:
//! every blob first (data, TOC, empty config), the referrer manifest last. The source image is
//! only read.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use streamsnap_format::oci::{Annotations, Descriptor, ImageManifest};
use streamsnap_format::{Digest, FORMAT_VERSION, encode_toc, media};
use streamsnap_registry::{Client, Reference, Repository};
use streamsnap_trust::SigningKey;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::index::{IndexedLayer, index_layer};
use crate::layer::{ConvertOptions, ConvertedLayer, convert_layer};
use crate::source::{SourceImage, SourceLayer, resolve};

/// What kind of streaming artifact [`create`] makes (docs/format.md).
pub use streamsnap_format::media::ArtifactKind;

/// Options of [`create`].
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Chunked (a copy of the content) or index (over the original gzip layers).
    pub kind: ArtifactKind,
    pub convert: ConvertOptions,
    /// Convert and push even if the image already has a streaming artifact of this version.
    pub force: bool,
    /// Where the data blobs are staged before upload (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Sign the artifact (pushed before it, see [`crate::push_signature`]); an image converted
    /// before gets a signature on its existing artifact.
    pub sign: Option<Arc<SigningKey>>,
}

/// Progress of a conversion, readable from any thread while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Compressed bytes of source layers to read in all.
    pub total: AtomicU64,
    /// Compressed bytes of source layers read so far.
    pub done: AtomicU64,
    /// Set to stop the conversion; it then fails with [`Error::Canceled`] before pushing the
    /// manifest. Shared with the compression threads, which skip the chunks still queued.
    pub cancel: Arc<AtomicBool>,
}

impl Progress {
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Canceled)
        } else {
            Ok(())
        }
    }
}

/// What [`create`] did.
#[derive(Debug)]
pub struct Created {
    /// The artifact's descriptor as referrers lists show it.
    pub artifact: Descriptor,
    /// The manifest it refers to.
    pub subject: Descriptor,
    /// True when an existing artifact was found and nothing was converted.
    pub existing: bool,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug)]
pub struct LayerReport {
    pub source: Digest,
    pub source_size: u64,
    pub uncompressed_size: u64,
    pub toc: Descriptor,
    /// The chunk data blob; for the index kind, the checkpoints blob.
    pub data: Descriptor,
    pub entries: usize,
    pub chunks: usize,
}

/// Converts `reference` (linux/amd64) and pushes the artifact into the same repository.
pub async fn create(
    client: &Client,
    reference: &Reference,
    options: &CreateOptions,
    progress: Arc<Progress>,
) -> Result<Created> {
    let image = resolve(client, reference).await?;
    let repo = &reference.repository;
    if !options.force
        && let Some(existing) =
            find_existing_kind(client, repo, &image.manifest.digest, options.kind).await?
    {
        tracing::info!(artifact = %existing.digest, "image already has a streaming artifact");
        if let Some(key) = &options.sign {
            crate::push_signature(client, repo, key, &existing).await?;
        }
        return Ok(Created {
            artifact: existing,
            subject: image.subject(),
            existing: true,
            layers: Vec::new(),
        });
    }
    progress
        .total
        .store(image.total_layer_bytes(), Ordering::Relaxed);

    let mut layers = Vec::with_capacity(image.layers.len());
    for layer in &image.layers {
        progress.check_cancel()?;
        // Instrumented, not entered: an entered span held across an await makes the future
        // !Send (the conversion service runs it on a multi-threaded runtime).
        let span = tracing::info_span!("layer", digest = %layer.source.digest);
        layers.push(
            convert_and_push_layer(client, repo, layer, options, &progress)
                .instrument(span)
                .await?,
        );
    }
    progress.check_cancel()?;

    let manifest = artifact_manifest(&image, &layers, options.kind);
    client
        .push_blob(
            repo,
            &manifest.config.digest,
            Bytes::from_static(media::OCI_EMPTY_CONTENT),
        )
        .await?;
    progress.check_cancel()?;
    if let Some(key) = &options.sign {
        let descriptor = crate::referrer_descriptor(&manifest)?;
        crate::push_signature(client, repo, key, &descriptor).await?;
    }
    let artifact = client.push_referrer(repo, &manifest).await?;
    tracing::info!(artifact = %artifact.digest, subject = %image.manifest.digest, "pushed streaming artifact");
    Ok(Created {
        artifact,
        subject: image.subject(),
        existing: false,
        layers,
    })
}

/// The existing (chunked) streaming artifact of this format version for `subject`, if any.
pub async fn find_existing(
    client: &Client,
    repo: &Repository,
    subject: &Digest,
) -> Result<Option<Descriptor>> {
    find_existing_kind(client, repo, subject, ArtifactKind::Chunked).await
}

/// The existing streaming artifact of `kind` and this format version for `subject`, if any.
pub async fn find_existing_kind(
    client: &Client,
    repo: &Repository,
    subject: &Digest,
    kind: ArtifactKind,
) -> Result<Option<Descriptor>> {
    let artifact_type = kind.artifact_type();
    let referrers = client.referrers(repo, subject, Some(artifact_type)).await?;
    let version = FORMAT_VERSION.to_string();
    Ok(referrers.manifests.into_iter().find(|d| {
        d.artifact_type.as_deref() == Some(artifact_type)
            && d.annotations.get(media::ANNOTATION_FORMAT_VERSION) == Some(&version)
    }))
}

async fn convert_and_push_layer(
    client: &Client,
    repo: &Repository,
    layer: &SourceLayer,
    options: &CreateOptions,
    progress: &Arc<Progress>,
) -> Result<LayerReport> {
    let staging = match &options.work_dir {
        Some(dir) => tempfile::NamedTempFile::new_in(dir),
        None => tempfile::NamedTempFile::new(),
    }
    .map_err(|source| Error::Io {
        context: "creating a staging file for the chunk data blob",
        source,
    })?;

    // Download on the runtime, convert on a blocking thread, joined by a bounded channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(16);
    let mut blob = client.get_blob(repo, &layer.source.digest).await?;
    let download = async move {
        loop {
            let next = blob.next_chunk().await.map_err(Error::from);
            let stop = !matches!(next, Ok(Some(_)));
            let item = match next {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    };
    let source = layer.source.clone();
    let mut convert_options = options.convert.clone();
    convert_options.cancel = Some(progress.cancel.clone());
    let progress_for_thread = progress.clone();
    let kind = options.kind;
    let convert =
        tokio::task::spawn_blocking(move || -> Result<(Converted, tempfile::NamedTempFile)> {
            let reader = ChannelReader {
                rx,
                current: Bytes::new(),
                error: None,
                progress: &progress_for_thread,
            };
            let mut file = std::io::BufWriter::with_capacity(1 << 20, staging);
            let advance = |n: u64| {
                progress_for_thread.done.fetch_add(n, Ordering::Relaxed);
            };
            let mut reader = reader;
            let result = match kind {
                ArtifactKind::Chunked => {
                    convert_layer(&mut reader, &source, &convert_options, &mut file, &advance)
                        .map(Converted::Chunked)
                }
                ArtifactKind::Index => {
                    index_layer(&mut reader, &source, &convert_options, &mut file, &advance)
                        .map(Converted::Index)
                }
            };
            if let Some(error) = reader.error.take() {
                return Err(error); // the download's error explains the read failure best
            }
            let converted = result?;
            let file = file.into_inner().map_err(|e| Error::WriteBlob {
                source: e.into_error(),
            })?;
            Ok((converted, file))
        });
    let ((), converted) = tokio::join!(download, convert);
    let (converted, file) = match converted.expect("conversion thread panicked") {
        // A canceled pipeline fails wherever it stopped: report the cancel, not that.
        Err(_) if progress.cancel.load(Ordering::Relaxed) => return Err(Error::Canceled),
        other => other?,
    };
    progress.check_cancel()?;

    let (toc, uncompressed_size, data_media_type, data_digest, data_size) = match converted {
        Converted::Chunked(layer) => {
            let (digest, size) = (layer.toc.data_digest(), layer.toc.data_size());
            (
                layer.toc,
                layer.uncompressed_size,
                media::CHUNKS,
                digest,
                size,
            )
        }
        Converted::Index(layer) => (
            layer.toc,
            layer.uncompressed_size,
            media::CHECKPOINTS,
            layer.checkpoints_digest,
            layer.checkpoints_size,
        ),
    };
    let toc_blob = Bytes::from(encode_toc(toc.raw()));
    let mut annotations = Annotations::new();
    annotations.insert(
        media::ANNOTATION_LAYER_DIGEST.into(),
        layer.source.digest.to_string(),
    );
    annotations.insert(
        media::ANNOTATION_LAYER_DIFF_ID.into(),
        layer.source.diff_id.to_string(),
    );
    let mut toc_descriptor = Descriptor::of(media::TOC, &toc_blob);
    toc_descriptor.annotations = annotations.clone();
    let mut data_descriptor = Descriptor::new(data_media_type, data_digest, data_size);
    data_descriptor.annotations = annotations;

    client
        .push_blob_file(repo, &data_digest, file.path())
        .await?;
    drop(file);
    client
        .push_blob(repo, &toc_descriptor.digest, toc_blob)
        .await?;
    tracing::info!(
        entries = toc.entries().len(),
        chunks = toc.chunks().len(),
        data_size,
        toc_size = toc_descriptor.size,
        %kind,
        "layer converted and pushed"
    );
    Ok(LayerReport {
        source: layer.source.digest,
        source_size: layer.descriptor.size,
        uncompressed_size,
        entries: toc.entries().len(),
        chunks: toc.chunks().len(),
        toc: toc_descriptor,
        data: data_descriptor,
    })
}

/// A layer converted one way or the other.
enum Converted {
    Chunked(ConvertedLayer),
    Index(IndexedLayer),
}

fn artifact_manifest(
    image: &SourceImage,
    layers: &[LayerReport],
    kind: ArtifactKind,
) -> ImageManifest {
    let mut annotations = Annotations::new();
    annotations.insert(
        media::ANNOTATION_FORMAT_VERSION.into(),
        FORMAT_VERSION.to_string(),
    );
    annotations.insert(
        media::ANNOTATION_SOURCE_MANIFEST.into(),
        image.manifest.digest.to_string(),
    );
    annotations.insert(
        media::ANNOTATION_CONVERTER.into(),
        concat!("streamsnap/", env!("CARGO_PKG_VERSION")).into(),
    );
    ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(kind.artifact_type().into()),
        config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
        layers: layers
            .iter()
            .flat_map(|l| [l.toc.clone(), l.data.clone()])
            .collect(),
        subject: Some(image.subject()),
        annotations,
    }
}

/// A blocking `Read` over the chunks the download task sends.
struct ChannelReader<'a> {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes>>,
    current: Bytes,
    error: Option<Error>,
    progress: &'a Progress,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.progress.cancel.load(Ordering::Relaxed) {
            self.error = Some(Error::Canceled);
            return Err(std::io::Error::other("conversion canceled"));
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(error)) => {
                    let message = error.to_string();
                    self.error = Some(error);
                    return Err(std::io::Error::other(message));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
