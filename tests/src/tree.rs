//! Walking a mounted rootfs into a comparable description, and comparing two of them: the check
//! that a streamsnap rootfs shows exactly what containerd's overlayfs snapshotter shows for the
//! same image.
//!
//! A [`Node`] holds everything a container can observe of a file except times (kept, but only
//! compared on request): kind, permission bits, owner, size, symlink target, device numbers,
//! every extended attribute (`trusted.*` and `security.*` included: the walk runs as root) and
//! the sha256 of a regular file's content. Hardlinks are recorded as the first path (in path
//! order) sharing the inode. Reading the content of every file means a lazy filesystem fetches
//! everything.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use streamsnap_format::{Digest, DigestHasher};

/// What kind of file a [`Node`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dir => "dir",
            Self::File => "file",
            Self::Symlink => "symlink",
            Self::CharDevice => "char device",
            Self::BlockDevice => "block device",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
        })
    }
}

/// One file of a walked tree. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Content length of a regular file, target length of a symlink, 0 for the rest (a dir's
    /// size depends on the filesystem).
    pub size: u64,
    pub link_target: Option<PathBuf>,
    /// `(major, minor)` of a device.
    pub rdev: Option<(u32, u32)>,
    /// Every extended attribute, by name.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of a regular file's content.
    pub sha256: Option<Digest>,
    /// For a file with other hardlinks in the tree: the first of them in path order (itself for
    /// that first one).
    pub hardlink_group: Option<PathBuf>,
    /// `(seconds, nanoseconds)`; compared only with [`DiffOptions::mtime`].
    pub mtime: (i64, i64),
}

/// What [`diff_trees_with`] compares besides what it always compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// Also compare modification times.
    pub mtime: bool,
}

/// Every file below `root` (not following symlinks), keyed by its path inside the tree: `/` for
/// `root` itself, `/bin/sh`, ...
pub fn walk_tree(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, Node>> {
    let mut tree = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    walk(root, Path::new("/"), &mut tree, &mut inodes)?;
    for mut paths in inodes.into_values().filter(|p| p.len() > 1) {
        paths.sort();
        for path in &paths {
            if let Some(node) = tree.get_mut(path) {
                node.hardlink_group = Some(paths[0].clone());
            }
        }
    }
    Ok(tree)
}

fn walk(
    real: &Path,
    inside: &Path,
    tree: &mut BTreeMap<PathBuf, Node>,
    inodes: &mut HashMap<(u64, u64), Vec<PathBuf>>,
) -> anyhow::Result<()> {
    let node = describe(real).with_context(|| format!("reading {}", real.display()))?;
    let kind = node.kind;
    if kind == NodeKind::File {
        let meta = fs::symlink_metadata(real)?;
        if meta.nlink() > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(inside.to_owned());
        }
    }
    tree.insert(inside.to_owned(), node);
    if kind == NodeKind::Dir {
        let mut names: Vec<_> = fs::read_dir(real)
            .with_context(|| format!("listing {}", real.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", real.display()))?;
        names.sort();
        for name in names {
            walk(&real.join(&name), &inside.join(&name), tree, inodes)?;
        }
    }
    Ok(())
}

fn describe(path: &Path) -> anyhow::Result<Node> {
    let meta = fs::symlink_metadata(path)?;
    let t = meta.file_type();
    let kind = if t.is_dir() {
        NodeKind::Dir
    } else if t.is_file() {
        NodeKind::File
    } else if t.is_symlink() {
        NodeKind::Symlink
    } else if t.is_char_device() {
        NodeKind::CharDevice
    } else if t.is_block_device() {
        NodeKind::BlockDevice
    } else if t.is_fifo() {
        NodeKind::Fifo
    } else {
        NodeKind::Socket
    };
    let link_target = match kind {
        NodeKind::Symlink => Some(fs::read_link(path)?),
        _ => None,
    };
    let sha256 = match kind {
        NodeKind::File => {
            let mut hasher = DigestHasher::new();
            std::io::copy(&mut File::open(path)?, &mut hasher)?;
            Some(hasher.finish())
        }
        _ => None,
    };
    let rdev = matches!(kind, NodeKind::CharDevice | NodeKind::BlockDevice)
        .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev())));
    Ok(Node {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: match kind {
            NodeKind::File | NodeKind::Symlink => meta.len(),
            _ => 0,
        },
        link_target,
        rdev,
        xattrs: xattrs(path)?,
        sha256,
        hardlink_group: None,
        mtime: (meta.mtime(), meta.mtime_nsec()),
    })
}

/// Every extended attribute of `path` itself (not following a symlink).
pub fn xattrs(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let names = xattr_call(|buf, len| {
        // SAFETY: `c_path` is NUL-terminated; `buf` is null with `len` 0 (a size query) or
        // points to `len` writable bytes.
        unsafe { libc::llistxattr(c_path.as_ptr(), buf.cast(), len) }
    });
    let names = match names {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).context("listing xattrs"),
    };
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name)?;
        let value = xattr_call(|buf, len| {
            // SAFETY: both strings are NUL-terminated; `buf` is null with `len` 0 (a size query)
            // or points to `len` writable bytes.
            unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), buf.cast(), len) }
        });
        let name = String::from_utf8_lossy(name).into_owned();
        match value {
            Ok(value) => {
                out.insert(name, value);
            }
            // Listed but gone (or hidden) by the time it is read.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e).with_context(|| format!("reading xattr {name}")),
        }
    }
    Ok(out)
}

/// Calls a `*xattr` function first for the size, then with a buffer; retries on ERANGE (the
/// value grew in between).
fn xattr_call(
    mut call: impl FnMut(*mut u8, libc::size_t) -> libc::ssize_t,
) -> std::io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        let size = usize::try_from(size).map_err(|_| std::io::Error::last_os_error())?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        let got = call(buf.as_mut_ptr(), buf.len());
        match usize::try_from(got) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(buf);
            }
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ERANGE) {
                    return Err(e);
                }
            }
        }
    }
}

/// The differences between two walked trees, one line each (`only in a: /x (file)`,
/// `/bin/sh: link target "busybox" != "toybox"`); empty when they are equal. Times are not
/// compared (see [`diff_trees_with`]).
pub fn diff_trees(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) -> Vec<String> {
    diff_trees_with(a, b, DiffOptions::default())
}

/// [`diff_trees`] with options.
pub fn diff_trees_with(
    a: &BTreeMap<PathBuf, Node>,
    b: &BTreeMap<PathBuf, Node>,
    opts: DiffOptions,
) -> Vec<String> {
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
    for path in paths {
        let p = path.display();
        match (a.get(path), b.get(path)) {
            (Some(x), None) => out.push(format!("only in a: {p} ({})", x.kind)),
            (None, Some(y)) => out.push(format!("only in b: {p} ({})", y.kind)),
            (Some(x), Some(y)) => diff_nodes(&p.to_string(), x, y, opts, &mut out),
            (None, None) => unreachable!("the path came from one of the trees"),
        }
    }
    out
}

fn diff_nodes(p: &str, x: &Node, y: &Node, opts: DiffOptions, out: &mut Vec<String>) {
    if x.kind != y.kind {
        out.push(format!("{p}: kind {} != {}", x.kind, y.kind));
        return;
    }
    if x.mode != y.mode {
        out.push(format!("{p}: mode {:04o} != {:04o}", x.mode, y.mode));
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        out.push(format!(
            "{p}: owner {}:{} != {}:{}",
            x.uid, x.gid, y.uid, y.gid
        ));
    }
    if x.size != y.size {
        out.push(format!("{p}: size {} != {}", x.size, y.size));
    }
    if x.link_target != y.link_target {
        out.push(format!(
            "{p}: link target {:?} != {:?}",
            x.link_target, y.link_target
        ));
    }
    if x.rdev != y.rdev {
        out.push(format!("{p}: device {:?} != {:?}", x.rdev, y.rdev));
    }
    if x.sha256 != y.sha256 {
        let show = |d: &Option<Digest>| d.map_or("-".to_owned(), |d| d.to_string());
        out.push(format!(
            "{p}: content {} != {}",
            show(&x.sha256),
            show(&y.sha256)
        ));
    }
    if x.hardlink_group != y.hardlink_group {
        out.push(format!(
            "{p}: hardlinked with {:?} != {:?}",
            x.hardlink_group, y.hardlink_group
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        x.xattrs.keys().chain(y.xattrs.keys()).collect();
    for name in names {
        let (vx, vy) = (x.xattrs.get(name), y.xattrs.get(name));
        if vx != vy {
            let show = |v: Option<&Vec<u8>>| {
                v.map_or("(none)".to_owned(), |v| {
                    format!("{:?}", String::from_utf8_lossy(v))
                })
            };
            out.push(format!("{p}: xattr {name} {} != {}", show(vx), show(vy)));
        }
    }
    if opts.mtime && x.mtime != y.mtime {
        out.push(format!("{p}: mtime {:?} != {:?}", x.mtime, y.mtime));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir(dir.join("d")).unwrap();
        fs::write(dir.join("d/f"), b"content").unwrap();
        fs::hard_link(dir.join("d/f"), dir.join("d/g")).unwrap();
        symlink("d/f", dir.join("link")).unwrap();
        fs::write(dir.join("x"), b"x").unwrap();
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: NUL-terminated strings and a valid buffer of `value.len()` bytes.
        let rc = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn equal_trees_have_no_diff_and_every_change_shows() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sample(a.path());
        sample(b.path());
        // The temp dirs themselves may differ in mode; make them equal.
        for d in [&a, &b] {
            fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let ta = walk_tree(a.path()).unwrap();
        assert_eq!(
            diff_trees(&ta, &walk_tree(b.path()).unwrap()),
            Vec::<String>::new()
        );
        assert_eq!(ta[Path::new("/d/g")].hardlink_group, Some("/d/f".into()));
        assert_eq!(ta[Path::new("/link")].link_target, Some("d/f".into()));
        assert_eq!(ta[Path::new("/x")].sha256, Some(Digest::sha256(b"x")),);

        fs::set_permissions(b.path().join("x"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(b.path().join("d/f"), b"changed").unwrap();
        fs::remove_file(b.path().join("link")).unwrap();
        symlink("d/g", b.path().join("link")).unwrap();
        fs::write(b.path().join("new"), b"").unwrap();
        set_xattr(&b.path().join("d"), "trusted.overlay.opaque", b"y");
        let diff = diff_trees(&ta, &walk_tree(b.path()).unwrap());
        let expect = [
            "/d: xattr trusted.overlay.opaque (none) != \"y\"",
            "/link: link target Some(\"d/f\") != Some(\"d/g\")",
            "only in b: /new (file)",
            "/x: mode 0644 != 0600",
        ];
        for e in expect {
            assert!(diff.iter().any(|d| d == e), "missing {e:?} in {diff:#?}");
        }
        assert!(
            diff.iter().any(|d| d.starts_with("/d/f: content sha256:")),
            "{diff:#?}"
        );
        // The hardlink partner changed with it.
        assert!(
            diff.iter().any(|d| d.starts_with("/d/g: content sha256:")),
            "{diff:#?}"
        );
    }

    #[test]
    fn broken_hardlinks_and_devices_show() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sample(a.path());
        sample(b.path());
        fs::remove_file(b.path().join("d/g")).unwrap();
        fs::write(b.path().join("d/g"), b"content").unwrap();
        let diff = diff_trees(&walk_tree(a.path()).unwrap(), &walk_tree(b.path()).unwrap());
        assert!(
            diff.iter()
                .any(|d| d == "/d/g: hardlinked with Some(\"/d/f\") != None"),
            "{diff:#?}"
        );

        let dev = CString::new(a.path().join("null").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mknod takes no other pointers.
        let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let tree = walk_tree(a.path()).unwrap();
        assert_eq!(tree[Path::new("/null")].kind, NodeKind::CharDevice);
        assert_eq!(tree[Path::new("/null")].rdev, Some((1, 3)));
    }

    #[test]
    fn mtimes_compare_only_on_request() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(a.path().join("f"), b"1").unwrap();
        fs::write(b.path().join("f"), b"1").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(b.path().join("f"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let (ta, tb) = (walk_tree(a.path()).unwrap(), walk_tree(b.path()).unwrap());
        let without = diff_trees(&ta, &tb);
        assert!(!without.iter().any(|d| d.contains("mtime")), "{without:?}");
        let with = diff_trees_with(&ta, &tb, DiffOptions { mtime: true });
        assert!(with.iter().any(|d| d.starts_with("/f: mtime")), "{with:?}");
    }
}
