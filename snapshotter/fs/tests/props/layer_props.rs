//! The inode table and metadata operations over any layer: entries in any order, replacing and
//! nesting each other, hardlinks to anything, whiteouts and opaque markers. Whatever the entries,
//! building never panics, and the tree it presents is consistent: every listed name looks up to
//! the inode listed, listings resume at any offset, link counts count names and subdirectories,
//! every file reads back the content of one of the layer's files.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use proptest::prelude::*;
use streamsnap_format::api::EntryType;
use streamsnap_fs::{Errno, FileKind, FsOptions, LayerFs, ROOT_INO};

use crate::testutil::LayerBuilder;
use crate::{config, runtime};

#[derive(Clone, Debug)]
pub enum Op {
    Dir(String),
    File(String, usize),
    Symlink(String, String),
    Hardlink(String, String),
    Whiteout(String),
    Opaque(String),
    Fifo(String),
    Device(String, u32, u32),
}

/// Up to three components from a small set, so entries collide, nest and replace each other.
pub fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&["a", "b", "c"][..]), 0..=3)
        .prop_map(|parts| parts.join("/"))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Dir),
        4 => (path(), prop_oneof![0usize..40, 0usize..600]).prop_map(|(p, n)| Op::File(p, n)),
        1 => (path(), "[a-c/.]{1,8}").prop_map(|(p, t)| Op::Symlink(p, t)),
        2 => (path(), path()).prop_map(|(p, t)| Op::Hardlink(p, t)),
        1 => path().prop_map(Op::Whiteout),
        1 => path().prop_map(Op::Opaque),
        1 => path().prop_map(Op::Fifo),
        1 => (path(), any::<u32>(), any::<u32>()).prop_map(|(p, a, b)| Op::Device(p, a, b)),
    ]
}

/// Xattrs for the `n`th entry: ordinary ones and the overlay ones a layer must not present.
fn xattr() -> impl Strategy<Value = (usize, &'static str, Vec<u8>)> {
    (
        0usize..16,
        prop::sample::select(
            &[
                "user.a",
                "user.b",
                "trusted.overlay.opaque",
                "user.overlay.redirect",
                "security.capability",
            ][..],
        ),
        prop::collection::vec(any::<u8>(), 0..4),
    )
}

/// The content of the `index`th entry when it is a file of `len` bytes.
pub fn content(index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (index.wrapping_mul(131) ^ j.wrapping_mul(7) ^ (j >> 8)) as u8)
        .collect()
}

/// The layer the ops describe, with `max_chunk` byte chunks.
pub fn build(ops: &[Op], xattrs: &[(usize, &str, Vec<u8>)], max_chunk: u32) -> LayerBuilder {
    let mut layer = LayerBuilder::new(max_chunk);
    for (index, op) in ops.iter().enumerate() {
        let entry = match op {
            Op::Dir(p) => layer.dir(p, 0o755),
            Op::File(p, len) => layer.file(p, 0o644, &content(index, *len)),
            Op::Symlink(p, t) => layer.symlink(p, t),
            Op::Hardlink(p, t) => layer.hardlink(p, if t.is_empty() { "a" } else { t }),
            Op::Whiteout(p) if p.is_empty() => layer.dir(p, 0o700),
            Op::Whiteout(p) => layer.whiteout(p),
            Op::Opaque(p) => layer.opaque(p),
            Op::Fifo(p) => layer.fifo(p),
            Op::Device(p, major, minor) => layer.device(p, EntryType::CharDevice, *major, *minor),
        };
        for (_, name, value) in xattrs.iter().filter(|(at, _, _)| *at == index) {
            entry.xattrs.push(streamsnap_format::api::Xattr {
                name: (*name).to_owned(),
                value: value.clone(),
            });
        }
    }
    layer
}

/// Whether `LayerFs::new` must refuse the layer: its root is named by something not a directory.
fn root_is_not_a_directory(ops: &[Op]) -> bool {
    ops.iter().any(|op| match op {
        Op::Dir(_) | Op::Opaque(_) | Op::Whiteout(_) => false,
        Op::File(p, _) | Op::Symlink(p, _) | Op::Hardlink(p, _) | Op::Fifo(p) => p.is_empty(),
        Op::Device(p, _, _) => p.is_empty(),
    })
}

/// Walks the whole tree from the root, checking every operation's answer against the others.
fn check_tree(fs: &LayerFs, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = runtime();
    let files: HashSet<Vec<u8>> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match op {
            Op::File(_, len) => Some(content(i, *len)),
            _ => None,
        })
        .collect();
    let mut dirs = HashSet::new();
    let mut names: HashMap<u64, u32> = HashMap::new();
    let mut stack = vec![(ROOT_INO, ROOT_INO)];
    while let Some((dir, parent)) = stack.pop() {
        prop_assert!(dirs.insert(dir), "directory {} reached twice", dir);
        let listing = fs.readdir(dir, 0).unwrap();
        prop_assert!(listing.len() >= 2);
        prop_assert_eq!((listing[0].name, listing[0].ino), (OsStr::new("."), dir));
        prop_assert_eq!(
            (listing[1].name, listing[1].ino),
            (OsStr::new(".."), parent)
        );
        for (i, entry) in listing.iter().enumerate() {
            prop_assert_eq!(entry.offset, i as u64 + 1);
        }
        for window in listing[2..].windows(2) {
            prop_assert!(window[0].name.as_bytes() < window[1].name.as_bytes());
        }
        for from in 0..listing.len() + 2 {
            prop_assert_eq!(
                fs.readdir(dir, from as u64).unwrap(),
                listing[from.min(listing.len())..].to_vec()
            );
        }
        prop_assert!(fs.readdir(dir, u64::MAX).unwrap().is_empty());
        let mut subdirs = 0;
        for entry in &listing[2..] {
            let attr = fs.lookup(dir, entry.name).unwrap();
            prop_assert_eq!(attr.ino, entry.ino);
            prop_assert_eq!(attr.kind, entry.kind);
            prop_assert_eq!(fs.getattr(entry.ino).unwrap(), attr);
            if attr.kind == FileKind::Directory {
                subdirs += 1;
                stack.push((entry.ino, dir));
            } else {
                *names.entry(entry.ino).or_default() += 1;
            }
        }
        let attr = fs.getattr(dir).unwrap();
        prop_assert_eq!(attr.kind, FileKind::Directory);
        prop_assert_eq!(attr.nlink, 2 + subdirs);
        prop_assert_eq!(fs.lookup(dir, OsStr::new("missing")), Err(Errno::ENOENT));
        prop_assert_eq!(rt.block_on(fs.read(dir, 0, 10)), Err(Errno::EISDIR));
        check_xattrs(fs, dir)?;
    }
    for (&ino, &count) in &names {
        let attr = fs.getattr(ino).unwrap();
        prop_assert_eq!(attr.nlink, count, "inode {} of kind {:?}", ino, attr.kind);
        prop_assert_eq!(fs.readdir(ino, 0), Err(Errno::ENOTDIR));
        prop_assert_eq!(fs.lookup(ino, OsStr::new("a")), Err(Errno::ENOTDIR));
        check_xattrs(fs, ino)?;
        match attr.kind {
            FileKind::RegularFile => {
                prop_assert_eq!(attr.blocks, attr.size.div_ceil(512));
                let data = rt.block_on(fs.read(ino, 0, attr.size as u32 + 1)).unwrap();
                prop_assert_eq!(data.len() as u64, attr.size);
                prop_assert!(
                    files.contains(&data),
                    "inode {} reads bytes no file of the layer has",
                    ino
                );
                prop_assert!(rt.block_on(fs.read(ino, attr.size, 10)).unwrap().is_empty());
                prop_assert_eq!(fs.readlink(ino), Err(Errno::EINVAL));
            }
            FileKind::Symlink => {
                let target = fs.readlink(ino).unwrap();
                prop_assert_eq!(attr.size, target.len() as u64);
                prop_assert_eq!(rt.block_on(fs.read(ino, 0, 1)), Err(Errno::EINVAL));
            }
            _ => {
                prop_assert_eq!(attr.size, 0);
                prop_assert_eq!(rt.block_on(fs.read(ino, 0, 1)), Err(Errno::EINVAL));
            }
        }
    }
    let statfs = fs.statfs();
    prop_assert_eq!(statfs.files, (dirs.len() + names.len()) as u64);
    for ino in [0, u64::MAX, statfs.files * 4 + 100] {
        prop_assert_eq!(fs.getattr(ino), Err(Errno::ENOENT));
    }
    Ok(())
}

fn check_xattrs(fs: &LayerFs, ino: u64) -> Result<(), TestCaseError> {
    let list = fs.listxattr(ino).unwrap();
    prop_assert!(list.is_empty() || list.ends_with(&[0]));
    let names: Vec<&[u8]> = list.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
    for name in names {
        prop_assert!(fs.getxattr(ino, OsStr::from_bytes(name)).is_ok());
        let overlay = name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.");
        prop_assert!(!overlay || name == b"trusted.overlay.opaque");
        if name == b"trusted.overlay.opaque" {
            prop_assert_eq!(
                fs.getxattr(ino, OsStr::from_bytes(name)).unwrap(),
                b"y".to_vec()
            );
        }
    }
    prop_assert_eq!(
        fs.getxattr(ino, OsStr::new("user.overlay.redirect")),
        Err(Errno::ENODATA)
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn any_layer_builds_into_a_consistent_tree(
        ops in prop::collection::vec(op(), 0..24),
        xattrs in prop::collection::vec(xattr(), 0..4),
        max_chunk in prop::sample::select(&[7u32, 64, 4096][..]),
    ) {
        let (toc, reader) = build(&ops, &xattrs, max_chunk).build();
        match LayerFs::new(toc, reader, FsOptions::default()) {
            Ok(fs) => {
                prop_assert!(!root_is_not_a_directory(&ops));
                check_tree(&fs, &ops)?;
            }
            Err(error) => {
                prop_assert!(root_is_not_a_directory(&ops), "refused: {}", error);
            }
        }
    }
}

/// Shared by the read targets: a layer of files only, as a `LayerFs`.
pub fn files_layer(
    lens: &[usize],
    max_chunk: u32,
) -> (LayerFs, Arc<crate::testutil::MemoryChunks>) {
    let ops: Vec<Op> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| Op::File(format!("f{i}"), len))
        .collect();
    let (toc, reader) = build(&ops, &[], max_chunk).build();
    let fs = LayerFs::new(toc, reader.clone(), FsOptions::default()).unwrap();
    (fs, reader)
}
