//! Tar streams to TOCs: a well-formed layer converts to a TOC that reads back every entry as the
//! tar has it (compared with the test harness's own tar reader); a hostile one converts or is
//! refused without panicking, and a name that escapes the layer root is always refused,
//! whichever of the header, a GNU long name or a PAX record carries it.

use proptest::prelude::*;
use streamsnap_convert::{ConvertOptions, Error, LayerSource, convert_layer};
use streamsnap_e2e::{diff_views, tar_views, toc_views};
use streamsnap_format::media::LayerCompression;
use streamsnap_format::{Digest, Toc};

use crate::config;

/// Where a member's name is written.
#[derive(Clone, Copy, Debug)]
enum NameIn {
    Header,
    GnuLongName,
    Pax,
}

#[derive(Clone, Debug)]
struct Member {
    name: Vec<u8>,
    name_in: NameIn,
    kind: tar::EntryType,
    content: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    mtime: u64,
    pax: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One PAX record, `"<len> <key>=<value>\n"`, with the length counting itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 2;
    let mut len = body + 2;
    while len != body + 1 + len.to_string().len() {
        len = body + 1 + len.to_string().len();
    }
    [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
}

fn header(kind: tar::EntryType, name: &[u8], size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    // Written raw, as a hostile tool would: `set_path` refuses what this test wants to send.
    let field = &mut header.as_old_mut().name;
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
    header.set_cksum();
    header
}

fn tar_of(members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for m in members {
        let mut pax = m.pax.clone();
        let mut name: &[u8] = &m.name;
        match m.name_in {
            NameIn::Header => {}
            NameIn::GnuLongName => {
                let data = [m.name.as_slice(), b"\0"].concat();
                let long = header(
                    tar::EntryType::GNULongName,
                    b"././@LongLink",
                    data.len() as u64,
                );
                builder.append(&long, data.as_slice()).unwrap();
                name = b"long";
            }
            NameIn::Pax => {
                pax.insert(0, (b"path".to_vec(), m.name.clone()));
                name = b"pax";
            }
        }
        // A link too long for the header goes in a PAX record, as real writers do.
        let long_link = m.link.len() > 100;
        if long_link {
            pax.push((b"linkpath".to_vec(), m.link.clone()));
        }
        if !pax.is_empty() {
            let data: Vec<u8> = pax.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let x = header(tar::EntryType::XHeader, b"PaxHeader", data.len() as u64);
            builder.append(&x, data.as_slice()).unwrap();
        }
        let mut h = header(m.kind, name, m.content.len() as u64);
        h.set_mode(m.mode);
        h.set_mtime(m.mtime);
        h.set_uid(1000);
        h.set_gid(1000);
        if !m.link.is_empty() && !long_link {
            let field = &mut h.as_old_mut().linkname;
            let n = m.link.len().min(field.len());
            field[..n].copy_from_slice(&m.link[..n]);
        }
        if m.kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        builder.append(&h, m.content.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

fn convert(tar: &[u8]) -> Result<(Toc, Vec<u8>), Error> {
    let source = LayerSource {
        digest: Digest::sha256(tar),
        compression: LayerCompression::None,
        diff_id: Digest::sha256(tar),
    };
    let options = ConvertOptions {
        max_chunk_size: 512,
        workers: 1,
        ..ConvertOptions::default()
    };
    let mut blob = Vec::new();
    let converted = convert_layer(tar, &source, &options, &mut blob, &|_| {})?;
    Ok((converted.toc, blob))
}

/// Names made of ordinary components: what real layers hold, some long.
fn plain_name() -> impl Strategy<Value = Vec<u8>> {
    let component = prop_oneof![
        6 => prop::sample::select(&["a", "b", "dir", "f.txt", "é", "x y", "nl\nx"][..]).prop_map(|c| c.as_bytes().to_vec()),
        1 => (50usize..200).prop_map(|n| vec![b'n'; n]),
    ];
    (
        prop::collection::vec(component, 1..4),
        prop::sample::select(&["", "./"][..]),
        any::<bool>(),
    )
        .prop_map(|(parts, lead, slash)| {
            let mut name = lead.as_bytes().to_vec();
            name.extend(parts.join(&b'/'));
            if slash {
                name.push(b'/');
            }
            name
        })
}

/// Names that escape the root, or are odd in other ways a hostile layer may try.
fn hostile_name() -> impl Strategy<Value = Vec<u8>> {
    let component = prop::sample::select(
        &[
            "a",
            "..",
            ".",
            "",
            "/",
            ".wh.a",
            ".wh..wh..opq",
            ".wh..wh.aufs",
            "a\0b",
        ][..],
    );
    (
        prop::sample::select(&["", "/", "./", "../"][..]),
        prop::collection::vec(component, 0..5),
    )
        .prop_map(|(lead, parts)| [lead.as_bytes().to_vec(), parts.join("/").into_bytes()].concat())
}

fn name_in() -> impl Strategy<Value = NameIn> {
    prop_oneof![
        Just(NameIn::Header),
        Just(NameIn::GnuLongName),
        Just(NameIn::Pax)
    ]
}

/// Xattr records with binary values (newlines and '=' included), and the usual PAX metadata.
fn plain_pax() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let record = prop_oneof![
        (
            prop::sample::select(&["user.a", "user.b", "security.capability"][..]),
            prop::collection::vec(any::<u8>(), 0..12)
        )
            .prop_map(|(n, v)| (format!("SCHILY.xattr.{n}").into_bytes(), v)),
        (0u64..2_000_000_000).prop_map(|t| (b"mtime".to_vec(), t.to_string().into_bytes())),
        (0u64..100_000).prop_map(|id| (b"uid".to_vec(), id.to_string().into_bytes())),
        "[a-z]{1,8}".prop_map(|u| (b"uname".to_vec(), u.into_bytes())),
    ];
    prop::collection::vec(record, 0..3).prop_map(|mut records| {
        // one record per key, as real writers do
        let mut seen = Vec::new();
        records.retain(|(k, _)| {
            !seen.contains(k) && {
                seen.push(k.clone());
                true
            }
        });
        records
    })
}

fn hostile_pax() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let key = prop::sample::select(
        &[
            "mtime",
            "uid",
            "gid",
            "size",
            "path",
            "linkpath",
            "GNU.sparse.size",
            "SCHILY.xattr.",
            "SCHILY.xattr.user.x",
            "comment",
            "",
        ][..],
    );
    let value = prop_oneof![
        "[-0-9.e ]{0,12}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..12),
        hostile_name(),
    ];
    prop::collection::vec((key.prop_map(|k| k.as_bytes().to_vec()), value), 0..4)
}

fn kind() -> impl Strategy<Value = tar::EntryType> {
    prop::sample::select(
        &[
            tar::EntryType::Regular,
            tar::EntryType::Regular,
            tar::EntryType::Directory,
            tar::EntryType::Symlink,
            tar::EntryType::Link,
            tar::EntryType::Fifo,
            tar::EntryType::Char,
        ][..],
    )
}

fn member(
    name: impl Strategy<Value = Vec<u8>>,
    pax: impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>>,
) -> impl Strategy<Value = Member> {
    (
        name,
        name_in(),
        kind(),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (0usize..1400).prop_map(|n| vec![7u8; n])
        ],
        pax,
        0u32..0o7777,
        0u64..0o77777777777,
        prop::sample::select(&["a", "dir/f.txt", "../up", "/abs"][..]),
    )
        .prop_map(|(name, name_in, kind, content, pax, mode, mtime, link)| {
            let content = if kind == tar::EntryType::Regular {
                content
            } else {
                Vec::new()
            };
            let link = match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => link.as_bytes().to_vec(),
                _ => Vec::new(),
            };
            Member {
                name,
                name_in,
                kind,
                content,
                link,
                mode,
                mtime,
                pax,
            }
        })
}

/// The name the converter takes for `m`: its PAX `path`, else the one in the header or long
/// name (a name stops at its first NUL there).
fn effective_name(m: &Member) -> Vec<u8> {
    if let Some((_, path)) = m.pax.iter().rev().find(|(k, _)| k == b"path") {
        return path.clone();
    }
    match m.name_in {
        NameIn::Pax => m.name.clone(),
        NameIn::Header => {
            let n = m.name.len().min(100);
            m.name[..n]
                .split(|&b| b == 0)
                .next()
                .unwrap_or_default()
                .to_vec()
        }
        NameIn::GnuLongName => {
            let mut name = m.name.clone();
            while name.last() == Some(&0) {
                name.pop();
            }
            name
        }
    }
}

fn escapes(name: &[u8]) -> bool {
    name.first() == Some(&b'/') || name.split(|&b| b == b'/').any(|c| c == b"..")
}

proptest! {
    #![proptest_config(config(9216))]

    /// A well-formed layer reads back, entry by entry, as the harness's tar reader reads it.
    #[test]
    fn well_formed_layers_read_back_as_their_tar(
        members in prop::collection::vec(member(plain_name(), plain_pax()), 1..10),
    ) {
        // A hardlink to a name that is not there makes the layer ill-formed: point every
        // hardlink at the first member.
        let first = effective_name(&members[0]);
        let members: Vec<Member> = members
            .into_iter()
            .map(|mut m| {
                if m.kind == tar::EntryType::Link {
                    m.link = first.clone();
                }
                m
            })
            .collect();
        let tar = tar_of(&members);
        let (toc, blob) = convert(&tar).expect("a well-formed layer converts");
        let converted = toc_views(&toc, |chunk| {
            Ok(blob[chunk.offset as usize..][..chunk.compressed_size as usize].to_vec())
        })
        .unwrap();
        let original = tar_views(&tar).unwrap();
        let differences = diff_views(&converted, &original);
        prop_assert!(differences.is_empty(), "{:#?}", differences);
    }

    /// Anything else converts or is refused, and what escapes the root is refused.
    #[test]
    fn hostile_layers_never_escape_the_root(
        members in prop::collection::vec(
            prop_oneof![member(plain_name(), hostile_pax()), member(hostile_name(), plain_pax()), member(hostile_name(), hostile_pax())],
            1..8,
        ),
    ) {
        let tar = tar_of(&members);
        let escaping = members.iter().any(|m| escapes(&effective_name(m)));
        if let Ok((toc, _)) = convert(&tar) {
            prop_assert!(!escaping, "converted a layer whose names escape: {:?}", members);
            for entry in toc.entries() {
                prop_assert!(!escapes(&entry.path));
                prop_assert!(!escapes(&entry.link_target) || entry.r#type != 4);
            }
        }
    }

    /// Damaged tar streams (bytes changed, cut short) convert or are refused, never a panic.
    #[test]
    fn damaged_layers_are_refused_or_converted(
        members in prop::collection::vec(member(plain_name(), plain_pax()), 1..6),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut tar = tar_of(&members);
        for (at, byte) in edits {
            let at = at.index(tar.len());
            tar[at] = byte;
        }
        if let Some(cut) = cut {
            tar.truncate(cut.index(tar.len()));
        }
        let _ = convert(&tar);
    }
}
