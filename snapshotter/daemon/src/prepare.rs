//! Prepare and View: new active or view snapshots, and the remote-layer path of Prepare.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result};
use crate::remote::{LayerRequest, TARGET_LABEL};
use crate::snapshotter::{Mount, Snapshotter};
use crate::store::{Kind, Record, Timestamp};

impl Snapshotter {
    /// Prepare: an active snapshot on top of `parent`. With the labels containerd sends while
    /// pulling an image (`containerd.io/snapshot.ref` and an image reference and layer digest)
    /// and a streaming artifact for that image, the layer is mounted remotely and committed
    /// under a new name instead; the answer is then AlreadyExists, which tells containerd to skip
    /// downloading and unpacking it. Any failure of the remote path falls back to an ordinary
    /// prepare, so containerd pulls as usual.
    pub async fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let (Some(remote), Some(target), Some(request)) = (
            &self.remote,
            labels.get(TARGET_LABEL),
            LayerRequest::from_labels(&labels),
        ) {
            let lock_key = format!("{target}\u{0}{}", parent.unwrap_or(""));
            let _guard = self.remote_locks.lock(&lock_key).await;
            // Already there (another namespace, or a retried pull): containerd finds it by label.
            let existing = self
                .store
                .write(|tx| tx.find_committed(TARGET_LABEL, target, parent))?;
            if let Some(existing) = existing {
                tracing::debug!(target, existing, "remote snapshot exists");
                return Err(Error::AlreadyExists {
                    key: target.clone(),
                });
            }
            match self
                .prepare_remote(remote, target, parent, &labels, &request)
                .await
            {
                Ok(name) => {
                    tracing::info!(layer = %request.layer_digest, snapshot = name, "layer mounted remotely");
                    return Err(Error::AlreadyExists {
                        key: target.clone(),
                    });
                }
                Err(error) => remote.note_fallback(&request, &error),
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    /// View: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    pub(crate) fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let parent_owner = match parent {
            Some(parent) => Some(self.owner_of_parent(parent)?),
            None => None,
        };
        // Held until the record is committed (after the write below returns).
        let mut creating = None;
        let record = self.store.write(|tx| {
            if tx.get(key)?.is_some() {
                return Err(Error::AlreadyExists {
                    key: key.to_owned(),
                });
            }
            if let Some(parent) = parent {
                let parent_record = tx.get(parent)?.ok_or_else(|| Error::NotFound {
                    key: parent.to_owned(),
                })?;
                if parent_record.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {parent:?} is not committed"
                    )));
                }
            }
            let now = Timestamp::now();
            let record = Record {
                id: tx.next_id()?,
                kind,
                parent: parent.map(str::to_owned),
                labels,
                created: now,
                updated: now,
                usage: None,
                remote: None,
            };
            creating = Some(self.creating(record.id));
            self.make_dirs(&record, parent_owner)?;
            tx.put(key, &record)?;
            Ok(record)
        })?;
        drop(creating);
        self.mounts_of(&record)
    }

    /// Creates the snapshot's directories. An active snapshot's upper dir takes the owner of
    /// its parent's root directory, as containerd's overlayfs snapshotter does (user namespaces
    /// need it).
    fn make_dirs(&self, record: &Record, owner: Option<(u32, u32)>) -> Result<()> {
        let fs = self.fs_dir(record.id);
        std::fs::create_dir_all(&fs).map_err(Error::io("creating", &fs))?;
        if record.kind == Kind::Active {
            let work = self.work_dir(record.id);
            std::fs::create_dir_all(&work).map_err(Error::io("creating", &work))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&fs, Some(uid), Some(gid))
                    .map_err(Error::io("changing the owner of", &fs))?;
            }
        }
        Ok(())
    }

    fn owner_of_parent(&self, parent: &str) -> Result<(u32, u32)> {
        let record = self.record(parent)?;
        let dir = self.fs_dir(record.id);
        let meta = std::fs::metadata(&dir).map_err(Error::io("reading the owner of", &dir))?;
        Ok((meta.uid(), meta.gid()))
    }

    /// Mounts the layer remotely and records it as a committed snapshot named
    /// `remote/<id>/<target>`, labelled with the target so containerd's lookup finds it.
    async fn prepare_remote(
        &self,
        remote: &std::sync::Arc<crate::remote::RemoteLayers>,
        target: &str,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
        request: &LayerRequest,
    ) -> Result<String> {
        // The snapshots below, nearest first, when they are all merged remote layers.
        let lowers = match parent {
            Some(parent) => {
                let parent_record = self.record(parent)?;
                if parent_record.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {parent:?} is not committed"
                    )));
                }
                match &parent_record.remote {
                    // Its mount holds the layers below it: their ids are only needed then.
                    Some(source) if source.merged => {
                        let below = self.chain(parent_record.parent.as_deref())?;
                        let ids =
                            std::iter::once(parent_record.id).chain(below.iter().map(|r| r.id));
                        Some(ids.collect::<Vec<_>>())
                    }
                    _ => None,
                }
            }
            None => Some(Vec::new()),
        };
        let id = self.store.write(|tx| tx.next_id())?;
        // The mount takes network round trips; Cleanup must leave its directory alone.
        let _creating = self.creating(id);
        let dir = self.snapshot_dir(id);
        let mounted = remote.mount(id, &dir, request, lowers.as_deref()).await;
        let source = match mounted {
            Ok(source) => source,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error.into());
            }
        };
        let name = format!("remote/{id}/{target}");
        let now = Timestamp::now();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
            created: now,
            updated: now,
            usage: Some(Default::default()),
            remote: Some(source),
        };
        let stored = self.store.write(|tx| {
            if tx.get(&name)?.is_some() {
                return Err(Error::AlreadyExists { key: name.clone() });
            }
            tx.put(&name, &record)
        });
        if let Err(error) = stored {
            remote.unmount(id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        Ok(name)
    }
}
