//! Chunks: the unit of fetching, verification, dedup and caching.

use crate::api;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Largest uncompressed chunk a reader accepts, whatever a TOC claims.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Most decoded bytes a chunk may declare per compressed byte: what zstd itself can reach (a
/// block of at most 128 KiB, repeating one byte, takes 4 bytes), so no real frame is refused,
/// while a TOC cannot make a few bytes of blob stand for gigabytes. The memory a read costs is
/// bounded by the readers' budgets of decoded bytes, not by this ratio.
pub const MAX_CHUNK_RATIO: u64 = 32 << 10;

/// Largest zstd frame a chunk of `size` bytes can compress to (zstd's compress bound, rounded up
/// generously). A TOC claiming more is refused before anything is fetched.
pub fn max_compressed_size(size: u32) -> u64 {
    u64::from(size) + u64::from(size) / 128 + 1024
}

/// Compresses one chunk into an independent zstd frame.
pub fn compress_chunk(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(data, level)
}

/// Decompresses one chunk's zstd frame and checks it against the chunk table before anything
/// may use it. Fails on a short or oversized frame, corrupt data or a digest mismatch. Never
/// allocates more than the chunk table's size: a frame header declaring another size is
/// refused before decompressing, and a frame without one is decoded into a buffer of exactly
/// the declared size, which it may not overflow.
pub fn decode_chunk(chunk: &api::Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
    let digest = Digest::from_slice(&chunk.sha256).ok_or_else(|| Error::InvalidChunk {
        index: usize::MAX,
        reason: "chunk digest is not 32 bytes".into(),
    })?;
    if compressed.len() as u64 != u64::from(chunk.compressed_size) {
        return Err(Error::ChunkDecompress {
            digest,
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "got {} compressed bytes, the chunk table says {}",
                    compressed.len(),
                    chunk.compressed_size
                ),
            ),
        });
    }
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(compressed)
        && declared != u64::from(chunk.size)
    {
        return Err(Error::ChunkFrameSize {
            digest,
            declared,
            expected: chunk.size,
        });
    }
    let data = zstd::bulk::decompress(compressed, chunk.size as usize)
        .map_err(|source| Error::ChunkDecompress { digest, source })?;
    let actual = Digest::sha256(&data);
    if actual != digest || data.len() != chunk.size as usize {
        return Err(Error::ChunkDigestMismatch { digest, actual });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_for(data: &[u8]) -> (api::Chunk, Vec<u8>) {
        let frame = compress_chunk(data, 3).unwrap();
        let chunk = api::Chunk {
            offset: 0,
            compressed_size: frame.len() as u32,
            size: data.len() as u32,
            sha256: Digest::sha256(data).as_bytes().to_vec(),
        };
        (chunk, frame)
    }

    #[test]
    fn decode_returns_the_original_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (chunk, frame) = chunk_for(&data);
        assert_eq!(decode_chunk(&chunk, &frame).unwrap(), data);
    }

    #[test]
    fn decode_rejects_truncated_corrupt_and_substituted_frames() {
        let (chunk, frame) = chunk_for(b"the real content of the chunk");
        assert!(decode_chunk(&chunk, &frame[..frame.len() - 1]).is_err());

        let mut corrupt = frame.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(decode_chunk(&chunk, &corrupt).is_err());

        // A well-formed frame of other content, of the same compressed length, is still refused.
        let (_, other) = chunk_for(b"the fake content of the chunk");
        assert_eq!(other.len(), frame.len());
        assert!(matches!(
            decode_chunk(&chunk, &other),
            Err(Error::ChunkDigestMismatch { .. })
        ));
    }

    #[test]
    fn decode_refuses_a_frame_that_inflates_past_the_declared_size() {
        let data = vec![0u8; 1 << 20];
        let (mut chunk, frame) = chunk_for(&data);
        chunk.size = 1024;
        assert!(matches!(
            decode_chunk(&chunk, &frame),
            Err(Error::ChunkFrameSize {
                declared: 1048576,
                expected: 1024,
                ..
            })
        ));
        // Without a declared size in the header, the buffer of the TOC's size overflows.
        let mut streamed = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        encoder.finish().unwrap();
        chunk.compressed_size = streamed.len() as u32;
        assert!(matches!(
            decode_chunk(&chunk, &streamed),
            Err(Error::ChunkDecompress { .. })
        ));
    }

    #[test]
    fn the_ratio_bound_admits_the_most_compressible_real_frames() {
        for size in [
            1usize,
            4096,
            128 << 10,
            (128 << 10) + 1,
            1 << 20,
            MAX_CHUNK_SIZE as usize,
        ] {
            for level in [1, 3, 19] {
                let frame = compress_chunk(&vec![7u8; size], level).unwrap();
                assert!(
                    size as u64 <= frame.len() as u64 * MAX_CHUNK_RATIO,
                    "{size} bytes at level {level}: {} byte frame",
                    frame.len()
                );
            }
        }
    }
}
