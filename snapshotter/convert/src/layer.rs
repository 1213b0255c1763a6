//! One layer: original (compressed) tar stream in, TOC and chunk data blob out.
//!
//! The input is checked as it streams: the compressed bytes against the layer digest, the tar
//! stream against the diff ID, every entry path against escapes. Any failure aborts the layer;
//! nothing partial leaves this module.

use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use flate2::read::MultiGzDecoder;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::media::LayerCompression;
use streamsnap_format::{Digest, DigestHasher, FORMAT_VERSION, Toc};

use crate::chunker::Chunker;
use crate::entry::toc_entry;
use crate::error::{Error, Result};
use crate::tarstream::{Pending, corrupt};

/// Tunables of a conversion.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Largest uncompressed chunk; files at least this big get chunks of their own.
    pub max_chunk_size: u32,
    /// zstd level of the chunk frames.
    pub compression_level: i32,
    /// The index kind: uncompressed bytes between two checkpoints (see [`crate::index`]).
    pub span_size: u32,
    /// Compression threads.
    pub workers: usize,
    /// Refuse layers whose tar stream is larger than this (decompression bombs).
    pub max_layer_size: u64,
    /// Refuse layers with more tar entries than this.
    pub max_entries: usize,
    /// When set to true, chunks not yet compressed are skipped and the conversion fails soon
    /// (the reader stops at its next read, the compression threads at their next chunk).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            max_chunk_size: 1 << 20,
            compression_level: 3,
            span_size: crate::index::DEFAULT_SPAN_SIZE,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_layer_size: 1 << 40,
            max_entries: 4 << 20,
            cancel: None,
        }
    }
}

/// What the source manifest and config say about the layer; checked against the content.
#[derive(Clone, Debug)]
pub struct LayerSource {
    pub digest: Digest,
    pub compression: LayerCompression,
    pub diff_id: Digest,
}

/// A converted layer: its TOC (validated, as a reader will see it) and data blob summary.
#[derive(Debug)]
pub struct ConvertedLayer {
    pub toc: Toc,
    pub uncompressed_size: u64,
}

/// Reports bytes of compressed input consumed, for progress.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// Converts one layer read from `input`, writing its chunk data blob to `out`.
pub fn convert_layer<R: Read, W: Write + Send>(
    input: R,
    source: &LayerSource,
    options: &ConvertOptions,
    out: W,
    progress: Progress<'_>,
) -> Result<ConvertedLayer> {
    let counted = CountingReader {
        inner: input,
        hasher: DigestHasher::new(),
        progress,
        limit: u64::MAX,
    };
    // The decompressed stream stops at the size limit, so a decompression bomb costs at most
    // the limit's worth of reading, not all of it.
    let mut tar_stream = CountingReader {
        inner: Decoder::new(counted, source.compression),
        hasher: DigestHasher::new(),
        progress: &|_| {},
        limit: options.max_layer_size,
    };
    let corrupt = |source_err: io::Error| Error::CorruptLayer {
        digest: source.digest,
        source: source_err,
    };

    let converted = std::thread::scope(|scope| -> Result<_> {
        let mut chunker = Chunker::start(
            scope,
            options.max_chunk_size,
            options.compression_level,
            options.workers,
            options.cancel.clone(),
            out,
        );
        let walked = walk_tar(&mut tar_stream, source, options, &mut chunker);
        // Always stop the pipeline threads, then report the first failure.
        let finished = chunker.finish();
        let mut entries = walked?;
        let mut blob = finished?;
        for (index, extent) in blob.resolved.drain(..) {
            entries[index].extents.push(extent);
        }
        Ok((entries, blob))
    });
    if tar_stream.hasher.len() >= options.max_layer_size {
        return Err(Error::LayerTooLarge {
            digest: source.digest,
            limit: options.max_layer_size,
        });
    }
    let (entries, blob) = converted?;

    // Whatever follows the end-of-archive blocks is part of the diff ID; read it all so the
    // decompressors also see (and check) the end of their stream.
    io::copy(
        &mut (&mut tar_stream).take(options.max_layer_size),
        &mut io::sink(),
    )
    .map_err(corrupt)?;
    let uncompressed_size = tar_stream.hasher.len();
    if uncompressed_size >= options.max_layer_size {
        return Err(Error::LayerTooLarge {
            digest: source.digest,
            limit: options.max_layer_size,
        });
    }
    let diff_id = tar_stream.hasher.finish();
    let mut counted = tar_stream.inner.into_inner();
    io::copy(&mut counted, &mut io::sink()).map_err(corrupt)?;
    let layer_digest = counted.hasher.finish();
    if layer_digest != source.digest {
        return Err(Error::LayerDigestMismatch {
            expected: source.digest,
            actual: layer_digest,
        });
    }
    if diff_id != source.diff_id {
        return Err(Error::DiffIdMismatch {
            layer: source.digest,
            expected: source.diff_id,
            actual: diff_id,
        });
    }

    let raw = api::Toc {
        version: FORMAT_VERSION,
        layer_digest: source.digest.to_string(),
        diff_id: diff_id.to_string(),
        data_digest: blob.digest.to_string(),
        data_size: blob.size,
        max_chunk_size: options.max_chunk_size,
        chunks: blob.chunks,
        entries,
        ..Default::default()
    };
    // The same validation a reader applies: never publish a TOC a node would refuse.
    let toc = Toc::from_raw(raw).map_err(|source_err| Error::InvalidOutput {
        layer: source.digest,
        source: source_err,
    })?;
    Ok(ConvertedLayer {
        toc,
        uncompressed_size,
    })
}

fn walk_tar<R: Read>(
    tar_stream: R,
    source: &LayerSource,
    options: &ConvertOptions,
    chunker: &mut Chunker<'_>,
) -> Result<Vec<api::Entry>> {
    let corrupt = corrupt(source.digest);
    walk_entries(
        tar_stream,
        source,
        options,
        |tar_entry, mut entry, entries| {
            if entry.r#type == EntryType::Regular as i32 {
                let index = entries.len();
                read_content(tar_entry, &mut entry, index, chunker).map_err(|e| match e {
                    Error::Io { source: io_err, .. } => corrupt(io_err),
                    other => other,
                })?;
            }
            entries.push(entry);
            for (index, extent) in chunker.take_resolved() {
                entries[index].extents.push(extent);
            }
            Ok(())
        },
    )
}

/// Walks a layer's tar stream: extension headers applied, each member turned into its TOC
/// entry and counted against `max_entries`, then handed to `each` with its tar entry (whose
/// content `each` may read) and the entries so far; `each` pushes it. The chunked and the
/// index kinds differ only in what they do with a regular file's content.
pub(crate) fn walk_entries<R: Read>(
    tar_stream: R,
    source: &LayerSource,
    options: &ConvertOptions,
    mut each: impl FnMut(&mut tar::Entry<'_, R>, api::Entry, &mut Vec<api::Entry>) -> Result<()>,
) -> Result<Vec<api::Entry>> {
    let corrupt = corrupt(source.digest);
    let mut archive = tar::Archive::new(tar_stream);
    let mut entries: Vec<api::Entry> = Vec::new();
    let mut pending = Pending::default();
    for tar_entry in archive.entries().map_err(&corrupt)?.raw(true) {
        let mut tar_entry = tar_entry.map_err(&corrupt)?;
        let Some(member) = pending.absorb(&mut tar_entry).map_err(&corrupt)? else {
            continue;
        };
        let Some(entry) = toc_entry(tar_entry.header(), member, source.digest)? else {
            continue;
        };
        if entries.len() >= options.max_entries {
            return Err(Error::TooManyEntries {
                digest: source.digest,
                limit: options.max_entries,
            });
        }
        each(&mut tar_entry, entry, &mut entries)?;
    }
    pending.finish().map_err(&corrupt)?;
    Ok(entries)
}

fn read_content<R: Read>(
    tar_entry: &mut tar::Entry<'_, R>,
    entry: &mut api::Entry,
    index: usize,
    chunker: &mut Chunker<'_>,
) -> Result<()> {
    let size = tar_entry.size();
    let io_err = |source| Error::Io {
        context: "reading tar entry content",
        source,
    };
    if chunker.is_small(size) {
        let mut data = Vec::with_capacity(size as usize);
        tar_entry.read_to_end(&mut data).map_err(io_err)?;
        check_size(&data, size)?;
        entry.size = data.len() as u64;
        return chunker.add_small(index, &data);
    }
    let piece = chunker.max_chunk_size();
    loop {
        let mut buf = Vec::with_capacity(piece);
        tar_entry
            .by_ref()
            .take(piece as u64)
            .read_to_end(&mut buf)
            .map_err(io_err)?;
        if buf.is_empty() {
            break;
        }
        entry.size += buf.len() as u64;
        let full = buf.len() == piece;
        entry.extents.push(chunker.add_large_piece(buf)?);
        if !full {
            break;
        }
    }
    if entry.size != size {
        return Err(io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("entry holds {} of its {size} bytes", entry.size),
        )));
    }
    Ok(())
}

fn check_size(data: &[u8], size: u64) -> Result<()> {
    if data.len() as u64 != size {
        return Err(Error::Io {
            context: "reading tar entry content",
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("entry holds {} of its {size} bytes", data.len()),
            ),
        });
    }
    Ok(())
}

/// Counts and hashes what passes through, reporting progress.
pub(crate) struct CountingReader<'p, R> {
    pub(crate) inner: R,
    pub(crate) hasher: DigestHasher,
    pub(crate) progress: Progress<'p>,
    /// Reading fails once this many bytes went through.
    pub(crate) limit: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.hasher.len() >= self.limit {
            return Err(io::Error::other("the layer is larger than the size limit"));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// The layer's decompressor, by media type.
enum Decoder<R: Read> {
    Plain(R),
    Gzip(Box<MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    fn new(input: R, compression: LayerCompression) -> Self {
        match compression {
            LayerCompression::None => Self::Plain(input),
            LayerCompression::Gzip => Self::Gzip(Box::new(MultiGzDecoder::new(input))),
            LayerCompression::Zstd => Self::Zstd(
                zstd::stream::read::Decoder::new(input)
                    .expect("creating a zstd decoder only allocates"),
            ),
        }
    }

    fn into_inner(self) -> R {
        match self {
            Self::Plain(r) => r,
            Self::Gzip(d) => d.into_inner(),
            Self::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(d) => d.read(buf),
            Self::Zstd(d) => d.read(buf),
        }
    }
}
