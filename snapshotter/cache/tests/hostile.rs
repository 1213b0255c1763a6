//! A frame bomb served by a registry costs the cache a bounded amount of memory: a 25 KB data
//! blob of 48 frames that each inflate to 16 MiB (768 MiB in all).
//!
//! Each case runs in a fresh process (this test binary run again with `STREAMSNAP_HOSTILE_CASE`
//! naming the case; the blob and its chunk table in files), whose peak resident size (`VmHWM`
//! in /proc/self/status) before and after the calls gives what they cost: a high-water mark in
//! a process shared with other tests would measure them too. The child runs with glibc's mmap
//! threshold fixed at 4 MiB, as the daemon sets it at start, so a freed chunk goes back to the
//! kernel rather than staying in a malloc arena (which would count what the process no longer
//! holds, differently from run to run).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use streamsnap_cache::{BlobSource, BoxFuture, CacheConfig, ChunkCache, ChunkRef, SourceError};
use streamsnap_format::{Digest, compress_chunk};

const CASE_ENV: &str = "STREAMSNAP_HOSTILE_CASE";
const DIR_ENV: &str = "STREAMSNAP_HOSTILE_DIR";
const FRAMES: usize = 48;
const FRAME_SIZE: usize = 16 << 20;
/// The most one hostile call may add to the process's peak RSS.
const BOUND: u64 = 64 << 20;
/// The cache's in-memory LRU in these tests (the daemon's default is 64 MiB; what it holds
/// is bounded by it, and counted in the peak).
const MEMORY_BYTES: u64 = 16 << 20;

/// Peak resident set size of this process, in bytes.
fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kb << 10
}

/// The data blob in memory.
#[derive(Debug)]
struct Memory(Bytes);

impl BlobSource for Memory {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let end = (offset + len).min(self.0.len() as u64);
        let body = self.0.slice(offset as usize..end as usize);
        Box::pin(async move { Ok(body) })
    }

    fn describe(&self) -> String {
        "hostile.registry/bomb@sha256:0000".into()
    }
}

/// Writes the bomb into `dir`: `blob` (the frames) and `table` (one `digest offset
/// compressed_size size` line per chunk). Each frame is made and dropped in turn.
fn write_bomb(dir: &Path) {
    let mut blob = Vec::new();
    let mut table = String::new();
    for i in 0..FRAMES {
        let content = vec![i as u8 + 1; FRAME_SIZE];
        let frame = compress_chunk(&content, 19).unwrap();
        table.push_str(&format!(
            "{} {} {} {}\n",
            Digest::sha256(&content),
            blob.len(),
            frame.len(),
            content.len()
        ));
        blob.extend_from_slice(&frame);
    }
    assert!(blob.len() < 32 << 10, "the bomb is {} bytes", blob.len());
    std::fs::write(dir.join("blob"), &blob).unwrap();
    std::fs::write(dir.join("table"), table).unwrap();
}

fn read_bomb(dir: &Path) -> (Arc<dyn BlobSource>, Vec<ChunkRef>) {
    let blob = std::fs::read(dir.join("blob")).unwrap();
    let table = std::fs::read_to_string(dir.join("table")).unwrap();
    let chunks = table
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            ChunkRef {
                digest: f[0].parse().unwrap(),
                offset: f[1].parse().unwrap(),
                compressed_size: f[2].parse().unwrap(),
                size: f[3].parse().unwrap(),
            }
        })
        .collect();
    (Arc::new(Memory(blob.into())), chunks)
}

/// In the child: runs `case` on the bomb and prints the outcome and the growth of the peak
/// RSS. In the parent: writes the bomb, runs the child, returns (growth, outcome).
fn in_child(case: &str) -> Option<(u64, String)> {
    if let Ok(running) = std::env::var(CASE_ENV) {
        if running == case {
            let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
            let (source, chunks) = read_bomb(&dir);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let mut config = CacheConfig::new(dir.join("cache"), 64 << 20);
            config.memory_bytes = MEMORY_BYTES;
            let cache = ChunkCache::open(config).unwrap();
            let before = vm_hwm();
            let outcome = runtime.block_on(async {
                match case {
                    "one_get_of_every_frame" => match cache.get(&source, &chunks).await {
                        Ok(got) => format!("returned {} chunks", got.len()),
                        Err(e) => format!("refused: {e}"),
                    },
                    "warm_every_frame" => match cache.warm(&source, &chunks).await {
                        Ok(()) => format!(
                            "fetched and verified {} of {} chunks",
                            cache.stats().misses,
                            chunks.len()
                        ),
                        Err(e) => format!("failed: {e}"),
                    },
                    _ => unreachable!("{case}"),
                }
            });
            let growth = vm_hwm() - before;
            println!("hostile-result growth={growth} outcome={outcome}");
        }
        return None;
    }
    let dir = std::env::temp_dir().join(format!("streamsnap-bomb-{}-{case}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_bomb(&dir);
    let output = Command::new(std::env::current_exe().unwrap())
        .args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .env(DIR_ENV, &dir)
        .env("MALLOC_MMAP_THRESHOLD_", (4 << 20).to_string())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| Some(&l[l.find("hostile-result ")? + "hostile-result ".len()..]))
        .unwrap_or_else(|| {
            panic!(
                "the child for {case} printed no result ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let (growth, outcome) = line.split_once(" outcome=").unwrap();
    let growth: u64 = growth.strip_prefix("growth=").unwrap().parse().unwrap();
    eprintln!("{case}: VmHWM +{} KiB, {outcome}", growth >> 10);
    let _ = std::io::stderr().flush();
    Some((growth, outcome.to_string()))
}

fn assert_within_bound(case: &str, growth: u64) {
    assert!(
        growth < BOUND,
        "{case}: took {} MiB of peak memory (bound {} MiB)",
        growth >> 20,
        BOUND >> 20
    );
}

#[test]
fn one_get_of_every_frame() {
    let case = "one_get_of_every_frame";
    let Some((growth, outcome)) = in_child(case) else {
        return;
    };
    assert!(
        outcome
            .contains("refused: a read of 48 chunks (805306368 bytes decoded) is over the limit"),
        "{outcome}"
    );
    assert_within_bound(case, growth);
}

#[test]
fn warm_every_frame() {
    let case = "warm_every_frame";
    let Some((growth, outcome)) = in_child(case) else {
        return;
    };
    assert_eq!(outcome, "fetched and verified 48 of 48 chunks");
    assert_within_bound(case, growth);
}
