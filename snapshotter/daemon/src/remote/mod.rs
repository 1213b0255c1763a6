//! Remote layers: from the labels containerd sends on Prepare to a FUSE-mounted streaming layer.
//!
//! Discovery (image -> manifest -> streaming artifact -> the layer's TOC) goes through the
//! registry client; content is read through the chunk cache. A failure anywhere is a
//! [`RemoteError`]: the caller falls back to an ordinary prepare and containerd pulls as usual.

mod artifact;
mod background;
#[cfg(test)]
mod fake;
mod labels;
mod profile;
mod registry_blob;
mod resolve;
mod source;
mod spans;
mod trust;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamsnap_cache::{ChunkCache, ChunkRef};
use streamsnap_format::{Digest, LayerProfile, Profile};
use streamsnap_fs::{
    ChunkTable, FsOptions, FuseConnection, IndexFile, KernelFeature, KernelFeatures, Layer,
    LayerIndex, MetadataCache, MetadataConfig,
};
use streamsnap_holder::HolderClient;
use streamsnap_registry::{Client, Repository};

pub use self::artifact::{Artifact, ArtifactCache, ArtifactKind};
use self::background::Background;
pub use self::background::BackgroundConfig;
pub use self::labels::{LayerRequest, TARGET_LABEL};
use self::profile::{AccessLog, LayerJob, Prefetcher};
pub use self::registry_blob::DEFAULT_MIRROR_MAX_SKIP;
use self::registry_blob::{MirrorHealth, RegistryBlob};
pub use self::resolve::DEFAULT_PROFILE_WAIT;
use self::resolve::{Ahead, Feed, Resolved};
use self::source::CacheReader;
use self::spans::{GzipSpans, SpanTable};

/// The span table of a layer of the index kind, beside its TOC.
const SPANS_FILE: &str = "spans";
pub use self::trust::TrustPolicy;
use crate::metrics::Metrics;
use crate::mounter::{MountedFs, Mounter};
use crate::store::RemoteSource;

/// Largest TOC blob fetched (compressed): a TOC at the format's entry cap compresses to well
/// under this (docs/format.md, "Limits").
const MAX_TOC_BLOB: u64 = 128 << 20;
/// Most decoded bytes one image's start-up profile prefetches by default (`[fetch]
/// prefetch_max_bytes`).
pub const DEFAULT_PREFETCH_MAX_BYTES: u64 = 1 << 30;
/// The default and the largest `[fetch] prefetch_in_flight_bytes`.
pub use profile::{
    DEFAULT_IN_FLIGHT as DEFAULT_PREFETCH_IN_FLIGHT, MAX_IN_FLIGHT as MAX_PREFETCH_IN_FLIGHT,
};
/// The default and the largest `[fetch] readahead_after_miss_bytes`.
pub use source::{DEFAULT_READAHEAD_AFTER_MISS, MAX_READAHEAD_AFTER_MISS};
/// A fallback is logged once per image per this period.
const FALLBACK_LOG_PERIOD: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid image reference in labels: {0}")]
    Reference(#[source] streamsnap_registry::Error),
    #[error(
        "{image}: no streaming artifact (convert it with `streamsnap artifact-streaming create`)"
    )]
    NoArtifact { image: String },
    #[error("{image}: no linux/amd64 manifest in the index")]
    NoPlatform { image: String },
    #[error("streaming artifact {artifact} does not cover layer {layer}")]
    LayerNotInArtifact { artifact: Digest, layer: Digest },
    #[error("streaming artifact {artifact} is malformed: {reason}")]
    InvalidArtifact { artifact: Digest, reason: String },
    /// The artifact's claims do not match the image it is used for: not a mount, ever.
    #[error("streaming artifact {artifact} does not match the image: {reason}")]
    ArtifactMismatch { artifact: Digest, reason: String },
    #[error("image manifest {manifest} cannot be used: {reason}")]
    InvalidImage { manifest: Digest, reason: String },
    /// A `[verify]` policy is set and the manifest has no signature by a trusted key.
    #[error("{manifest} is not signed by a trusted key: {reason}")]
    Unsigned { manifest: Digest, reason: String },
    #[error(transparent)]
    Registry(#[from] streamsnap_registry::Error),
    #[error("TOC of layer {layer} is invalid")]
    Toc {
        layer: Digest,
        #[source]
        source: streamsnap_format::Error,
    },
    #[error("layer {layer} cannot be presented")]
    Fs {
        layer: Digest,
        #[source]
        source: streamsnap_fs::Error,
    },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Batches of a layer's chunks to prefetch, each with the rank of its first read.
type Batches = Vec<(u64, Vec<ChunkRef>)>;

/// What a layer's resolution made for its first mount.
struct Fresh {
    index: LayerIndex,
    spans: Option<SpanTable>,
    /// Batches of its profile to fetch now.
    prefetch: Option<Batches>,
    /// Its feed, when its prefetch started before the mount.
    feed: Option<Feed>,
}

/// A mounted layer, the switch that stops its background fetch and prefetch, and what its
/// first reads touched.
struct MountEntry {
    fs: Box<dyn MountedFs>,
    stop: Arc<AtomicBool>,
    layer: Digest,
    log: Arc<AccessLog>,
    /// What the mount serves of its own layer: the merged mounts of the layers above read it.
    served: Arc<Layer>,
}

pub struct RemoteLayers {
    client: Client,
    cache: Arc<ChunkCache>,
    mounter: Arc<dyn Mounter>,
    artifacts: ArtifactCache,
    /// Layers resolved ahead of their Prepare (at their image's first one).
    ahead: Ahead,
    /// Mirrors by registry host, tried first for blob reads.
    mirrors: HashMap<String, Vec<String>>,
    /// Most bytes of a mirror's whole-blob answer to a range read read through before the
    /// range (`[fetch] mirror_max_skip_bytes`).
    mirror_max_skip: u64,
    /// Which mirrors failed, shared by every blob of the node: a mirror that stalls costs one
    /// timeout, not one per layer.
    mirror_health: Arc<MirrorHealth>,
    background: Background,
    mounts: Mutex<HashMap<u64, MountEntry>>,
    fallback_logged: Mutex<HashMap<String, Instant>>,
    metrics: Metrics,
    /// Keeps a descriptor of every FUSE connection so mounts outlive this process.
    holder: Option<HolderClient>,
    /// Compressed bytes fetched ahead after a read that missed the cache.
    readahead_bytes: u64,
    /// Compressed bytes fetched ahead after a random read that missed the cache.
    readahead_after_miss_bytes: u64,
    /// Fetch the chunks an image's start-up profile lists as soon as its layers mount.
    prefetch: bool,
    /// Most decoded bytes one image's profile may prefetch, over all its layers.
    prefetch_max_bytes: u64,
    prefetcher: Arc<Prefetcher>,
    /// Orders first reads across every layer (the ranks of a recorded profile).
    reads: Arc<AtomicU64>,
    /// TOCs decoded at once.
    toc_decodes: tokio::sync::Semaphore,
    /// The mounted layers' metadata in memory: loaded when used, dropped when idle.
    metadata: Arc<MetadataCache>,
    /// The optional kernel FUSE features the daemon may use (the mounter's mounts use the
    /// same); here for RESEND, which the daemon itself sends.
    kernel_features: KernelFeatures,
    /// Whether the features in use were logged (once, at the first mount: only a mount tells
    /// what the kernel offers).
    features_logged: AtomicBool,
    /// Mount each layer merged with the layers below it (`[fuse] merge_layers`).
    merge_layers: bool,
    /// How long a layer whose TOC is in waits for its image's profile.
    profile_wait: Duration,
    /// `[fuse] passthrough_min_file_bytes` where passthrough is on: a layer worth passthrough
    /// is mounted alone (a merged mount decides passthrough for all its files at once).
    passthrough_min_file_bytes: Option<u64>,
}

impl std::fmt::Debug for RemoteLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLayers")
            .field("mirrors", &self.mirrors)
            .finish_non_exhaustive()
    }
}

impl RemoteLayers {
    pub fn new(
        client: Client,
        cache: Arc<ChunkCache>,
        mounter: Arc<dyn Mounter>,
        mirrors: HashMap<String, Vec<String>>,
        background: BackgroundConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            artifacts: ArtifactCache::new(client.clone()),
            ahead: Ahead::default(),
            client,
            cache,
            mounter,
            mirrors,
            mirror_max_skip: DEFAULT_MIRROR_MAX_SKIP,
            mirror_health: Arc::new(MirrorHealth::with_metrics(registry_blob::MirrorMetrics {
                down: metrics.mirror_down.clone(),
                failures: metrics.mirror_failures.clone(),
            })),
            background: Background::new(background),
            mounts: Mutex::new(HashMap::new()),
            fallback_logged: Mutex::new(HashMap::new()),
            prefetcher: Prefetcher::new(metrics.clone(), DEFAULT_PREFETCH_IN_FLIGHT),
            metrics,
            holder: None,
            readahead_bytes: 0,
            readahead_after_miss_bytes: 0,
            prefetch: false,
            prefetch_max_bytes: DEFAULT_PREFETCH_MAX_BYTES,
            reads: Arc::default(),
            toc_decodes: tokio::sync::Semaphore::new(1),
            metadata: MetadataCache::new(
                MetadataConfig::default(),
                streamsnap_fs::Metrics::unregistered(),
            ),
            kernel_features: KernelFeatures::all(),
            features_logged: AtomicBool::new(false),
            merge_layers: false,
            passthrough_min_file_bytes: None,
            profile_wait: resolve::DEFAULT_PROFILE_WAIT,
        }
    }

    /// A layer whose TOC is in waits at most `wait` for its image's start-up profile, then
    /// mounts without the prefetch.
    pub fn with_profile_wait(mut self, wait: Duration) -> Self {
        self.profile_wait = wait;
        self
    }

    /// Mounts each layer merged with the layers below it where they allow (all remote and
    /// merged in turn, no layer worth passthrough with `passthrough_min_file_bytes`, at most
    /// [`streamsnap_fs::MAX_MERGED_LAYERS`]), so a container's overlay has one lower directory.
    pub fn with_merged_mounts(
        mut self,
        enabled: bool,
        passthrough_min_file_bytes: Option<u64>,
    ) -> Self {
        self.merge_layers = enabled;
        self.passthrough_min_file_bytes = passthrough_min_file_bytes;
        self
    }

    /// The layers the mounts of snapshots `ids` serve, in that order; `None` if one is not
    /// mounted by this process.
    fn served_layers(&self, ids: &[u64]) -> Option<Vec<Arc<Layer>>> {
        let mounts = self.mounts.lock().expect("mounts lock");
        ids.iter()
            .map(|id| mounts.get(id).map(|entry| Arc::clone(&entry.served)))
            .collect()
    }

    /// The layers a new mount of a layer whose index is `index` merges with it, given the
    /// snapshots below it (`lowers`: nearest first, `None` when they are not all merged
    /// remote layers); `None`: mounted alone.
    fn merge_with(&self, index: &LayerIndex, lowers: Option<&[u64]>) -> Option<Vec<Arc<Layer>>> {
        let lowers = lowers.filter(|_| self.merge_layers)?;
        if lowers.len() >= streamsnap_fs::MAX_MERGED_LAYERS {
            return None;
        }
        if self
            .passthrough_min_file_bytes
            .is_some_and(|min| index.worth_passthrough(min))
        {
            return None;
        }
        self.served_layers(lowers)
    }

    /// Uses only the optional kernel FUSE features `features` allows; give the mounter the
    /// same in its `MountOptions`.
    pub fn with_kernel_features(mut self, features: KernelFeatures) -> Self {
        self.kernel_features = features;
        self
    }

    /// Whether a takeover after a crash may ask the kernel to resend (where it can): off, the
    /// layers are mounted afresh as on a kernel without RESEND.
    pub fn resend_allowed(&self) -> bool {
        self.kernel_features.allows(KernelFeature::Resend)
    }

    /// Keeps the mounted layers' metadata in `cache` (its idle period and budget), instead of
    /// one with the defaults counting into metrics exported nowhere.
    pub fn with_metadata(mut self, cache: Arc<MetadataCache>) -> Self {
        self.metadata = cache;
        self
    }

    pub fn metadata(&self) -> &Arc<MetadataCache> {
        &self.metadata
    }

    /// Use only artifacts (and follow only profiles) signed by a key of `policy`.
    pub fn with_trust(mut self, policy: TrustPolicy) -> Self {
        self.artifacts = self.artifacts.with_trust(policy);
        self
    }

    /// When an image has a start-up profile, fetch the chunks it lists as soon as each layer
    /// is mounted, instead of one read at a time: at most `max_bytes` (decoded) per image, and
    /// never more than a quarter of the cache's capacity, with about `in_flight` compressed
    /// bytes of requests in flight node-wide.
    pub fn with_prefetch(mut self, enabled: bool, max_bytes: u64, in_flight: u64) -> Self {
        self.prefetch = enabled;
        self.prefetch_max_bytes = max_bytes;
        self.prefetcher = Prefetcher::new(self.metrics.clone(), in_flight);
        self
    }

    /// What one image's profile may prefetch in all, in decoded bytes.
    fn prefetch_budget(&self) -> u64 {
        self.prefetch_max_bytes.min(self.cache.capacity_bytes() / 4)
    }

    /// What the reads of every mounted layer touched within [`profile::RECORD_WINDOW`] of its
    /// mount: a start-up profile of whatever ran on this node (layers mounted more than once
    /// are listed once, in the order of their first mount).
    pub fn profile(&self) -> Profile {
        let mounts = self.mounts.lock().expect("mounts lock");
        let mut entries: Vec<(&u64, &MountEntry)> = mounts.iter().collect();
        entries.sort_by_key(|(id, _)| **id);
        // Per layer: each chunk with its earliest rank over the layer's mounts.
        let mut by_layer: Vec<(Digest, HashMap<u32, u64>)> = Vec::new();
        for (_, entry) in entries {
            let index = match by_layer.iter().position(|(l, _)| *l == entry.layer) {
                Some(index) => index,
                None => {
                    by_layer.push((entry.layer, HashMap::new()));
                    by_layer.len() - 1
                }
            };
            entry.log.merge_into(&mut by_layer[index].1);
        }
        let layers = by_layer
            .into_iter()
            .map(|(layer, ranks)| {
                let ranked = profile::ranked(&ranks);
                LayerProfile {
                    layer,
                    chunks: ranked.iter().map(|&(c, _)| c).collect(),
                    ranks: ranked.iter().map(|&(_, r)| r).collect(),
                }
            })
            .filter(|l| !l.chunks.is_empty())
            .collect();
        Profile::new(layers)
    }

    /// After a read that had to go to the network, fetch up to `bytes` (compressed) of the
    /// chunks that follow in the background.
    pub fn with_readahead(mut self, bytes: u64) -> Self {
        self.readahead_bytes = bytes;
        self
    }

    /// After a read that is not sequential and misses the cache, fetch up to `bytes`
    /// (compressed) of the chunks that follow in the background (0: off).
    pub fn with_readahead_after_miss(mut self, bytes: u64) -> Self {
        self.readahead_after_miss_bytes = bytes;
        self
    }

    /// Reads through at most `bytes` of a mirror's whole-blob answer to a range read before
    /// going to the next source.
    pub fn with_mirror_max_skip(mut self, bytes: u64) -> Self {
        self.mirror_max_skip = bytes;
        self
    }

    /// Hands every new FUSE connection to `holder` too, so the mounts outlive this process.
    pub fn with_holder(mut self, holder: HolderClient) -> Self {
        self.holder = Some(holder);
        self
    }

    pub fn holder(&self) -> Option<&HolderClient> {
        self.holder.as_ref()
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Finds the layer's streaming form, saves its TOC into `dir/toc` and mounts it on
    /// `dir/fs`. The image's first Prepare also starts resolving its other layers
    /// ([`resolve`]), which the Prepares that follow take ready.
    ///
    /// `lowers`: the snapshots below the layer, nearest first, when all are remote layers
    /// mounted merged (empty for an image's first layer); the layer is then mounted merged with
    /// them where it can be, which the returned source says.
    pub async fn mount(
        self: &Arc<Self>,
        id: u64,
        dir: &Path,
        request: &LayerRequest,
        lowers: Option<&[u64]>,
    ) -> Result<RemoteSource, RemoteError> {
        let artifact = self.artifacts.get(request).await?;
        self.resolve_ahead(&artifact, request.layer_digest);
        let resolved = match self.ahead.take(artifact.digest, request.layer_digest).await {
            Some(resolved) => {
                self.metrics.layers_resolved_ahead.inc();
                resolved
            }
            None => self.resolve(&artifact, request.layer_digest).await?,
        };
        let Resolved {
            toc_blob,
            mut source,
            fresh,
            held: _,
        } = resolved;
        write_atomically(&dir.join("toc"), &toc_blob)?;
        drop(toc_blob);
        if let Some(spans) = &fresh.spans {
            let path = dir.join(SPANS_FILE);
            spans.save(&path).map_err(|source| RemoteError::Io {
                action: "saving the span table",
                path,
                source,
            })?;
        }
        let index_file = IndexFile::in_dir(dir, source.toc_digest);
        streamsnap_fs::save_index(&fresh.index, &index_file.index).map_err(|e| {
            RemoteError::Fs {
                layer: request.layer_digest,
                source: e,
            }
        })?;
        let merged = self.merge_with(&fresh.index, lowers);
        source.merged = merged.is_some();
        self.mount_layer(
            id,
            dir,
            &source,
            merged.unwrap_or_default(),
            None,
            Some(fresh),
        )?;
        Ok(source)
    }

    /// Serves a remote snapshot again without the network and without reading its metadata:
    /// the layer's index is loaded from `dir` when the first request needs it (rebuilt from the
    /// saved TOC if it is missing or damaged). With `held`, the connection the holder kept (the
    /// mount never went away): it is served again, and with `resend` the kernel is asked to
    /// resend what the previous daemon took and did not answer. Without, the layer is mounted
    /// afresh (stale mounts of a dead daemon are detached first). A merged layer needs the
    /// snapshots below it (`lowers`, nearest first) served again first.
    pub fn remount(
        &self,
        id: u64,
        dir: &Path,
        source: &RemoteSource,
        lowers: &[u64],
        held: Option<FuseConnection>,
        resend: bool,
    ) -> Result<(), RemoteError> {
        // What the layer is loaded from must be there (the TOC can rebuild the index).
        let toc = dir.join("toc");
        if let Err(error) = std::fs::metadata(&toc) {
            return Err(RemoteError::Io {
                action: "finding the saved TOC",
                path: toc,
                source: error,
            });
        }
        let merged = if source.merged {
            self.served_layers(lowers).ok_or_else(|| RemoteError::Io {
                action: "serving the layers below (they could not be served again) under",
                path: dir.join("fs"),
                source: std::io::ErrorKind::NotFound.into(),
            })?
        } else {
            Vec::new()
        };
        if held.is_none() {
            crate::mounter::detach_all_under(&dir.join("fs"));
        }
        self.mount_layer(id, dir, source, merged, held, None)?;
        if resend {
            self.resend(id);
        }
        Ok(())
    }

    /// Asks the kernel to resend snapshot `id`'s requests a dead daemon took and did not answer.
    fn resend(&self, id: u64) {
        let mounts = self.mounts.lock().expect("mounts lock");
        let Some(entry) = mounts.get(&id) else { return };
        match entry.fs.connection().and_then(|c| c.notify_resend()) {
            Ok(()) => self.metrics.fuse_resends.inc(),
            Err(error) => tracing::warn!(id, %error, "asking the kernel to resend requests failed"),
        }
    }

    /// The blob a layer's chunks are read from (through the mirrors; for the index kind, its
    /// spans inflated with the checkpoints' windows, `spans` being its span table) and a new
    /// stop switch.
    fn feed(&self, source: &RemoteSource, spans: Option<SpanTable>) -> Result<Feed, RemoteError> {
        let repo = Repository::new(source.registry.clone(), source.repository.clone());
        let mirrors = self
            .mirrors
            .get(&repo.registry)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut blob: Arc<dyn streamsnap_cache::BlobSource> = Arc::new(
            RegistryBlob::new(
                self.client.clone(),
                repo.clone(),
                mirrors,
                source.data_digest,
                self.mirror_health.clone(),
            )
            .with_max_skip(self.mirror_max_skip),
        );
        if let Some(checkpoints) = source.checkpoints {
            let Some(table) = spans else {
                return Err(RemoteError::Io {
                    action: "finding the span table of",
                    path: source.layer_digest.to_string().into(),
                    source: std::io::ErrorKind::NotFound.into(),
                });
            };
            let windows = Arc::new(
                RegistryBlob::new(
                    self.client.clone(),
                    repo,
                    &[],
                    checkpoints.digest,
                    self.mirror_health.clone(),
                )
                .with_max_skip(self.mirror_max_skip),
            );
            blob = Arc::new(GzipSpans::new(
                blob,
                windows,
                table,
                self.cache.fetch_deadline(),
            ));
        }
        Ok(Feed {
            blob,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Asks the prefetcher for `batches` of the layer's profile, read through `feed`.
    fn start_prefetch(&self, source: &RemoteSource, feed: &Feed, batches: Batches) {
        tracing::debug!(
            layer = %source.layer_digest,
            batches = batches.len(),
            "prefetching the layer's chunks the start-up profile lists"
        );
        if batches.is_empty() {
            return;
        }
        self.metrics.prefetch_layers.inc();
        let job = LayerJob::new(
            source.layer_digest.to_string(),
            feed.blob.clone(),
            self.cache.clone(),
            feed.stop.clone(),
        );
        self.prefetcher.submit(&job, batches);
    }

    /// Mounts (or, with `held`, serves again) the layer of snapshot `id` from its files in
    /// `dir`, merged with `lowers` (none: alone); `fresh`: what its resolution just made (its
    /// index, span table and profile batches to fetch now, and its feed if the prefetch started
    /// already).
    fn mount_layer(
        &self,
        id: u64,
        dir: &Path,
        source: &RemoteSource,
        lowers: Vec<Arc<Layer>>,
        held: Option<FuseConnection>,
        fresh: Option<Fresh>,
    ) -> Result<(), RemoteError> {
        let _span = tracing::info_span!("layer", id, digest = %source.layer_digest).entered();
        let fs_dir = dir.join("fs");
        // A kept connection is still mounted there, and nobody serves it until the session
        // below runs: touching the path now (even a stat) would wait forever.
        if held.is_none() {
            std::fs::create_dir_all(&fs_dir).map_err(|e| RemoteError::Io {
                action: "creating",
                path: fs_dir.clone(),
                source: e,
            })?;
        }
        // A layer its image's start-up profile covers (its prefetch to start, or started) gets
        // its start's chunks from the prefetch: a miss there is a read the profile did not
        // foresee, and fetching past it would only take the link from the prefetch (measured:
        // docs/benchmarks.md).
        let after_miss = match &fresh {
            Some(fresh) if fresh.prefetch.is_some() || fresh.feed.is_some() => 0,
            _ => self.readahead_after_miss_bytes,
        };
        let (index, prefetch, feed) = match fresh {
            Some(Fresh {
                index,
                spans,
                prefetch,
                feed,
            }) => {
                let feed = match feed {
                    Some(feed) => feed,
                    None => self.feed(source, spans)?,
                };
                (Some(index), prefetch, feed)
            }
            // A remount reads the index kind's span table from beside the TOC.
            None => (None, None, self.feed(source, saved_spans(dir, source)?)?),
        };
        let blob = feed.blob.clone();
        let log = Arc::new(AccessLog::new(self.reads.clone()));
        let reader = Arc::new(
            CacheReader::new(
                self.cache.clone(),
                blob.clone(),
                self.background.on_demand.clone(),
                self.readahead_bytes,
            )
            .with_readahead_after_miss(after_miss)
            .with_log(log.clone()),
        );
        let mut layer = Layer::open(
            source.layer_digest,
            IndexFile::in_dir(dir, source.toc_digest),
            reader,
            FsOptions::default(),
            &self.metadata,
        );
        if let Some(index) = index {
            layer = layer.with_index(index);
        }
        let layer = Arc::new(layer);
        let fresh = held.is_none();
        let mounted = match held {
            Some(connection) => self
                .mounter
                .attach(layer.clone(), lowers, connection, &fs_dir),
            None => self.mounter.mount(layer.clone(), lowers, &fs_dir),
        }
        .map_err(|e| RemoteError::Io {
            action: "mounting a FUSE layer on",
            path: fs_dir.clone(),
            source: e,
        })?;
        if let Ok(connection) = mounted.connection() {
            self.metrics.fuse_resend_supported.set(i64::from(
                connection.resend_supported() && self.resend_allowed(),
            ));
            if !self.features_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "fuse kernel features: {}",
                    self.kernel_features.describe(Some(connection.offered()))
                );
            }
        }
        if fresh && let Some(holder) = &self.holder {
            // Without the holder's copy the mount still works; it just dies with this process.
            match mounted
                .connection()
                .and_then(|c| holder.put(id, c.as_fd(), &c.init))
            {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(id, %error, "the FUSE holder did not take the connection")
                }
            }
        }
        let stop = feed.stop.clone();
        self.mounts.lock().expect("mounts lock").insert(
            id,
            MountEntry {
                fs: mounted,
                stop: stop.clone(),
                layer: source.layer_digest,
                log,
                served: Arc::clone(&layer),
            },
        );
        self.metrics.remote_mounts.inc();
        if let Some(batches) = prefetch {
            self.start_prefetch(source, &feed, batches);
        }
        self.background.start(
            layer,
            source.data_size,
            blob,
            self.cache.clone(),
            stop,
            self.metrics.clone(),
        );
        Ok(())
    }

    /// Unmounts snapshot `id`'s layer if this process mounted it (and lets the holder's copy of
    /// its connection go).
    pub fn unmount(&self, id: u64) {
        if let Some(holder) = &self.holder
            && let Err(error) = holder.remove(id)
        {
            tracing::warn!(id, %error, "the FUSE holder did not let a connection go");
        }
        let entry = self.mounts.lock().expect("mounts lock").remove(&id);
        if let Some(entry) = entry {
            entry.stop.store(true, Ordering::Relaxed);
            if let Err(error) = entry.fs.unmount() {
                tracing::warn!(id, %error, "unmounting a remote layer failed");
            }
        }
    }

    /// Unmounts every layer for good (a full stop).
    pub fn unmount_all(&self) {
        let ids: Vec<u64> = self
            .mounts
            .lock()
            .expect("mounts lock")
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.unmount(id);
        }
    }

    /// Stops serving every layer without unmounting, answering the requests taken, so the next
    /// daemon takes the connections over from the holder (a restart or an upgrade). Without a
    /// holder the mounts would die with this process: they are unmounted instead.
    pub fn handover_all(&self, timeout: std::time::Duration) {
        if self.holder.is_none() {
            self.unmount_all();
            return;
        }
        let entries: Vec<MountEntry> = self
            .mounts
            .lock()
            .expect("mounts lock")
            .drain()
            .map(|(_, e)| e)
            .collect();
        let layers: Vec<_> = entries
            .into_iter()
            .filter_map(|entry| {
                entry.stop.store(true, Ordering::Relaxed);
                entry.fs.into_layer()
            })
            .collect();
        match streamsnap_fs::handover(layers, timeout) {
            Ok(report) => {
                self.metrics
                    .handovers
                    .with_label_values(&["graceful"])
                    .inc();
                tracing::info!(
                    layers = report.layers,
                    answered = report.forwarded,
                    timed_out = report.timed_out,
                    "layers handed over"
                );
            }
            Err(error) => {
                tracing::error!(%error, "handing the layers over failed; the next daemon remounts them")
            }
        }
    }

    /// Counts a fallback to an ordinary pull by reason, and logs it once per image per period.
    pub fn note_fallback(&self, request: &LayerRequest, error: &crate::error::Error) {
        self.metrics
            .fallbacks
            .with_label_values(&[fallback_reason(error)])
            .inc();
        let mut logged = self.fallback_logged.lock().expect("fallback log lock");
        let now = Instant::now();
        logged.retain(|_, at| now.duration_since(*at) < FALLBACK_LOG_PERIOD);
        if logged.insert(request.image.clone(), now).is_none() {
            tracing::warn!(image = request.image, layer = %request.layer_digest, error = %crate::error::chain(error), "cannot stream this image; falling back to a normal pull");
        } else {
            tracing::debug!(image = request.image, layer = %request.layer_digest, "falling back to a normal pull");
        }
    }
}

/// The batches of `listed` a layer may prefetch: what is left of its image's `budget`, reserved
/// in `planned` (the image's layers share it and may mount concurrently).
fn plan_within_budget(
    table: &dyn ChunkTable,
    listed: &LayerProfile,
    budget: u64,
    planned: &AtomicU64,
) -> Batches {
    loop {
        let used = planned.load(Ordering::SeqCst);
        let batches = profile::plan(table, listed, budget.saturating_sub(used));
        let bytes = batch_bytes(&batches);
        if planned
            .compare_exchange(used, used + bytes, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return batches;
        }
    }
}

/// The span table saved beside the TOC of `source`'s layer, if it is of the index kind.
fn saved_spans(dir: &Path, source: &RemoteSource) -> Result<Option<SpanTable>, RemoteError> {
    if source.checkpoints.is_none() {
        return Ok(None);
    }
    let path = dir.join(SPANS_FILE);
    SpanTable::load(&path)
        .map(Some)
        .map_err(|source| RemoteError::Io {
            action: "loading the span table",
            path,
            source,
        })
}

/// Decoded bytes of `batches`: what they take of their image's prefetch budget.
fn batch_bytes(batches: &Batches) -> u64 {
    batches
        .iter()
        .flat_map(|(_, chunks)| chunks)
        .map(|c| u64::from(c.size))
        .sum()
}

/// The `reason` label of a fallback: a small fixed set.
fn fallback_reason(error: &crate::error::Error) -> &'static str {
    use crate::error::Error;
    match error {
        Error::Remote(remote) => match remote {
            RemoteError::NoArtifact { .. } => "no_artifact",
            RemoteError::NoPlatform { .. } => "no_platform",
            RemoteError::LayerNotInArtifact { .. } => "layer_not_in_artifact",
            RemoteError::InvalidArtifact { .. } | RemoteError::Toc { .. } => "invalid_artifact",
            RemoteError::ArtifactMismatch { .. } => "artifact_mismatch",
            RemoteError::InvalidImage { .. } => "invalid_image",
            RemoteError::Unsigned { .. } => "unsigned",
            RemoteError::Reference(_) => "invalid_reference",
            RemoteError::Registry(e) if e.is_transient() => "registry_unavailable",
            RemoteError::Registry(_) => "registry_error",
            RemoteError::Fs { .. } | RemoteError::Io { .. } => "mount",
        },
        _ => "snapshot",
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), RemoteError> {
    let tmp = path.with_extension("tmp");
    let io = |action, p: &Path| {
        let path = p.to_owned();
        move |source| RemoteError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    std::fs::write(&tmp, data).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(batches: &[(u64, Vec<ChunkRef>)]) -> usize {
        batches.iter().map(|(_, c)| c.len()).sum()
    }

    #[test]
    fn an_images_layers_share_one_prefetch_budget() {
        // Two layers of 10 chunks of 1 MiB, a profile listing all of them, a 15 MiB budget.
        let (toc, _) = fake::layer(10, 1 << 20, false);
        let listed = LayerProfile {
            layer: toc.layer_digest(),
            chunks: (0..10).collect(),
            ranks: (0..10).collect(),
        };
        let planned = AtomicU64::new(0);
        let first = plan_within_budget(&*toc, &listed, 15 << 20, &planned);
        assert_eq!(chunks(&first), 10);
        let second = plan_within_budget(&*toc, &listed, 15 << 20, &planned);
        assert_eq!(chunks(&second), 5, "the second layer gets what is left");
        assert_eq!(planned.load(Ordering::SeqCst), 15 << 20);
        assert!(plan_within_budget(&*toc, &listed, 15 << 20, &planned).is_empty());
        // Chunks a hostile profile lists beyond the layer's TOC are never planned.
        let hostile = LayerProfile {
            layer: toc.layer_digest(),
            chunks: vec![3, 1_000_000, u32::MAX],
            ranks: vec![0, 1, 2],
        };
        let batches = plan_within_budget(&*toc, &hostile, 1 << 30, &AtomicU64::new(0));
        assert_eq!(chunks(&batches), 1);
    }
}
