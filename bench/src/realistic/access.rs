//! The registry side of a cold lazy start: the requests the link carried (from the shaping
//! proxy's request log), how they were spread in time and in the data blobs, and what a
//! read-ahead or a start-up profile would have made of them.

use std::collections::HashMap;

use serde::Serialize;
use streamsnap_e2e::RequestRecord;

use super::report::median;

/// Read-ahead windows simulated, in MiB of compressed blob.
const WINDOWS_MIB: [u64; 3] = [1, 4, 16];
/// Largest merged request of the simulated profile prefetch (the daemon's
/// `cache.max_request_bytes` default) and the gap merged over.
const PROFILE_MAX_REQUEST: u64 = 8 << 20;
const PROFILE_MAX_GAP: u64 = 1 << 20;

#[derive(Debug, Default, Serialize)]
pub struct AccessTrace {
    /// Every request the node sent.
    pub requests: usize,
    /// Ranged blob reads (chunk fetches).
    pub range_requests: usize,
    pub range_bytes: u64,
    /// Data blobs (layers) the ranges touched.
    pub blobs: usize,
    /// Connections the ranges came on.
    pub connections: usize,
    /// First to last range request.
    pub span_s: f64,
    /// Median time between the starts of successive range requests.
    pub median_gap_ms: f64,
    /// Ranges that start within 1 MiB after the end of a range fetched before in the same blob.
    pub near_previous: usize,
    /// (window MiB, requests, bytes) if each miss had fetched at least that window.
    pub readahead: Vec<(u64, usize, u64)>,
    /// (requests, bytes) fetching the same ranges up front, merged (a start-up profile).
    pub profile: (usize, u64),
}

impl AccessTrace {
    pub fn of(records: &[RequestRecord]) -> Self {
        let ranges: Vec<(&RequestRecord, (u64, u64))> = records
            .iter()
            .filter_map(|r| r.range.map(|(first, last)| (r, (first, last + 1))))
            .collect();
        let mut trace = Self {
            requests: records.len(),
            range_requests: ranges.len(),
            range_bytes: ranges.iter().map(|(_, (a, b))| b - a).sum(),
            ..Self::default()
        };
        if ranges.is_empty() {
            return trace;
        }
        let mut blobs: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        let mut connections: Vec<u64> = ranges.iter().map(|(r, _)| r.connection).collect();
        connections.sort_unstable();
        connections.dedup();
        trace.connections = connections.len();
        let first = ranges[0].0.at;
        let last = ranges[ranges.len() - 1].0.at;
        trace.span_s = last.duration_since(first).as_secs_f64();
        let gaps: Vec<f64> = ranges
            .windows(2)
            .map(|w| w[1].0.at.duration_since(w[0].0.at).as_secs_f64() * 1e3)
            .collect();
        trace.median_gap_ms = median(&gaps);
        for (record, (a, b)) in &ranges {
            let fetched = blobs.entry(record.path.as_str()).or_default();
            if fetched
                .iter()
                .any(|&(_, end)| end <= *a && a - end <= 1 << 20)
            {
                trace.near_previous += 1;
            }
            fetched.push((*a, *b));
        }
        trace.blobs = blobs.len();
        trace.readahead = WINDOWS_MIB
            .iter()
            .map(|&w| {
                let (requests, bytes) = simulate_readahead(&ranges, w << 20);
                (w, requests, bytes)
            })
            .collect();
        trace.profile = simulate_profile(&blobs);
        trace
    }
}

/// Requests and bytes if each range not already fetched had fetched at least `window` bytes.
fn simulate_readahead(ranges: &[(&RequestRecord, (u64, u64))], window: u64) -> (usize, u64) {
    let mut fetched: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    let (mut requests, mut bytes) = (0, 0);
    for (record, (a, b)) in ranges {
        let have = fetched.entry(record.path.as_str()).or_default();
        if have.iter().any(|&(s, e)| s <= *a && *b <= e) {
            continue;
        }
        let end = (*b).max(a + window);
        requests += 1;
        bytes += end - a;
        have.push((*a, end));
    }
    (requests, bytes)
}

/// Requests and bytes fetching every range up front, sorted and merged per blob.
fn simulate_profile(blobs: &HashMap<&str, Vec<(u64, u64)>>) -> (usize, u64) {
    let (mut requests, mut bytes) = (0, 0);
    for ranges in blobs.values() {
        let mut sorted = ranges.clone();
        sorted.sort_unstable();
        let mut current: Option<(u64, u64)> = None;
        for (a, b) in sorted {
            current = match current {
                Some((s, e)) if a <= e + PROFILE_MAX_GAP && b.max(e) - s <= PROFILE_MAX_REQUEST => {
                    Some((s, b.max(e)))
                }
                Some((s, e)) => {
                    requests += 1;
                    bytes += e - s;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((s, e)) = current {
            requests += 1;
            bytes += e - s;
        }
    }
    (requests, bytes)
}
