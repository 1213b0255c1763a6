//! One tar member to one TOC entry: type, normalized path, whiteouts, metadata, xattrs.

use std::io;

use streamsnap_format::api::{self, EntryType};
use streamsnap_format::{Digest, normalize_tar_path};

use crate::error::{Error, Result};
use crate::tarstream::Member;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const AUFS_PREFIX: &[u8] = b".wh..wh.";

/// The TOC entry for a tar member, without content. `None` for AUFS bookkeeping entries.
pub(crate) fn toc_entry(
    header: &tar::Header,
    member: Member,
    layer: Digest,
) -> Result<Option<api::Entry>> {
    let raw_path = member.path;
    let bad = |reason: String| Error::BadEntry {
        layer,
        path: String::from_utf8_lossy(&raw_path)
            .chars()
            .take(200)
            .collect(),
        reason,
    };
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryType::Regular,
        tar::EntryType::Directory => EntryType::Directory,
        tar::EntryType::Symlink => EntryType::Symlink,
        tar::EntryType::Link => EntryType::Hardlink,
        tar::EntryType::Char => EntryType::CharDevice,
        tar::EntryType::Block => EntryType::BlockDevice,
        tar::EntryType::Fifo => EntryType::Fifo,
        tar::EntryType::GNUSparse => return Err(bad("GNU sparse files are not supported".into())),
        other => {
            return Err(bad(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            )));
        }
    };
    let path = normalize_tar_path(&raw_path).map_err(|e| bad(e.to_string()))?;
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (&path[..0], &path[..]),
    };
    let (kind, path) = if name == OPAQUE_MARKER {
        (EntryType::Opaque, parent.to_vec())
    } else if name.starts_with(AUFS_PREFIX) {
        tracing::debug!(path = %String::from_utf8_lossy(&path), "skipping AUFS metadata entry");
        return Ok(None);
    } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() {
            return Err(bad("whiteout without a name".into()));
        }
        let mut target = parent.to_vec();
        if !target.is_empty() {
            target.push(b'/');
        }
        target.extend_from_slice(hidden);
        (EntryType::Whiteout, target)
    } else {
        (kind, path)
    };

    let field = |what: &str, e: io::Error| bad(format!("unreadable {what}: {e}"));
    // Like Go's archive/tar (which wrote most image layers), a blank numeric field reads as 0.
    let old = header.as_old();
    let mode =
        blank_as_zero(header.mode().map(u64::from), &old.mode).map_err(|e| field("mode", e))?;
    let mtime = blank_as_zero(header.mtime(), &old.mtime).map_err(|e| field("mtime", e))?;
    let mut entry = api::Entry {
        path,
        r#type: kind as i32,
        mode: (mode & 0o7777) as u32,
        uid: blank_as_zero(header.uid(), &old.uid).map_err(|e| field("uid", e))?,
        gid: blank_as_zero(header.gid(), &old.gid).map_err(|e| field("gid", e))?,
        mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        uname: String::from_utf8_lossy(header.username_bytes().unwrap_or_default()).into_owned(),
        gname: String::from_utf8_lossy(header.groupname_bytes().unwrap_or_default()).into_owned(),
        ..Default::default()
    };
    match kind {
        EntryType::Hardlink => {
            entry.link_target = normalize_tar_path(&member.link)
                .map_err(|e| bad(format!("hardlink target: {e}")))?;
        }
        EntryType::Symlink => entry.link_target = member.link,
        EntryType::CharDevice | EntryType::BlockDevice => {
            entry.dev_major = header
                .device_major()
                .map_err(|e| field("device major", e))?
                .unwrap_or(0);
            entry.dev_minor = header
                .device_minor()
                .map_err(|e| field("device minor", e))?
                .unwrap_or(0);
        }
        _ => {}
    }
    for (key, value) in member.pax {
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| bad("xattr name is not UTF-8".into()))?;
            entry.xattrs.push(api::Xattr { name, value });
            continue;
        }
        match key.as_slice() {
            b"mtime" => {
                let (secs, nanos) =
                    parse_pax_time(&value).ok_or_else(|| bad("malformed PAX mtime".into()))?;
                entry.mtime = secs;
                entry.mtime_nanos = nanos;
            }
            b"uid" => {
                entry.uid = parse_pax_id(&value).ok_or_else(|| bad("malformed PAX uid".into()))?
            }
            b"gid" => {
                entry.gid = parse_pax_id(&value).ok_or_else(|| bad("malformed PAX gid".into()))?
            }
            b"uname" => entry.uname = String::from_utf8_lossy(&value).into_owned(),
            b"gname" => entry.gname = String::from_utf8_lossy(&value).into_owned(),
            _ => {}
        }
    }
    Ok(Some(entry))
}

fn parse_pax_id(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A numeric header field that failed to parse reads as 0 when it is blank (NULs and spaces).
fn blank_as_zero(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        other => other,
    }
}

/// Parses a PAX time, `[-]seconds[.fraction]`, into seconds and nanoseconds (floor semantics:
/// -1.5 is -2 s + 500000000 ns).
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(match (negative, nanos) {
        (false, _) => (secs, nanos),
        (true, 0) => (-secs, 0),
        (true, _) => (-secs - 1, 1_000_000_000 - nanos),
    })
}

#[cfg(test)]
#[path = "entry_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_floor_semantics() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        for bad in [&b""[..], b".5", b"1e9", b"12a", b"--1"] {
            assert_eq!(
                parse_pax_time(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn blank_numeric_fields_read_as_zero_but_garbage_does_not() {
        let err = || Err(io::Error::other("not a number"));
        assert_eq!(blank_as_zero(err(), &[0; 8]).unwrap(), 0);
        assert_eq!(blank_as_zero(err(), b"        ").unwrap(), 0);
        assert!(blank_as_zero(err(), b"12x45   ").is_err());
    }
}
