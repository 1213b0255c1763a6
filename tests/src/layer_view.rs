//! Entry-by-entry views of a layer, to compare a streaming layer with the tar it came from.
//!
//! [`tar_views`] parses the ORIGINAL layer tar with the `tar` crate; [`toc_views`] reads a
//! streaming layer back through its TOC and verified chunks. Equal views mean equal bytes and
//! metadata for every entry, in order.

use std::collections::HashMap;
use std::io::Read;

use anyhow::Context;
use streamsnap_format::{Toc, api, decode_chunk, normalize_tar_path, tar_name};

/// One tar entry: name as in the tar (normalized), type flag, metadata and content.
#[derive(Debug, PartialEq, Eq)]
pub struct EntryView {
    pub name: Vec<u8>,
    /// The tar type flag: b'0' regular, b'1' hardlink, b'2' symlink, b'3' char, b'4' block,
    /// b'5' directory, b'6' fifo.
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Vec<u8>,
    pub dev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub content: Vec<u8>,
}

impl EntryView {
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Views of every entry of an uncompressed layer tar, parsed independently of streamsnap's
/// converter. Extension headers are applied here (the `tar` crate's own PAX parser splits
/// records at newlines, which binary xattr values may contain).
pub fn tar_views(tar: &[u8]) -> anyhow::Result<Vec<EntryView>> {
    let mut archive = tar::Archive::new(tar);
    let mut views = Vec::new();
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in archive.entries()?.raw(true) {
        let mut entry = entry?;
        let header = entry.header().clone();
        let mut data = Vec::new();
        let kind = match header.entry_type() {
            tar::EntryType::XHeader => {
                entry.read_to_end(&mut data)?;
                pax = pax_records(&data)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                entry.read_to_end(&mut data)?;
                let name = data.split(|&b| b == 0).next().unwrap_or_default().to_vec();
                if header.entry_type() == tar::EntryType::GNULongName {
                    long_name = Some(name);
                } else {
                    long_link = Some(name);
                }
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => b'0',
            other => other.as_byte(),
        };
        let record = |key: &str| pax.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let number = |key: &str, fallback: u64| -> anyhow::Result<u64> {
            match record(key) {
                Some(v) => Ok(String::from_utf8(v)?
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .parse()?),
                None => Ok(fallback),
            }
        };
        let name = record("path")
            .or(long_name.take())
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let link = record("linkpath")
            .or(long_link.take())
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()))
            .unwrap_or_default();
        let link = if kind == b'1' {
            normalize_tar_path(&link)?
        } else {
            link
        };
        entry.read_to_end(&mut data)?;
        let dev = if matches!(kind, b'3' | b'4') {
            (
                header.device_major()?.unwrap_or(0),
                header.device_minor()?.unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let xattrs = pax
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("SCHILY.xattr.")
                    .map(|n| (n.to_owned(), v.clone()))
            })
            .collect();
        views.push(EntryView {
            name: normalize_tar_path(&name)?,
            kind,
            mode: header.mode()? & 0o7777,
            uid: number("uid", header.uid()?)?,
            gid: number("gid", header.gid()?)?,
            mtime: number("mtime", header.mtime()?)?,
            link,
            dev,
            xattrs,
            content: data,
        });
        pax.clear();
    }
    Ok(views)
}

/// PAX records of an extended header: each is `"<length> <key>=<value>\n"` with the length
/// counting the whole record.
fn pax_records(mut data: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut records = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let digits = data.iter().take_while(|b| b.is_ascii_digit()).count();
        let len: usize = std::str::from_utf8(&data[..digits])?.parse()?;
        anyhow::ensure!(len <= data.len() && data[digits] == b' ', "bad PAX record");
        let (record, rest) = data.split_at(len);
        let body = &record[digits + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .context("PAX record without '='")?;
        records.push((
            String::from_utf8(body[..eq].to_vec())?,
            body[eq + 1..].to_vec(),
        ));
        data = rest;
    }
    Ok(records)
}

/// Views of every entry of a streaming layer. `fetch_frame(chunk)` returns the chunk's zstd
/// frame, however the caller gets it (slice of a local blob, range request to a registry); every
/// frame is verified against the TOC before use.
pub fn toc_views(
    toc: &Toc,
    mut fetch_frame: impl FnMut(&api::Chunk) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<EntryView>> {
    toc_views_decoded(toc, |_, chunk| {
        let frame = fetch_frame(chunk)?;
        Ok(decode_chunk(chunk, &frame)?)
    })
}

/// [`toc_views`] for any codec: `decoded(index, chunk)` gives chunk `index`'s verified
/// content (for the index kind: its gzip span, inflated from its checkpoint).
pub fn toc_views_decoded(
    toc: &Toc,
    mut decoded: impl FnMut(u32, &api::Chunk) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<EntryView>> {
    let mut chunks: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut views = Vec::with_capacity(toc.entries().len());
    for entry in toc.entries() {
        let mut content = Vec::with_capacity(entry.size as usize);
        for piece in toc.pieces(entry, 0, entry.size) {
            let data = match chunks.entry(piece.chunk) {
                std::collections::hash_map::Entry::Occupied(cached) => cached.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let chunk = &toc.chunks()[piece.chunk as usize];
                    let data = decoded(piece.chunk, chunk)
                        .with_context(|| format!("verifying chunk {}", piece.chunk))?;
                    slot.insert(data)
                }
            };
            content.extend_from_slice(&data[piece.offset as usize..][..piece.len as usize]);
        }
        let kind = match api::EntryType::try_from(entry.r#type)? {
            // Whiteouts and opaque markers are empty regular files in the tar.
            api::EntryType::Regular | api::EntryType::Whiteout | api::EntryType::Opaque => b'0',
            api::EntryType::Hardlink => b'1',
            api::EntryType::Symlink => b'2',
            api::EntryType::CharDevice => b'3',
            api::EntryType::BlockDevice => b'4',
            api::EntryType::Directory => b'5',
            api::EntryType::Fifo => b'6',
            api::EntryType::Unspecified => anyhow::bail!("unspecified entry type"),
        };
        views.push(EntryView {
            name: tar_name(entry),
            kind,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime: u64::try_from(entry.mtime)?,
            link: entry.link_target.clone(),
            dev: (entry.dev_major, entry.dev_minor),
            xattrs: entry
                .xattrs
                .iter()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
            content,
        });
    }
    Ok(views)
}

/// Human-readable differences between two view lists; empty when equal.
pub fn diff_views(got: &[EntryView], want: &[EntryView]) -> Vec<String> {
    let mut out = Vec::new();
    if got.len() != want.len() {
        out.push(format!("{} entries, expected {}", got.len(), want.len()));
    }
    for (g, w) in got.iter().zip(want) {
        if g == w {
            continue;
        }
        let mut fields = Vec::new();
        if g.name != w.name {
            fields.push(format!("name {:?}", g.display_name()));
        }
        if g.kind != w.kind {
            fields.push(format!("type {} != {}", g.kind as char, w.kind as char));
        }
        if (g.mode, g.uid, g.gid, g.mtime) != (w.mode, w.uid, w.gid, w.mtime) {
            fields.push(format!(
                "mode/uid/gid/mtime {:o}/{}/{}/{} != {:o}/{}/{}/{}",
                g.mode, g.uid, g.gid, g.mtime, w.mode, w.uid, w.gid, w.mtime
            ));
        }
        if g.link != w.link {
            fields.push("link target".into());
        }
        if g.dev != w.dev {
            fields.push(format!("device {:?} != {:?}", g.dev, w.dev));
        }
        if g.xattrs != w.xattrs {
            fields.push("xattrs".into());
        }
        if g.content != w.content {
            fields.push(format!(
                "content ({} bytes vs {})",
                g.content.len(),
                w.content.len()
            ));
        }
        out.push(format!("{}: {}", w.display_name(), fields.join(", ")));
    }
    out
}
