//! Disk usage of a directory tree, counted like containerd (bytes of blocks, inodes once each).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::Usage;

pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir).map_err(Error::io("measuring", &dir))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += (meta.blocks() * 512) as i64;
        }
        if !meta.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(Error::io("measuring", &dir))? {
            let entry = entry.map_err(Error::io("measuring", &dir))?;
            let meta = entry
                .metadata()
                .map_err(Error::io("measuring", entry.path()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                usage.inodes += 1;
                usage.size += (meta.blocks() * 512) as i64;
            }
        }
    }
    Ok(usage)
}
