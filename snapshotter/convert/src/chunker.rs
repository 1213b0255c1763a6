//! Cuts file content into chunks, dedups them by digest and compresses them in parallel into the
//! data blob.
//!
//! Files of at least `max_chunk_size` bytes get chunks of their own, cut at fixed offsets from the
//! file start, so the same large file dedups across layers and images. Smaller files are packed
//! together in layer order until a pack would exceed `max_chunk_size`: one range request then
//! serves many small files, and they compress better together. Identical chunks (by sha256 of
//! their content) are stored once.
//!
//! Threads: the caller cuts and hashes; `workers` threads compress; one writer thread puts the
//! frames in chunk order into the output and hashes it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use streamsnap_format::{Digest, DigestHasher, api, compress_chunk};

use crate::error::{Error, Result};

/// Where the data blob went: chunk table (offsets filled in), digest and size.
#[derive(Debug)]
pub(crate) struct BlobSummary {
    pub chunks: Vec<api::Chunk>,
    /// Extents of the small files of the last pack, closed by `finish`.
    pub resolved: Vec<(usize, api::Extent)>,
    pub digest: Digest,
    pub size: u64,
}

/// What the writer thread placed: (offset, length) of each frame in chunk order, the blob's
/// digest and size.
type WrittenFrames = (Vec<(u64, u32)>, Digest, u64);

pub(crate) struct Chunker<'scope> {
    max_chunk_size: usize,
    pack: Vec<u8>,
    /// Small files in `pack`, as (caller's file id, offset in pack, length).
    packed: Vec<(usize, u32, u32)>,
    /// Files whose packs closed since the caller last asked, with their one extent.
    resolved: Vec<(usize, api::Extent)>,
    dedup: HashMap<Digest, u32>,
    chunks: Vec<api::Chunk>,
    to_workers: Option<SyncSender<(u32, Vec<u8>)>>,
    writer: ScopedJoinHandle<'scope, Result<WrittenFrames>>,
    workers: Vec<ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope> Chunker<'scope> {
    pub fn start<'env, W: Write + Send + 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        max_chunk_size: u32,
        level: i32,
        workers: usize,
        cancel: Option<Arc<AtomicBool>>,
        out: W,
    ) -> Self {
        let workers = workers.max(1);
        let (to_workers, work) = sync_channel::<(u32, Vec<u8>)>(workers * 2);
        let work = std::sync::Arc::new(std::sync::Mutex::new(work));
        let (to_writer, frames) = sync_channel::<(u32, std::io::Result<Vec<u8>>)>(workers * 2);
        let worker_handles = (0..workers)
            .map(|_| {
                let work = work.clone();
                let to_writer = to_writer.clone();
                let cancel = cancel.clone();
                scope.spawn(move || {
                    loop {
                        let next = work.lock().expect("chunk work queue lock").recv();
                        let Ok((index, data)) = next else {
                            return Ok(());
                        };
                        let canceled = cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
                        let frame = if canceled {
                            Err(std::io::Error::other("conversion canceled"))
                        } else {
                            compress_chunk(&data, level)
                        };
                        if to_writer.send((index, frame)).is_err() {
                            return Ok(()); // the writer failed; it reports why
                        }
                    }
                })
            })
            .collect();
        drop(to_writer);
        let writer = scope.spawn(move || write_frames(frames, out));
        Self {
            max_chunk_size: max_chunk_size as usize,
            pack: Vec::with_capacity(max_chunk_size as usize),
            packed: Vec::new(),
            resolved: Vec::new(),
            dedup: HashMap::new(),
            chunks: Vec::new(),
            to_workers: Some(to_workers),
            writer,
            workers: worker_handles,
        }
    }

    pub fn max_chunk_size(&self) -> usize {
        self.max_chunk_size
    }

    /// Whether a file of `size` bytes is packed with others rather than chunked on its own.
    pub fn is_small(&self, size: u64) -> bool {
        size < self.max_chunk_size as u64
    }

    /// Adds the whole content of a small file (`is_small`) to the current pack. Its extent is
    /// known once the pack closes: see [`Chunker::take_resolved`].
    pub fn add_small(&mut self, file: usize, data: &[u8]) -> Result<()> {
        debug_assert!(self.is_small(data.len() as u64));
        if data.is_empty() {
            return Ok(());
        }
        if self.pack.len() + data.len() > self.max_chunk_size {
            self.close_pack()?;
        }
        self.packed
            .push((file, self.pack.len() as u32, data.len() as u32));
        self.pack.extend_from_slice(data);
        Ok(())
    }

    /// Adds one full-size (or final) chunk of a large file; returns its extent.
    pub fn add_large_piece(&mut self, data: Vec<u8>) -> Result<api::Extent> {
        debug_assert!(!data.is_empty() && data.len() <= self.max_chunk_size);
        // Keep layer order: what was packed before this file goes first.
        self.close_pack()?;
        let length = data.len() as u32;
        let chunk = self.emit(data)?;
        Ok(api::Extent {
            chunk,
            offset: 0,
            length,
        })
    }

    /// Extents of small files whose packs have closed since the last call.
    pub fn take_resolved(&mut self) -> Vec<(usize, api::Extent)> {
        std::mem::take(&mut self.resolved)
    }

    fn close_pack(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.pack, Vec::with_capacity(self.max_chunk_size));
        let chunk = self.emit(data)?;
        self.resolved
            .extend(self.packed.drain(..).map(|(file, offset, length)| {
                (
                    file,
                    api::Extent {
                        chunk,
                        offset,
                        length,
                    },
                )
            }));
        Ok(())
    }

    fn emit(&mut self, data: Vec<u8>) -> Result<u32> {
        let digest = Digest::sha256(&data);
        if let Some(&index) = self.dedup.get(&digest) {
            return Ok(index);
        }
        let index = u32::try_from(self.chunks.len()).map_err(|_| Error::TooManyChunks)?;
        self.chunks.push(api::Chunk {
            offset: 0,
            compressed_size: 0,
            size: data.len() as u32,
            sha256: digest.as_bytes().to_vec(),
        });
        self.dedup.insert(digest, index);
        let sender = self.to_workers.as_ref().expect("chunker used after finish");
        if sender.send((index, data)).is_err() {
            // A worker or the writer stopped: finish() reports the cause.
            return Err(Error::ChunkPipelineStopped);
        }
        Ok(index)
    }

    /// Closes the last pack, waits for every frame to be written and returns the chunk table.
    pub fn finish(mut self) -> Result<BlobSummary> {
        let closed = self.close_pack();
        self.to_workers = None;
        for worker in self.workers {
            worker.join().expect("chunk compression thread panicked")?;
        }
        let (frames, digest, size) = self.writer.join().expect("chunk writer thread panicked")?;
        closed?;
        for (chunk, (offset, compressed_size)) in self.chunks.iter_mut().zip(frames) {
            chunk.offset = offset;
            chunk.compressed_size = compressed_size;
        }
        Ok(BlobSummary {
            chunks: self.chunks,
            resolved: self.resolved,
            digest,
            size,
        })
    }
}

/// Writes frames in chunk order as they arrive from the workers in any order.
fn write_frames<W: Write>(
    frames: Receiver<(u32, std::io::Result<Vec<u8>>)>,
    mut out: W,
) -> Result<WrittenFrames> {
    let mut waiting = BTreeMap::new();
    let mut placed = Vec::new();
    let mut hasher = DigestHasher::new();
    for (index, frame) in frames {
        waiting.insert(index, frame.map_err(Error::Compress)?);
        while let Some(frame) = waiting.remove(&(placed.len() as u32)) {
            out.write_all(&frame)
                .map_err(|source| Error::WriteBlob { source })?;
            placed.push((hasher.len(), frame.len() as u32));
            hasher.update(&frame);
        }
    }
    out.flush().map_err(|source| Error::WriteBlob { source })?;
    debug_assert!(waiting.is_empty());
    let size = hasher.len();
    Ok((placed, hasher.finish(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_small_files_and_dedups_identical_chunks() {
        let mut blob = Vec::new();
        let (summary, resolved, large) = std::thread::scope(|scope| {
            let mut chunker = Chunker::start(scope, 1000, 3, 2, None, &mut blob);
            chunker.add_small(0, &[1; 400]).unwrap();
            chunker.add_small(1, &[2; 400]).unwrap();
            chunker.add_small(2, &[3; 400]).unwrap(); // does not fit: closes the first pack
            let large = vec![
                chunker.add_large_piece(vec![9; 1000]).unwrap(),
                chunker.add_large_piece(vec![9; 1000]).unwrap(), // same content: same chunk
                chunker.add_large_piece(vec![8; 10]).unwrap(),
            ];
            let mut resolved = chunker.take_resolved();
            let summary = chunker.finish().unwrap();
            resolved.sort_by_key(|(file, _)| *file);
            (summary, resolved, large)
        });
        let extent = |chunk, offset, length| api::Extent {
            chunk,
            offset,
            length,
        };
        assert_eq!(
            resolved,
            vec![
                (0, extent(0, 0, 400)),
                (1, extent(0, 400, 400)),
                (2, extent(1, 0, 400))
            ]
        );
        assert_eq!(
            large,
            vec![extent(2, 0, 1000), extent(2, 0, 1000), extent(3, 0, 10)]
        );
        assert_eq!(summary.chunks.len(), 4);
        assert_eq!(summary.size, blob.len() as u64);
        assert_eq!(summary.digest, Digest::sha256(&blob));
        // Frames are back to back in chunk order and each decodes to its content.
        let mut expected_offset = 0;
        for chunk in &summary.chunks {
            assert_eq!(chunk.offset, expected_offset);
            let frame = &blob[chunk.offset as usize..][..chunk.compressed_size as usize];
            streamsnap_format::decode_chunk(chunk, frame).unwrap();
            expected_offset += u64::from(chunk.compressed_size);
        }
    }

    #[test]
    fn a_failing_output_is_reported_not_hidden() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no space left on device"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let result = std::thread::scope(|scope| {
            let mut chunker = Chunker::start(scope, 100, 3, 1, None, Full);
            // Keep feeding until the pipeline notices, then finish reports the writer's error.
            for i in 0..1000u32 {
                if chunker.add_large_piece(i.to_le_bytes().repeat(25)).is_err() {
                    break;
                }
            }
            chunker.finish()
        });
        assert!(matches!(result, Err(Error::WriteBlob { .. })), "{result:?}");
    }

    #[test]
    fn a_cancel_skips_the_queued_chunks_and_stops_the_pipeline() {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut blob = Vec::new();
        let result = std::thread::scope(|scope| {
            let mut chunker = Chunker::start(scope, 100, 19, 2, Some(cancel.clone()), &mut blob);
            chunker.add_large_piece(vec![1; 100]).unwrap();
            cancel.store(true, Ordering::Relaxed);
            for i in 0..1000u32 {
                if chunker.add_large_piece(i.to_le_bytes().repeat(25)).is_err() {
                    break;
                }
            }
            chunker.finish()
        });
        assert!(
            matches!(&result, Err(Error::Compress(e)) if e.to_string().contains("canceled")),
            "{result:?}"
        );
    }
}
