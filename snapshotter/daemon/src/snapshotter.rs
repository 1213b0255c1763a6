//! The snapshotter: containerd's snapshot semantics over overlay directories, with remote
//! (FUSE-mounted, lazily fetched) layers where an image has a streaming artifact.
//!
//! Layout under the root: `snapshots/<id>/fs` (the snapshot's files: an overlay upper dir, or a
//! FUSE mount point for a remote layer), `snapshots/<id>/work` (overlay work dir),
//! `snapshots/<id>/toc` (a remote layer's TOC blob, so a restart remounts without the network),
//! and `metadata.db`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::remote::RemoteLayers;
use crate::store::{Kind, Record, Store, Timestamp};

/// Most ancestors a snapshot may have (deeper chains are refused as damaged).
pub(crate) const MAX_CHAIN: usize = 4096;

/// A mount containerd performs to use a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What Stat, Update and List report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

impl Info {
    pub fn from_record(name: &str, record: &Record) -> Self {
        Self {
            name: name.to_owned(),
            parent: record.parent.clone(),
            kind: record.kind,
            labels: record.labels.clone(),
            created: record.created,
            updated: record.updated,
        }
    }
}

impl crate::filter::Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [field] if field == "name" => Some(self.name.clone()),
            // Like containerd's adaptor: a snapshot without parent has parent "".
            [field] if field == "parent" => Some(self.parent.clone().unwrap_or_default()),
            [field] if field == "kind" => Some(
                match self.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }
                .to_owned(),
            ),
            [field, rest @ ..] if field == "labels" && !rest.is_empty() => {
                self.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Snapshotter {
    pub(crate) root: PathBuf,
    pub(crate) store: Store,
    pub(crate) remote: Option<Arc<RemoteLayers>>,
    /// Serializes remote prepares of one target so concurrent pulls of an image mount each
    /// layer once.
    pub(crate) remote_locks: crate::locks::KeyedLocks,
    /// Ids whose directories exist (or are about to) before their record is committed: Cleanup
    /// must not take those for leftovers.
    pub(crate) creating: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// Keeps a snapshot id out of Cleanup's reach while its snapshot is being created.
#[derive(Debug)]
pub(crate) struct Creating<'a> {
    owner: &'a Snapshotter,
    id: u64,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.owner
            .creating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Snapshotter {
    /// Marks `id` as being created until the guard is dropped (after its record is committed,
    /// or its directory removed).
    pub(crate) fn creating(&self, id: u64) -> Creating<'_> {
        self.creating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        Creating { owner: self, id }
    }

    /// Opens (or creates) the snapshotter state under `root`. Remote layers are mounted only if
    /// `remote` is given; without it, every prepare is an ordinary one.
    pub fn open(root: &Path, remote: Option<Arc<RemoteLayers>>) -> Result<Self> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(Error::io("creating", &snapshots))?;
        let store = Store::open(&root.join("metadata.db"))?;
        Ok(Self {
            root: root.to_owned(),
            store,
            remote,
            remote_locks: Default::default(),
            creating: Default::default(),
        })
    }

    pub(crate) fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub(crate) fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub(crate) fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// The record of `key`, or NotFound.
    pub(crate) fn record(&self, key: &str) -> Result<Record> {
        self.store.get(key)?.ok_or_else(|| Error::NotFound {
            key: key.to_owned(),
        })
    }

    /// Records of `parent` and its ancestors, nearest first (at most [`MAX_CHAIN`]).
    pub(crate) fn chain(&self, parent: Option<&str>) -> Result<Vec<Record>> {
        let mut chain = Vec::new();
        let mut next = parent.map(str::to_owned);
        while let Some(key) = next {
            let record = self.record(&key)?;
            next = record.parent.clone();
            chain.push(record);
            if chain.len() > MAX_CHAIN {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot chain of {key:?} is too deep"
                )));
            }
        }
        Ok(chain)
    }

    /// Sets the snapshot gauges from the store (at each scrape).
    pub fn refresh_gauges(&self, metrics: &crate::metrics::Metrics) {
        let Ok(records) = self.store.list() else {
            return;
        };
        for kind in ["view", "active", "committed"] {
            for origin in ["local", "remote"] {
                metrics.snapshots.with_label_values(&[kind, origin]).set(0);
            }
        }
        for (_, record) in records {
            let kind = match record.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            };
            let origin = if record.remote.is_some() {
                "remote"
            } else {
                "local"
            };
            metrics.snapshots.with_label_values(&[kind, origin]).inc();
        }
    }

    /// Whether the store answers and the root is there (for `/healthz`).
    pub fn healthy(&self) -> bool {
        self.store.get("").is_ok() && self.root.join("snapshots").is_dir()
    }

    /// The mounts of a snapshot whose record is `record`, as containerd's overlayfs snapshotter
    /// builds them. A merged remote layer's mount holds the layers below it too: the lower
    /// directories end there.
    pub(crate) fn mounts_of(&self, record: &Record) -> Result<Vec<Mount>> {
        let mut lowers: Vec<String> = Vec::new();
        for lower in self.chain(record.parent.as_deref())? {
            lowers.push(self.fs_dir(lower.id).display().to_string());
            if lower.remote.as_ref().is_some_and(|source| source.merged) {
                break;
            }
        }
        let own = self.fs_dir(record.id).display().to_string();
        let bind = |source: String, mode: &str| Mount {
            kind: "bind".into(),
            source,
            options: vec![mode.into(), "rbind".into()],
        };
        Ok(match (record.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(own, "rw")],
            (Kind::Active, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", self.work_dir(record.id).display()),
                    format!("upperdir={own}"),
                    format!("lowerdir={}", lowers.join(":")),
                ],
            }],
            (_, 0) => vec![bind(own, "ro")],
            (_, 1) => vec![bind(lowers[0].clone(), "ro")],
            (_, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", lowers.join(":"))],
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Fields, Filter};

    fn info(parent: Option<&str>) -> Info {
        Info {
            name: "remote/1/sha256:abc".into(),
            parent: parent.map(str::to_owned),
            kind: Kind::Committed,
            labels: [(
                "containerd.io/snapshot.ref".to_owned(),
                "sha256:abc".to_owned(),
            )]
            .into(),
            created: Timestamp::default(),
            updated: Timestamp::default(),
        }
    }

    #[test]
    fn containerds_adoption_filter_matches_a_parentless_remote_snapshot() {
        // The filter containerd's metadata snapshotter walks with after AlreadyExists.
        let filter =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#).unwrap();
        assert!(filter.matches(&info(None)));
        assert!(!filter.matches(&info(Some("x"))));
        assert_eq!(
            info(None).field(&["kind".into()]).as_deref(),
            Some("committed")
        );
    }
    #[test]
    fn cleanup_leaves_the_directories_of_snapshots_being_created() {
        let root = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::open(root.path(), None).unwrap();
        snapshotter
            .create(Kind::Active, "kept", None, BTreeMap::new())
            .unwrap();
        // A snapshot whose record is not committed yet, and a leftover.
        let (being_created, leftover) =
            (snapshotter.snapshot_dir(90), snapshotter.snapshot_dir(91));
        std::fs::create_dir_all(being_created.join("fs")).unwrap();
        std::fs::create_dir_all(leftover.join("fs")).unwrap();
        let guard = snapshotter.creating(90);
        snapshotter.cleanup().unwrap();
        assert!(being_created.exists(), "removed while being created");
        assert!(!leftover.exists(), "a leftover was kept");
        drop(guard);
        snapshotter.cleanup().unwrap();
        assert!(!being_created.exists(), "kept after its creation failed");
        let record = snapshotter.record("kept").unwrap();
        assert!(
            snapshotter.snapshot_dir(record.id).exists(),
            "a committed snapshot was removed"
        );
    }
}
