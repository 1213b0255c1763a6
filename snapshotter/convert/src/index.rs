//! One gzip layer in, its index out (the index artifact kind, docs/format.md "The index kind"):
//! a TOC whose chunks are spans of the ORIGINAL layer blob between deflate block boundaries,
//! and a checkpoints blob holding the 32 KiB window before each span. Nothing of the layer's
//! content is copied: a node range-reads the spans from the layer blob itself.
//!
//! The layer is streamed once: the compressed bytes are hashed (layer digest), inflated block
//! by block (a checkpoint at the first block boundary after every `span_size` bytes of output),
//! and the output is hashed (diff ID, span digests) and walked as a tar stream for the entries
//! and the position of each file's content. As in `layer`, any failure aborts the layer.

use std::io::{self, Read, Write};

use streamsnap_format::api::{self, Codec, EntryType};
use streamsnap_format::gzip::{RawInflate, WINDOW_SIZE, decode_span, encode_window};
use streamsnap_format::media::LayerCompression;
use streamsnap_format::{Digest, DigestHasher, FORMAT_VERSION, MAX_CHUNK_SIZE, Toc};

use crate::error::{Error, Result};
use crate::layer::{ConvertOptions, CountingReader, LayerSource, Progress, walk_entries};

/// Default uncompressed bytes between two checkpoints: a read fetches and inflates at most
/// about this much (plus one deflate block), as a chunk of the chunked kind; the index costs
/// one window (32 KiB before compression) per span whose back-references reach before it.
pub const DEFAULT_SPAN_SIZE: u32 = 1 << 20;
/// Longest gzip header field (file name, comment) accepted.
const MAX_HEADER_FIELD: usize = 64 << 10;
const INPUT_BUFFER: usize = 256 << 10;

/// An indexed layer: its TOC (validated, as a reader will see it) and checkpoints blob.
#[derive(Debug)]
pub struct IndexedLayer {
    pub toc: Toc,
    pub uncompressed_size: u64,
    pub checkpoints_digest: Digest,
    pub checkpoints_size: u64,
}

/// Indexes one gzip layer read from `input`, writing its checkpoints blob to `out`. Layers of
/// other compressions, and gzip layers of several members, are refused with
/// [`Error::IndexUnsupported`] (the chunked kind converts them).
pub fn index_layer<R: Read, W: Write>(
    input: R,
    source: &LayerSource,
    options: &ConvertOptions,
    out: W,
    progress: Progress<'_>,
) -> Result<IndexedLayer> {
    if source.compression != LayerCompression::Gzip {
        return Err(Error::IndexUnsupported {
            digest: source.digest,
            reason: format!(
                "the index kind reads gzip layers only, this one is {}",
                match source.compression {
                    LayerCompression::None => "uncompressed",
                    LayerCompression::Zstd => "zstd-compressed",
                    LayerCompression::Gzip => "gzip",
                }
            ),
        });
    }
    let corrupt_layer = |e: io::Error| Error::CorruptLayer {
        digest: source.digest,
        source: e,
    };
    let span_size = u64::from(options.span_size.clamp(64 << 10, MAX_CHUNK_SIZE / 2));
    let mut indexer = Indexer::new(
        CountingReader {
            inner: input,
            hasher: DigestHasher::new(),
            progress,
            limit: u64::MAX,
        },
        out,
        span_size,
        source.digest,
    )
    .map_err(corrupt_layer)?;
    // A cancel stops the input: `create`'s reader fails at its next read.
    let mut tar_stream = CountingReader {
        inner: &mut indexer,
        hasher: DigestHasher::new(),
        progress: &|_| {},
        limit: options.max_layer_size,
    };
    let walked = walk_tar(&mut tar_stream, source, options);
    // What follows the end-of-archive blocks is part of the diff ID, and the deflate stream
    // must be read to its end for the last span.
    let copied = match &walked {
        Ok(_) => io::copy(&mut tar_stream, &mut io::sink()).map(drop),
        Err(_) => Ok(()),
    };
    let uncompressed_size = tar_stream.hasher.len();
    let diff_id = tar_stream.hasher.finish();
    if uncompressed_size >= options.max_layer_size {
        return Err(Error::LayerTooLarge {
            digest: source.digest,
            limit: options.max_layer_size,
        });
    }
    if !indexer.ended {
        return Err(match (walked, copied) {
            (Err(error), _) => error,
            (Ok(_), Err(error)) => corrupt_layer(error),
            (Ok(_), Ok(())) => corrupt_layer(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the deflate stream does not end",
            )),
        });
    }
    // A tar stream cut short where the first gzip member ends goes on in a second member: the
    // trailer check names that rather than a corrupt layer.
    let index = indexer.finish()?;
    let (mut entries, files) = walked?;
    copied.map_err(corrupt_layer)?;
    if index.layer_digest != source.digest {
        return Err(Error::LayerDigestMismatch {
            expected: source.digest,
            actual: index.layer_digest,
        });
    }
    if diff_id != source.diff_id {
        return Err(Error::DiffIdMismatch {
            layer: source.digest,
            expected: source.diff_id,
            actual: diff_id,
        });
    }

    let starts: Vec<u64> = index.spans.iter().map(|s| s.out_start).collect();
    for (entry, position, size) in files {
        entries[entry].extents = extents(&starts, &index.spans, position, size);
    }
    let max_chunk_size = index.spans.iter().map(|s| s.chunk.size).max().unwrap_or(1);
    let raw = api::Toc {
        version: FORMAT_VERSION,
        layer_digest: source.digest.to_string(),
        diff_id: diff_id.to_string(),
        data_digest: source.digest.to_string(),
        data_size: index.compressed_size,
        max_chunk_size,
        chunks: index.spans.iter().map(|s| s.chunk.clone()).collect(),
        checkpoints: index.spans.iter().map(|s| s.checkpoint).collect(),
        entries,
        codec: Codec::GzipSpans as i32,
        checkpoints_digest: index.checkpoints_digest.to_string(),
        checkpoints_size: index.checkpoints_size,
    };
    // The same validation a reader applies: never publish a TOC a node would refuse.
    let toc = Toc::from_raw(raw).map_err(|source_err| Error::InvalidOutput {
        layer: source.digest,
        source: source_err,
    })?;
    Ok(IndexedLayer {
        toc,
        uncompressed_size,
        checkpoints_digest: index.checkpoints_digest,
        checkpoints_size: index.checkpoints_size,
    })
}

/// The extents of `size` bytes at `position` of the tar stream, cut at span boundaries.
fn extents(starts: &[u64], spans: &[Span], position: u64, size: u64) -> Vec<api::Extent> {
    let mut out = Vec::new();
    let end = position + size;
    let mut at = position;
    let mut span = starts.partition_point(|&s| s <= position).saturating_sub(1);
    while at < end {
        let span_start = starts[span];
        let span_end = span_start + u64::from(spans[span].chunk.size);
        let take = end.min(span_end) - at;
        out.push(api::Extent {
            chunk: span as u32,
            offset: (at - span_start) as u32,
            length: take as u32,
        });
        at += take;
        span += 1;
    }
    out
}

/// Regular files: (entry index, position of the content in the tar stream, size).
type Files = Vec<(usize, u64, u64)>;

/// The entries, and where each regular file's content is in the tar stream (not read).
fn walk_tar<R: Read>(
    tar_stream: R,
    source: &LayerSource,
    options: &ConvertOptions,
) -> Result<(Vec<api::Entry>, Files)> {
    let mut files = Vec::new();
    let entries = walk_entries(
        tar_stream,
        source,
        options,
        |tar_entry, mut entry, entries| {
            if entry.r#type == EntryType::Regular as i32 {
                entry.size = tar_entry.size();
                if entry.size > 0 {
                    files.push((entries.len(), tar_entry.raw_file_position(), entry.size));
                }
            }
            entries.push(entry);
            Ok(())
        },
    )?;
    Ok((entries, files))
}

/// One span as the indexer closed it.
#[derive(Debug)]
struct Span {
    chunk: api::Chunk,
    checkpoint: api::Checkpoint,
    /// Offset of its first byte in the tar stream.
    out_start: u64,
}

/// The span being inflated.
struct Open {
    offset: u64,
    checkpoint: api::Checkpoint,
    /// The output before the span (at most [`WINDOW_SIZE`]), written as the span's window when
    /// it closes, if the span needs it.
    window: Vec<u8>,
    out_start: u64,
    hasher: DigestHasher,
}

/// What [`Indexer::finish`] gives.
struct Index {
    spans: Vec<Span>,
    layer_digest: Digest,
    compressed_size: u64,
    checkpoints_digest: Digest,
    checkpoints_size: u64,
}

/// Inflates a gzip stream as a `Read` of its output, recording checkpoints on the way.
struct Indexer<'p, R, W> {
    input: CountingReader<'p, R>,
    buffer: Vec<u8>,
    /// Unread input is `buffer[at..len]`; `base` is the blob offset of `buffer[0]`.
    at: usize,
    len: usize,
    base: u64,
    inflate: RawInflate,
    produced: u64,
    /// The output's tail, at least the last [`WINDOW_SIZE`] bytes of it.
    window: Vec<u8>,
    span_size: u64,
    open: Open,
    spans: Vec<Span>,
    out: W,
    out_hasher: DigestHasher,
    ended: bool,
    layer: Digest,
    /// Compressed bytes from the open span's offset on, to try it without its window.
    span_input: Vec<u8>,
}

impl<'p, R: Read, W: Write> Indexer<'p, R, W> {
    fn new(
        input: CountingReader<'p, R>,
        out: W,
        span_size: u64,
        layer: Digest,
    ) -> io::Result<Self> {
        let mut indexer = Self {
            input,
            buffer: vec![0; INPUT_BUFFER],
            at: 0,
            len: 0,
            base: 0,
            inflate: RawInflate::new(),
            produced: 0,
            window: Vec::with_capacity(2 * WINDOW_SIZE),
            span_size,
            open: Open {
                offset: 0,
                checkpoint: api::Checkpoint::default(),
                window: Vec::new(),
                out_start: 0,
                hasher: DigestHasher::new(),
            },
            spans: Vec::new(),
            out,
            out_hasher: DigestHasher::new(),
            ended: false,
            layer,
            span_input: Vec::new(),
        };
        indexer.skip_header()?;
        indexer.open.offset = indexer.position();
        Ok(indexer)
    }

    /// Blob offset of the next unread input byte.
    fn position(&self) -> u64 {
        self.base + self.at as u64
    }

    /// Makes input available; false at its end.
    fn fill(&mut self) -> io::Result<bool> {
        if self.at < self.len {
            return Ok(true);
        }
        self.base += self.len as u64;
        self.at = 0;
        self.len = self.input.read(&mut self.buffer)?;
        Ok(self.len > 0)
    }

    fn byte(&mut self) -> io::Result<u8> {
        if !self.fill()? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the gzip header is cut short",
            ));
        }
        self.at += 1;
        Ok(self.buffer[self.at - 1])
    }

    /// Reads the gzip member header (RFC 1952), leaving the input at the deflate stream.
    fn skip_header(&mut self) -> io::Result<()> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut fixed = [0u8; 10];
        for byte in &mut fixed {
            *byte = self.byte()?;
        }
        if fixed[0] != 0x1f || fixed[1] != 0x8b || fixed[2] != 8 {
            return Err(invalid("not a gzip stream (bad magic or method)"));
        }
        let flags = fixed[3];
        if flags & 0xe0 != 0 {
            return Err(invalid("gzip header has reserved flags set"));
        }
        if flags & 4 != 0 {
            let len = usize::from(self.byte()?) | usize::from(self.byte()?) << 8;
            for _ in 0..len {
                self.byte()?;
            }
        }
        for flag in [8u8, 16] {
            if flags & flag != 0 {
                let mut n = 0;
                while self.byte()? != 0 {
                    n += 1;
                    if n > MAX_HEADER_FIELD {
                        return Err(invalid("gzip header field too long"));
                    }
                }
            }
        }
        if flags & 2 != 0 {
            self.byte()?;
            self.byte()?;
        }
        Ok(())
    }

    fn remember(&mut self, data: &[u8]) {
        self.open.hasher.update(data);
        self.produced += data.len() as u64;
        if data.len() >= WINDOW_SIZE {
            self.window.clear();
            self.window
                .extend_from_slice(&data[data.len() - WINDOW_SIZE..]);
        } else {
            self.window.extend_from_slice(data);
            if self.window.len() > 2 * WINDOW_SIZE {
                self.window.drain(..self.window.len() - WINDOW_SIZE);
            }
        }
    }

    /// Closes the open span at blob offset `end` and opens the next one there.
    fn checkpoint(&mut self, end: u64, bits: u8, last_byte: u8) -> io::Result<()> {
        let window = self.window[self.window.len().saturating_sub(WINDOW_SIZE)..].to_vec();
        let checkpoint = api::Checkpoint {
            bits: u32::from(bits),
            prime: if bits > 0 {
                u32::from(last_byte >> (8 - bits))
            } else {
                0
            },
            window_offset: 0,
            window_size: 0,
        };
        let next = Open {
            offset: end,
            checkpoint,
            window,
            out_start: self.produced,
            hasher: DigestHasher::new(),
        };
        let closed = std::mem::replace(&mut self.open, next);
        self.close(closed, end)
    }

    /// Records a closed span ending at blob offset `end`, with its window if it needs one.
    fn close(&mut self, span: Open, end: u64) -> io::Result<()> {
        let size = self.produced - span.out_start;
        if size > u64::from(MAX_CHUNK_SIZE) {
            return Err(io::Error::other(format!(
                "a deflate block run of {size} bytes has no boundary within {MAX_CHUNK_SIZE} \
                 bytes; convert this layer with the chunked kind"
            )));
        }
        let compressed_size = u32::try_from(end - span.offset)
            .map_err(|_| io::Error::other("a span's compressed size overflows"))?;
        let chunk = api::Chunk {
            offset: span.offset,
            compressed_size,
            size: size as u32,
            sha256: span.hasher.finish().as_bytes().to_vec(),
        };
        // The bytes of the span are the tail of what was read since it opened (the next span
        // may share its last byte).
        let input = &self.span_input[..(end - span.offset) as usize];
        let mut checkpoint = span.checkpoint;
        if !span.window.is_empty() && decode_span(&chunk, &checkpoint, &[], input).is_err() {
            // Its back-references reach before it: the window goes into the checkpoints blob.
            let frame = encode_window(&span.window);
            checkpoint.window_offset = self.out_hasher.len();
            checkpoint.window_size = frame.len() as u32;
            self.out.write_all(&frame)?;
            self.out_hasher.update(&frame);
        }
        // What the next span starts with: the bytes from `end` on (the byte before `end` too,
        // when the boundary is inside it: it is read again from the blob as `prime`).
        self.span_input.drain(..(end - span.offset) as usize);
        self.spans.push(Span {
            chunk,
            checkpoint,
            out_start: span.out_start,
        });
        Ok(())
    }

    /// After the deflate stream: the gzip trailer, the rest of the input, the spans.
    fn finish(mut self) -> Result<Index> {
        let layer = self.layer;
        let corrupt = |e: io::Error| Error::CorruptLayer {
            digest: layer,
            source: e,
        };
        if !self.ended {
            return Err(corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the deflate stream does not end",
            )));
        }
        let mut trailer = [0u8; 8];
        for byte in &mut trailer {
            *byte = self.byte().map_err(corrupt)?;
        }
        let isize = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
        if isize != self.produced as u32 {
            return Err(corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                "the gzip trailer's size does not match the content",
            )));
        }
        // Anything but zero padding after the member is another member.
        let mut rest = Vec::new();
        rest.extend_from_slice(&self.buffer[self.at..self.len]);
        self.at = self.len;
        let mut buf = vec![0u8; INPUT_BUFFER];
        loop {
            if rest.iter().any(|&b| b != 0) {
                return Err(Error::IndexUnsupported {
                    digest: layer,
                    reason: "the gzip layer has several members".into(),
                });
            }
            rest.clear();
            let n = self.input.read(&mut buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
        self.out
            .flush()
            .map_err(|source| Error::WriteBlob { source })?;
        Ok(Index {
            spans: self.spans,
            compressed_size: self.input.hasher.len(),
            layer_digest: self.input.hasher.finish(),
            checkpoints_size: self.out_hasher.len(),
            checkpoints_digest: self.out_hasher.finish(),
        })
    }
}

impl<R: Read, W: Write> Read for Indexer<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the gzip stream is cut short",
                ));
            }
            let step = self
                .inflate
                .step(&self.buffer[self.at..self.len], buf, true)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.span_input
                .extend_from_slice(&self.buffer[self.at..self.at + step.consumed]);
            self.at += step.consumed;
            let produced = step.produced;
            self.remember(&buf[..produced]);
            if step.stream_end {
                self.ended = true;
                let end = self.position();
                let last = std::mem::replace(
                    &mut self.open,
                    Open {
                        offset: end,
                        checkpoint: api::Checkpoint::default(),
                        window: Vec::new(),
                        out_start: self.produced,
                        hasher: DigestHasher::new(),
                    },
                );
                if self.produced == last.out_start && !self.spans.is_empty() {
                    // An empty last block (Go's gzip writer ends with one): the previous span
                    // takes its bytes.
                    let previous = self.spans.last_mut().expect("not empty");
                    previous.chunk.compressed_size = u32::try_from(end - previous.chunk.offset)
                        .map_err(|_| io::Error::other("a span's compressed size overflows"))?;
                } else {
                    self.close(last, end)?;
                }
                return Ok(produced);
            }
            if step.block_boundary
                && !step.last_block
                && self.produced - self.open.out_start >= self.span_size
            {
                let end = self.position();
                let last_byte = if self.at > 0 {
                    self.buffer[self.at - 1]
                } else {
                    0
                };
                if step.unused_bits > 0 && self.at == 0 {
                    return Err(io::Error::other("lost the byte a block boundary is in"));
                }
                self.checkpoint(end, step.unused_bits, last_byte)?;
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(size: u32) -> Span {
        Span {
            chunk: api::Chunk {
                size,
                ..Default::default()
            },
            checkpoint: api::Checkpoint::default(),
            out_start: 0,
        }
    }

    #[test]
    fn a_file_across_spans_gets_one_extent_per_span() {
        let spans = vec![span(100), span(100), span(100)];
        let starts = [0, 100, 200];
        let shape = |position, size| {
            extents(&starts, &spans, position, size)
                .iter()
                .map(|e| (e.chunk, e.offset, e.length))
                .collect::<Vec<_>>()
        };
        assert_eq!(shape(10, 20), vec![(0, 10, 20)]);
        assert_eq!(shape(90, 20), vec![(0, 90, 10), (1, 0, 10)]);
        assert_eq!(shape(50, 250), vec![(0, 50, 50), (1, 0, 100), (2, 0, 100)]);
        assert_eq!(shape(100, 100), vec![(1, 0, 100)]);
    }
}
