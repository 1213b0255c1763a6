//! A merged mount (a layer served with the layers below it as one tree) shows a container
//! exactly what overlayfs shows over one mount per layer: for generated stacks of layers with
//! files, directories, symlinks, hard links, xattrs, whiteouts and opaque directories, the two
//! trees under a container's overlay (an upper directory over the lower mounts) are compared
//! entry by entry, content included, with listings by READDIRPLUS and by plain READDIR. Needs
//! root, /dev/fuse and overlayfs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use nix::mount::MsFlags;
use streamsnap_format::api;
use streamsnap_fs::{FsOptions, KernelFeature, KernelFeatures, Layer, LayerFs, MountOptions};

use common::testutil::LayerBuilder;
use common::{DetachOnDrop, fuse_available, mount_options, runtime};

/// A small deterministic generator (no dependency for a test's dice).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const DIRS: [&str; 6] = ["", "a", "a/b", "a/b/c", "d", "e"];
const NAMES: [&str; 5] = ["f", "g", "a", "d", "b"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Used {
    Dir,
    Other,
}

/// One generated layer: each path is used once, parents are directories.
fn layer(
    dice: &mut Dice,
    seed: u8,
) -> (
    Arc<streamsnap_format::Toc>,
    Arc<common::testutil::MemoryChunks>,
) {
    let mut b = LayerBuilder::new(4096);
    let mut used: BTreeMap<String, Used> = BTreeMap::new();
    used.insert(String::new(), Used::Dir);
    b.dir("", 0o755);
    let mut files: Vec<String> = Vec::new();
    let free_for = |used: &BTreeMap<String, Used>, path: &str, want: Used| {
        let ancestors_ok = {
            let mut ok = true;
            let mut at = path;
            while let Some((parent, _)) = at.rsplit_once('/') {
                if used.get(parent) == Some(&Used::Other) {
                    ok = false;
                }
                at = parent;
            }
            ok
        };
        let below = format!("{path}/");
        let has_children = used.keys().any(|k| k.starts_with(&below));
        ancestors_ok
            && match (used.get(path), want) {
                (None, Used::Dir) => true,
                (None, Used::Other) => !has_children,
                _ => false,
            }
    };
    let mark_parents = |used: &mut BTreeMap<String, Used>, path: &str| {
        let mut at = path;
        while let Some((parent, _)) = at.rsplit_once('/') {
            used.entry(parent.to_owned()).or_insert(Used::Dir);
            at = parent;
        }
    };
    for step in 0..14 {
        let dir = DIRS[dice.below(DIRS.len())];
        let name = NAMES[dice.below(NAMES.len())];
        let path = if dir.is_empty() {
            name.to_owned()
        } else {
            format!("{dir}/{name}")
        };
        match dice.below(7) {
            0 | 1 if free_for(&used, &path, Used::Other) => {
                let len = [0, 5, 300, 5000][dice.below(4)];
                let content: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed ^ step))
                    .collect();
                let entry = b.file(&path, [0o644, 0o600, 0o755][dice.below(3)], &content);
                entry.uid = dice.below(3) as u64;
                if dice.below(3) == 0 {
                    entry.xattrs.push(api::Xattr {
                        name: "user.seed".into(),
                        value: vec![seed, step],
                    });
                }
                used.insert(path.clone(), Used::Other);
                files.push(path.clone());
            }
            2 if free_for(&used, &path, Used::Other) => {
                b.symlink(&path, &format!("target-{seed}-{step}"));
                used.insert(path.clone(), Used::Other);
            }
            3 if free_for(&used, &path, Used::Other) => {
                b.whiteout(&path);
                used.insert(path.clone(), Used::Other);
            }
            4 if free_for(&used, &path, Used::Dir) => {
                let entry = b.dir(&path, [0o755, 0o700, 0o1777][dice.below(3)]);
                entry.mtime = 1_600_000_000 + i64::from(seed);
                used.insert(path.clone(), Used::Dir);
                if dice.below(2) == 0 {
                    b.opaque(&path);
                }
            }
            5 if !files.is_empty() && free_for(&used, &path, Used::Other) => {
                let target = files[dice.below(files.len())].clone();
                b.hardlink(&path, &target);
                used.insert(path.clone(), Used::Other);
            }
            6 if !dir.is_empty() && !used.contains_key(dir) && free_for(&used, dir, Used::Dir) => {
                b.dir(dir, 0o755);
                used.insert(dir.to_owned(), Used::Dir);
                mark_parents(&mut used, dir);
                b.opaque(dir);
            }
            _ => {}
        }
        mark_parents(&mut used, &path);
    }
    b.build()
}

/// What a tree shows of each entry, by path: type, permissions, owner, size, mtime, link count
/// (files), content or target, and user xattrs. `phantoms`: skip names a listing shows that
/// cannot be looked up (overlayfs lists a lower layer's whiteout in a directory it does not
/// merge, yet hides it from lookups); otherwise such a name fails the test.
fn snapshot(root: &Path, phantoms: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, phantoms, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, phantoms: bool, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if phantoms && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{} listed, but: {e}", path.display()),
        };
        let kind = meta.file_type();
        let mut line = format!(
            "mode {:o} uid {} gid {} mtime {}",
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.mtime()
        );
        if kind.is_file() {
            line += &format!(
                " nlink {} size {} content {:?}",
                meta.nlink(),
                meta.len(),
                streamsnap_format::Digest::sha256(&fs::read(&path).unwrap())
            );
        } else if kind.is_symlink() {
            line += &format!(" -> {}", fs::read_link(&path).unwrap().display());
        }
        if !kind.is_symlink() {
            line += &format!(" xattr {:?}", xattr(&path, "user.seed"));
        }
        let relative = path.strip_prefix(root).unwrap().display().to_string();
        out.insert(relative, line);
        if kind.is_dir() {
            walk(root, &path, phantoms, out);
        }
    }
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    common::getxattr(path, name, 256)
        .ok()
        .map(|(_, value)| value)
}

/// A container's overlay over `lowers` (top first) with an empty upper directory.
fn overlay(lowers: &[&Path], scratch: &Path) -> DetachOnDrop {
    let (upper, work, merged) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("merged"),
    );
    for dir in [&upper, &work, &merged] {
        fs::create_dir_all(dir).unwrap();
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount -t overlay -o {options}: {e}"));
    DetachOnDrop(merged)
}

/// Odd seeds list directories with plain READDIR (the fallback without READDIRPLUS).
fn options_for(seed: u8) -> MountOptions {
    let kernel_features = if seed % 2 == 1 {
        KernelFeatures::without([KernelFeature::Readdirplus])
    } else {
        KernelFeatures::all()
    };
    MountOptions {
        kernel_features,
        ..mount_options()
    }
}

#[test]
fn a_merged_mount_shows_what_overlayfs_shows_over_one_mount_per_layer() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    for seed in 0..24u8 {
        let mut dice = Dice(u64::from(seed) * 977 + 13);
        let depth = 2 + dice.below(4);
        // Bottom first.
        let layers: Vec<Arc<Layer>> = (0..depth)
            .map(|i| {
                let (toc, reader) = layer(&mut dice, seed.wrapping_mul(16) + i as u8);
                let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
                Arc::new(Layer::resident(Arc::new(fs)))
            })
            .collect();
        let scratch = tempfile::tempdir().unwrap();
        let base = scratch.path().canonicalize().unwrap();

        let mut singles = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let dir = base.join(format!("layer{i}"));
            fs::create_dir_all(&dir).unwrap();
            singles.push(
                streamsnap_fs::mount(
                    Arc::clone(layer),
                    &dir,
                    rt.handle().clone(),
                    &options_for(seed),
                )
                .unwrap(),
            );
        }
        let single_dirs: Vec<_> = (0..depth)
            .rev()
            .map(|i| base.join(format!("layer{i}")))
            .collect();
        let single_refs: Vec<&Path> = single_dirs.iter().map(|p| p.as_path()).collect();
        let by_layer = overlay(&single_refs, &base.join("per-layer"));

        let merged_dir = base.join("merged-mount");
        fs::create_dir_all(&merged_dir).unwrap();
        let options = MountOptions {
            lowers: layers[..depth - 1].iter().rev().cloned().collect(),
            ..options_for(seed)
        };
        let top = Arc::clone(&layers[depth - 1]);
        let merged = streamsnap_fs::mount(top, &merged_dir, rt.handle().clone(), &options).unwrap();
        let by_merge = overlay(&[&merged_dir], &base.join("one-mount"));

        let expected = snapshot(&by_layer.0, true);
        let got = snapshot(&by_merge.0, false);
        assert_eq!(got, expected, "seed {seed}, {depth} layers");
        // The merged mount itself presents no whiteout and no opaque marker.
        for path in snapshot(&merged_dir, false).keys() {
            let meta = fs::symlink_metadata(merged_dir.join(path)).unwrap();
            assert!(
                !(meta.file_type().is_char_device() && meta.rdev() == 0),
                "seed {seed}: whiteout {path} shown"
            );
            if meta.is_dir() {
                assert_eq!(
                    xattr(&merged_dir.join(path), "trusted.overlay.opaque"),
                    None
                );
            }
        }

        drop(by_merge);
        drop(by_layer);
        merged.unmount().unwrap();
        for single in singles {
            single.unmount().unwrap();
        }
    }
}
