//! The daemon's configuration: one TOML file, every section strict (an unknown key is an error
//! at start, naming the key), defaults that work on a stock node. Flags override the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_ADDRESS: &str = "/run/streamsnap/snapshotter.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/streamsnap";
/// Most seconds `[fetch] profile_wait_seconds` may say.
const MAX_PROFILE_WAIT_SECONDS: u64 = 600;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The unix socket containerd connects to.
    pub address: PathBuf,
    /// Where snapshots, the chunk cache and the metadata live.
    pub root: PathBuf,
    /// Serve Prometheus `/metrics` and `/healthz` on this address (off when unset).
    pub metrics_address: Option<SocketAddr>,
    pub cache: CacheSection,
    pub fetch: FetchSection,
    pub fuse: FuseSection,
    pub background_fetch: BackgroundFetchSection,
    pub registry: RegistrySection,
    pub verify: VerifySection,
    pub debug: DebugSection,
    pub cri_proxy: CriProxySection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Disk cap of the chunk cache (`<root>/cache`), in bytes.
    pub max_size_bytes: u64,
    /// In-memory cache of recently read chunks, in bytes.
    pub memory_bytes: u64,
    /// Largest merged range request, in bytes.
    pub max_request_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSection {
    /// A read whose chunks cannot be fetched within this many seconds fails with EIO.
    pub deadline_seconds: u64,
    /// Wait for a registry response (or the next bytes of one) before retrying.
    pub timeout_seconds: u64,
    /// Extra attempts of a failed request, with exponential backoff.
    pub retries: u32,
    /// Fetches of a chunk whose bytes fail verification (a corrupt or cut body) before the read
    /// fails with EIO.
    pub verify_attempts: u32,
    /// After a read that had to go to the network, fetch this many compressed bytes of the
    /// chunks that follow it in the background (0: off). Readers moving forward through a layer
    /// (imports, sequential reads) then find their next chunks cached.
    pub readahead_bytes: u64,
    /// After a read that is not sequential and had to go to the network (a cache miss of a
    /// starting container), also fetch this many compressed bytes of the chunks that follow it
    /// in the background (0: off). Files a start reads one after another often sit next to each
    /// other in the layer (a package's modules), so the next miss may already be on its way:
    /// it pays where round trips are long. Costs bytes the start may never read. Layers an
    /// image's start-up profile covers never do it (the prefetch brings their start). At most
    /// 16 MiB.
    pub readahead_after_miss_bytes: u64,
    /// When an image has a start-up profile (`streamsnap artifact-streaming profile`), fetch
    /// the chunks it lists as soon as each layer is mounted, in a few large requests.
    pub prefetch_profile: bool,
    /// Most bytes (decoded) one image's profile prefetches over all its layers; never more
    /// than a quarter of the cache's capacity. Only chunks of the image's own layers are
    /// fetched, whatever the profile lists.
    pub prefetch_max_bytes: u64,
    /// Compressed bytes of prefetch requests in flight at once on the node (in batches of up
    /// to 2 MiB). A link stays full only when this covers its bandwidth times its round trip:
    /// the default, 16 MiB, fills 1 Gbit/s up to about 130 ms. At most 256 MiB.
    pub prefetch_in_flight_bytes: u64,
    /// Seconds a layer whose TOC has arrived waits for the image's start-up profile before it
    /// mounts without the prefetch (0: only a profile already there is used). At most 600.
    pub profile_wait_seconds: u64,
    /// A mirror that answers a range read with the whole blob (a pull-through cache that has
    /// not cached the blob yet) is read through at most this many bytes before the range;
    /// reads further into the blob go to the next mirror or the registry itself.
    pub mirror_max_skip_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseSection {
    /// Unused (each layer has one FUSE event loop; reads run as tasks); kept for old configs.
    pub threads: usize,
    /// Seconds the kernel may cache entries and attributes (the content never changes).
    pub attr_timeout_seconds: u64,
    /// Keep every FUSE connection in a holder process so mounts, and the containers reading
    /// them, survive a restart, crash or upgrade of the daemon. The daemon starts
    /// `streamsnap-fuse-holder` (next to its own binary) when none answers on `holder_socket`.
    pub holder: bool,
    /// The holder's socket [default: <root>/fuse-holder.sock].
    pub holder_socket: Option<PathBuf>,
    /// A holder the daemon starts exits after this many seconds holding no connection with no
    /// daemon connected (0: never). One that keeps connections never exits on its own.
    pub holder_idle_timeout_seconds: u64,
    /// Seconds a graceful stop (SIGTERM) waits for requests in flight before handing over.
    pub handover_timeout_seconds: u64,
    /// The kernel's readahead on each layer mount, in bytes (0: none, only the pages asked for;
    /// larger: faster sequential reads, longer waits during a registry outage).
    pub readahead_bytes: u64,
    /// A mounted layer without a request for this many seconds drops its metadata (its index)
    /// from memory; the mount stays and the next request loads it again from disk (0: never).
    pub metadata_idle_seconds: u64,
    /// Most bytes of layer metadata (indexes) in memory at once; the least recently used are
    /// dropped past it (0: no limit). One layer's metadata is always loaded when it is used.
    pub metadata_cache_bytes: u64,
    /// Optional kernel FUSE features not to use even where the kernel offers them (a
    /// workaround for a kernel bug): each has a slower fallback that is always correct.
    pub kernel_features_off: Vec<KernelFeatureName>,
    /// Most bytes of whole-file copies kept in `<root>/passthrough` for FUSE passthrough: a file
    /// of at least `passthrough_min_file_bytes` whose chunks are all on the node is copied once,
    /// and later opens let the kernel read the copy at local disk speed (Linux 6.9+). Counted
    /// apart from the chunk cache (`[cache] max_size_bytes`); 0 turns passthrough off.
    pub passthrough_max_bytes: u64,
    /// Smaller files are read through FUSE only. A layer whose files this large hold less than
    /// half its bytes keeps zero-message opens instead of passthrough (with passthrough every
    /// open is a request).
    pub passthrough_min_file_bytes: u64,
    /// Mount each streamed layer merged with the streamed layers below it, so a container's
    /// overlay has one lower directory and a lookup one FUSE request, instead of one mount per
    /// layer asked in turn. Layers worth passthrough (see above) and the layers above them are
    /// mounted one per layer. Applies to layers mounted from now on. Off by default: it makes
    /// fewer requests and walks trees faster, but the bench's start-up measured slower with it
    /// (docs/benchmarks.md).
    pub merge_layers: bool,
}

/// An optional kernel FUSE feature, as named in `[fuse] kernel_features_off`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KernelFeatureName {
    /// Listings with attributes: off, plain READDIR and a lookup per name the kernel needs.
    Readdirplus,
    /// Opens without a request: off, every open of a file is a request.
    ZeroMessageOpen,
    /// Resending what a crashed daemon took: off, a crash remounts the layers afresh.
    Resend,
    /// Reads of whole files on the node by the kernel from their copy: off, every read is a
    /// request answered from the chunk cache.
    Passthrough,
    /// Opens of directories without a request: off, every listing opens with a request.
    ZeroMessageOpendir,
}

impl From<KernelFeatureName> for streamsnap_fs::KernelFeature {
    fn from(name: KernelFeatureName) -> Self {
        match name {
            KernelFeatureName::Readdirplus => Self::Readdirplus,
            KernelFeatureName::ZeroMessageOpen => Self::ZeroMessageOpen,
            KernelFeatureName::Resend => Self::Resend,
            KernelFeatureName::Passthrough => Self::Passthrough,
            KernelFeatureName::ZeroMessageOpendir => Self::ZeroMessageOpendir,
        }
    }
}

/// Fetching the rest of a layer after it is mounted, so later reads are local.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackgroundFetchSection {
    /// Off by default: on-demand reads alone fetch what containers use.
    pub enabled: bool,
    /// Bytes per background request batch.
    pub batch_bytes: u64,
    /// Layers whose data blob is larger than this share of the cache capacity are not fetched
    /// in the background (they would evict what containers read).
    pub max_cache_share: f64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// Registries (host[:port]) reached over plain HTTP; loopback always is.
    pub plain_http: Vec<String>,
    /// Docker config file with registry credentials (its `auths`, `credHelpers` and
    /// `credsStore`) [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json of the
    /// daemon's user].
    pub docker_config: Option<PathBuf>,
    /// The kubelet's CredentialProviderConfig (its `--image-credential-provider-config`): the
    /// daemon runs the same plugins for the same images.
    pub image_credential_provider_config: Option<PathBuf>,
    /// Where those plugins are (the kubelet's `--image-credential-provider-bin-dir`).
    pub image_credential_provider_bin_dir: Option<PathBuf>,
    /// Per-registry settings, keyed by host[:port].
    pub hosts: BTreeMap<String, HostSection>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSection {
    /// `true`: reach this registry over plain HTTP; `false`: over HTTPS, even on loopback
    /// (unset: HTTPS, but plain HTTP for loopback addresses).
    pub plain_http: Option<bool>,
    /// A CA certificate file (PEM) trusted for this registry only, beside the system roots.
    pub ca_file: Option<PathBuf>,
    /// Registries (host[:port]) holding the same repositories, tried first for blob reads; the
    /// content is verified by digest, so a mirror can be slow or stale but never wrong.
    pub mirrors: Vec<String>,
    /// A docker config.json with this registry's credentials (its `auths` entry for the host).
    pub credentials_file: Option<PathBuf>,
}

/// Diagnostic endpoints on the metrics address, off by default: the address is often reachable
/// from the whole cluster (the DaemonSet binds 0.0.0.0), and what they show is the node's own
/// business.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugSection {
    /// Serve `/debug/profile`: the start-up profile of the layers mounted now (the layer digests
    /// and chunks the node read), for `streamsnap artifact-streaming profile`.
    pub profile: bool,
}

/// The CRI image-service proxy that lets images pulled with pull secrets stream
/// (docs/deploy.md, "Image pull secrets"): off unless `address` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriProxySection {
    /// The socket the kubelet's `--image-service-endpoint` points at.
    pub address: Option<PathBuf>,
    /// containerd's CRI socket, where every call is forwarded.
    pub containerd_address: PathBuf,
}

impl Default for CriProxySection {
    fn default() -> Self {
        Self {
            address: None,
            containerd_address: "/run/containerd/containerd.sock".into(),
        }
    }
}

/// The signature policy (docs/trust.md): with public keys, only artifacts and profiles signed by
/// one of them are used.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySection {
    /// PEM public keys (ECDSA P-256, `PUBLIC KEY`); a signature by any of them is accepted.
    pub public_keys: Vec<PathBuf>,
}

impl VerifySection {
    /// Reads the keys; a missing or unusable key file is an error at start, naming the file.
    pub fn policy(&self) -> anyhow::Result<crate::remote::TrustPolicy> {
        use anyhow::Context;
        let mut keys = Vec::new();
        for path in &self.public_keys {
            let text = std::fs::read(path).with_context(|| {
                format!(
                    "verify.public_keys: {} not found or unreadable",
                    path.display()
                )
            })?;
            let key = streamsnap_trust::VerifyingKey::from_pem(&text)
                .with_context(|| format!("verify.public_keys: {}", path.display()))?;
            keys.push(key);
        }
        Ok(crate::remote::TrustPolicy::new(keys))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            address: DEFAULT_ADDRESS.into(),
            root: DEFAULT_ROOT.into(),
            cache: CacheSection::default(),
            fetch: FetchSection::default(),
            fuse: FuseSection::default(),
            background_fetch: BackgroundFetchSection::default(),
            registry: RegistrySection::default(),
            verify: VerifySection::default(),
            cri_proxy: CriProxySection::default(),
            debug: DebugSection::default(),
            metrics_address: None,
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            max_size_bytes: 10 << 30,
            memory_bytes: 64 << 20,
            max_request_bytes: 8 << 20,
        }
    }
}

impl Default for BackgroundFetchSection {
    fn default() -> Self {
        Self {
            enabled: false,
            batch_bytes: 8 << 20,
            max_cache_share: 0.5,
        }
    }
}

impl Default for FetchSection {
    fn default() -> Self {
        Self {
            deadline_seconds: 60,
            timeout_seconds: 30,
            retries: 3,
            verify_attempts: 5,
            readahead_bytes: 4 << 20,
            readahead_after_miss_bytes: crate::remote::DEFAULT_READAHEAD_AFTER_MISS,
            prefetch_profile: true,
            prefetch_max_bytes: crate::remote::DEFAULT_PREFETCH_MAX_BYTES,
            prefetch_in_flight_bytes: crate::remote::DEFAULT_PREFETCH_IN_FLIGHT,
            profile_wait_seconds: crate::remote::DEFAULT_PROFILE_WAIT.as_secs(),
            mirror_max_skip_bytes: crate::remote::DEFAULT_MIRROR_MAX_SKIP,
        }
    }
}

impl Default for FuseSection {
    fn default() -> Self {
        Self {
            threads: 1,
            attr_timeout_seconds: 3600,
            holder: true,
            holder_socket: None,
            holder_idle_timeout_seconds: streamsnap_holder::DEFAULT_IDLE_TIMEOUT.as_secs(),
            handover_timeout_seconds: 10,
            readahead_bytes: streamsnap_fs::DEFAULT_READAHEAD_BYTES,
            metadata_idle_seconds: streamsnap_fs::MetadataConfig::DEFAULT_IDLE.as_secs(),
            metadata_cache_bytes: streamsnap_fs::MetadataConfig::DEFAULT_MAX_BYTES,
            kernel_features_off: Vec::new(),
            passthrough_max_bytes: 2 << 30,
            passthrough_min_file_bytes: 64 << 20,
            merge_layers: false,
        }
    }
}

impl FuseSection {
    /// The optional kernel features the layers may use: all but `kernel_features_off`, and
    /// passthrough only with room for copies.
    pub fn kernel_features(&self) -> streamsnap_fs::KernelFeatures {
        let no_room = (self.passthrough_max_bytes == 0).then_some(KernelFeatureName::Passthrough);
        streamsnap_fs::KernelFeatures::without(
            self.kernel_features_off
                .iter()
                .copied()
                .chain(no_room)
                .map(Into::into),
        )
    }

    /// Where and how much of whole files are copied for passthrough; `None`: off.
    pub fn passthrough(&self, root: &std::path::Path) -> Option<streamsnap_fs::PassthroughConfig> {
        let features = self.kernel_features();
        features
            .allows(streamsnap_fs::KernelFeature::Passthrough)
            .then(|| streamsnap_fs::PassthroughConfig {
                dir: root.join("passthrough"),
                capacity_bytes: self.passthrough_max_bytes,
                min_file_bytes: self.passthrough_min_file_bytes,
            })
    }

    /// How long unused layers keep their metadata in memory, and how much all may keep.
    pub fn metadata(&self) -> streamsnap_fs::MetadataConfig {
        streamsnap_fs::MetadataConfig {
            idle: (self.metadata_idle_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.metadata_idle_seconds)),
            max_bytes: self.metadata_cache_bytes,
        }
    }
}

impl Config {
    /// Reads a config file; the error names the file and, for a bad key, the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.fetch.deadline_seconds > 0,
            "fetch.deadline_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.fetch.timeout_seconds > 0,
            "fetch.timeout_seconds must be at least 1"
        );
        let mirrors = self.registry.hosts.values().any(|h| !h.mirrors.is_empty());
        anyhow::ensure!(
            !mirrors || self.fetch.timeout_seconds < self.fetch.deadline_seconds,
            "fetch.timeout_seconds ({}) must be below fetch.deadline_seconds ({}) when mirrors \
             are configured: a read waits up to timeout_seconds for a stalled mirror before it \
             goes to the origin, within its deadline (half of it or less is best)",
            self.fetch.timeout_seconds,
            self.fetch.deadline_seconds
        );
        anyhow::ensure!(
            self.fetch.verify_attempts > 0,
            "fetch.verify_attempts must be at least 1"
        );
        anyhow::ensure!(
            (1..=crate::remote::MAX_PREFETCH_IN_FLIGHT)
                .contains(&self.fetch.prefetch_in_flight_bytes),
            "fetch.prefetch_in_flight_bytes must be between 1 and {} (256 MiB)",
            crate::remote::MAX_PREFETCH_IN_FLIGHT
        );
        anyhow::ensure!(
            self.fetch.readahead_after_miss_bytes <= crate::remote::MAX_READAHEAD_AFTER_MISS,
            "fetch.readahead_after_miss_bytes must be at most {} (16 MiB)",
            crate::remote::MAX_READAHEAD_AFTER_MISS
        );
        anyhow::ensure!(
            self.fetch.profile_wait_seconds <= MAX_PROFILE_WAIT_SECONDS,
            "fetch.profile_wait_seconds must be at most {MAX_PROFILE_WAIT_SECONDS}: a pull waits \
             this long for a profile that does not come"
        );
        anyhow::ensure!(self.fuse.threads > 0, "fuse.threads must be at least 1");
        anyhow::ensure!(
            self.cache.max_request_bytes > 0,
            "cache.max_request_bytes must be at least 1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(config.cache.max_size_bytes, 10 << 30);
        assert_eq!(config.fuse.holder_idle_timeout_seconds, 600);
        let config = Config::parse("[fuse]\nholder_idle_timeout_seconds = 0\n").unwrap();
        assert_eq!(config.fuse.holder_idle_timeout_seconds, 0);
    }

    #[test]
    fn layer_metadata_is_dropped_after_five_idle_minutes_and_kept_within_64_mib() {
        let metadata = Config::parse("").unwrap().fuse.metadata();
        assert_eq!(metadata.idle, Some(std::time::Duration::from_secs(300)));
        assert_eq!(metadata.max_bytes, 64 << 20);
        let config =
            Config::parse("[fuse]\nmetadata_idle_seconds = 0\nmetadata_cache_bytes = 0\n").unwrap();
        assert_eq!(config.fuse.metadata().idle, None, "0: never for idleness");
        assert_eq!(config.fuse.metadata().max_bytes, 0);
    }

    #[test]
    fn profile_wait_defaults_to_5_seconds_and_is_bounded() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.fetch.profile_wait_seconds, 5);
        let config = Config::parse("[fetch]\nprofile_wait_seconds = 0\n").unwrap();
        assert_eq!(config.fetch.profile_wait_seconds, 0);
        let error = Config::parse("[fetch]\nprofile_wait_seconds = 601\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("fetch.profile_wait_seconds"), "{error}");
    }

    #[test]
    fn readahead_after_miss_bytes_has_its_default_and_is_bounded() {
        let config = Config::parse("").unwrap();
        assert_eq!(
            config.fetch.readahead_after_miss_bytes,
            crate::remote::DEFAULT_READAHEAD_AFTER_MISS
        );
        let config = Config::parse("[fetch]\nreadahead_after_miss_bytes = 0\n").unwrap();
        assert_eq!(config.fetch.readahead_after_miss_bytes, 0);
        let text = format!(
            "[fetch]\nreadahead_after_miss_bytes = {}\n",
            crate::remote::MAX_READAHEAD_AFTER_MISS + 1
        );
        let error = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(
            error.contains("fetch.readahead_after_miss_bytes"),
            "{error}"
        );
    }

    #[test]
    fn prefetch_in_flight_bytes_defaults_to_16_mib_and_is_bounded() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.fetch.prefetch_in_flight_bytes, 16 << 20);
        let config = Config::parse("[fetch]\nprefetch_in_flight_bytes = 33554432\n").unwrap();
        assert_eq!(config.fetch.prefetch_in_flight_bytes, 32 << 20);
        for refused in [0, (256 << 20) + 1] {
            let text = format!("[fetch]\nprefetch_in_flight_bytes = {refused}\n");
            let error = Config::parse(&text).unwrap_err().to_string();
            assert!(error.contains("fetch.prefetch_in_flight_bytes"), "{error}");
        }
    }

    #[test]
    fn kernel_features_are_turned_off_by_name_and_unknown_names_refused() {
        use streamsnap_fs::KernelFeature;
        let features = Config::parse("").unwrap().fuse.kernel_features();
        assert!(KernelFeature::ALL.iter().all(|&f| features.allows(f)));
        let config = Config::parse(
            "[fuse]\nkernel_features_off = [\"readdirplus\", \"zero_message_open\", \"resend\", \
             \"passthrough\", \"zero_message_opendir\"]\n",
        )
        .unwrap();
        let features = config.fuse.kernel_features();
        assert!(KernelFeature::ALL.iter().all(|&f| !features.allows(f)));
        assert!(config.fuse.passthrough(Path::new("/r")).is_none());
        let features = Config::parse("[fuse]\nkernel_features_off = [\"resend\"]\n")
            .unwrap()
            .fuse
            .kernel_features();
        assert!(!features.allows(KernelFeature::Resend));
        assert!(features.allows(KernelFeature::Readdirplus));
        let error = Config::parse("[fuse]\nkernel_features_off = [\"dax\"]\n").unwrap_err();
        let message = format!("{error:#}");
        for valid in [
            "readdirplus",
            "zero_message_open",
            "resend",
            "passthrough",
            "zero_message_opendir",
        ] {
            assert!(message.contains(valid), "{message}");
        }
        assert!(message.contains("dax"), "{message}");
    }

    #[test]
    fn passthrough_copies_go_under_the_root_within_their_cap_and_a_zero_cap_turns_it_off() {
        use streamsnap_fs::KernelFeature;
        let fuse = Config::parse("").unwrap().fuse;
        let passthrough = fuse.passthrough(Path::new("/r")).unwrap();
        assert_eq!(passthrough.dir, Path::new("/r/passthrough"));
        assert_eq!(passthrough.capacity_bytes, 2 << 30);
        assert_eq!(passthrough.min_file_bytes, 64 << 20);
        let fuse = Config::parse("[fuse]\npassthrough_max_bytes = 0\n")
            .unwrap()
            .fuse;
        assert!(fuse.passthrough(Path::new("/r")).is_none());
        assert!(!fuse.kernel_features().allows(KernelFeature::Passthrough));
        assert!(
            fuse.kernel_features()
                .allows(KernelFeature::ZeroMessageOpen)
        );
    }

    #[test]
    fn per_registry_settings_and_metrics_address_parse() {
        let config = Config::parse(
            "metrics_address = \"127.0.0.1:9464\"\n[background_fetch]\nenabled = true\n\
             [registry.hosts.\"reg.example:5000\"]\nplain_http = true\nmirrors = [\"m:5000\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.metrics_address,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(config.background_fetch.enabled);
        let host = &config.registry.hosts["reg.example:5000"];
        assert_eq!(host.plain_http, Some(true));
        assert_eq!(host.mirrors, vec!["m:5000".to_owned()]);
        let error = format!(
            "{:#}",
            Config::parse("[registry.hosts.x]\nmirror = []\n").unwrap_err()
        );
        assert!(error.contains("mirror"), "{error}");
    }

    #[test]
    fn the_debug_profile_is_off_unless_the_config_turns_it_on() {
        assert!(!Config::default().debug.profile);
        assert!(!Config::parse("").unwrap().debug.profile);
        assert!(
            Config::parse("[debug]\nprofile = true\n")
                .unwrap()
                .debug
                .profile
        );
        let error = format!(
            "{:#}",
            Config::parse("[debug]\nprofiles = true\n").unwrap_err()
        );
        assert!(error.contains("profiles"), "{error}");
    }

    #[test]
    fn sections_parse_and_unknown_keys_are_errors_naming_the_key() {
        let config = Config::parse(
            "root = \"/srv/ss\"\n[cache]\nmax_size_bytes = 1024\n[registry]\nplain_http = [\"r:5000\"]\n",
        )
        .unwrap();
        assert_eq!(config.root, PathBuf::from("/srv/ss"));
        assert_eq!(config.cache.max_size_bytes, 1024);
        assert_eq!(
            config.cache.memory_bytes,
            64 << 20,
            "unset keys keep their defaults"
        );
        assert_eq!(config.registry.plain_http, vec!["r:5000".to_owned()]);

        let error = format!(
            "{:#}",
            Config::parse("[cache]\nmax_size = 1\n").unwrap_err()
        );
        assert!(error.contains("max_size"), "{error}");
        let error = format!(
            "{:#}",
            Config::parse("[fetch]\ndeadline_seconds = 0\n").unwrap_err()
        );
        assert!(error.contains("deadline_seconds"), "{error}");
    }

    #[test]
    fn with_mirrors_the_request_timeout_must_leave_time_within_the_read_deadline() {
        let mirrors = "[registry.hosts.\"r:5000\"]\nmirrors = [\"m:5000\"]\n";
        let error = format!(
            "{:#}",
            Config::parse(&format!(
                "[fetch]\ndeadline_seconds = 30\ntimeout_seconds = 30\n{mirrors}"
            ))
            .unwrap_err()
        );
        assert!(error.contains("timeout_seconds (30)"), "{error}");
        assert!(error.contains("deadline_seconds (30)"), "{error}");
        Config::parse(&format!(
            "[fetch]\ndeadline_seconds = 31\ntimeout_seconds = 30\n{mirrors}"
        ))
        .unwrap();
        // Without mirrors the deadline bounds a read whatever the timeout.
        Config::parse("[fetch]\ndeadline_seconds = 4\ntimeout_seconds = 30\n").unwrap();
    }
}

/// The sample config (deploy/image/config.toml) must stay true: every `# key = value` line,
/// uncommented, is a valid key with its default value; the examples parse too.
#[cfg(test)]
mod sample {
    use super::*;

    const SAMPLE: &str = include_str!("../../../deploy/image/config.toml");
    const EXAMPLE: &str = "# unset by default";

    /// `# key = value` lines uncommented; with `examples`, also the ones marked [`EXAMPLE`] and
    /// the commented `# [section]` blocks.
    fn uncommented(examples: bool) -> String {
        let mut out = String::new();
        let mut in_example_section = false;
        for line in SAMPLE.lines() {
            let body = line.strip_prefix("# ");
            let is_setting = body.is_some_and(|b| {
                b.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            });
            if line.starts_with('[') {
                in_example_section = false;
            }
            if body.is_some_and(|b| b.starts_with('[')) {
                in_example_section = true;
                if examples {
                    out.push_str(body.unwrap());
                    out.push('\n');
                }
                continue;
            }
            let is_example = in_example_section || line.ends_with(EXAMPLE);
            if is_setting && (examples || !is_example) {
                out.push_str(body.unwrap());
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn the_sample_shows_every_default_truly() {
        let text = uncommented(false);
        let parsed = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        // And it names every key and section the daemon reads (but the unused fuse.threads).
        let debug = format!("{:?}", Config::default());
        for part in debug.split(['{', ',', '(']) {
            let Some((name, _)) = part.trim().split_once(": ") else {
                continue;
            };
            if name == "threads" || name == "hosts" {
                continue;
            }
            assert!(
                SAMPLE.contains(&format!("# {name} = ")) || SAMPLE.contains(&format!("[{name}]")),
                "{name} is missing from the sample"
            );
        }
    }

    #[test]
    fn the_samples_examples_parse() {
        let text = uncommented(true);
        let parsed = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert!(parsed.registry.hosts.contains_key("registry.example.com"));
        assert_eq!(parsed.verify.public_keys.len(), 1);
    }
}
