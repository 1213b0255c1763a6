//! Ready-made layers: one covering every kind of tar entry a converter and a filesystem must
//! handle, and a three-layer stack exercising whiteouts and opaque directories. Deterministic:
//! the same bytes (and so the same digests) on every call.

use crate::targen::{EntryOpts, LongNames, TarGen, XorShift, pseudo_random_bytes};

/// Size of `files/large.bin` in [`every_entry_type_layer`]: over 5 MiB, not a multiple of any
/// chunk size.
pub const LARGE_FILE_SIZE: usize = 6 * 1024 * 1024 + 12_345;
/// Number of zero bytes at the start of `files/zeros.bin`.
pub const ZEROS_FILE_ZEROS: usize = 8 * 1024 * 1024;
/// The bytes after the zeros of `files/zeros.bin`.
pub const ZEROS_FILE_TAIL: &[u8] = b"the end of a long run of zeros\n";
/// Number of files under `small/` in [`every_entry_type_layer`].
pub const SMALL_FILES: usize = 300;
/// Seed of `files/large.bin`'s content ([`pseudo_random_bytes`]).
pub const LARGE_FILE_SEED: u64 = 1;

/// `security.capability` holding cap_net_bind_service in the permitted and effective sets
/// (`vfs_cap_data` revision 2, little-endian, with the effective flag).
pub const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// The long directory names of the PAX (`a…`, `b…`) and GNU (`c…`, `d…`) long paths.
fn long_dirs() -> [String; 4] {
    ["a", "b", "c", "d"].map(|c| c.repeat(60))
}

/// Path of the file whose name needs a PAX `path` record (over 100 bytes).
pub fn pax_long_path() -> String {
    let [a, b, ..] = long_dirs();
    format!("long/{a}/{b}/file-with-a-pax-long-name.txt")
}

/// Path of the file whose name needs a GNU `././@LongLink` entry (over 100 bytes).
pub fn gnu_long_path() -> String {
    let [_, _, c, d] = long_dirs();
    format!("long/{c}/{d}/file-with-a-gnu-long-name.txt")
}

/// Content of `small/dNN/fNNN.txt` number `i` (0..[`SMALL_FILES`]): 100 to 3999 bytes, half of
/// the files pseudo-random, half text.
pub fn small_file(i: usize) -> (String, Vec<u8>) {
    let mut rng = XorShift::new(1000 + i as u64);
    let len = rng.below(100..4000) as usize;
    let data = if i.is_multiple_of(2) {
        pseudo_random_bytes(2000 + i as u64, len)
    } else {
        let line = format!("small file {i}: some compressible text\n");
        line.repeat(len / line.len() + 1).into_bytes()[..len].to_vec()
    };
    (format!("small/d{:02}/f{i:03}.txt", i % 10), data)
}

/// One layer with every entry type and header feature (paths without `./`, parents first):
///
/// - `files/`: `hello.txt`, `empty`, `large.bin` ([`LARGE_FILE_SIZE`] pseudo-random bytes),
///   `zeros.bin` ([`ZEROS_FILE_ZEROS`] zeros then [`ZEROS_FILE_TAIL`]), `setuid` (04755),
///   `setgid` (02755), `owned-1000` (1000:1000 `user`/`user`, 0600), `owned-100000`
///   (100000:100000, 0640), `mtime-epoch` (mtime 0), `mtime-2038` (mtime 2^31),
///   `xattrs` (`user.comment`, binary `user.binary`, `security.capability` =
///   [`CAP_NET_BIND_SERVICE`])
/// - `small/dNN/fNNN.txt`: [`SMALL_FILES`] files, see [`small_file`]
/// - `links/`: `hardlink` (hard link to `files/hello.txt`), `relative` -> `../files/hello.txt`,
///   `absolute` -> `/files/hello.txt`, `dangling` -> `does-not-exist`, `dir-link` -> `../files`,
///   `long-target` -> a 120+ byte relative target (PAX `linkpath`) that resolves to
///   `files/hello.txt`
/// - `modes/`: `sticky/` (01777), `private/` (0700), `setgid-dir/` (02775)
/// - `dev/`: `char-null` (char 1:3), `block-loop0` (block 7:0), `fifo`
/// - `whiteouts/.wh.deleted` (a whiteout), `opaque/.wh..wh..opq` + `opaque/kept.txt`
/// - `unicode/`: `café.txt`, `日本語/ファイル.txt`, `emoji-🦀.txt`
/// - `long/`: [`pax_long_path`] and [`gnu_long_path`] with their (long) parent directories
pub fn every_entry_type_layer() -> Vec<u8> {
    let mut t = TarGen::new();
    t.dir("files", 0o755)
        .file("files/hello.txt", 0o644, b"hello, streamsnap\n")
        .file("files/empty", 0o644, b"")
        .file(
            "files/large.bin",
            0o644,
            &pseudo_random_bytes(LARGE_FILE_SEED, LARGE_FILE_SIZE),
        );
    let mut zeros = vec![0u8; ZEROS_FILE_ZEROS];
    zeros.extend_from_slice(ZEROS_FILE_TAIL);
    t.file("files/zeros.bin", 0o644, &zeros)
        .file("files/setuid", 0o4755, b"#!/bin/sh\necho setuid\n")
        .file("files/setgid", 0o2755, b"#!/bin/sh\necho setgid\n")
        .file_with(
            "files/owned-1000",
            EntryOpts::mode(0o600)
                .owner(1000, 1000)
                .names("user", "user"),
            b"owned by 1000\n",
        )
        .file_with(
            "files/owned-100000",
            EntryOpts::mode(0o640).owner(100_000, 100_000),
            b"owned by 100000\n",
        )
        .file_with(
            "files/mtime-epoch",
            EntryOpts::mode(0o644).mtime(0),
            b"1970\n",
        )
        .file_with(
            "files/mtime-2038",
            EntryOpts::mode(0o644).mtime(1 << 31),
            b"2038\n",
        )
        .file_with(
            "files/xattrs",
            EntryOpts::mode(0o755)
                .xattr("user.comment", b"hello xattr")
                .xattr("user.binary", &[0, 1, 2, 0xff, b'\n', b'='])
                .xattr("security.capability", &CAP_NET_BIND_SERVICE),
            b"#!/bin/sh\necho capable\n",
        );

    t.dir("small", 0o755);
    for d in 0..10 {
        t.dir(&format!("small/d{d:02}"), 0o755);
    }
    for i in 0..SMALL_FILES {
        let (path, data) = small_file(i);
        t.file(&path, 0o644, &data);
    }

    let long_target = format!("../links/{}/../../files/hello.txt", "x".repeat(110));
    t.dir("links", 0o755)
        .dir(&format!("links/{}", "x".repeat(110)), 0o755)
        .hardlink("links/hardlink", "files/hello.txt")
        .symlink("links/relative", "../files/hello.txt")
        .symlink("links/absolute", "/files/hello.txt")
        .symlink("links/dangling", "does-not-exist")
        .symlink("links/dir-link", "../files")
        .symlink("links/long-target", &long_target);

    t.dir("modes", 0o755)
        .dir("modes/sticky", 0o1777)
        .dir("modes/private", 0o700)
        .dir("modes/setgid-dir", 0o2775)
        .dir("dev", 0o755)
        .char_device("dev/char-null", 1, 3)
        .block_device("dev/block-loop0", 7, 0)
        .fifo("dev/fifo");

    t.dir("whiteouts", 0o755)
        .whiteout("whiteouts", "deleted")
        .dir("opaque", 0o755)
        .opaque("opaque")
        .file("opaque/kept.txt", 0o644, b"kept\n");

    t.dir("unicode", 0o755)
        .file("unicode/café.txt", 0o644, "café\n".as_bytes())
        .dir("unicode/日本語", 0o755)
        .file(
            "unicode/日本語/ファイル.txt",
            0o644,
            "ファイル\n".as_bytes(),
        )
        .file("unicode/emoji-🦀.txt", 0o644, "🦀\n".as_bytes());

    let [a, b, c, d] = long_dirs();
    t.dir("long", 0o755)
        .dir(&format!("long/{a}"), 0o755)
        .dir(&format!("long/{a}/{b}"), 0o755)
        .file(&pax_long_path(), 0o644, b"a pax long name\n")
        .long_names(LongNames::Gnu)
        .dir(&format!("long/{c}"), 0o755)
        .dir(&format!("long/{c}/{d}"), 0o755)
        .file(&gnu_long_path(), 0o644, b"a gnu long name\n")
        .long_names(LongNames::Pax);
    t.finish()
}

/// What a container sees of a layer stack: files with their content, and paths that must not
/// exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedView {
    pub files: Vec<(&'static str, &'static [u8])>,
    pub dirs: Vec<&'static str>,
    pub symlinks: Vec<(&'static str, &'static str)>,
    pub absent: Vec<&'static str>,
}

/// Three layers, bottom first. The base has `app/` (`config.txt`, `keep.txt`, `remove-me.txt`,
/// `cache/{a,b}.bin`, `opaque/{old1,old2}.txt`, `opaque/nested/old3.txt`), `gone-dir/` and a
/// symlink `config-link` -> `app/config.txt`. The middle layer deletes `app/remove-me.txt`,
/// `app/cache/b.bin` and the whole `gone-dir/`, replaces `app/config.txt` and adds
/// `app/new-in-1.txt`. The top layer makes `app/opaque/` opaque and re-adds `old1.txt` (new
/// content) and `fresh.txt` in it, brings `app/remove-me.txt` and `gone-dir/` back with new
/// content and replaces `app/config.txt` again. [`upper_layers_view`] is the result.
pub fn upper_layers() -> Vec<Vec<u8>> {
    let base = TarGen::new()
        .dir("app", 0o755)
        .file("app/config.txt", 0o644, b"config v1\n")
        .file("app/keep.txt", 0o644, b"keep me\n")
        .file("app/remove-me.txt", 0o644, b"doomed\n")
        .dir("app/cache", 0o755)
        .file("app/cache/a.bin", 0o644, &pseudo_random_bytes(10, 3000))
        .file("app/cache/b.bin", 0o644, &pseudo_random_bytes(11, 3000))
        .dir("app/opaque", 0o755)
        .file("app/opaque/old1.txt", 0o644, b"old 1\n")
        .file("app/opaque/old2.txt", 0o644, b"old 2\n")
        .dir("app/opaque/nested", 0o755)
        .file("app/opaque/nested/old3.txt", 0o644, b"old 3\n")
        .dir("gone-dir", 0o755)
        .file("gone-dir/x.txt", 0o644, b"x\n")
        .dir("gone-dir/y", 0o755)
        .file("gone-dir/y/z.txt", 0o644, b"z\n")
        .symlink("config-link", "app/config.txt")
        .finish();
    let middle = TarGen::new()
        .dir("app", 0o755)
        .whiteout("app", "remove-me.txt")
        .file("app/config.txt", 0o644, b"config v2\n")
        .file("app/new-in-1.txt", 0o644, b"new in layer 1\n")
        .dir("app/cache", 0o755)
        .whiteout("app/cache", "b.bin")
        .whiteout("", "gone-dir")
        .finish();
    let top = TarGen::new()
        .dir("app", 0o755)
        .dir("app/opaque", 0o755)
        .opaque("app/opaque")
        .file("app/opaque/old1.txt", 0o644, b"old 1, re-added\n")
        .file("app/opaque/fresh.txt", 0o644, b"fresh\n")
        .file("app/remove-me.txt", 0o644, b"back again\n")
        .file("app/config.txt", 0o600, b"config v3\n")
        .dir("gone-dir", 0o755)
        .file("gone-dir/only-new.txt", 0o644, b"only new\n")
        .finish();
    vec![base, middle, top]
}

/// The merged view of [`upper_layers`].
pub fn upper_layers_view() -> MergedView {
    MergedView {
        files: vec![
            ("app/config.txt", b"config v3\n"),
            ("app/keep.txt", b"keep me\n"),
            ("app/remove-me.txt", b"back again\n"),
            ("app/new-in-1.txt", b"new in layer 1\n"),
            ("app/opaque/old1.txt", b"old 1, re-added\n"),
            ("app/opaque/fresh.txt", b"fresh\n"),
            ("gone-dir/only-new.txt", b"only new\n"),
            ("config-link", b"config v3\n"),
        ],
        dirs: vec!["app", "app/cache", "app/opaque", "gone-dir"],
        symlinks: vec![("config-link", "app/config.txt")],
        absent: vec![
            "app/cache/b.bin",
            "app/opaque/old2.txt",
            "app/opaque/nested",
            "gone-dir/x.txt",
            "gone-dir/y",
        ],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use tar::EntryType;

    use super::*;

    #[test]
    fn every_entry_type_layer_has_everything_it_documents() {
        let tar = every_entry_type_layer();
        assert_eq!(tar, every_entry_type_layer(), "deterministic");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut kinds = BTreeMap::new();
        let mut by_path = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let kind = entry.header().entry_type();
            *kinds.entry(format!("{kind:?}")).or_insert(0) += 1;
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            let mode = entry.header().mode().unwrap();
            let uid = entry.header().uid().unwrap();
            by_path.insert(path, (kind, mode, uid, data));
        }
        for kind in [
            "Regular",
            "Directory",
            "Symlink",
            "Link",
            "Char",
            "Block",
            "Fifo",
        ] {
            assert!(kinds.contains_key(kind), "no {kind} in {kinds:?}");
        }
        let large = &by_path["files/large.bin"].3;
        assert_eq!(large.len(), LARGE_FILE_SIZE);
        assert_eq!(
            *large,
            pseudo_random_bytes(LARGE_FILE_SEED, LARGE_FILE_SIZE)
        );
        let zeros = &by_path["files/zeros.bin"].3;
        assert!(zeros[..ZEROS_FILE_ZEROS].iter().all(|b| *b == 0));
        assert_eq!(&zeros[ZEROS_FILE_ZEROS..], ZEROS_FILE_TAIL);
        let small = by_path.keys().filter(|p| p.starts_with("small/d")).count();
        assert_eq!(small, SMALL_FILES + 10, "files plus their 10 dirs");
        assert_eq!(by_path["files/setuid"].1, 0o4755);
        assert_eq!(by_path["modes/sticky/"].1, 0o1777);
        assert_eq!(by_path["files/owned-100000"].2, 100_000);
        assert_eq!(by_path["links/hardlink"].0, EntryType::Link);
        assert!(pax_long_path().len() > 100 && gnu_long_path().len() > 100);
        for path in [
            pax_long_path(),
            gnu_long_path(),
            "unicode/日本語/ファイル.txt".to_owned(),
            "unicode/emoji-🦀.txt".to_owned(),
            "whiteouts/.wh.deleted".to_owned(),
            "opaque/.wh..wh..opq".to_owned(),
        ] {
            assert!(by_path.contains_key(&path), "{path} missing");
        }
        // Every parent directory comes before its children.
        let mut seen = std::collections::BTreeSet::new();
        let mut archive = tar::Archive::new(tar.as_slice());
        for entry in archive.entries().unwrap() {
            let path = String::from_utf8(entry.unwrap().path_bytes().into_owned()).unwrap();
            let trimmed = path.trim_end_matches('/');
            if let Some((parent, _)) = trimmed.rsplit_once('/') {
                assert!(seen.contains(parent), "{path} before its parent");
            }
            seen.insert(trimmed.to_owned());
        }
    }

    #[test]
    fn upper_layers_are_three_valid_tars() {
        let layers = upper_layers();
        assert_eq!(layers.len(), 3);
        for layer in &layers {
            let mut archive = tar::Archive::new(layer.as_slice());
            assert!(archive.entries().unwrap().all(|e| e.is_ok()));
        }
        assert_eq!(layers, upper_layers());
    }
}
