//! Test doubles for the remote layer pieces: a data blob in memory and its TOC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, SourceError};
use streamsnap_format::{Digest, Toc, api, compress_chunk};

/// A data blob in memory that counts range requests; while `stalled`, requests never answer.
pub struct Blob {
    pub data: Vec<u8>,
    pub requests: AtomicU64,
    pub stalled: AtomicBool,
}

impl BlobSource for Blob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.stalled.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        let slice = Bytes::copy_from_slice(&self.data[offset as usize..(offset + len) as usize]);
        Box::pin(async move { Ok(slice) })
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// A layer of `chunks` chunks of `size` bytes each: the same byte repeated (tiny frames) or,
/// with `incompressible`, pseudo-random bytes (frames a little larger than `size`).
pub fn layer(chunks: usize, size: usize, incompressible: bool) -> (Arc<Toc>, Arc<Blob>) {
    let mut data = Vec::new();
    let mut table = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..chunks {
        let content: Vec<u8> = if incompressible {
            (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        } else {
            vec![i as u8; size]
        };
        let frame = compress_chunk(&content, 1).unwrap();
        table.push(api::Chunk {
            offset: data.len() as u64,
            compressed_size: frame.len() as u32,
            size: content.len() as u32,
            sha256: Digest::sha256(&content).as_bytes().to_vec(),
        });
        data.extend_from_slice(&frame);
    }
    let d = Digest::sha256(b"x").to_string();
    let toc = api::Toc {
        version: 1,
        layer_digest: d.clone(),
        diff_id: d,
        data_digest: Digest::sha256(&data).to_string(),
        data_size: data.len() as u64,
        max_chunk_size: size as u32,
        chunks: table,
        entries: vec![api::Entry {
            r#type: api::EntryType::Directory as i32,
            mode: 0o755,
            ..Default::default()
        }],
        ..Default::default()
    };
    (
        Arc::new(Toc::from_raw(toc).unwrap()),
        Arc::new(Blob {
            data,
            requests: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }),
    )
}

/// A chunk reader that has nothing: for layers whose content a test does not read.
pub struct NoChunks;

impl streamsnap_fs::ChunkReader for NoChunks {
    fn read_chunks(
        &self,
        _chunks: &[u32],
    ) -> streamsnap_fs::BoxFuture<'_, Result<Vec<Bytes>, streamsnap_fs::ReadError>> {
        Box::pin(async { Err(streamsnap_fs::ReadError::new("no chunks here")) })
    }
}

/// `toc`'s layer, built in memory and resident.
pub fn resident(toc: &Arc<Toc>) -> Arc<streamsnap_fs::Layer> {
    let fs = streamsnap_fs::LayerFs::new(
        toc.clone(),
        Arc::new(NoChunks),
        streamsnap_fs::FsOptions::default(),
    )
    .unwrap();
    Arc::new(streamsnap_fs::Layer::resident(Arc::new(fs)))
}
