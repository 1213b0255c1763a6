//! Unit tests of [`LayerFs`] over TOCs built in the test and an in-memory chunk reader.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use streamsnap_format::api::{EntryType, Xattr};

use crate::layer::makedev;
use crate::testutil::{LayerBuilder, MemoryChunks};
use crate::{
    Attr, BoxFuture, ChunkReader, Errno, Error, FileKind, FsOptions, LayerFs, ROOT_INO, ReadError,
};

const MAX_CHUNK: u32 = 64;
const MTIME: u64 = 1_700_000_000;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn xattr(name: &str, value: &[u8]) -> Xattr {
    Xattr {
        name: name.into(),
        value: value.to_vec(),
    }
}

/// A layer with one of everything; returns the filesystem and its reader.
fn sample() -> (LayerFs, Arc<MemoryChunks>) {
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.dir("", 0o755);
    b.dir("etc", 0o755);
    b.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    b.file("etc/group", 0o644, b"root:x:0:\n");
    b.file("big", 0o600, &pattern(200, 1)); // chunks of 64, 64, 64 and 8 bytes
    b.file("empty", 0o644, b"");
    let tool = b.file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho tool\n");
    tool.uid = 0;
    tool.gid = 50;
    b.hardlink("usr/bin/link", "usr/bin/tool");
    b.symlink("lnk", "etc/passwd");
    b.device("dev/null", EntryType::CharDevice, 1, 3);
    b.device("dev/sda", EntryType::BlockDevice, 8, 0);
    b.fifo("run/fifo");
    let gone = b.whiteout("gone");
    gone.uid = 1000;
    gone.gid = 1001;
    b.dir("opq", 0o755);
    b.opaque("opq");
    b.file("opq/inside", 0o644, b"inside");
    b.opaque("implied/opq");
    b.file("dup", 0o644, b"first");
    b.file("dup", 0o640, b"second!");
    b.dir("dupdir", 0o700);
    b.file("dupdir/child", 0o644, b"child");
    let again = b.dir("dupdir", 0o750);
    again.uid = 5;
    again.mtime = 1_600_000_000;
    again.mtime_nanos = 42;
    let xa = b.file("xa", 0o644, b"xattrs");
    xa.xattrs = vec![
        xattr("user.first", b"1"),
        xattr("security.capability", b"\x01\x02"),
        xattr("trusted.overlay.redirect", b"/etc"),
        xattr("user.second", b"2"),
    ];
    b.hardlink("badlink", "does/not/exist");
    b.hardlink("dirlink", "etc");
    b.dir("replaced", 0o755);
    b.file("replaced/old", 0o644, b"old");
    b.file("replaced", 0o644, b"now a file");
    b.file("h1", 0o644, b"h1 content");
    b.hardlink("h2", "h1");
    b.file("h1", 0o644, b"new h1");
    b.file("below/file", 0o644, b"x");
    b.file("below/file/deeper", 0o644, b"parent is a file: skipped");
    let (toc, reader) = b.build();
    let fs = LayerFs::new(toc, reader.clone(), FsOptions::default()).unwrap();
    (fs, reader)
}

fn walk(fs: &LayerFs, path: &str) -> Result<Attr, Errno> {
    let mut attr = fs.getattr(ROOT_INO)?;
    for component in path.split('/').filter(|c| !c.is_empty()) {
        attr = fs.lookup(attr.ino, OsStr::new(component))?;
    }
    Ok(attr)
}

fn read(fs: &LayerFs, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(fs.read(ino, offset, size))
}

fn names(fs: &LayerFs, path: &str) -> Vec<String> {
    let dir = walk(fs, path).unwrap();
    fs.readdir(dir.ino, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_index_stays_small() {
    // A small file costs a node, a directory entry, an extent and its name (once per distinct
    // name): under 80 bytes with a name of 10.
    use crate::index::{CHILD_LEN, EXTENT_LEN, NODE_LEN};
    assert_eq!(NODE_LEN + CHILD_LEN + EXTENT_LEN, 65);
    let mut b = LayerBuilder::new(1 << 20);
    for d in 0..10 {
        for f in 0..1000 {
            b.file(&format!("d{d}/f{f:08}"), 0o644, b"x");
        }
    }
    let (toc, reader) = b.build();
    let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
    let per_entry = fs.index().len_bytes() / 10_010;
    assert!(per_entry <= 80, "{per_entry} bytes per entry");
}

#[test]
fn root_and_directories_have_their_metadata() {
    let (fs, _) = sample();
    let root = fs.getattr(ROOT_INO).unwrap();
    assert_eq!(root.kind, FileKind::Directory);
    assert_eq!(root.perm, 0o755);
    // subdirectories: etc usr dev run opq implied dupdir below
    assert_eq!(root.nlink, 2 + 8);
    assert_eq!(root.mtime, UNIX_EPOCH + Duration::from_secs(MTIME));

    let etc = walk(&fs, "etc").unwrap();
    assert_eq!(
        (etc.kind, etc.perm, etc.nlink),
        (FileKind::Directory, 0o755, 2)
    );
}

#[test]
fn implied_parents_are_root_owned_0755_directories() {
    let (fs, _) = sample();
    for path in ["usr", "usr/bin", "dev", "run", "implied"] {
        let attr = walk(&fs, path).unwrap();
        assert_eq!(attr.kind, FileKind::Directory, "{path}");
        assert_eq!((attr.perm, attr.uid, attr.gid), (0o755, 0, 0), "{path}");
        assert_eq!(attr.mtime, UNIX_EPOCH, "{path}");
    }
    assert_eq!(walk(&fs, "usr").unwrap().nlink, 3);

    let options = FsOptions {
        default_dir_mode: 0o711,
        ..FsOptions::default()
    };
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("a/b", 0o644, b"x");
    let (toc, reader) = b.build();
    let fs = LayerFs::new(toc, reader, options).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().perm, 0o711);
    assert_eq!(walk(&fs, "a").unwrap().perm, 0o711);
}

#[test]
fn regular_files_report_size_blocks_mode_and_owner() {
    let (fs, _) = sample();
    let big = walk(&fs, "big").unwrap();
    assert_eq!(
        (big.kind, big.size, big.blocks, big.perm),
        (FileKind::RegularFile, 200, 1, 0o600)
    );
    assert_eq!(big.nlink, 1);
    let tool = walk(&fs, "usr/bin/tool").unwrap();
    assert_eq!((tool.perm, tool.uid, tool.gid), (0o4755, 0, 50));
    let empty = walk(&fs, "empty").unwrap();
    assert_eq!((empty.size, empty.blocks), (0, 0));
}

#[test]
fn hardlinks_share_the_inode_and_count_names() {
    let (fs, _) = sample();
    let tool = walk(&fs, "usr/bin/tool").unwrap();
    let link = walk(&fs, "usr/bin/link").unwrap();
    assert_eq!(tool.ino, link.ino);
    assert_eq!(tool.nlink, 2);
    assert_eq!(link, tool);
    assert_eq!(
        read(&fs, link.ino, 0, 100).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
}

#[test]
fn bad_hardlinks_are_skipped_and_the_layer_still_builds() {
    let (fs, _) = sample();
    assert_eq!(walk(&fs, "badlink"), Err(Errno::ENOENT));
    assert_eq!(walk(&fs, "dirlink"), Err(Errno::ENOENT));
    assert_eq!(walk(&fs, "below/file/deeper"), Err(Errno::ENOTDIR));
    assert_eq!(walk(&fs, "below/file").unwrap().kind, FileKind::RegularFile);
}

#[test]
fn replacing_a_name_keeps_other_hardlinks_of_the_old_inode() {
    let (fs, _) = sample();
    let h1 = walk(&fs, "h1").unwrap();
    let h2 = walk(&fs, "h2").unwrap();
    assert_ne!(h1.ino, h2.ino);
    assert_eq!((h1.nlink, h2.nlink), (1, 1));
    assert_eq!(read(&fs, h1.ino, 0, 100).unwrap(), b"new h1");
    assert_eq!(read(&fs, h2.ino, 0, 100).unwrap(), b"h1 content");
}

#[test]
fn symlinks_read_their_target() {
    let (fs, _) = sample();
    let lnk = walk(&fs, "lnk").unwrap();
    assert_eq!(
        (lnk.kind, lnk.size, lnk.perm),
        (FileKind::Symlink, 10, 0o777)
    );
    assert_eq!(fs.readlink(lnk.ino).unwrap(), b"etc/passwd");
    assert_eq!(
        fs.readlink(walk(&fs, "big").unwrap().ino),
        Err(Errno::EINVAL)
    );
}

#[test]
fn devices_and_fifos() {
    let (fs, _) = sample();
    let null = walk(&fs, "dev/null").unwrap();
    assert_eq!(
        (null.kind, null.rdev, null.perm),
        (FileKind::CharDevice, makedev(1, 3), 0o660)
    );
    assert_eq!(null.rdev, libc::makedev(1, 3) as u32);
    let sda = walk(&fs, "dev/sda").unwrap();
    assert_eq!(
        (sda.kind, sda.rdev),
        (FileKind::BlockDevice, libc::makedev(8, 0) as u32)
    );
    assert_eq!(walk(&fs, "run/fifo").unwrap().kind, FileKind::NamedPipe);
    // large numbers use the split encoding the kernel decodes
    assert_eq!(makedev(259, 70000), libc::makedev(259, 70000) as u32);
}

#[test]
fn whiteouts_are_0_0_character_devices_with_the_entry_owner() {
    let (fs, _) = sample();
    let gone = walk(&fs, "gone").unwrap();
    assert_eq!(gone.kind, FileKind::CharDevice);
    assert_eq!((gone.perm, gone.rdev, gone.size), (0, 0, 0));
    assert_eq!((gone.uid, gone.gid), (1000, 1001));
    let listed = fs.readdir(ROOT_INO, 0).unwrap();
    let entry = listed.iter().find(|e| e.name == "gone").unwrap();
    assert_eq!(entry.kind, FileKind::CharDevice);
}

#[test]
fn opaque_directories_carry_the_overlay_xattr() {
    let (fs, _) = sample();
    for path in ["opq", "implied/opq"] {
        let dir = walk(&fs, path).unwrap();
        assert_eq!(dir.kind, FileKind::Directory, "{path}");
        let name = OsStr::new("trusted.overlay.opaque");
        assert_eq!(fs.getxattr(dir.ino, name).unwrap(), b"y", "{path}");
        assert_eq!(
            fs.listxattr(dir.ino).unwrap(),
            b"trusted.overlay.opaque\0",
            "{path}"
        );
    }
    assert_eq!(walk(&fs, "implied/opq").unwrap().perm, 0o755);
    assert_eq!(names(&fs, "opq"), [".", "..", "inside"]);
    let etc = walk(&fs, "etc").unwrap();
    assert_eq!(
        fs.getxattr(etc.ino, OsStr::new("trusted.overlay.opaque")),
        Err(Errno::ENODATA)
    );
    assert_eq!(fs.listxattr(etc.ino).unwrap(), b"");
}

#[test]
fn xattrs_come_from_the_entry_in_order_without_overlay_ones() {
    let (fs, _) = sample();
    let xa = walk(&fs, "xa").unwrap();
    assert_eq!(
        fs.listxattr(xa.ino).unwrap(),
        b"user.first\0security.capability\0user.second\0"
    );
    assert_eq!(
        fs.getxattr(xa.ino, OsStr::new("user.second")).unwrap(),
        b"2"
    );
    assert_eq!(
        fs.getxattr(xa.ino, OsStr::new("security.capability"))
            .unwrap(),
        b"\x01\x02"
    );
    assert_eq!(
        fs.getxattr(xa.ino, OsStr::new("trusted.overlay.redirect")),
        Err(Errno::ENODATA)
    );
    assert_eq!(
        fs.getxattr(xa.ino, OsStr::new("user.none")),
        Err(Errno::ENODATA)
    );
}

#[test]
fn later_duplicates_win_and_directories_keep_their_children() {
    let (fs, _) = sample();
    let dup = walk(&fs, "dup").unwrap();
    assert_eq!((dup.size, dup.perm), (7, 0o640));
    assert_eq!(read(&fs, dup.ino, 0, 100).unwrap(), b"second!");
    assert_eq!(names(&fs, "").iter().filter(|n| *n == "dup").count(), 1);

    let dupdir = walk(&fs, "dupdir").unwrap();
    assert_eq!((dupdir.perm, dupdir.uid), (0o750, 5));
    assert_eq!(dupdir.mtime, UNIX_EPOCH + Duration::new(1_600_000_000, 42));
    assert_eq!(names(&fs, "dupdir"), [".", "..", "child"]);

    let replaced = walk(&fs, "replaced").unwrap();
    assert_eq!(replaced.kind, FileKind::RegularFile);
    assert_eq!(read(&fs, replaced.ino, 0, 100).unwrap(), b"now a file");
}

#[test]
fn a_root_entry_that_is_not_a_directory_is_refused() {
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("", 0o644, b"");
    let (toc, reader) = b.build();
    let error = LayerFs::new(toc, reader, FsOptions::default()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::RootNotDirectory {
                kind: "regular file"
            }
        ),
        "{error}"
    );
}

#[test]
fn errors_for_wrong_inodes_and_types() {
    let (fs, _) = sample();
    let big = walk(&fs, "big").unwrap().ino;
    assert_eq!(fs.getattr(0), Err(Errno::ENOENT));
    assert_eq!(fs.getattr(u64::MAX), Err(Errno::ENOENT));
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("nope")), Err(Errno::ENOENT));
    assert_eq!(fs.lookup(big, OsStr::new("x")), Err(Errno::ENOTDIR));
    assert!(matches!(fs.readdir(big, 0), Err(Errno::ENOTDIR)));
    assert_eq!(read(&fs, ROOT_INO, 0, 10), Err(Errno::EISDIR));
    assert_eq!(
        read(&fs, walk(&fs, "lnk").unwrap().ino, 0, 10),
        Err(Errno::EINVAL)
    );
    assert_eq!(read(&fs, 999_999, 0, 10), Err(Errno::ENOENT));
}

#[test]
fn reads_at_every_boundary_return_the_right_bytes() {
    let (fs, _) = sample();
    let content = pattern(200, 1);
    let big = walk(&fs, "big").unwrap().ino;
    for offset in [0usize, 1, 10, 63, 64, 65, 127, 128, 191, 192, 199, 200] {
        for size in [0usize, 1, 2, 63, 64, 65, 100, 128, 200, 4096] {
            let got = read(&fs, big, offset as u64, size as u32).unwrap();
            let end = (offset + size).min(content.len());
            assert_eq!(
                got,
                &content[offset.min(end)..end],
                "offset {offset} size {size}"
            );
        }
    }
    assert_eq!(read(&fs, big, 201, 10).unwrap(), b"");
    assert_eq!(read(&fs, big, u64::MAX, u32::MAX).unwrap(), b"");
    let passwd = walk(&fs, "etc/passwd").unwrap().ino;
    assert_eq!(read(&fs, passwd, 5, 3).unwrap(), b"x:0");
    assert_eq!(
        read(&fs, walk(&fs, "empty").unwrap().ino, 0, 10).unwrap(),
        b""
    );
}

#[test]
fn reads_fetch_only_the_chunks_they_need() {
    let (fs, reader) = sample();
    let big = walk(&fs, "big").unwrap().ino;
    let passwd = walk(&fs, "etc/passwd").unwrap().ino;
    let group = walk(&fs, "etc/group").unwrap().ino;
    // chunk 0 packs passwd and group, big has chunks 1..=4
    let cases: [(u64, u64, u32, &[u32]); 9] = [
        (passwd, 0, 4096, &[0]),
        (group, 3, 2, &[0]),
        (big, 0, 1, &[1]),
        (big, 10, 20, &[1]),
        (big, 60, 10, &[1, 2]),
        (big, 64, 64, &[2]),
        (big, 100, 100, &[2, 3, 4]),
        (big, 0, 4096, &[1, 2, 3, 4]),
        (big, 195, 4096, &[4]),
    ];
    for (ino, offset, size, chunks) in cases {
        reader.clear_calls();
        read(&fs, ino, offset, size).unwrap();
        assert_eq!(
            reader.calls(),
            [chunks.to_vec()],
            "ino {ino} offset {offset} size {size}"
        );
    }
    for (offset, size) in [(200, 10), (500, 10), (0, 0), (50, 0)] {
        reader.clear_calls();
        assert_eq!(read(&fs, big, offset, size).unwrap(), b"");
        assert!(reader.calls().is_empty(), "offset {offset} size {size}");
    }
}

#[test]
fn reader_failures_become_eio() {
    let (fs, reader) = sample();
    let big = walk(&fs, "big").unwrap().ino;
    reader.fail(3);
    assert_eq!(read(&fs, big, 100, 100), Err(Errno::EIO));
    assert_eq!(read(&fs, big, 0, 64).unwrap(), pattern(64, 1));
}

/// Returns chunks one byte short, or too few of them.
struct Misbehaving {
    short: bool,
}

impl ChunkReader for Misbehaving {
    fn read_chunks(&self, chunks: &[u32]) -> BoxFuture<'_, Result<Vec<Bytes>, ReadError>> {
        let reply = if self.short {
            vec![Bytes::from(vec![0u8; MAX_CHUNK as usize - 1]); chunks.len()]
        } else {
            Vec::new()
        };
        Box::pin(async move { Ok(reply) })
    }
}

#[test]
fn chunks_of_the_wrong_size_or_count_become_eio() {
    for short in [true, false] {
        let mut b = LayerBuilder::new(MAX_CHUNK);
        b.file("f", 0o644, &pattern(128, 0));
        let (toc, _) = b.build();
        let fs = LayerFs::new(toc, Arc::new(Misbehaving { short }), FsOptions::default()).unwrap();
        let f = walk(&fs, "f").unwrap().ino;
        assert_eq!(read(&fs, f, 0, 128), Err(Errno::EIO), "short {short}");
    }
}

#[test]
fn readdir_lists_dots_and_sorted_names_with_stable_offsets() {
    let (fs, _) = sample();
    let all = fs.readdir(ROOT_INO, 0).unwrap();
    let listed: Vec<&[u8]> = all.iter().map(|e| e.name.as_bytes()).collect();
    let expected: Vec<&[u8]> = vec![
        b".",
        b"..",
        b"below",
        b"big",
        b"dev",
        b"dup",
        b"dupdir",
        b"empty",
        b"etc",
        b"gone",
        b"h1",
        b"h2",
        b"implied",
        b"lnk",
        b"opq",
        b"replaced",
        b"run",
        b"usr",
        b"xa",
    ];
    assert_eq!(listed, expected);
    assert_eq!(all[0].ino, ROOT_INO);
    assert_eq!(all[1].ino, ROOT_INO);
    for (i, entry) in all.iter().enumerate() {
        assert_eq!(entry.offset, i as u64 + 1);
        if i >= 2 {
            let attr = fs.lookup(ROOT_INO, entry.name).unwrap();
            assert_eq!((attr.ino, attr.kind), (entry.ino, entry.kind));
        }
    }
    for offset in 0..=all.len() as u64 + 2 {
        let page = fs.readdir(ROOT_INO, offset).unwrap();
        assert_eq!(
            page,
            all[(offset as usize).min(all.len())..],
            "offset {offset}"
        );
    }
    let usr = walk(&fs, "usr").unwrap();
    let bin = fs.readdir(walk(&fs, "usr/bin").unwrap().ino, 0).unwrap();
    assert_eq!(bin[1].ino, usr.ino, "'..' is the parent");
}

#[test]
fn paging_through_a_large_directory_sees_every_entry_once() {
    let mut b = LayerBuilder::new(MAX_CHUNK);
    for i in (0..3000).rev() {
        b.file(&format!("many/f{i:05}"), 0o644, b"");
    }
    let (toc, reader) = b.build();
    let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
    let many = walk(&fs, "many").unwrap().ino;
    let mut offset = 0;
    let mut seen = Vec::new();
    loop {
        let page: Vec<_> = fs.readdir_iter(many, offset).unwrap().take(37).collect();
        let Some(last) = page.last() else { break };
        offset = last.offset;
        seen.extend(page.iter().map(|e| e.name.to_string_lossy().into_owned()));
    }
    assert_eq!(seen.len(), 3002);
    let expected: Vec<String> = [".".to_string(), "..".to_string()]
        .into_iter()
        .chain((0..3000).map(|i| format!("f{i:05}")))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn statfs_totals_come_from_the_toc() {
    let (fs, _) = sample();
    let s = fs.statfs();
    assert_eq!(s.block_size, 4096);
    assert_eq!(s.name_max, 255);
    // one block each: passwd group big tool inside dup child xa replaced h1 h2 below/file
    assert_eq!(s.blocks, 12);
    let mut count = 0;
    let mut stack = vec![ROOT_INO];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        count += 1;
        for entry in fs.readdir(dir, 2).unwrap() {
            if entry.kind == FileKind::Directory {
                stack.push(entry.ino);
            } else if seen.insert(entry.ino) {
                count += 1;
            }
        }
    }
    assert_eq!(s.files, count);
}

#[test]
fn a_layer_without_a_root_entry_gets_an_implied_root() {
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("only", 0o644, b"only");
    let (toc, reader) = b.build();
    let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
    let root = fs.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.perm, root.uid, root.nlink),
        (FileKind::Directory, 0o755, 0, 2)
    );
    assert_eq!(root.mtime, UNIX_EPOCH);
    assert_eq!(names(&fs, ""), [".", "..", "only"]);
}

/// Scale check, run by hand: `cargo test -p streamsnap-fs --release -- --ignored --nocapture`.
#[test]
#[ignore = "scale measurement, prints timings"]
fn half_a_million_entries() {
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let mut b = LayerBuilder::new(1 << 20);
    for d in 0..500 {
        b.dir(&format!("usr/lib/python3/site-packages/pkg{d:03}"), 0o755);
        for f in 0..1000 {
            b.file(
                &format!("usr/lib/python3/site-packages/pkg{d:03}/mod{f:04}.py"),
                0o644,
                b"",
            );
        }
    }
    let (toc, reader) = b.build();
    let before = rss_kib();
    let start = std::time::Instant::now();
    let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
    let took = start.elapsed();
    let grown = rss_kib().saturating_sub(before);
    let start = std::time::Instant::now();
    for d in (0..500).step_by(7) {
        let path = format!("usr/lib/python3/site-packages/pkg{d:03}/mod0999.py");
        walk(&fs, &path).unwrap();
    }
    eprintln!(
        "501k entries: table built in {took:?}, +{grown} KiB RSS; 72 deep lookups in {:?}",
        start.elapsed()
    );
    assert_eq!(fs.statfs().files, 500_000 + 500 + 5);
}
