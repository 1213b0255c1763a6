//! Hostile TOC blobs, as a registry could serve them, are refused at a bounded cost in memory.
//!
//! Each case is decoded in a fresh process (this test binary run again with
//! `STREAMSNAP_HOSTILE_CASE` naming the case and the blob in a file), whose peak resident size
//! (`VmHWM` in /proc/self/status) before and after the decode gives what the decode cost:
//! a high-water mark in a process shared with other tests would measure them too.

use std::io::Write;
use std::process::Command;

use streamsnap_format::{Error, Toc};

const CASE_ENV: &str = "STREAMSNAP_HOSTILE_CASE";
const BLOB_ENV: &str = "STREAMSNAP_HOSTILE_BLOB";
/// The most a refused TOC may add to the decoding process's peak RSS.
const BOUND: u64 = 64 << 20;

/// Peak resident set size of this process, in bytes.
fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb << 10
}

/// In the child: decodes the blob, prints the outcome and the growth of the peak RSS.
/// In the parent: builds the blob, runs the child for `case` on it, returns (growth, outcome).
fn decode_in_child(case: &str, build: impl FnOnce() -> Vec<u8>) -> Option<(u64, String)> {
    if let Ok(running) = std::env::var(CASE_ENV) {
        if running == case {
            let blob = std::fs::read(std::env::var(BLOB_ENV).unwrap()).unwrap();
            let before = vm_hwm();
            let outcome = match Toc::decode(&blob) {
                Ok(toc) => format!("decoded {} entries", toc.entries().len()),
                Err(e) => format!("refused: {e}"),
            };
            let growth = vm_hwm() - before;
            println!("hostile-result growth={growth} outcome={outcome}");
        }
        return None;
    }
    let blob = build();
    let blob = blob.as_slice();
    let dir = tempfile_dir();
    let path = dir.join(format!("{case}.blob"));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(blob))
        .unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .env(BLOB_ENV, &path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
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
    let growth = growth.strip_prefix("growth=").unwrap().parse().unwrap();
    eprintln!(
        "{case}: {blob_len} byte blob, VmHWM +{} KiB, {outcome}",
        growth >> 10,
        blob_len = blob.len()
    );
    Some((growth, outcome.to_string()))
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("streamsnap-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `count` empty `Toc.entries` (field 8, length 0): the layer root, over and over.
fn empty_entries(count: usize) -> Vec<u8> {
    [0x42u8, 0x00].repeat(count)
}

fn assert_refused_within_bound(case: &str, build: impl FnOnce() -> Vec<u8>, reason: &str) {
    let Some((growth, outcome)) = decode_in_child(case, build) else {
        return;
    };
    assert!(outcome.starts_with("refused:"), "{case}: {outcome}");
    assert!(outcome.contains(reason), "{case}: {outcome}");
    assert!(
        growth < BOUND,
        "{case}: decoding took {} MiB of peak memory (bound {} MiB)",
        growth >> 20,
        BOUND >> 20
    );
}

#[test]
fn four_million_empty_entries_in_a_small_blob() {
    // The blob of the issue: 4 million root entries, a kilobyte or two once compressed,
    // which decoded all at once take 800 MB.
    assert_refused_within_bound(
        "four_million_empty_entries_in_a_small_blob",
        || {
            let blob = zstd::bulk::compress(&empty_entries(4_000_000), 19).unwrap();
            assert!(blob.len() < 2048, "{} bytes", blob.len());
            blob
        },
        "estimated decoded size in memory",
    );
}

#[test]
fn too_many_entries_padded_past_the_ratio_limits() {
    // One entry over the count cap, with an unknown field of incompressible bytes so the blob
    // is large enough for the per-compressed-byte limits: only the count stops it.
    assert_refused_within_bound(
        "too_many_entries_padded_past_the_ratio_limits",
        padded_entries,
        "entry count 4194305 exceeds the limit of 4194304",
    );
}

fn padded_entries() -> Vec<u8> {
    let mut raw = empty_entries(streamsnap_format::MAX_TOC_ENTRIES + 1);
    let padding = 400 << 10;
    raw.extend_from_slice(&[0xa2, 0x06]); // field 100, length-delimited
    let mut len = padding;
    while len >= 0x80 {
        raw.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    raw.push(len as u8);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    raw.extend((0..padding).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    zstd::bulk::compress(&raw, 3).unwrap()
}

#[test]
fn a_zstd_bomb_declaring_its_size() {
    assert_refused_within_bound(
        "a_zstd_bomb_declaring_its_size",
        || zstd::bulk::compress(&vec![0u8; 1 << 30], 3).unwrap(),
        "declared by the zstd frame",
    );
}

#[test]
fn a_zstd_bomb_not_declaring_its_size() {
    assert_refused_within_bound(
        "a_zstd_bomb_not_declaring_its_size",
        || {
            let mut blob = Vec::new();
            let mut encoder = zstd::stream::write::Encoder::new(&mut blob, 3).unwrap();
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..1024 {
                encoder.write_all(&zeros).unwrap();
            }
            encoder.finish().unwrap();
            blob
        },
        "toc: decompressed size",
    );
}

#[test]
fn limits_are_reported_by_kind() {
    if std::env::var(CASE_ENV).is_ok() {
        return;
    }
    let blob = zstd::bulk::compress(&empty_entries(1_000_000), 19).unwrap();
    match Toc::decode(&blob) {
        Err(Error::TocLimit { what, value, limit }) => {
            assert!(what.contains("memory"), "{what}");
            assert!(value > limit, "{value} {limit}");
        }
        other => panic!("expected a limit, got {other:?}"),
    }
}
