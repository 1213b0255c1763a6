//! Resolving a layer: its TOC fetched, decoded, checked against the image and indexed, and its
//! share of the start-up profile planned. Only then can a layer be mounted.
//!
//! containerd prepares an image's layers one after another, and each Prepare used to resolve
//! its own layer: one TOC round trip per layer on the pull's critical path, and a profile whose
//! chunks for the upper layers were only asked for once the lower ones were mounted. Now the
//! image's first Prepare resolves every other layer of its artifact at once, in the background
//! ([`RemoteLayers::resolve_ahead`]): their TOCs travel in parallel, and each layer's profile
//! chunks are asked for as soon as its TOC is checked, so the link fills with what the
//! start-up reads while containerd is still preparing. The later Prepares take their layer
//! ready ([`Ahead::take`]); a layer whose resolution failed is resolved again by its Prepare,
//! which then reports the error as before.
//!
//! What waits for a Prepare is bounded: at most [`MAX_AHEAD_LAYERS`] layers and
//! [`MAX_AHEAD_TOC_BYTES`] of TOCs per image are resolved ahead, and at most
//! [`MAX_AHEAD_INDEX_BYTES`] of layer indexes are held on the node (a layer past it is left to
//! its Prepare); what a Prepare never takes (the pull was cancelled) is dropped after
//! [`AHEAD_TTL`]. Their prefetch stays within the image's budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streamsnap_cache::BlobSource;
use streamsnap_format::{Digest, Toc};
use streamsnap_fs::{FsOptions, LayerIndex};
use tokio::sync::{OwnedMutexGuard, Semaphore};

use super::spans::SpanTable;
use super::{
    Artifact, ArtifactKind, Fresh, MAX_TOC_BLOB, RemoteError, RemoteLayers, batch_bytes,
    plan_within_budget,
};
use crate::store::{CheckpointsBlob, RemoteSource};

/// Most layers of one image resolved ahead of their Prepare.
const MAX_AHEAD_LAYERS: usize = 64;
/// Most TOC bytes (compressed, as the artifact lists them) one image resolves ahead.
const MAX_AHEAD_TOC_BYTES: u64 = 64 << 20;
/// Most bytes of layer indexes held for Prepares on the node.
const MAX_AHEAD_INDEX_BYTES: u64 = 128 << 20;
/// TOCs fetched at once by one image's resolution ahead.
const AHEAD_FETCHES: usize = 8;
/// How long a layer whose TOC is in waits for the image's start-up profile by default
/// (`[fetch] profile_wait_seconds`): a registry that stalls the profile delays a pull by this
/// much, not by its request timeouts and retries.
pub const DEFAULT_PROFILE_WAIT: Duration = Duration::from_secs(5);
/// A layer resolved ahead and not taken by a Prepare within this is dropped.
pub(super) const AHEAD_TTL: Duration = Duration::from_secs(120);

/// A layer ready to mount.
pub(super) struct Resolved {
    /// The TOC blob, saved beside the snapshot so a restart needs no network.
    pub toc_blob: Bytes,
    pub source: RemoteSource,
    /// What its first mount starts with.
    pub fresh: Fresh,
    /// Its index's share of [`MAX_AHEAD_INDEX_BYTES`] while it waits for its Prepare.
    pub held: Option<Held>,
}

/// Index bytes counted as held for a Prepare until dropped.
pub(super) struct Held {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A layer's blob source and the switch that stops its background fetches (set when the
/// layer is unmounted).
#[derive(Clone)]
pub(super) struct Feed {
    pub blob: Arc<dyn BlobSource>,
    pub stop: Arc<AtomicBool>,
}

/// Layers being resolved, or resolved, ahead of their Prepare: by artifact and layer.
#[derive(Default)]
pub(super) struct Ahead {
    slots: Mutex<HashMap<(Digest, Digest), Slot>>,
    /// Index bytes held for Prepares.
    held: Arc<AtomicU64>,
}

struct Slot {
    made: Instant,
    /// Locked by the resolution until it is done; then holds the layer (`None`: it failed).
    result: Arc<tokio::sync::Mutex<Option<Resolved>>>,
}

impl Ahead {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(Digest, Digest), Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `layer` of `artifact` for a resolution ahead: the guard to put it in, or `None`
    /// when it is claimed already. Drops what waited past [`AHEAD_TTL`].
    fn claim(&self, artifact: Digest, layer: Digest) -> Option<OwnedMutexGuard<Option<Resolved>>> {
        let mut slots = self.slots();
        slots.retain(|_, slot| slot.made.elapsed() < AHEAD_TTL);
        if slots.contains_key(&(artifact, layer)) {
            return None;
        }
        let result = Arc::new(tokio::sync::Mutex::new(None));
        let guard = result
            .clone()
            .try_lock_owned()
            .expect("nobody else has it yet");
        let made = Instant::now();
        slots.insert((artifact, layer), Slot { made, result });
        Some(guard)
    }

    /// Counts `bytes` of index as held, if that stays within [`MAX_AHEAD_INDEX_BYTES`].
    fn hold(&self, bytes: u64) -> Option<Held> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held + bytes <= MAX_AHEAD_INDEX_BYTES).then_some(held + bytes)
            })
            .ok()?;
        Some(Held {
            bytes,
            total: self.held.clone(),
        })
    }

    /// The layer resolved ahead, waiting for its resolution if it is still running; `None`
    /// when it was not resolved ahead or that failed.
    pub async fn take(&self, artifact: Digest, layer: Digest) -> Option<Resolved> {
        let slot = self.slots().remove(&(artifact, layer))?;
        slot.result.lock().await.take()
    }

    /// Layers held or being resolved (for tests and the debug figures).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots().len()
    }
}

impl RemoteLayers {
    /// Fetches, decodes and checks `layer`'s TOC, indexes it and plans its profile's batches.
    pub(super) async fn resolve(
        &self,
        artifact: &Artifact,
        layer: Digest,
    ) -> Result<Resolved, RemoteError> {
        let (toc_descriptor, data_descriptor) = artifact.layer(&layer)?;
        let repo = &artifact.repository;
        // The client checks the blob against the digest the artifact manifest pins.
        let blob = self
            .client
            .get_blob_bytes(repo, &toc_descriptor.digest, MAX_TOC_BLOB)
            .await?;
        // The profile has been on its way (in a task of its own) beside the TOC. It is only a
        // hint: a layer waits for it `profile_wait` at most, then reads on demand.
        let profile = if self.prefetch {
            tokio::time::timeout(self.profile_wait, artifact.profile())
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(%layer, waited = ?self.profile_wait, "the image's start-up profile has not arrived; this layer is mounted without its prefetch (see [fetch] profile_wait_seconds)");
                    None
                })
        } else {
            None
        };
        // One decode at a time, off the runtime's threads: a TOC at the limits costs up to the
        // format's decode budget while it is decoded, and two at once would cost twice that.
        let _one_at_a_time = self.toc_decodes.acquire().await.expect("never closed");
        let toc = {
            let blob = blob.clone();
            tokio::task::spawn_blocking(move || Toc::decode(&blob))
                .await
                .expect("TOC decoding does not panic")
        }
        .map_err(|source| RemoteError::Toc { layer, source })?;
        if let Err(error) = artifact.expect_claims(
            toc_descriptor.digest,
            layer,
            toc.layer_digest(),
            toc.diff_id(),
        ) {
            self.artifacts.reject(artifact, error.to_string());
            return Err(error);
        }
        // The chunked kind's TOC names the artifact's data blob; the index kind's, the layer
        // itself (checked by the format) and the artifact's checkpoints blob.
        let (data_digest, data_size, checkpoints) = match (artifact.kind, toc.checkpoints_blob()) {
            (ArtifactKind::Chunked, None)
                if toc.data_digest() == data_descriptor.digest
                    && toc.data_size() == data_descriptor.size =>
            {
                (data_descriptor.digest, data_descriptor.size, None)
            }
            (ArtifactKind::Index, Some((digest, size)))
                if digest == data_descriptor.digest && size == data_descriptor.size =>
            {
                (
                    toc.data_digest(),
                    toc.data_size(),
                    Some(CheckpointsBlob { digest, size }),
                )
            }
            _ => {
                return Err(RemoteError::InvalidArtifact {
                    artifact: artifact.digest,
                    reason: format!(
                        "TOC {} names another data blob than the manifest, or is of another kind",
                        toc_descriptor.digest
                    ),
                });
            }
        };
        let spans = SpanTable::of_toc(&toc);
        // The layer's index: what the mount serves from, saved beside the TOC so the layer can
        // drop it when idle and load it again (and a restart mount it) without decoding.
        let toc = Arc::new(toc);
        let index = {
            let toc = toc.clone();
            let toc_digest = toc_descriptor.digest;
            tokio::task::spawn_blocking(move || {
                LayerIndex::build(&toc, toc_digest, &FsOptions::default())
            })
            .await
            .expect("building a layer index does not panic")
        }
        .map_err(|source| RemoteError::Fs { layer, source })?;
        let prefetch = match &profile {
            Some(profile) => profile.layer(&layer).map(|listed| {
                plan_within_budget(
                    &*toc,
                    listed,
                    self.prefetch_budget(),
                    artifact.prefetch_planned(),
                )
            }),
            _ => None,
        };
        // The decoded TOC goes now: the mount keeps only the index.
        drop(toc);
        drop(_one_at_a_time);
        tokio::task::spawn_blocking(streamsnap_fs::trim_heap);
        Ok(Resolved {
            toc_blob: blob,
            source: RemoteSource {
                registry: repo.registry.clone(),
                repository: repo.name.clone(),
                layer_digest: layer,
                toc_digest: toc_descriptor.digest,
                data_digest,
                data_size,
                checkpoints,
                // Set by the mount, which decides.
                merged: false,
            },
            fresh: Fresh {
                index,
                spans,
                prefetch,
                feed: None,
            },
            held: None,
        })
    }

    /// At the first Prepare of `artifact`'s image (the one for `requested`): resolves its
    /// other layers in the background, each starting its profile's prefetch as soon as it is
    /// checked. Layers mounted already are left out (containerd will not prepare them).
    pub(super) fn resolve_ahead(self: &Arc<Self>, artifact: &Arc<Artifact>, requested: Digest) {
        if !artifact.begin_resolving_ahead(AHEAD_TTL) {
            return;
        }
        let mounted: Vec<Digest> = {
            let mounts = self.mounts.lock().expect("mounts lock");
            mounts.values().map(|entry| entry.layer).collect()
        };
        let fetches = Arc::new(Semaphore::new(AHEAD_FETCHES));
        let mut toc_bytes = 0;
        let mut started = 0;
        for &layer in artifact.layer_order() {
            if layer == requested || mounted.contains(&layer) {
                continue;
            }
            let Ok((toc, _)) = artifact.layer(&layer) else {
                continue;
            };
            toc_bytes += toc.size;
            started += 1;
            if started > MAX_AHEAD_LAYERS || toc_bytes > MAX_AHEAD_TOC_BYTES {
                // The rest resolve at their own Prepare, as before.
                tracing::debug!(artifact = %artifact.digest, "not resolving more layers ahead");
                break;
            }
            let Some(slot) = self.ahead.claim(artifact.digest, layer) else {
                continue;
            };
            let (this, artifact, fetches) = (self.clone(), artifact.clone(), fetches.clone());
            let span = tracing::debug_span!("resolve_ahead", %layer);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _fetch = fetches.acquire().await.expect("never closed");
                    this.resolve_into(&artifact, layer, slot).await;
                },
                span,
            ));
        }
    }

    /// Resolves `layer` into `slot` and starts its profile's prefetch.
    async fn resolve_into(
        &self,
        artifact: &Artifact,
        layer: Digest,
        mut slot: OwnedMutexGuard<Option<Resolved>>,
    ) {
        let mut resolved = match self.resolve(artifact, layer).await {
            Ok(resolved) => resolved,
            Err(error) => {
                // Its Prepare resolves it again and reports what goes wrong.
                tracing::debug!(error = %crate::error::chain(&error), "resolving a layer ahead failed");
                return;
            }
        };
        let fresh = &mut resolved.fresh;
        let Some(held) = self.ahead.hold(fresh.index.len_bytes()) else {
            tracing::debug!(
                "the indexes held for Prepares are at their cap; this layer resolves at its own"
            );
            // Its Prepare plans its profile again: give back what this plan took.
            if let Some(batches) = &fresh.prefetch {
                artifact
                    .prefetch_planned()
                    .fetch_sub(batch_bytes(batches), Ordering::SeqCst);
            }
            return;
        };
        if let Some(batches) = fresh.prefetch.take() {
            match self.feed(&resolved.source, fresh.spans.clone()) {
                Ok(feed) => {
                    self.start_prefetch(&resolved.source, &feed, batches);
                    fresh.feed = Some(feed);
                }
                Err(error) => {
                    tracing::debug!(%error, "no prefetch ahead of the mount");
                    fresh.prefetch = Some(batches);
                }
            }
        }
        resolved.held = Some(held);
        *slot = Some(resolved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::fake;

    fn resolved() -> Resolved {
        let (toc, _) = fake::layer(2, 1024, false);
        let digest = Digest::sha256(b"toc");
        let index = LayerIndex::build(&toc, digest, &FsOptions::default()).unwrap();
        Resolved {
            toc_blob: Bytes::from_static(b"toc"),
            source: RemoteSource {
                registry: "r:5000".into(),
                repository: "app".into(),
                layer_digest: toc.layer_digest(),
                toc_digest: digest,
                data_digest: toc.data_digest(),
                data_size: toc.data_size(),
                checkpoints: None,
                merged: false,
            },
            fresh: Fresh {
                index,
                spans: None,
                prefetch: None,
                feed: None,
            },
            held: None,
        }
    }

    #[tokio::test]
    async fn a_prepare_waits_for_its_layer_resolved_ahead_and_takes_it_once() {
        let ahead = Ahead::default();
        let (artifact, layer) = (Digest::sha256(b"artifact"), Digest::sha256(b"layer"));
        let mut slot = ahead.claim(artifact, layer).unwrap();
        assert!(
            ahead.claim(artifact, layer).is_none(),
            "claimed twice: it would be resolved twice"
        );
        // The Prepare comes while the resolution runs: it waits for it.
        let resolving = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            *slot = Some(resolved());
        });
        let taken = ahead.take(artifact, layer).await.expect("resolved ahead");
        assert_eq!(taken.source.registry, "r:5000");
        resolving.await.unwrap();
        assert_eq!(ahead.len(), 0, "a taken layer is no longer held");
        // A second Prepare of the layer (it was removed and pulled again) resolves it itself.
        assert!(ahead.take(artifact, layer).await.is_none());
    }

    #[tokio::test]
    async fn a_failed_resolution_ahead_leaves_the_prepare_to_resolve_its_layer() {
        let ahead = Ahead::default();
        let (artifact, layer) = (Digest::sha256(b"artifact"), Digest::sha256(b"layer"));
        let slot = ahead.claim(artifact, layer).unwrap();
        drop(slot); // failed: nothing put in
        assert!(ahead.take(artifact, layer).await.is_none());
        // Another image's layer is its own slot.
        let _other = ahead.claim(Digest::sha256(b"other"), layer).unwrap();
        assert_eq!(ahead.len(), 1);
    }

    #[test]
    fn indexes_held_for_prepares_stay_within_their_cap_until_dropped() {
        let ahead = Ahead::default();
        let most = ahead.hold(MAX_AHEAD_INDEX_BYTES - 10).unwrap();
        assert!(ahead.hold(11).is_none(), "past the cap");
        let small = ahead.hold(10).unwrap();
        assert!(ahead.hold(1).is_none());
        drop(most);
        assert!(ahead.hold(MAX_AHEAD_INDEX_BYTES - 10).is_some());
        drop(small);
        assert_eq!(ahead.held.load(Ordering::SeqCst), 0);
    }
}
