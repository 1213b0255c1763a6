//! Test helpers: a TOC built entry by entry with real chunks, and an in-memory chunk reader that
//! counts calls and can be made slow or failing. Shared with the integration tests, which
//! include this file with `#[path]` (so it names the crate's items through `super`).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{Digest, FORMAT_VERSION, Toc, compress_chunk};

use super::{BoxFuture, ChunkReader, ReadError};

/// Builds a layer TOC the way the converter lays out chunks: files of at least `max_chunk`
/// bytes get chunks of their own, smaller ones are packed together.
#[derive(Debug)]
pub struct LayerBuilder {
    max_chunk: u32,
    chunks: Vec<Vec<u8>>,
    pack: Vec<u8>,
    entries: Vec<api::Entry>,
}

impl LayerBuilder {
    pub fn new(max_chunk: u32) -> Self {
        Self {
            max_chunk,
            chunks: Vec::new(),
            pack: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn push(&mut self, path: &str, kind: EntryType, mode: u32) -> &mut api::Entry {
        self.entries.push(api::Entry {
            path: path.as_bytes().to_vec(),
            r#type: kind as i32,
            mode,
            mtime: 1_700_000_000,
            ..Default::default()
        });
        self.entries.last_mut().unwrap()
    }

    fn close_pack(&mut self) {
        if !self.pack.is_empty() {
            self.chunks.push(std::mem::take(&mut self.pack));
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut api::Entry {
        self.push(path, EntryType::Directory, mode)
    }

    pub fn file(&mut self, path: &str, mode: u32, content: &[u8]) -> &mut api::Entry {
        let max = self.max_chunk as usize;
        let mut extents = Vec::new();
        if content.len() >= max {
            self.close_pack();
            for piece in content.chunks(max) {
                extents.push(api::Extent {
                    chunk: self.chunks.len() as u32,
                    offset: 0,
                    length: piece.len() as u32,
                });
                self.chunks.push(piece.to_vec());
            }
        } else if !content.is_empty() {
            if self.pack.len() + content.len() > max {
                self.close_pack();
            }
            extents.push(api::Extent {
                chunk: self.chunks.len() as u32,
                offset: self.pack.len() as u32,
                length: content.len() as u32,
            });
            self.pack.extend_from_slice(content);
        }
        let entry = self.push(path, EntryType::Regular, mode);
        entry.size = content.len() as u64;
        entry.extents = extents;
        entry
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut api::Entry {
        let entry = self.push(path, EntryType::Symlink, 0o777);
        entry.link_target = target.as_bytes().to_vec();
        entry
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut api::Entry {
        let entry = self.push(path, EntryType::Hardlink, 0o644);
        entry.link_target = target.as_bytes().to_vec();
        entry
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: EntryType,
        major: u32,
        minor: u32,
    ) -> &mut api::Entry {
        let entry = self.push(path, kind, 0o660);
        entry.dev_major = major;
        entry.dev_minor = minor;
        entry
    }

    pub fn fifo(&mut self, path: &str) -> &mut api::Entry {
        self.push(path, EntryType::Fifo, 0o644)
    }

    pub fn whiteout(&mut self, path: &str) -> &mut api::Entry {
        self.push(path, EntryType::Whiteout, 0o644)
    }

    pub fn opaque(&mut self, path: &str) -> &mut api::Entry {
        self.push(path, EntryType::Opaque, 0o644)
    }

    /// The chunk index the next packed small file would land in (for tests that slow it down).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len() + usize::from(!self.pack.is_empty())
    }

    /// The validated TOC and a reader holding its chunks.
    pub fn build(mut self) -> (Arc<Toc>, Arc<MemoryChunks>) {
        self.close_pack();
        let digest = Digest::sha256(b"test layer").to_string();
        let mut offset = 0u64;
        let mut table = Vec::new();
        let mut data = Vec::new();
        for chunk in &self.chunks {
            let frame = compress_chunk(chunk, 1).unwrap();
            table.push(api::Chunk {
                offset,
                compressed_size: frame.len() as u32,
                size: chunk.len() as u32,
                sha256: Digest::sha256(chunk).as_bytes().to_vec(),
            });
            offset += frame.len() as u64;
            data.extend_from_slice(&frame);
        }
        let raw = api::Toc {
            version: FORMAT_VERSION,
            layer_digest: digest.clone(),
            diff_id: digest,
            data_digest: Digest::sha256(&data).to_string(),
            data_size: data.len() as u64,
            max_chunk_size: self.max_chunk,
            chunks: table,
            entries: self.entries,
            ..Default::default()
        };
        let toc = Toc::from_raw(raw).expect("test TOC is valid");
        let reader = MemoryChunks::new(self.chunks.into_iter().map(Bytes::from).collect());
        (Arc::new(toc), Arc::new(reader))
    }
}

/// A [`ChunkReader`] over chunks in memory that records every call.
#[derive(Debug, Default)]
pub struct MemoryChunks {
    chunks: Vec<Bytes>,
    calls: Mutex<Vec<Vec<u32>>>,
    delays: Mutex<HashMap<u32, Duration>>,
    failing: Mutex<HashSet<u32>>,
    /// Chunks that are not on the node: `local_chunks_in` does not give them.
    remote: Mutex<HashSet<u32>>,
    /// Calls of `local_chunks_in` so far.
    local_calls: Mutex<usize>,
}

impl MemoryChunks {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks,
            ..Default::default()
        }
    }

    /// The chunk index lists asked for so far, one per call.
    pub fn calls(&self) -> Vec<Vec<u32>> {
        self.calls.lock().unwrap().clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Calls that include `chunk` take `delay` before answering.
    pub fn delay(&self, chunk: u32, delay: Duration) {
        self.delays.lock().unwrap().insert(chunk, delay);
    }

    /// Calls that include `chunk` fail.
    pub fn fail(&self, chunk: u32) {
        self.failing.lock().unwrap().insert(chunk);
    }

    /// `chunk` is not on the node: reads fetch it, `local_chunks_in` does not give it.
    pub fn remote(&self, chunk: u32) {
        self.remote.lock().unwrap().insert(chunk);
    }

    pub fn local_calls(&self) -> usize {
        *self.local_calls.lock().unwrap()
    }
}

impl ChunkReader for MemoryChunks {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let chunks = chunks.to_vec();
        Box::pin(async move {
            self.calls.lock().unwrap().push(chunks.clone());
            let delay = {
                let delays = self.delays.lock().unwrap();
                chunks.iter().filter_map(|c| delays.get(c)).max().copied()
            };
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(bad) = chunks
                .iter()
                .find(|c| self.failing.lock().unwrap().contains(c))
            {
                return Err(ReadError::new(format!("chunk {bad}: injected failure")));
            }
            chunks
                .iter()
                .map(|&c| {
                    self.chunks
                        .get(c as usize)
                        .cloned()
                        .ok_or_else(|| ReadError::new(format!("chunk {c} does not exist")))
                })
                .collect()
        })
    }

    fn local_chunks_in<'a>(
        &'a self,
        _table: &'a dyn super::ChunkTable,
        chunks: &[u32],
    ) -> BoxFuture<'a, Option<Vec<Bytes>>> {
        *self.local_calls.lock().unwrap() += 1;
        let remote = self.remote.lock().unwrap();
        let failing = self.failing.lock().unwrap();
        let local = chunks
            .iter()
            .map(|&c| {
                let on_node = !remote.contains(&c) && !failing.contains(&c);
                on_node
                    .then(|| self.chunks.get(c as usize).cloned())
                    .flatten()
            })
            .collect();
        Box::pin(async move { local })
    }
}
