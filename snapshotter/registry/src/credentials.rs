//! Registry credentials: given explicitly, read from a Docker `config.json` (its `auths`, and
//! its credential helpers, run as the docker CLI runs them), or looked up at request time from a
//! [`CredentialSource`]. Secrets never appear in `Debug` output or log lines.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, JsonFault, Result};
use crate::reference::DOCKER_HUB;

/// A username and password (or token used as a password) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// `Basic <base64(user:password)>`, the value of an `Authorization` header.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A future a [`CredentialSource`] answers with.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Credentials looked up when a request needs them, per repository: a kubelet credential
/// provider plugin, the pull secrets a CRI proxy saw. Sources are asked in order before the
/// client's [`CredentialStore`].
pub trait CredentialSource: Send + Sync + fmt::Debug {
    /// Credentials for `repository` of `registry` (normalised `host[:port]`), if this source has
    /// some for it.
    fn credentials<'a>(
        &'a self,
        registry: &'a str,
        repository: &'a str,
    ) -> BoxFuture<'a, Option<Credentials>>;
}

/// How long an answer of a credential helper is reused.
const HELPER_CACHE: Duration = Duration::from_secs(60);
/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from a credential helper.
const HELPER_MAX_OUTPUT: u64 = 64 << 10;

/// Credentials by registry host, and the docker credential helpers that hold others. Keys are
/// normalised: scheme and path dropped, lowercase, and the Docker Hub aliases
/// (`index.docker.io`, `registry-1.docker.io`) folded into `docker.io`.
#[derive(Clone, Default)]
pub struct CredentialStore {
    entries: HashMap<String, Credentials>,
    /// `credHelpers`: registry -> helper name (`docker-credential-NAME`).
    helpers: HashMap<String, String>,
    /// `credsStore`: the helper for registries without an entry or a helper of their own.
    default_helper: Option<String>,
    /// Answers of helpers, by registry, reused for [`HELPER_CACHE`].
    helper_answers: Arc<Mutex<HashMap<String, HelperAnswerAt>>>,
}

/// A helper's answer and when it was given.
type HelperAnswerAt = (Option<Credentials>, Instant);

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        hosts.sort_unstable();
        f.debug_struct("CredentialStore")
            .field("registries", &hosts)
            .field("helpers", &self.helpers)
            .field("default_helper", &self.default_helper)
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

impl CredentialStore {
    /// Reads a Docker `config.json`: `path`, or else `$DOCKER_CONFIG/config.json`, or else
    /// `~/.docker/config.json`. A missing default file gives an empty store; a missing `path`
    /// is an error (someone named it: a typo must not silently mean "no credentials").
    /// Credential helpers and stores are not run: the hosts that rely on them are named in a
    /// warning and skipped.
    pub fn from_docker_config(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(path) => Self::from_docker_config_file(path),
            None => match default_config_path() {
                Some(path) => Self::read(&path, false),
                None => Ok(Self::default()),
            },
        }
    }

    /// Reads the Docker `config.json` at `path`, which must exist.
    pub fn from_docker_config_file(path: &Path) -> Result<Self> {
        Self::read(path, true)
    }

    fn read(path: &Path, required: bool) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && required => {
                return Err(Error::DockerConfigMissing {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no docker config, no stored credentials");
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(Error::DockerConfigRead {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_docker_config_json(&text, path)
    }

    fn from_docker_config_json(text: &[u8], path: &Path) -> Result<Self> {
        let config: DockerConfig =
            serde_json::from_slice(text).map_err(|e| Error::DockerConfigParse {
                path: path.to_path_buf(),
                fault: JsonFault::from(&e),
            })?;
        let mut store = Self::default();
        for (host, helper) in &config.cred_helpers {
            store.set_helper(host, helper, path)?;
        }
        if let Some(helper) = config.creds_store.as_deref().filter(|h| !h.is_empty()) {
            check_helper_name(helper, path)?;
            store.default_helper = Some(helper.to_owned());
        }
        for (key, entry) in config.auths {
            let entry_error = |reason| Error::DockerConfigEntry {
                path: path.to_path_buf(),
                registry: key.clone(),
                reason,
            };
            let from_auth = match entry.auth.as_deref().filter(|a| !a.is_empty()) {
                Some(auth) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| entry_error("\"auth\" is not valid base64"))?;
                    let raw = String::from_utf8(raw)
                        .map_err(|_| entry_error("\"auth\" does not decode to UTF-8 text"))?;
                    let (user, pass) = raw
                        .split_once(':')
                        .ok_or_else(|| entry_error("\"auth\" is not base64 of user:password"))?;
                    Some(Credentials::new(user, pass))
                }
                None => None,
            };
            let credentials = from_auth.or_else(|| match (entry.username, entry.password) {
                (Some(u), Some(p)) if !u.is_empty() => Some(Credentials::new(u, p)),
                _ => None,
            });
            match credentials {
                Some(c) => store.insert(&key, c),
                None if entry.identity_token.is_some() => tracing::warn!(
                    registry = %key,
                    config = %path.display(),
                    "docker config holds an identity token for this registry, which streamsnap \
                     does not support; requests to it go without credentials"
                ),
                // An empty entry: `docker login` with a credential store leaves one; the store
                // (credsStore) holds the credentials.
                None => {}
            }
        }
        Ok(store)
    }

    pub fn insert(&mut self, registry: &str, credentials: Credentials) {
        self.entries
            .insert(normalize_registry(registry), credentials);
    }

    /// The credentials stored for `registry` (not those of its credential helper: see
    /// [`Self::lookup`]).
    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        self.entries.get(&normalize_registry(registry))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.helpers.is_empty() && self.default_helper.is_none()
    }

    fn set_helper(&mut self, registry: &str, helper: &str, path: &Path) -> Result<()> {
        check_helper_name(helper, path)?;
        self.helpers
            .insert(normalize_registry(registry), helper.to_owned());
        Ok(())
    }

    /// The credentials for `registry` the way the docker CLI finds them: its own credential
    /// helper (`credHelpers`), else its `auths` entry, else the default store (`credsStore`).
    /// A helper that fails or knows nothing of the registry gives none (logged, without its
    /// output, which may hold a secret).
    pub async fn lookup(&self, registry: &str) -> Option<Credentials> {
        let key = normalize_registry(registry);
        let helper = match self.helpers.get(&key) {
            Some(helper) => helper,
            None => match self.entries.get(&key) {
                Some(credentials) => return Some(credentials.clone()),
                None => self.default_helper.as_ref()?,
            },
        };
        let now = Instant::now();
        if let Some((answer, at)) = self
            .helper_answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && now.duration_since(*at) < HELPER_CACHE
        {
            return answer.clone();
        }
        let answer = match run_helper(helper, &key).await {
            Ok(answer) => answer,
            Err(reason) => {
                tracing::warn!(registry = %key, helper, %reason, "docker credential helper failed; requests go without credentials");
                None
            }
        };
        self.helper_answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (answer.clone(), now));
        answer
    }
}

/// A helper name is a plain name: `docker-credential-NAME` is looked up on `PATH`.
fn check_helper_name(helper: &str, path: &Path) -> Result<()> {
    if helper.is_empty()
        || !helper
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(Error::DockerConfigEntry {
            path: path.to_path_buf(),
            registry: "credHelpers/credsStore".into(),
            reason: "a credential helper name must be a plain name (docker-credential-NAME on PATH)",
        });
    }
    Ok(())
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `docker-credential-HELPER get` with the registry on stdin, as the docker CLI does.
/// `Ok(None)`: the helper has no credentials for it.
async fn run_helper(
    helper: &str,
    registry: &str,
) -> std::result::Result<Option<Credentials>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let program = format!("docker-credential-{helper}");
    // Docker Hub's entry is keyed by its v1 index URL in every store.
    let server = if registry == DOCKER_HUB {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program} (is it on PATH?): {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let run = async {
        stdin.write_all(server.as_bytes()).await?;
        drop(stdin);
        let mut out = Vec::new();
        (&mut stdout)
            .take(HELPER_MAX_OUTPUT)
            .read_to_end(&mut out)
            .await?;
        let status = child.wait().await?;
        std::io::Result::Ok((status, out))
    };
    let (status, out) = tokio::time::timeout(HELPER_TIMEOUT, run)
        .await
        .map_err(|_| format!("{program} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|e| format!("running {program}: {e}"))?;
    if !status.success() {
        // "credentials not found in native keychain" is how every helper says it has none.
        if String::from_utf8_lossy(&out).contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!("{program} exited with {status}"));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out).map_err(|e| {
        format!(
            "{program} answered no credentials JSON (error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials::new(answer.username, answer.secret)))
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker").join("config.json"))
}

/// `https://index.docker.io/v1/` -> `docker.io`, `HTTP://Host:5000/x` -> `host:5000`.
pub(crate) fn normalize_registry(key: &str) -> String {
    let key = key.trim();
    let without_scheme = key
        .split_once("://")
        .map_or(key, |(_, rest)| rest)
        .to_ascii_lowercase();
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn reads_auth_and_username_password_entries_under_any_key_form() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "https://quay.io": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u", "password": "p:with:colons"}},
                "https://ghcr.io/v1/": {{"auth": "", "username": "g", "password": "gp"}},
                "helper.example": {{}}
            }}, "credsStore": "desktop", "credHelpers": {{"gcr.io": "gcloud"}}, "other": 1}}"#,
            b64("hubuser:hub:pass"),
            b64("q:qp"),
        );
        let store =
            CredentialStore::from_docker_config_json(json.as_bytes(), Path::new("c.json")).unwrap();
        for alias in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        ] {
            let c = store.get(alias).unwrap_or_else(|| panic!("{alias}"));
            assert_eq!((c.username.as_str(), c.password()), ("hubuser", "hub:pass"));
        }
        assert_eq!(store.get("quay.io").unwrap().password(), "qp");
        assert_eq!(
            store.get("127.0.0.1:5000").unwrap().password(),
            "p:with:colons"
        );
        assert_eq!(store.get("ghcr.io").unwrap().username, "g");
        assert!(store.get("helper.example").is_none());
        assert!(store.get("gcr.io").is_none());
        assert!(store.get("127.0.0.1:5001").is_none());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut store = CredentialStore::default();
        store.insert("r.example", Credentials::new("alice", "s3cret-pass"));
        let creds = Credentials::new("bob", "hunter2");
        let shown = format!("{store:?} {creds:?} {:#?}", store);
        assert!(
            !shown.contains("s3cret-pass") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(
            shown.contains("<redacted>") && shown.contains("r.example"),
            "{shown}"
        );
        assert!(shown.contains("bob"), "{shown}");
    }

    #[test]
    fn malformed_config_errors_name_the_file_and_entry() {
        let e = CredentialStore::from_docker_config_json(b"{not json", Path::new("/x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/config.json") && e.contains("malformed JSON"),
            "{e}"
        );
        let bad = br#"{"auths": {"r.example": {"auth": "!!!"}}}"#;
        let e = CredentialStore::from_docker_config_json(bad, Path::new("/x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.example") && e.contains("base64"), "{e}");
        let nocolon = format!(r#"{{"auths": {{"r": {{"auth": "{}"}}}}}}"#, b64("nocolon"));
        let e = CredentialStore::from_docker_config_json(nocolon.as_bytes(), Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("user:password") && !e.contains("nocolon"), "{e}");
    }

    #[test]
    fn malformed_config_errors_never_show_a_value_of_the_file() {
        let secret = b64("alice:hunter2-secret");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for text in [
            // serde_json would quote the string it did not expect: the secret itself.
            format!(r#"{{"auths": {{"r.example": "{secret}"}}}}"#),
            format!(r#"{{"auths": {{"r.example": {{"auth": "{secret}", "username": 7}}}}}}"#),
            format!(r#"{{"auths": {{"r.example": {{"auth": "{secret}"}}}}"#),
            format!("{{\"auths\": {{\"r.example\": {{\"auth\": {secret}}}}}}}"),
            format!(
                "{{\n  \"auths\": {{\n    \"r.example\": {{\"auth\": \"{secret}\"}}\n  }},\n  x\n}}"
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let e = CredentialStore::from_docker_config_file(&path).unwrap_err();
            let shown = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
            assert!(
                shown.contains(&*path.to_string_lossy())
                    && shown.contains("malformed JSON")
                    && shown.contains("line ")
                    && shown.contains("column "),
                "{shown}"
            );
            for secret_part in [secret.as_str(), "hunter2", "alice"] {
                assert!(!shown.contains(secret_part), "{shown}");
            }
        }
        std::fs::write(&path, "{\n  \"auths\": {\n  x\n}").unwrap();
        let e = CredentialStore::from_docker_config_file(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3 column 3"), "{e}");
    }

    #[test]
    fn a_missing_default_file_gives_an_empty_store_and_a_missing_named_file_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let store = CredentialStore::read(&missing, false).unwrap();
        assert!(store.is_empty());
        for result in [
            CredentialStore::from_docker_config(Some(&missing)),
            CredentialStore::from_docker_config_file(&missing),
        ] {
            let e = result.unwrap_err().to_string();
            assert!(
                e.contains(&*missing.to_string_lossy()) && e.contains("not found"),
                "{e}"
            );
        }
        let path = dir.path().join("config.json");
        std::fs::write(&path, br#"{"auths":{"localhost:5000":{"auth":"dTpw"}}}"#).unwrap();
        let store = CredentialStore::from_docker_config(Some(&path)).unwrap();
        assert_eq!(store.get("localhost:5000").unwrap().password(), "p");
    }

    #[test]
    fn basic_header_encodes_user_and_password() {
        assert_eq!(Credentials::new("u", "p").basic_header(), "Basic dTpw");
    }
}
