//! One mount for a layer and every layer below it: the image's tree as overlayfs would show it
//! over those layers, resolved here instead of by overlayfs over one mount per layer.
//!
//! Under overlayfs a start-up's lookup of a name asks each lower mount in turn until one has
//! it (a file of the base layer of a five-layer image costs four negative lookups and one
//! positive, each a FUSE request the first time). A merged mount answers it with one request:
//! the daemon searches the layers' indexes, top first, applying their whiteouts and opaque
//! directories the way overlayfs does, and presents neither (nothing lies below the bottom
//! layer for them to hide).
//!
//! Node numbers say which layer an inode comes from: the layer's position from the top in the
//! high 32 bits, its node number in that layer's index in the low 32 (the top layer's nodes
//! keep their numbers; the root is 1). A directory that exists in several layers is the
//! topmost one's node, and what it merges (its *parts*: that directory in each layer down to
//! the first opaque one, or to a layer where the name is something else or whited out) is
//! remembered from its lookup. A node number the kernel kept from a previous daemon is
//! resolved again from its path, so a restarted daemon serves a mount it never looked up.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;
use nix::errno::Errno;

use crate::index::{Kind, LayerIndex};
use crate::layer::{Attr, BLOCK_SIZE, FileKind, NAME_MAX, OPAQUE_XATTR, StatFs};
use crate::metadata::Layer;
use crate::ops::file_kind;
use crate::table::ROOT;

/// Most layers one merged mount serves: the position must fit the high half of a node number,
/// and an image this deep is better served layer by layer.
pub const MAX_MERGED_LAYERS: usize = 128;

/// Directory depth followed when a node number is resolved from its path.
const MAX_DEPTH: usize = 4096;

/// A layer's position from the top of the stack and a node number in its index.
pub(crate) type Part = (usize, u64);

/// The node number presented for node `local` of the layer at `pos`.
pub(crate) fn encode(pos: usize, local: u64) -> u64 {
    ((pos as u64) << 32) | local
}

/// The layer position and node number of a presented node number.
pub(crate) fn decode(ino: u64) -> Part {
    ((ino >> 32) as usize, ino & u64::from(u32::MAX))
}

/// What a merged directory is made of, and its parent's presented number (for `..`).
#[derive(Clone, Debug)]
struct DirInfo {
    parts: Arc<[Part]>,
    parent: u64,
}

/// Loads a layer's index (the FUSE adapter's loader, which logs failures).
pub(crate) type Load<'a> = &'a dyn Fn(&Layer) -> Result<Arc<LayerIndex>, Errno>;

/// Listings kept for the requests that page through them.
const KEPT_LISTINGS: usize = 8;
/// Entries of the largest listing kept (larger ones are built again for each request).
pub(crate) const MAX_KEPT_LISTING: usize = 100_000;

/// A directory's whole merged listing.
pub(crate) type Listing = Arc<[MergedEntry]>;

/// One entry of a merged listing.
#[derive(Clone, Debug)]
pub(crate) struct MergedEntry {
    pub(crate) ino: u64,
    pub(crate) offset: u64,
    pub(crate) kind: FileKind,
    pub(crate) name: Vec<u8>,
}

/// A layer over the layers below it, as one tree. See the module docs.
#[derive(Debug)]
pub(crate) struct Merged {
    /// Top first.
    layers: Vec<Arc<Layer>>,
    /// Merged directories looked up so far, by presented number: at most one per directory of
    /// the layers, which their validated indexes bound.
    dirs: Mutex<HashMap<u64, DirInfo>>,
    /// The last listings built, by directory.
    listings: Mutex<LruCache<u64, Listing>>,
    /// Whether some layer has xattrs of its own, once known (asked at every xattr query).
    has_xattrs: OnceLock<bool>,
}

impl Merged {
    /// `layers` top first; `None` if there are more than [`MAX_MERGED_LAYERS`] or none.
    pub(crate) fn new(layers: Vec<Arc<Layer>>) -> Option<Self> {
        if layers.is_empty() || layers.len() > MAX_MERGED_LAYERS {
            return None;
        }
        Some(Self {
            layers,
            dirs: Mutex::default(),
            listings: Mutex::new(LruCache::new(
                NonZeroUsize::new(KEPT_LISTINGS).expect("not zero"),
            )),
            has_xattrs: OnceLock::new(),
        })
    }

    /// The layer at `pos` and its index; ENOENT for a position past the bottom.
    pub(crate) fn layer_index(
        &self,
        pos: usize,
        load: Load<'_>,
    ) -> Result<(&Arc<Layer>, Arc<LayerIndex>), Errno> {
        let layer = self.layers.get(pos).ok_or(Errno::ENOENT)?;
        Ok((layer, load(layer)?))
    }

    fn indexes(&self, load: Load<'_>) -> Result<Vec<Arc<LayerIndex>>, Errno> {
        self.layers.iter().map(|layer| load(layer)).collect()
    }

    fn remember(&self, ino: u64, info: DirInfo) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ino, info);
    }

    /// The root: every layer's root from the top down to the first opaque one.
    fn root(&self, load: Load<'_>) -> Result<DirInfo, Errno> {
        let mut parts = Vec::new();
        for (pos, layer) in self.layers.iter().enumerate() {
            let index = load(layer)?;
            let node = index.node(ROOT).ok_or(Errno::EIO)?;
            parts.push((pos, ROOT));
            if node.opaque() {
                break;
            }
        }
        Ok(DirInfo {
            parts: parts.into(),
            parent: ROOT,
        })
    }

    /// What directory `ino` merges: remembered from its lookup, or resolved from its path.
    fn dir(&self, ino: u64, load: Load<'_>) -> Result<DirInfo, Errno> {
        if let Some(info) = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
        {
            return Ok(info.clone());
        }
        if ino == ROOT {
            let info = self.root(load)?;
            self.remember(ROOT, info.clone());
            return Ok(info);
        }
        self.resolve(ino, load)?;
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// Looks the path of directory `ino` up from the root (which remembers every directory on
    /// it); ENOENT if that path leads elsewhere (a number this stack never presented).
    fn resolve(&self, ino: u64, load: Load<'_>) -> Result<(), Errno> {
        let (pos, local) = decode(ino);
        let (_, index) = self.layer_index(pos, load)?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut at = local;
        while at != ROOT {
            if names.len() >= MAX_DEPTH {
                return Err(Errno::ENOENT);
            }
            let node = index.node(at).ok_or(Errno::ENOENT)?;
            if node.kind() != Kind::Dir {
                return Err(Errno::ENOTDIR);
            }
            let parent = node.parent();
            let parent_node = index.node(parent).ok_or(Errno::ENOENT)?;
            let name = (0..index.child_count(&parent_node))
                .map(|i| index.child(&parent_node, i))
                .find(|(_, child)| *child == at)
                .map(|(name, _)| name.to_vec())
                .ok_or(Errno::ENOENT)?;
            names.push(name);
            at = parent;
        }
        let mut current = ROOT;
        for name in names.iter().rev() {
            current = self.lookup(current, OsStr::from_bytes(name), load)?.ino;
        }
        if current == ino {
            Ok(())
        } else {
            Err(Errno::ENOENT)
        }
    }

    /// The entry `name` of directory `parent`: the topmost layer's, unless a whiteout above
    /// hides it; a directory merges the same directory of the layers below it.
    pub(crate) fn lookup(&self, parent: u64, name: &OsStr, load: Load<'_>) -> Result<Attr, Errno> {
        let info = self.dir(parent, load)?;
        let name = name.as_bytes();
        let mut found: Vec<Part> = Vec::new();
        // The index of the topmost directory found, which presents it.
        let mut top_index = None;
        for &(pos, dir) in info.parts.iter() {
            let (_, index) = self.layer_index(pos, load)?;
            let node = index.node(dir).ok_or(Errno::EIO)?;
            let Some(child) = index.find_child(&node, name) else {
                continue;
            };
            let child_node = index.node(child).ok_or(Errno::EIO)?;
            match child_node.kind() {
                // Hides the name in the layers below.
                Kind::Whiteout => break,
                Kind::Dir => {
                    found.push((pos, child));
                    let opaque = child_node.opaque();
                    top_index.get_or_insert(index);
                    if opaque {
                        break;
                    }
                }
                // A file over a directory hides it; below a directory it ends the merge.
                _ if found.is_empty() => return self.attr(encode(pos, child), &index, child, 1),
                _ => break,
            }
        }
        let (Some(&(pos, top)), Some(index)) = (found.first(), top_index) else {
            return Err(Errno::ENOENT);
        };
        let ino = encode(pos, top);
        let parts = found.len();
        self.remember(
            ino,
            DirInfo {
                parts: found.into(),
                parent,
            },
        );
        self.attr(ino, &index, top, parts)
    }

    /// The attributes of node `local` of `index`, presented as `ino`; a directory merging
    /// several has one link (as overlayfs counts a merged directory: the count is unknown).
    fn attr(&self, ino: u64, index: &LayerIndex, local: u64, parts: usize) -> Result<Attr, Errno> {
        let mut attr = index.getattr(local)?;
        attr.ino = ino;
        if attr.kind == FileKind::Directory && parts > 1 {
            attr.nlink = 1;
        }
        Ok(attr)
    }

    pub(crate) fn getattr(&self, ino: u64, load: Load<'_>) -> Result<Attr, Errno> {
        let (pos, local) = decode(ino);
        let (_, index) = self.layer_index(pos, load)?;
        let node = index.node(local).ok_or(Errno::ENOENT)?;
        let parts = if node.kind() == Kind::Dir {
            self.dir(ino, load)?.parts.len()
        } else {
            1
        };
        self.attr(ino, &index, local, parts)
    }

    /// The listing of directory `ino`: `.`, `..`, then the merged entries sorted by name (the
    /// topmost layer's entry of each name; whiteouts and what they hide left out). Entry `i`
    /// has offset `i + 1`: a listing resumes after an entry at its offset. Built once for the
    /// requests that page through it (the last few are kept, up to
    /// [`MAX_KEPT_LISTING`] entries each).
    pub(crate) fn listing(&self, ino: u64, load: Load<'_>) -> Result<Listing, Errno> {
        if let Some(listing) = self
            .listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
        {
            return Ok(Arc::clone(listing));
        }
        let (pos, local) = decode(ino);
        let (_, index) = self.layer_index(pos, load)?;
        if index.node(local).ok_or(Errno::ENOENT)?.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let info = self.dir(ino, load)?;
        let indexes = self.indexes(load)?;
        // Name -> (position, node, kind) of its topmost entry.
        let mut names: BTreeMap<&[u8], (usize, u64, Kind)> = BTreeMap::new();
        for &(pos, dir) in info.parts.iter() {
            let index = &indexes[pos];
            let node = index.node(dir).ok_or(Errno::EIO)?;
            for i in 0..index.child_count(&node) {
                let (name, child) = index.child(&node, i);
                let kind = index.node(child).ok_or(Errno::EIO)?.kind();
                names.entry(name).or_insert((pos, child, kind));
            }
        }
        let dots = [(".", ino), ("..", info.parent)]
            .into_iter()
            .map(|(name, ino)| (name.as_bytes(), ino, FileKind::Directory));
        let entries = names
            .into_iter()
            .filter(|(_, (_, _, kind))| *kind != Kind::Whiteout)
            .map(|(name, (pos, child, kind))| (name, encode(pos, child), file_kind(kind)));
        let listing: Listing = dots
            .chain(entries)
            .enumerate()
            .map(|(i, (name, ino, kind))| MergedEntry {
                ino,
                offset: i as u64 + 1,
                kind,
                name: name.to_vec(),
            })
            .collect();
        if listing.len() <= MAX_KEPT_LISTING {
            self.listings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(ino, Arc::clone(&listing));
        }
        Ok(listing)
    }

    /// The entries of [`listing`](Self::listing) after `offset`.
    #[cfg(test)]
    pub(crate) fn readdir(
        &self,
        ino: u64,
        offset: u64,
        load: Load<'_>,
    ) -> Result<Vec<MergedEntry>, Errno> {
        let listing = self.listing(ino, load)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(listing.len());
        Ok(listing[start..].to_vec())
    }

    pub(crate) fn readlink(&self, ino: u64, load: Load<'_>) -> Result<Vec<u8>, Errno> {
        let (pos, local) = decode(ino);
        self.layer_index(pos, load)?.1.readlink(local)
    }

    /// Some layer has an xattr of the image's own (opaque markers are applied, not presented):
    /// without, the mount answers every xattr query ENOSYS once and the kernel stops asking
    /// (overlayfs asks each directory for its opaque and redirect markers).
    pub(crate) fn has_xattrs(&self, load: Load<'_>) -> Result<bool, Errno> {
        if let Some(&has) = self.has_xattrs.get() {
            return Ok(has);
        }
        let has = self
            .indexes(load)?
            .iter()
            .any(|index| index.has_image_xattrs());
        Ok(*self.has_xattrs.get_or_init(|| has))
    }

    /// The xattr of the node's layer; opaque markers are applied here, not presented.
    pub(crate) fn getxattr(
        &self,
        ino: u64,
        name: &OsStr,
        load: Load<'_>,
    ) -> Result<Vec<u8>, Errno> {
        if name.as_bytes() == OPAQUE_XATTR.as_bytes() {
            return Err(Errno::ENODATA);
        }
        let (pos, local) = decode(ino);
        self.layer_index(pos, load)?.1.getxattr(local, name)
    }

    pub(crate) fn listxattr(&self, ino: u64, load: Load<'_>) -> Result<Vec<u8>, Errno> {
        let (pos, local) = decode(ino);
        let names = self.layer_index(pos, load)?.1.listxattr(local)?;
        let mut out = Vec::with_capacity(names.len());
        for name in names.split_inclusive(|&b| b == 0) {
            if name.strip_suffix(&[0]) != Some(OPAQUE_XATTR.as_bytes()) {
                out.extend_from_slice(name);
            }
        }
        Ok(out)
    }

    /// The layers' totals added up.
    pub(crate) fn statfs(&self, load: Load<'_>) -> Result<StatFs, Errno> {
        let (mut blocks, mut files) = (0u64, 0u64);
        for index in self.indexes(load)? {
            let (b, f) = index.statfs_totals();
            blocks = blocks.saturating_add(b);
            files = files.saturating_add(f);
        }
        Ok(StatFs {
            blocks,
            files,
            block_size: BLOCK_SIZE,
            name_max: NAME_MAX,
        })
    }

    /// [`LayerIndex::worth_passthrough`] over the bytes of every layer.
    pub(crate) fn worth_passthrough(&self, min_file_bytes: u64, load: Load<'_>) -> bool {
        let Ok(indexes) = self.indexes(load) else {
            return false;
        };
        let (large, all) = indexes.iter().fold((0u64, 0u64), |(large, all), index| {
            let (l, a) = index.file_bytes(min_file_bytes.max(1));
            (large.saturating_add(l), all.saturating_add(a))
        });
        crate::index::worth_passthrough(large, all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::LayerBuilder;
    use crate::{FsOptions, LayerFs};

    fn layer(build: impl FnOnce(&mut LayerBuilder)) -> Arc<Layer> {
        let mut b = LayerBuilder::new(4096);
        b.dir("", 0o755);
        build(&mut b);
        let (toc, reader) = b.build();
        let fs = LayerFs::new(toc, reader, FsOptions::default()).unwrap();
        Arc::new(Layer::resident(Arc::new(fs)))
    }

    fn load(layer: &Layer) -> Result<Arc<LayerIndex>, Errno> {
        layer.index().map_err(|_| Errno::EIO)
    }

    fn names(entries: &[MergedEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect()
    }

    #[test]
    fn a_directory_the_kernel_kept_from_a_previous_daemon_is_resolved_from_its_path() {
        let lower = layer(|b| {
            b.file("a/b/f", 0o644, b"lower f");
            b.file("a/gone", 0o644, b"whited out");
        });
        let upper = layer(|b| {
            b.file("a/b/g", 0o644, b"upper g");
            b.whiteout("a/gone");
        });
        let layers = vec![Arc::clone(&upper), Arc::clone(&lower)];
        let first = Merged::new(layers.clone()).unwrap();
        let a = first.lookup(ROOT, OsStr::new("a"), &load).unwrap();
        let b = first.lookup(a.ino, OsStr::new("b"), &load).unwrap();
        assert_eq!(decode(b.ino).0, 0, "the topmost directory names it");
        assert_eq!(b.nlink, 1, "merged from two layers");

        // A new daemon: nothing looked up yet, the kernel asks by number.
        let next = Merged::new(layers).unwrap();
        assert_eq!(next.getattr(b.ino, &load).unwrap(), b);
        assert_eq!(
            names(&next.readdir(b.ino, 0, &load).unwrap()),
            [".", "..", "f", "g"]
        );
        let f = next.lookup(b.ino, OsStr::new("f"), &load).unwrap();
        assert_eq!(decode(f.ino).0, 1, "from the lower layer");
        assert_eq!(
            names(&next.readdir(a.ino, 0, &load).unwrap()),
            [".", "..", "b"],
            "the whiteout and what it hides are not listed"
        );
        assert_eq!(
            next.lookup(a.ino, OsStr::new("gone"), &load),
            Err(Errno::ENOENT)
        );
        // The lower layer's own "a" is hidden under the upper's: never presented.
        let lower_a = load(&lower).unwrap().lookup(ROOT, OsStr::new("a")).unwrap();
        assert_eq!(
            next.getattr(encode(1, lower_a.ino), &load),
            Err(Errno::ENOENT)
        );
        assert_eq!(next.getattr(encode(7, 1), &load), Err(Errno::ENOENT));
    }

    #[test]
    fn listings_resume_after_the_offset_each_entry_gives() {
        let lower = layer(|b| {
            for i in 0..20 {
                b.file(&format!("d/l{i:02}"), 0o644, b"");
            }
        });
        let upper = layer(|b| {
            for i in 0..20 {
                b.file(&format!("d/u{i:02}"), 0o644, b"");
            }
        });
        let merged = Merged::new(vec![upper, lower]).unwrap();
        let d = merged.lookup(ROOT, OsStr::new("d"), &load).unwrap();
        let all = merged.readdir(d.ino, 0, &load).unwrap();
        assert_eq!(all.len(), 42);
        let mut resumed = Vec::new();
        let mut offset = 0;
        loop {
            let page = merged.readdir(d.ino, offset, &load).unwrap();
            let Some(first) = page.first() else { break };
            resumed.push(first.clone());
            offset = first.offset;
        }
        assert_eq!(names(&resumed), names(&all));
    }

    #[test]
    fn opaque_markers_are_applied_not_shown_and_only_image_xattrs_keep_xattr_queries() {
        let lower = layer(|b| {
            b.file("d/old", 0o644, b"hidden");
        });
        let upper = layer(|b| {
            b.dir("d", 0o755);
            b.opaque("d");
            b.file("d/new", 0o644, b"shown");
        });
        let merged = Merged::new(vec![Arc::clone(&upper), Arc::clone(&lower)]).unwrap();
        assert!(
            load(&upper).unwrap().has_xattrs(),
            "the layer alone shows the marker"
        );
        assert!(!merged.has_xattrs(&load).unwrap(), "nothing to show merged");
        let d = merged.lookup(ROOT, OsStr::new("d"), &load).unwrap();
        assert_eq!(d.nlink, 2, "one layer's directory keeps its count");
        assert_eq!(
            names(&merged.readdir(d.ino, 0, &load).unwrap()),
            [".", "..", "new"]
        );
        assert_eq!(
            merged.getxattr(d.ino, OsStr::new(OPAQUE_XATTR), &load),
            Err(Errno::ENODATA)
        );
        assert_eq!(merged.listxattr(d.ino, &load).unwrap(), b"");

        let with_xattr = layer(|b| {
            b.file("cap", 0o755, b"x")
                .xattrs
                .push(streamsnap_format::api::Xattr {
                    name: "security.capability".into(),
                    value: vec![1, 2],
                });
        });
        let merged = Merged::new(vec![upper, with_xattr]).unwrap();
        assert!(merged.has_xattrs(&load).unwrap());
        let cap = merged.lookup(ROOT, OsStr::new("cap"), &load).unwrap();
        assert_eq!(
            merged.getxattr(cap.ino, OsStr::new("security.capability"), &load),
            Ok(vec![1, 2])
        );
        assert_eq!(
            merged.listxattr(cap.ino, &load).unwrap(),
            b"security.capability\0"
        );
    }

    #[test]
    fn more_layers_than_a_node_number_holds_are_refused() {
        let one = layer(|_| {});
        assert!(Merged::new(vec![Arc::clone(&one); MAX_MERGED_LAYERS]).is_some());
        assert!(Merged::new(vec![one; MAX_MERGED_LAYERS + 1]).is_none());
        assert!(Merged::new(Vec::new()).is_none());
    }
}
