//! The kubelet's image credential provider plugins, run the way the kubelet runs them, so the
//! cloud's own plugin (acr-credential-provider, ecr-credential-provider, the GKE one) gives the
//! daemon the credentials it gives the kubelet.
//!
//! The daemon reads the kubelet's `CredentialProviderConfig` (`--image-credential-provider-config`,
//! apiVersion `kubelet.config.k8s.io/v1`, YAML or JSON) and finds the plugins in
//! `--image-credential-provider-bin-dir`. For an image, every provider whose `matchImages` match
//! is asked in order: the plugin gets a `CredentialProviderRequest` on stdin and prints a
//! `CredentialProviderResponse`; its `auth` entries whose key matches the image give the
//! credentials. Responses are cached per `cacheKeyType` (Image, Registry, Global) for
//! `cacheDuration` (else the provider's `defaultCacheDuration`; `0` means not cached). Matching
//! follows the kubelet: the same number of host parts, each matched by a glob (`*` within one
//! part), the same port if the pattern has one, and the pattern's path a prefix of the image's.
//!
//! Credentials stay in memory; plugin output is never logged (only its size and exit status).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use streamsnap_registry::Credentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The config API version the daemon reads (the kubelet's, stable since 1.26).
pub const CONFIG_API_VERSION: &str = "kubelet.config.k8s.io/v1";
/// The plugin API version (the only stable one).
pub const PLUGIN_API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";
/// Largest config file read.
const MAX_CONFIG: u64 = 1 << 20;
/// Largest plugin response read.
const MAX_RESPONSE: usize = 1 << 20;
/// How long a plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most cached responses kept (a response per image with cacheKeyType Image).
const MAX_CACHED: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<ProviderConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderConfig {
    name: String,
    match_images: Vec<String>,
    default_cache_duration: String,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

/// One plugin, ready to run.
#[derive(Debug)]
struct Provider {
    name: String,
    executable: PathBuf,
    match_images: Vec<String>,
    default_cache: Duration,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(Clone, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// A cached response: its auth entries, until when.
struct Cached {
    auth: Vec<(String, Credentials)>,
    until: Instant,
}

/// The providers of a config file and their response cache.
pub struct KubeletProviders {
    providers: Vec<Provider>,
    /// By (provider index, cache key).
    cache: tokio::sync::Mutex<HashMap<(usize, String), Cached>>,
}

impl std::fmt::Debug for KubeletProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletProviders")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl KubeletProviders {
    /// Reads and checks `config` and finds each provider's executable in `bin_dir`. Errors name
    /// the file and what to fix.
    pub fn load(config: &Path, bin_dir: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(config).with_context(|| {
            format!("credential provider config {} not found", config.display())
        })?;
        ensure!(
            meta.len() <= MAX_CONFIG,
            "credential provider config {} is larger than {MAX_CONFIG} bytes",
            config.display()
        );
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        Self::parse(&text, bin_dir)
            .with_context(|| format!("credential provider config {}", config.display()))
    }

    fn parse(text: &str, bin_dir: &Path) -> anyhow::Result<Self> {
        // YAML is a superset of JSON: one parser for both forms the kubelet accepts.
        let file: ConfigFile = serde_yaml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "not a CredentialProviderConfig: {}",
                e.location().map_or_else(
                    || "malformed".to_owned(),
                    |l| format!("malformed at line {} column {}", l.line(), l.column())
                )
            )
        })?;
        ensure!(
            file.kind == "CredentialProviderConfig",
            "kind is {:?}, expected CredentialProviderConfig",
            file.kind
        );
        ensure!(
            file.api_version == CONFIG_API_VERSION,
            "apiVersion {:?} is not supported (this daemon reads {CONFIG_API_VERSION})",
            file.api_version
        );
        let mut providers = Vec::new();
        for p in file.providers {
            ensure!(
                !p.name.is_empty() && !p.name.contains('/') && p.name != "." && p.name != "..",
                "provider name {:?} must be a plain file name in the bin dir",
                p.name
            );
            ensure!(
                providers.iter().all(|q: &Provider| q.name != p.name),
                "provider {:?} is listed twice",
                p.name
            );
            ensure!(
                !p.match_images.is_empty(),
                "provider {:?} has no matchImages",
                p.name
            );
            for pattern in &p.match_images {
                Pattern::parse(pattern)
                    .with_context(|| format!("provider {:?}: matchImages {pattern:?}", p.name))?;
            }
            ensure!(
                p.api_version == PLUGIN_API_VERSION,
                "provider {:?}: apiVersion {:?} is not supported (use {PLUGIN_API_VERSION})",
                p.name,
                p.api_version
            );
            let default_cache = parse_duration(&p.default_cache_duration).with_context(|| {
                format!(
                    "provider {:?}: defaultCacheDuration {:?}",
                    p.name, p.default_cache_duration
                )
            })?;
            let executable = bin_dir.join(&p.name);
            ensure!(
                executable.is_file(),
                "provider {:?}: {} not found (--image-credential-provider-bin-dir)",
                p.name,
                executable.display()
            );
            providers.push(Provider {
                name: p.name,
                executable,
                match_images: p.match_images,
                default_cache,
                args: p.args,
                env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
            });
        }
        Ok(Self {
            providers,
            cache: tokio::sync::Mutex::default(),
        })
    }

    /// Credentials for `image` (`REGISTRY/REPO[:TAG|@DIGEST]`) from the first provider whose
    /// matchImages and auth entries match it; `None` when none does. A failing plugin is
    /// logged and skipped, as the kubelet does.
    pub async fn credentials_for(&self, image: &str) -> Option<Credentials> {
        let target = ImageUrl::parse(image)?;
        for (index, provider) in self.providers.iter().enumerate() {
            if !provider
                .match_images
                .iter()
                .any(|p| Pattern::parse(p).is_ok_and(|p| p.matches(&target)))
            {
                continue;
            }
            match self.auth_of(index, provider, image, &target).await {
                Ok(auth) => {
                    if let Some(credentials) = best_match(&auth, &target) {
                        return Some(credentials);
                    }
                }
                Err(error) => {
                    tracing::warn!(provider = provider.name, image, error = %format!("{error:#}"), "credential provider failed")
                }
            }
        }
        None
    }

    /// The provider's auth entries for `image`: cached, or from a run of the plugin.
    async fn auth_of(
        &self,
        index: usize,
        provider: &Provider,
        image: &str,
        target: &ImageUrl,
    ) -> anyhow::Result<Vec<(String, Credentials)>> {
        // One plugin run at a time: concurrent layers of one image share its answer.
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        for key in [
            target.image_key(),
            target.registry_key(),
            String::new(), // Global
        ] {
            if let Some(hit) = cache.get(&(index, key))
                && hit.until > now
            {
                return Ok(hit.auth.clone());
            }
        }
        let response = run_plugin(provider, image).await?;
        let ttl = match response.cache_duration.as_deref().filter(|d| !d.is_empty()) {
            Some(d) => parse_duration(d).with_context(|| format!("cacheDuration {d:?}"))?,
            None => provider.default_cache,
        };
        let key = match response.cache_key_type.as_str() {
            "Image" => target.image_key(),
            "Registry" => target.registry_key(),
            "Global" => String::new(),
            other => bail!("cacheKeyType {other:?} is not Image, Registry or Global"),
        };
        let auth: Vec<(String, Credentials)> = response
            .auth
            .into_iter()
            .map(|(k, v)| (k, Credentials::new(v.username, v.password)))
            .collect();
        if !ttl.is_zero() {
            cache.retain(|_, c| c.until > now);
            if cache.len() < MAX_CACHED {
                cache.insert(
                    (index, key),
                    Cached {
                        auth: auth.clone(),
                        until: now + ttl,
                    },
                );
            }
        }
        Ok(auth)
    }
}

impl streamsnap_registry::CredentialSource for KubeletProviders {
    fn credentials<'a>(
        &'a self,
        registry: &'a str,
        repository: &'a str,
    ) -> streamsnap_registry::BoxFuture<'a, Option<Credentials>> {
        Box::pin(async move {
            self.credentials_for(&format!("{registry}/{repository}"))
                .await
        })
    }
}

/// The credentials of the auth entry that matches `target`, preferring the most specific key
/// (longest pattern), as the kubelet's keyring does.
fn best_match(auth: &[(String, Credentials)], target: &ImageUrl) -> Option<Credentials> {
    let mut matching: Vec<&(String, Credentials)> = auth
        .iter()
        .filter(|(key, _)| Pattern::parse(key).is_ok_and(|p| p.matches(target)))
        .collect();
    matching.sort_by_key(|(key, _)| std::cmp::Reverse(key.len()));
    matching.first().map(|(_, c)| c.clone())
}

/// Runs the plugin with a request for `image` on stdin; its parsed response.
async fn run_plugin(provider: &Provider, image: &str) -> anyhow::Result<Response> {
    let request = serde_json::json!({
        "kind": "CredentialProviderRequest",
        "apiVersion": PLUGIN_API_VERSION,
        "image": image,
    });
    let mut child = tokio::process::Command::new(&provider.executable)
        .args(&provider.args)
        .envs(provider.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", provider.executable.display()))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let run = async {
        stdin.write_all(request.to_string().as_bytes()).await?;
        drop(stdin);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut out_reader = (&mut stdout).take(MAX_RESPONSE as u64 + 1);
        let mut err_reader = (&mut stderr).take(64 << 10);
        let (read_out, read_err) = tokio::join!(
            out_reader.read_to_end(&mut out),
            err_reader.read_to_end(&mut err)
        );
        read_out?;
        read_err?;
        let status = child.wait().await?;
        anyhow::Ok((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(PLUGIN_TIMEOUT, run)
        .await
        .map_err(|_| anyhow::anyhow!("did not answer within {PLUGIN_TIMEOUT:?}"))??;
    ensure!(
        status.success(),
        "exited with {status} ({} bytes on stderr, not shown: they may hold secrets)",
        err.len()
    );
    ensure!(
        out.len() <= MAX_RESPONSE,
        "answered more than {MAX_RESPONSE} bytes"
    );
    let response: Response = serde_json::from_slice(&out).map_err(|e| {
        anyhow::anyhow!(
            "answered no CredentialProviderResponse (JSON error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    ensure!(
        response.kind == "CredentialProviderResponse" && response.api_version == PLUGIN_API_VERSION,
        "answered kind {:?} apiVersion {:?}, expected CredentialProviderResponse {PLUGIN_API_VERSION}",
        response.kind,
        response.api_version
    );
    tracing::debug!(
        provider = provider.name,
        image,
        entries = response.auth.len(),
        cache_key_type = response.cache_key_type,
        "credential provider answered"
    );
    Ok(response)
}

/// An image reference as a URL: host (lowercase), port, path (the repository).
#[derive(Debug, PartialEq, Eq)]
struct ImageUrl {
    host: String,
    port: Option<String>,
    path: String,
}

impl ImageUrl {
    /// `REGISTRY[:PORT]/REPO[:TAG][@DIGEST]`; `None` for a reference without a registry part.
    fn parse(image: &str) -> Option<Self> {
        let image = image.split('@').next()?;
        let (authority, path) = image.split_once('/')?;
        // A tag comes after the last slash.
        let path = match path.rsplit_once('/') {
            Some((dir, last)) => format!("{dir}/{}", last.split(':').next()?),
            None => path.split(':').next()?.to_owned(),
        };
        let (host, port) = split_port(authority);
        Some(Self {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    fn registry_key(&self) -> String {
        match &self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }

    fn image_key(&self) -> String {
        format!("{}/{}", self.registry_key(), self.path)
    }
}

fn split_port(authority: &str) -> (&str, Option<String>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port.to_owned()))
        }
        _ => (authority, None),
    }
}

/// A matchImages pattern (or an auth key): host parts with globs, an optional port, a path
/// prefix.
#[derive(Debug)]
struct Pattern {
    host_parts: Vec<String>,
    port: Option<String>,
    path: String,
}

impl Pattern {
    fn parse(pattern: &str) -> anyhow::Result<Self> {
        let pattern = pattern
            .strip_prefix("https://")
            .or_else(|| pattern.strip_prefix("http://"))
            .unwrap_or(pattern);
        let (authority, path) = pattern.split_once('/').unwrap_or((pattern, ""));
        let (host, port) = split_port(authority);
        ensure!(!host.is_empty(), "no host");
        ensure!(
            !path.contains('*') && port.as_deref().is_none_or(|p| !p.contains('*')),
            "globs are allowed in the host only"
        );
        Ok(Self {
            host_parts: host
                .to_ascii_lowercase()
                .split('.')
                .map(str::to_owned)
                .collect(),
            port,
            path: path.trim_end_matches('/').to_owned(),
        })
    }

    fn matches(&self, target: &ImageUrl) -> bool {
        let parts: Vec<&str> = target.host.split('.').collect();
        parts.len() == self.host_parts.len()
            && self
                .host_parts
                .iter()
                .zip(&parts)
                .all(|(glob, part)| glob_matches(glob.as_bytes(), part.as_bytes()))
            && self
                .port
                .as_ref()
                .is_none_or(|p| target.port.as_ref() == Some(p))
            && (self.path.is_empty()
                || target.path == self.path
                || target.path.starts_with(&format!("{}/", self.path)))
    }
}

/// `*` (any run of characters, within one host part) and `?` (one character) globbing.
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    match (glob.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_matches(&glob[1..], text) || (!text.is_empty() && glob_matches(glob, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_matches(&glob[1..], &text[1..]),
        (Some(g), Some(t)) if g == t => glob_matches(&glob[1..], &text[1..]),
        _ => false,
    }
}

/// A Go duration as Kubernetes writes them: `12h`, `1h30m`, `90s`, `500ms`, `0`.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    ensure!(!text.is_empty(), "empty duration");
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .context("a number without a unit (use h, m, s or ms)")?;
        ensure!(digits > 0, "a unit without a number");
        let value: f64 = rest[..digits].parse().context("not a number")?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            other => bail!("unknown unit {other:?} (use h, m, s or ms)"),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * seconds).context("out of range")?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(image: &str) -> ImageUrl {
        ImageUrl::parse(image).unwrap()
    }

    fn matches(pattern: &str, image: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(&url(image))
    }

    #[test]
    fn match_images_follow_the_kubelets_rules() {
        assert!(matches("*.azurecr.io", "myreg.azurecr.io/team/app:1"));
        assert!(
            !matches("*.azurecr.io", "a.b.azurecr.io/app"),
            "one glob, one part"
        );
        assert!(!matches("*.azurecr.io", "azurecr.io/app"));
        assert!(matches(
            "*.dkr.ecr.*.amazonaws.com",
            "123.dkr.ecr.us-east-1.amazonaws.com/x"
        ));
        assert!(matches("gcr.io", "gcr.io/project/img@sha256:abcd"));
        assert!(matches("k8s.*", "k8s.io/pause"));
        assert!(matches(
            "registry.io:8080/path",
            "registry.io:8080/path/app:1"
        ));
        assert!(!matches(
            "registry.io:8080/path",
            "registry.io:8081/path/app"
        ));
        assert!(!matches(
            "registry.io:8080/path",
            "registry.io:8080/pathology/app"
        ));
        assert!(!matches(
            "registry.io:8080/path",
            "registry.io:8080/other/app"
        ));
        assert!(
            matches("registry.io", "registry.io:5000/app"),
            "no port in the pattern"
        );
        assert!(matches("https://Quay.IO", "quay.io/org/app"));
        assert!(matches("127.0.0.1:5000", "127.0.0.1:5000/app:v1"));
        assert!(!matches("127.0.0.1:5000", "127.0.0.2:5000/app:v1"));
        assert!(Pattern::parse("reg.io/pa*th").is_err());
        assert!(ImageUrl::parse("busybox").is_none());
    }

    #[test]
    fn image_keys_drop_tags_and_digests() {
        let u = url("Reg.io:5000/team/app:1.4@sha256:ab");
        assert_eq!(u.registry_key(), "reg.io:5000");
        assert_eq!(u.image_key(), "reg.io:5000/team/app");
    }

    #[test]
    fn durations_parse_as_go_writes_them() {
        assert_eq!(
            parse_duration("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "12", "h", "1d", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configs_are_checked_with_messages_that_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acr-credential-provider"), "").unwrap();
        let good = "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: acr-credential-provider\n    matchImages: [\"*.azurecr.io\"]\n    defaultCacheDuration: 10m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    args: [/etc/kubernetes/azure.json]\n";
        let providers = KubeletProviders::parse(good, dir.path()).unwrap();
        assert_eq!(providers.providers.len(), 1);
        assert_eq!(
            providers.providers[0].default_cache,
            Duration::from_secs(600)
        );
        for (bad, says) in [
            (
                good.replace("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1alpha1"),
                "apiVersion",
            ),
            (
                good.replace("acr-credential-provider\n", "../bin/x\n"),
                "plain file name",
            ),
            (good.replace("10m", "10x"), "defaultCacheDuration"),
            (
                good.replace(
                    "credentialprovider.kubelet.k8s.io/v1",
                    "credentialprovider.kubelet.k8s.io/v1beta1",
                ),
                "apiVersion",
            ),
            (
                good.replace("name: acr-credential-provider", "name: missing"),
                "not found",
            ),
            ("{nope".to_owned(), "malformed"),
        ] {
            let err = format!(
                "{:#}",
                KubeletProviders::parse(&bad, dir.path()).unwrap_err()
            );
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn the_most_specific_auth_entry_wins() {
        let auth = vec![
            ("*.io".to_owned(), Credentials::new("wide", "p")),
            ("reg.io/team".to_owned(), Credentials::new("team", "p")),
            ("reg.io".to_owned(), Credentials::new("host", "p")),
        ];
        assert_eq!(
            best_match(&auth, &url("reg.io/team/app")).unwrap().username,
            "team"
        );
        assert_eq!(
            best_match(&auth, &url("reg.io/other/app"))
                .unwrap()
                .username,
            "host"
        );
        assert_eq!(best_match(&auth, &url("x.io/a")).unwrap().username, "wide");
        assert!(best_match(&auth, &url("x.com/a")).is_none());
    }
}

#[cfg(test)]
mod plugin_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A plugin (a shell script speaking the v1 protocol) that counts its runs in `runs` and
    /// answers with `cache_key_type` and `duration`.
    fn plugin(dir: &Path, cache_key_type: &str, duration: &str) -> KubeletProviders {
        let script = dir.join("test-provider");
        let runs = dir.join("runs");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nread request\necho x >> {runs}\ncase \"$request\" in *'\"image\":\"reg.io/team/'*) ;; *) exit 3;; esac\n\
                 printf '{{\"kind\":\"CredentialProviderResponse\",\"apiVersion\":\"{PLUGIN_API_VERSION}\",\"cacheKeyType\":\"{cache_key_type}\",\"cacheDuration\":\"{duration}\",\"auth\":{{\"reg.io\":{{\"username\":\"u\",\"password\":\"p\"}}}}}}'\n",
                runs = runs.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = format!(
            "{{\"apiVersion\":\"{CONFIG_API_VERSION}\",\"kind\":\"CredentialProviderConfig\",\"providers\":[{{\"name\":\"test-provider\",\"matchImages\":[\"reg.io\"],\"defaultCacheDuration\":\"1h\",\"apiVersion\":\"{PLUGIN_API_VERSION}\"}}]}}"
        );
        KubeletProviders::parse(&config, dir).unwrap()
    }

    fn runs(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_plugin_is_run_as_the_kubelet_runs_it_and_cached_per_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let providers = plugin(dir.path(), "Registry", "1h");
        let c = providers
            .credentials_for("reg.io/team/app:1")
            .await
            .unwrap();
        assert_eq!((c.username.as_str(), c.password()), ("u", "p"));
        providers
            .credentials_for("reg.io/team/other:2")
            .await
            .unwrap();
        assert_eq!(
            runs(dir.path()),
            1,
            "cacheKeyType Registry: one run per registry"
        );
        assert!(
            providers
                .credentials_for("other.io/team/app")
                .await
                .is_none()
        );
        assert_eq!(runs(dir.path()), 1, "not matched: not run");

        let dir = tempfile::tempdir().unwrap();
        let providers = plugin(dir.path(), "Image", "1h");
        providers
            .credentials_for("reg.io/team/app:1")
            .await
            .unwrap();
        providers
            .credentials_for("reg.io/team/app:2")
            .await
            .unwrap();
        providers
            .credentials_for("reg.io/team/other")
            .await
            .unwrap();
        assert_eq!(
            runs(dir.path()),
            2,
            "cacheKeyType Image: one run per repository"
        );

        let dir = tempfile::tempdir().unwrap();
        let providers = plugin(dir.path(), "Global", "0");
        providers.credentials_for("reg.io/team/app").await.unwrap();
        providers.credentials_for("reg.io/team/app").await.unwrap();
        assert_eq!(runs(dir.path()), 2, "cacheDuration 0: never cached");

        // A plugin that fails gives no credentials (and the daemon goes on).
        assert!(
            providers
                .credentials_for("reg.io/elsewhere/app")
                .await
                .is_none()
        );
    }
}
