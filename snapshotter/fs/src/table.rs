//! The inode table: the TOC's entries, taken in tar order, turned into a tree of inodes the way
//! extracting the tar would (later entries replace earlier ones, hardlinks share an inode,
//! missing parents are created).
//!
//! The first stage of a layer index (`crate::index`), which flattens it: inode numbers are
//! indices into one `Vec` plus one (the same in every build from the same TOC, so a daemon that
//! takes a mount over answers the kernel's inode numbers), nodes keep the index of the TOC entry
//! that describes them, names are references into the TOC's paths, and all directories'
//! children live in one array, each directory's run sorted by name.

use std::collections::BTreeMap;

use streamsnap_format::api::{self, EntryType};

use crate::error::Error;

/// Inode number of the layer root.
pub(crate) const ROOT: u64 = 1;
/// `Node::entry` of an implied directory (one that has no entry of its own in the TOC).
pub(crate) const NO_ENTRY: u32 = u32::MAX;
/// How many skipped entries are logged one by one before only a count is.
const SKIP_WARNINGS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Dir,
    Regular,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Whiteout,
}

impl NodeKind {
    fn of(kind: EntryType) -> Option<Self> {
        Some(match kind {
            EntryType::Directory => Self::Dir,
            EntryType::Regular => Self::Regular,
            EntryType::Symlink => Self::Symlink,
            EntryType::CharDevice => Self::CharDevice,
            EntryType::BlockDevice => Self::BlockDevice,
            EntryType::Fifo => Self::Fifo,
            EntryType::Whiteout => Self::Whiteout,
            EntryType::Hardlink | EntryType::Opaque | EntryType::Unspecified => return None,
        })
    }
}

/// A file name: `len` bytes at `start` of the path of TOC entry `entry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Name {
    entry: u32,
    start: u16,
    len: u16,
}

impl Name {
    fn new(entry: u32, start: usize, len: usize) -> Self {
        // a validated TOC has paths of at most 4096 bytes
        let narrow = |n: usize| u16::try_from(n).expect("validated: paths fit in 4096 bytes");
        Self {
            entry,
            start: narrow(start),
            len: narrow(len),
        }
    }

    pub(crate) fn bytes<'a>(&self, entries: &'a [api::Entry]) -> &'a [u8] {
        let start = usize::from(self.start);
        &entries[self.entry as usize].path[start..start + usize::from(self.len)]
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Child {
    pub(crate) name: Name,
    pub(crate) ino: u64,
}

#[derive(Debug)]
pub(crate) struct Node {
    /// Directories only: inode of `..` (the root is its own parent).
    pub(crate) parent: u64,
    /// Index of the TOC entry holding this inode's metadata, or [`NO_ENTRY`].
    pub(crate) entry: u32,
    /// Names of a non-directory; `2 + subdirectories` for a directory. 0 for an inode that a
    /// later entry replaced and no name leads to any more.
    pub(crate) nlink: u32,
    /// Directories only: this directory's run in [`Table::children`].
    children_start: u32,
    children_len: u32,
    pub(crate) kind: NodeKind,
    /// Directories only: an opaque marker names this directory.
    pub(crate) opaque: bool,
}

impl Node {
    pub(crate) fn entry<'a>(&self, entries: &'a [api::Entry]) -> Option<&'a api::Entry> {
        (self.entry != NO_ENTRY).then(|| &entries[self.entry as usize])
    }
}

#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) nodes: Vec<Node>,
    children: Vec<Child>,
}

impl Table {
    pub(crate) fn build(entries: &[api::Entry]) -> Result<Self, Error> {
        if entries.len() >= NO_ENTRY as usize {
            return Err(Error::TooManyEntries {
                count: entries.len(),
                max: NO_ENTRY as usize - 1,
            });
        }
        let mut builder = Builder {
            entries,
            nodes: Vec::with_capacity(entries.len() + 1),
            skipped: 0,
        };
        let root = builder.alloc(NO_ENTRY, NodeKind::Dir);
        builder.node(root).nlink = 1;
        for index in 0..entries.len() {
            builder.add(index as u32)?;
        }
        if builder.skipped > SKIP_WARNINGS {
            tracing::warn!(
                skipped = builder.skipped,
                "layer entries skipped in total (only the first {SKIP_WARNINGS} were logged)"
            );
        }
        Ok(builder.finish())
    }

    /// The entries of a directory, sorted by name (empty for other inodes).
    pub(crate) fn children(&self, node: &Node) -> &[Child] {
        let start = node.children_start as usize;
        &self.children[start..start + node.children_len as usize]
    }
}

struct BuildNode<'a> {
    entry: u32,
    kind: NodeKind,
    opaque: bool,
    nlink: u32,
    parent: u64,
    children: BTreeMap<&'a [u8], Child>,
}

struct Builder<'a> {
    entries: &'a [api::Entry],
    nodes: Vec<BuildNode<'a>>,
    skipped: usize,
}

/// Where a new name goes: the directory, and the name as bytes and as a reference.
type Slot<'a> = (u64, &'a [u8], Name);

impl<'a> Builder<'a> {
    fn alloc(&mut self, entry: u32, kind: NodeKind) -> u64 {
        self.nodes.push(BuildNode {
            entry,
            kind,
            opaque: false,
            nlink: 0,
            parent: ROOT,
            children: BTreeMap::new(),
        });
        self.nodes.len() as u64
    }

    fn node(&mut self, ino: u64) -> &mut BuildNode<'a> {
        &mut self.nodes[ino as usize - 1]
    }

    fn kind(&self, ino: u64) -> NodeKind {
        self.nodes[ino as usize - 1].kind
    }

    fn get_child(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.nodes[dir as usize - 1]
            .children
            .get(name)
            .map(|child| child.ino)
    }

    fn add(&mut self, index: u32) -> Result<(), Error> {
        let entries = self.entries;
        let entry = &entries[index as usize];
        let kind = EntryType::try_from(entry.r#type).unwrap_or(EntryType::Unspecified);
        if entry.path.is_empty() {
            return match kind {
                EntryType::Directory => {
                    self.node(ROOT).entry = index;
                    Ok(())
                }
                EntryType::Opaque => {
                    self.node(ROOT).opaque = true;
                    Ok(())
                }
                other => Err(Error::RootNotDirectory {
                    kind: type_name(other),
                }),
            };
        }
        let outcome = match kind {
            EntryType::Opaque => self
                .ensure_dir(index, entry.path.len())
                .map(|dir| self.node(dir).opaque = true),
            EntryType::Hardlink => match self.resolve(&entry.link_target) {
                None => Err("hardlink target does not exist"),
                Some(target) => match self.kind(target) {
                    NodeKind::Dir => Err("hardlink target is a directory"),
                    NodeKind::Whiteout => Err("hardlink target is a whiteout"),
                    _ => self
                        .ensure_parent(index)
                        .map(|slot| self.place(slot, target)),
                },
            },
            EntryType::Directory => self.ensure_parent(index).map(|slot| {
                match self.get_child(slot.0, slot.1) {
                    // tar semantics: an existing directory keeps its children, takes the metadata
                    Some(dir) if self.kind(dir) == NodeKind::Dir => self.node(dir).entry = index,
                    _ => {
                        let dir = self.alloc(index, NodeKind::Dir);
                        self.place(slot, dir);
                    }
                }
            }),
            other => NodeKind::of(other)
                .ok_or("unknown entry type")
                .and_then(|kind| {
                    let slot = self.ensure_parent(index)?;
                    let ino = self.alloc(index, kind);
                    self.place(slot, ino);
                    Ok(())
                }),
        };
        if let Err(reason) = outcome {
            self.skip(entry, reason);
        }
        Ok(())
    }

    fn skip(&mut self, entry: &api::Entry, reason: &str) {
        self.skipped += 1;
        if self.skipped <= SKIP_WARNINGS {
            tracing::warn!(
                path = %String::from_utf8_lossy(&entry.path),
                target = %String::from_utf8_lossy(&entry.link_target),
                reason,
                "layer entry skipped"
            );
        }
    }

    /// The inode at `path`, without creating anything.
    fn resolve(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT;
        if path.is_empty() {
            return Some(ino);
        }
        for component in path.split(|&b| b == b'/') {
            if self.kind(ino) != NodeKind::Dir {
                return None;
            }
            ino = self.get_child(ino, component)?;
        }
        Some(ino)
    }

    /// The directory named by the first `len` bytes of entry `index`'s path, creating implied
    /// directories where nothing exists. An error when a component is not a directory.
    fn ensure_dir(&mut self, index: u32, len: usize) -> Result<u64, &'static str> {
        let entries = self.entries;
        let path: &'a [u8] = &entries[index as usize].path[..len];
        let mut ino = ROOT;
        let mut start = 0;
        while start < len {
            let end = path[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(len, |slash| start + slash);
            let component = &path[start..end];
            ino = match self.get_child(ino, component) {
                Some(child) if self.kind(child) == NodeKind::Dir => child,
                Some(_) => return Err("a parent is not a directory"),
                None => {
                    let dir = self.alloc(NO_ENTRY, NodeKind::Dir);
                    let name = Name::new(index, start, end - start);
                    self.place((ino, component, name), dir);
                    dir
                }
            };
            start = end + 1;
        }
        Ok(ino)
    }

    /// The parent directory of entry `index`'s path (created if implied) and its last name.
    fn ensure_parent(&mut self, index: u32) -> Result<Slot<'a>, &'static str> {
        let entries = self.entries;
        let path: &'a [u8] = &entries[index as usize].path;
        let (parent, start) = match path.iter().rposition(|&b| b == b'/') {
            Some(slash) => (self.ensure_dir(index, slash)?, slash + 1),
            None => (ROOT, 0),
        };
        let name = Name::new(index, start, path.len() - start);
        Ok((parent, &path[start..], name))
    }

    /// Names `ino` in a directory, replacing what had that name.
    fn place(&mut self, (parent, bytes, name): Slot<'a>, ino: u64) {
        let old = self
            .node(parent)
            .children
            .insert(bytes, Child { name, ino });
        match old {
            Some(old) if old.ino == ino => return,
            Some(old) => self.unlink(old.ino),
            None => {}
        }
        let node = self.node(ino);
        node.nlink += 1;
        if node.kind == NodeKind::Dir {
            node.parent = parent;
        }
    }

    /// Drops one name of `ino`, and with a directory everything below it.
    fn unlink(&mut self, ino: u64) {
        let mut stack = vec![ino];
        while let Some(ino) = stack.pop() {
            let node = self.node(ino);
            node.nlink = node.nlink.saturating_sub(1);
            if node.kind == NodeKind::Dir {
                let children = std::mem::take(&mut node.children);
                stack.extend(children.into_values().map(|child| child.ino));
            }
        }
    }

    fn finish(self) -> Table {
        let kinds: Vec<NodeKind> = self.nodes.iter().map(|node| node.kind).collect();
        let total = self.nodes.iter().map(|node| node.children.len()).sum();
        let mut children = Vec::with_capacity(total);
        let nodes = self
            .nodes
            .into_iter()
            .map(|node| {
                let start = children.len();
                let mut subdirs = 0u32;
                for child in node.children.into_values() {
                    subdirs += u32::from(kinds[child.ino as usize - 1] == NodeKind::Dir);
                    children.push(child);
                }
                let narrow = |n: usize| u32::try_from(n).expect("fewer children than u32::MAX");
                Node {
                    parent: node.parent,
                    entry: node.entry,
                    nlink: match node.kind {
                        NodeKind::Dir if node.nlink > 0 => subdirs.saturating_add(2),
                        _ => node.nlink,
                    },
                    children_start: narrow(start),
                    children_len: narrow(children.len() - start),
                    kind: node.kind,
                    opaque: node.opaque,
                }
            })
            .collect();
        Table { nodes, children }
    }
}

fn type_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Unspecified => "entry of unknown type",
        EntryType::Regular => "regular file",
        EntryType::Directory => "directory",
        EntryType::Symlink => "symlink",
        EntryType::Hardlink => "hardlink",
        EntryType::CharDevice => "character device",
        EntryType::BlockDevice => "block device",
        EntryType::Fifo => "fifo",
        EntryType::Whiteout => "whiteout",
        EntryType::Opaque => "opaque marker",
    }
}
