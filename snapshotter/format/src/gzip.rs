//! Random access into gzip layers, for the index artifact kind (docs/format.md, "The index
//! kind"): a raw deflate stream can be entered at a deflate block boundary with the bits of the
//! boundary byte that belong to the next block and the 32 KiB of output before it (the
//! technique of zlib's `zran.c` example). This module holds the inflater the converter records
//! checkpoints with, and the decoder a reader turns a fetched span into verified content with.
//!
//! zlib's API for this (`inflatePrime`, `Z_BLOCK`, `data_type`) comes from `libz-rs-sys`, the
//! C API of the zlib-rs implementation `flate2` already uses.

use libz_rs_sys as z;

use crate::api;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The deflate window: the most a back-reference reaches, so the most output a checkpoint needs.
pub const WINDOW_SIZE: usize = 32 << 10;
/// Largest compressed window a reader accepts (zstd's bound for [`WINDOW_SIZE`], generously).
pub const MAX_WINDOW_FRAME: u32 = (WINDOW_SIZE + WINDOW_SIZE / 128 + 1024) as u32;

/// Why inflating failed, as zlib says it.
#[derive(Debug, thiserror::Error)]
#[error("inflate: {0}")]
pub struct InflateError(String);

/// What one [`RawInflate::step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Input bytes taken.
    pub consumed: usize,
    /// Output bytes written.
    pub produced: usize,
    /// The deflate stream ended (its last block is done).
    pub stream_end: bool,
    /// The inflater stopped right after a block's end code (only when stopping at blocks).
    pub block_boundary: bool,
    /// The block being decoded (or just ended) is the stream's last.
    pub last_block: bool,
    /// Bits of the last input byte taken that inflating has not used yet (0..=7): the high bits
    /// of that byte, which belong to what follows.
    pub unused_bits: u8,
}

/// A raw deflate inflater (no zlib or gzip framing).
pub struct RawInflate {
    // Boxed: zlib's state points back at the stream, which must not move.
    strm: Box<z::z_stream>,
}

impl std::fmt::Debug for RawInflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawInflate")
            .field("total_in", &self.strm.total_in)
            .field("total_out", &self.strm.total_out)
            .finish()
    }
}

impl Default for RawInflate {
    fn default() -> Self {
        Self::new()
    }
}

impl RawInflate {
    pub fn new() -> Self {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialized stream (allocator set by its Default),
        // the version string is zlib's own and the size is the struct's.
        let code = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(
            code,
            z::Z_OK,
            "inflateInit2 with valid arguments only allocates"
        );
        Self { strm }
    }

    /// Inserts `bits` bits of `value` (the high bits of the byte a span starts in) before the
    /// input.
    pub fn prime(&mut self, bits: u32, value: u32) -> std::result::Result<(), InflateError> {
        // SAFETY: the stream was initialized by `new` and is not used concurrently.
        let code = unsafe { z::inflatePrime(&mut *self.strm, bits as i32, value as i32) };
        self.check(code, "inflatePrime")
    }

    /// Sets the window: the output that precedes the input.
    pub fn set_dictionary(&mut self, window: &[u8]) -> std::result::Result<(), InflateError> {
        // SAFETY: the pointer and length describe `window`, which outlives the call; zlib
        // copies it.
        let code = unsafe {
            z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32)
        };
        self.check(code, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`; with `stop_at_blocks`, returns at the end of each
    /// deflate block (zlib's `Z_BLOCK`).
    pub fn step(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> std::result::Result<Step, InflateError> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        let flush = if stop_at_blocks {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: next_in/avail_in and next_out/avail_out describe the two slices, which live
        // for the whole call; zlib reads and writes only within them.
        let code = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        // The pointers must not outlive the slices.
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_in = 0;
        self.strm.avail_out = 0;
        let stream_end = code == z::Z_STREAM_END;
        if !stream_end && code != z::Z_OK && code != z::Z_BUF_ERROR {
            return Err(self.error(code, "inflate"));
        }
        let data_type = self.strm.data_type;
        Ok(Step {
            consumed,
            produced,
            stream_end,
            block_boundary: data_type & 128 != 0,
            last_block: data_type & 64 != 0,
            unused_bits: (data_type & 7) as u8,
        })
    }

    fn check(&self, code: i32, call: &str) -> std::result::Result<(), InflateError> {
        if code == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(code, call))
        }
    }

    fn error(&self, code: i32, call: &str) -> InflateError {
        let message = if self.strm.msg.is_null() {
            format!("{call} failed (zlib code {code})")
        } else {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
            let text = unsafe { std::ffi::CStr::from_ptr(self.strm.msg) };
            format!("{call}: {}", text.to_string_lossy())
        };
        InflateError(message)
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialized by `new`; this is its only end.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Compresses a checkpoint's window into its frame in the checkpoints blob.
pub fn encode_window(window: &[u8]) -> Vec<u8> {
    debug_assert!(window.len() <= WINDOW_SIZE);
    zstd::bulk::compress(window, 3).expect("zstd compression of an in-memory buffer cannot fail")
}

/// Decompresses a window frame: at most [`WINDOW_SIZE`] bytes, whatever the frame claims.
pub fn decode_window(frame: &[u8]) -> Result<Vec<u8>> {
    if frame.len() > MAX_WINDOW_FRAME as usize {
        return Err(Error::InvalidWindow(format!(
            "frame of {} bytes is over {MAX_WINDOW_FRAME}",
            frame.len()
        )));
    }
    zstd::bulk::decompress(frame, WINDOW_SIZE)
        .map_err(|e| Error::InvalidWindow(format!("corrupt window frame: {e}")))
}

/// Inflates a gzip span fetched from the layer blob (`frame`: exactly the chunk's
/// `compressed_size` bytes at its `offset`), started at `checkpoint` with `window` (decoded),
/// and checks the output against the chunk table before anything may use it: exactly `size`
/// bytes that hash to the chunk's digest. Never allocates more than the chunk's size.
pub fn decode_span(
    chunk: &api::Chunk,
    checkpoint: &api::Checkpoint,
    window: &[u8],
    frame: &[u8],
) -> Result<Vec<u8>> {
    let digest = Digest::from_slice(&chunk.sha256).ok_or_else(|| Error::InvalidChunk {
        index: usize::MAX,
        reason: "chunk digest is not 32 bytes".into(),
    })?;
    let failed = |reason: String| Error::SpanDecompress { digest, reason };
    if frame.len() as u64 != u64::from(chunk.compressed_size) {
        return Err(failed(format!(
            "got {} compressed bytes, the chunk table says {}",
            frame.len(),
            chunk.compressed_size
        )));
    }
    if window.len() > WINDOW_SIZE || checkpoint.bits > 7 || checkpoint.prime >> checkpoint.bits != 0
    {
        return Err(failed("invalid checkpoint".into()));
    }
    let mut inflate = RawInflate::new();
    if checkpoint.bits > 0 {
        inflate
            .prime(checkpoint.bits, checkpoint.prime)
            .map_err(|e| failed(e.to_string()))?;
    }
    if !window.is_empty() {
        inflate
            .set_dictionary(window)
            .map_err(|e| failed(e.to_string()))?;
    }
    let mut data = vec![0u8; chunk.size as usize];
    let (mut read, mut written) = (0usize, 0usize);
    while written < data.len() {
        let step = inflate
            .step(&frame[read..], &mut data[written..], false)
            .map_err(|e| failed(e.to_string()))?;
        read += step.consumed;
        written += step.produced;
        if step.stream_end || (step.consumed == 0 && step.produced == 0) {
            break;
        }
    }
    if written != data.len() {
        return Err(failed(format!(
            "the span inflates to {written} bytes, the chunk table says {}",
            chunk.size
        )));
    }
    let actual = Digest::sha256(&data);
    if actual != digest {
        return Err(Error::ChunkDigestMismatch { digest, actual });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// Text-like data with long-range repeats (back-references across block boundaries).
    fn sample(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x = 12345u32;
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let word = ["alpha ", "beta ", "gamma\n", "delta ", "epsilon "][(x >> 16) as usize % 5];
            out.extend_from_slice(word.as_bytes());
            if x.is_multiple_of(7) {
                out.extend_from_slice(format!("{}", x % 1000).as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    /// A block boundary: (input byte offset, bits, prime, output offset).
    type Boundary = (usize, u32, u32, usize);

    /// Every block boundary, and the whole output.
    fn boundaries(compressed: &[u8]) -> (Vec<Boundary>, Vec<u8>) {
        let mut inflate = RawInflate::new();
        let mut out = Vec::new();
        let mut points = Vec::new();
        let mut read = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let step = inflate.step(&compressed[read..], &mut buf, true).unwrap();
            read += step.consumed;
            out.extend_from_slice(&buf[..step.produced]);
            if step.stream_end {
                break;
            }
            if step.block_boundary && !step.last_block && !out.is_empty() {
                let bits = u32::from(step.unused_bits);
                let prime = if bits > 0 {
                    u32::from(compressed[read - 1]) >> (8 - bits)
                } else {
                    0
                };
                points.push((read, bits, prime, out.len()));
            }
        }
        (points, out)
    }

    #[test]
    fn a_span_decodes_from_any_block_boundary() {
        let data = sample(3 << 20);
        let compressed = deflate(&data);
        let (points, out) = boundaries(&compressed);
        assert_eq!(out, data);
        assert!(points.len() > 10, "{} boundaries", points.len());
        let mut bit_boundaries = 0;
        for pair in points.windows(2) {
            let ((start, bits, prime, out_start), (end, _, _, out_end)) = (pair[0], pair[1]);
            bit_boundaries += usize::from(bits > 0);
            let content = &data[out_start..out_end];
            let chunk = api::Chunk {
                offset: start as u64,
                compressed_size: (end - start) as u32,
                size: content.len() as u32,
                sha256: Digest::sha256(content).as_bytes().to_vec(),
            };
            let window = &data[out_start.saturating_sub(WINDOW_SIZE)..out_start];
            let frame = encode_window(window);
            let checkpoint = api::Checkpoint {
                bits,
                prime,
                window_offset: 0,
                window_size: frame.len() as u32,
            };
            let window = decode_window(&frame).unwrap();
            let decoded = decode_span(&chunk, &checkpoint, &window, &compressed[start..end]);
            assert_eq!(decoded.unwrap(), content);

            // The wrong window gives other bytes, which the digest refuses.
            let wrong = vec![b'x'; WINDOW_SIZE];
            assert!(decode_span(&chunk, &checkpoint, &wrong, &compressed[start..end]).is_err());
            // A flipped byte in the span is never served.
            let mut corrupt = compressed[start..end].to_vec();
            let middle = corrupt.len() / 2;
            corrupt[middle] ^= 0x20;
            assert!(decode_span(&chunk, &checkpoint, &window, &corrupt).is_err());
        }
        assert!(bit_boundaries > 0, "no boundary inside a byte was tried");
    }

    #[test]
    fn a_window_frame_never_decodes_past_the_window_size() {
        let frame = zstd::bulk::compress(&vec![0u8; WINDOW_SIZE + 1], 3).unwrap();
        assert!(decode_window(&frame).is_err());
        let big = vec![0u8; MAX_WINDOW_FRAME as usize + 1];
        assert!(decode_window(&big).is_err());
    }

    #[test]
    fn a_span_claiming_more_than_its_bytes_inflate_to_is_refused() {
        let data = sample(100_000);
        let compressed = deflate(&data);
        let chunk = api::Chunk {
            offset: 0,
            compressed_size: compressed.len() as u32,
            size: data.len() as u32 + 1,
            sha256: Digest::sha256(&data).as_bytes().to_vec(),
        };
        let checkpoint = api::Checkpoint::default();
        assert!(matches!(
            decode_span(&chunk, &checkpoint, &[], &compressed),
            Err(Error::SpanDecompress { .. })
        ));
    }
}
