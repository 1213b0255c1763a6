//! Layers of the index kind (docs/format.md, "The index kind"): their chunks are spans of the
//! ORIGINAL gzip layer blob, each inflated from its checkpoint (the bits of its first byte and
//! the 32 KiB window before it, a frame of the artifact's checkpoints blob).
//!
//! [`GzipSpans`] is the cache's source for such a layer: ranges come from the layer blob (its
//! mirrors included) and, in the same breath, the windows of the spans that start in them from
//! the checkpoints blob (one range request: the windows of neighbouring spans are neighbours);
//! [`BlobSource::decode`] inflates a span with its window and verifies it against the chunk
//! table (`streamsnap_format::gzip::decode_span`), so a layer served this way is checked as
//! strictly as a chunked one. The checkpoint table ([`SpanTable`]) is saved beside the TOC at
//! mount, so a restart reads no metadata.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, ChunkRef, SourceError};
use streamsnap_format::gzip::{MAX_WINDOW_FRAME, decode_span, decode_window};
use streamsnap_format::{Toc, api};

/// One span's checkpoint, keyed by the span's offset in the layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    offset: u64,
    bits: u8,
    prime: u8,
    window_offset: u64,
    window_size: u32,
}

const MAGIC: &[u8; 8] = b"sssspan1";
const RECORD_LEN: usize = 8 + 1 + 1 + 8 + 4;
/// Most spans a table holds: the format's chunk cap.
const MAX_SPANS: usize = streamsnap_format::MAX_TOC_CHUNKS;
/// Windows fetched ahead of their decode that a source keeps at most (a body whose windows came
/// but whose spans were never decoded, as when the body failed).
const MAX_PENDING_WINDOWS: usize = 1024;

/// A gzip layer's checkpoints, in blob order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanTable {
    spans: Vec<Span>,
}

impl SpanTable {
    /// The table of a validated TOC of gzip spans; `None` for zstd frames.
    pub fn of_toc(toc: &Toc) -> Option<Self> {
        toc.checkpoints_blob()?;
        let spans = toc
            .chunks()
            .iter()
            .enumerate()
            .map(|(index, chunk)| {
                let checkpoint = toc
                    .checkpoint(index as u32)
                    .expect("validated: one per chunk");
                Span {
                    offset: chunk.offset,
                    bits: checkpoint.bits as u8,
                    prime: checkpoint.prime as u8,
                    window_offset: checkpoint.window_offset,
                    window_size: checkpoint.window_size,
                }
            })
            .collect();
        Some(Self { spans })
    }

    /// Writes the table to `path` (atomically: a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + self.spans.len() * RECORD_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(self.spans.len() as u64).to_le_bytes());
        for span in &self.spans {
            bytes.extend_from_slice(&span.offset.to_le_bytes());
            bytes.push(span.bits);
            bytes.push(span.prime);
            bytes.extend_from_slice(&span.window_offset.to_le_bytes());
            bytes.extend_from_slice(&span.window_size.to_le_bytes());
        }
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, &bytes)?;
        std::fs::rename(&temporary, path)
    }

    /// Reads a table [`save`](Self::save) wrote; refuses anything else (a damaged file is an
    /// error, not a table that serves wrong windows: the digests would catch those anyway).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let invalid = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let bytes = std::fs::read(path)?;
        let head = MAGIC.len() + 8;
        if bytes.len() < head || &bytes[..MAGIC.len()] != MAGIC {
            return Err(invalid("not a span table"));
        }
        let count = u64::from_le_bytes(bytes[MAGIC.len()..head].try_into().expect("8 bytes"));
        if count > MAX_SPANS as u64 || bytes.len() != head + count as usize * RECORD_LEN {
            return Err(invalid("span table of the wrong length"));
        }
        let spans = bytes[head..]
            .chunks_exact(RECORD_LEN)
            .map(|r| Span {
                offset: u64::from_le_bytes(r[0..8].try_into().expect("8 bytes")),
                bits: r[8],
                prime: r[9],
                window_offset: u64::from_le_bytes(r[10..18].try_into().expect("8 bytes")),
                window_size: u32::from_le_bytes(r[18..22].try_into().expect("4 bytes")),
            })
            .collect::<Vec<_>>();
        if spans.windows(2).any(|w| w[0].offset >= w[1].offset) {
            return Err(invalid("spans out of order"));
        }
        Ok(Self { spans })
    }

    /// The span starting at `offset`.
    fn at(&self, offset: u64) -> Option<&Span> {
        self.spans
            .binary_search_by_key(&offset, |s| s.offset)
            .ok()
            .map(|i| &self.spans[i])
    }

    /// The spans starting in `offset..end`.
    fn starting_in(&self, offset: u64, end: u64) -> &[Span] {
        let first = self.spans.partition_point(|s| s.offset < offset);
        let last = self.spans.partition_point(|s| s.offset < end);
        &self.spans[first..last]
    }
}

/// The cache's source for a layer of the index kind (see the module doc).
pub struct GzipSpans {
    layer: Arc<dyn BlobSource>,
    checkpoints: Arc<dyn BlobSource>,
    table: SpanTable,
    /// How long fetching a window alone may take (the cache's fetch deadline).
    window_deadline: Duration,
    /// Window frames fetched with a range, by span offset, until the span is decoded.
    pending: Mutex<HashMap<u64, Bytes>>,
}

impl GzipSpans {
    pub fn new(
        layer: Arc<dyn BlobSource>,
        checkpoints: Arc<dyn BlobSource>,
        table: SpanTable,
        window_deadline: Duration,
    ) -> Self {
        Self {
            layer,
            checkpoints,
            table,
            window_deadline,
            pending: Mutex::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Bytes>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The window frames of the spans starting in `offset..end`, with one range request.
    async fn windows_for(&self, offset: u64, end: u64) -> Result<Vec<(u64, Bytes)>, SourceError> {
        let spans: Vec<Span> = self
            .table
            .starting_in(offset, end)
            .iter()
            .filter(|s| s.window_size > 0)
            .copied()
            .collect();
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Ok(Vec::new());
        };
        let start = first.window_offset;
        let stop = last.window_offset + u64::from(last.window_size);
        if stop < start || spans.len() as u64 * u64::from(MAX_WINDOW_FRAME) < stop - start {
            return Err(SourceError::permanent("windows out of order"));
        }
        let body = self.checkpoints.read_range(start, stop - start).await?;
        Ok(spans
            .iter()
            .filter_map(|s| {
                let from = (s.window_offset - start) as usize;
                let to = from + s.window_size as usize;
                (to <= body.len()).then(|| (s.offset, body.slice(from..to)))
            })
            .collect())
    }

    /// The window frame of `span`: fetched with its range, or now on its own (the registry
    /// client retries what may pass; the cache's deadline bounds the wait).
    async fn window(&self, span: &Span) -> Result<Bytes, String> {
        if span.window_size == 0 {
            return Ok(Bytes::new());
        }
        if let Some(frame) = self.pending().remove(&span.offset) {
            return Ok(frame);
        }
        let read = self
            .checkpoints
            .read_range(span.window_offset, u64::from(span.window_size));
        match tokio::time::timeout(self.window_deadline, read).await {
            Ok(frame) => frame.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no window from {} within {:?}",
                self.checkpoints.describe(),
                self.window_deadline
            )),
        }
    }
}

impl BlobSource for GzipSpans {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            let (body, windows) = tokio::join!(
                self.layer.read_range(offset, len),
                self.windows_for(offset, end)
            );
            // Windows that did not come are fetched alone at decode.
            if let Ok(windows) = windows {
                let mut pending = self.pending();
                if pending.len() + windows.len() > MAX_PENDING_WINDOWS {
                    pending.clear();
                }
                pending.extend(windows);
            }
            body
        })
    }

    fn describe(&self) -> String {
        self.layer.describe()
    }

    fn decode(&self, chunk: ChunkRef, frame: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let span = *self
                .table
                .at(chunk.offset)
                .ok_or_else(|| format!("no checkpoint for the span at {}", chunk.offset))?;
            let window = self.window(&span).await?;
            tokio::task::spawn_blocking(move || {
                let window = if window.is_empty() {
                    Vec::new()
                } else {
                    decode_window(&window).map_err(|e| e.to_string())?
                };
                let table_chunk = api::Chunk {
                    offset: chunk.offset,
                    compressed_size: chunk.compressed_size,
                    size: chunk.size,
                    sha256: chunk.digest.as_bytes().to_vec(),
                };
                let checkpoint = api::Checkpoint {
                    bits: u32::from(span.bits),
                    prime: u32::from(span.prime),
                    window_offset: span.window_offset,
                    window_size: span.window_size,
                };
                decode_span(&table_chunk, &checkpoint, &window, &frame)
                    .map(Bytes::from)
                    .map_err(|e| crate::error::chain(&e))
            })
            .await
            .unwrap_or_else(|e| Err(format!("span decoding task failed: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SpanTable {
        SpanTable {
            spans: vec![
                Span {
                    offset: 10,
                    bits: 0,
                    prime: 0,
                    window_offset: 0,
                    window_size: 0,
                },
                Span {
                    offset: 1000,
                    bits: 3,
                    prime: 5,
                    window_offset: 0,
                    window_size: 700,
                },
                Span {
                    offset: 2000,
                    bits: 7,
                    prime: 100,
                    window_offset: 700,
                    window_size: 650,
                },
            ],
        }
    }

    #[test]
    fn a_span_table_survives_its_file_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans");
        table().save(&path).unwrap();
        assert_eq!(SpanTable::load(&path).unwrap(), table());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(SpanTable::load(&path).is_err());
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(SpanTable::load(&path).is_err());
    }

    #[test]
    fn spans_are_found_by_their_offset_and_by_range() {
        let t = table();
        assert_eq!(t.at(1000).unwrap().bits, 3);
        assert!(t.at(1001).is_none());
        let offsets = |from, to| {
            t.starting_in(from, to)
                .iter()
                .map(|s| s.offset)
                .collect::<Vec<_>>()
        };
        assert_eq!(offsets(0, 5000), vec![10, 1000, 2000]);
        assert_eq!(offsets(1000, 2000), vec![1000]);
        assert_eq!(offsets(11, 999), Vec::<u64>::new());
    }
}
