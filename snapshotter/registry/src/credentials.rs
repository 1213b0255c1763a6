//! Registry credentials: given explicitly or read from a Docker `config.json`. Secrets never
//! appear in `Debug` output or log lines.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

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

/// Credentials by registry host. Keys are normalised: scheme and path dropped, lowercase, and the
/// Docker Hub aliases (`index.docker.io`, `registry-1.docker.io`) folded into `docker.io`.
#[derive(Clone, Default)]
pub struct CredentialStore {
    entries: HashMap<String, Credentials>,
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        hosts.sort_unstable();
        f.debug_struct("CredentialStore")
            .field("registries", &hosts)
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
        for (host, helper) in &config.cred_helpers {
            tracing::warn!(
                registry = %host,
                helper = %helper,
                config = %path.display(),
                "credentials for this registry come from a docker credential helper, which \
                 streamsnap does not run; put them in \"auths\" or pass them explicitly"
            );
        }
        let mut store = Self::default();
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
                None => {
                    if let Some(creds_store) = &config.creds_store {
                        tracing::warn!(
                            registry = %key,
                            store = %creds_store,
                            config = %path.display(),
                            "credentials for this registry are in a docker credential store, \
                             which streamsnap does not read; pass them explicitly"
                        );
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn insert(&mut self, registry: &str, credentials: Credentials) {
        self.entries
            .insert(normalize_registry(registry), credentials);
    }

    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        self.entries.get(&normalize_registry(registry))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
