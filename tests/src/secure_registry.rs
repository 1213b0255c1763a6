//! A private registry as a node meets it on a real cluster: HTTPS with a certificate from a test
//! CA, and no auth, HTTP Basic auth (htpasswd) or bearer tokens from a token server. It is the
//! real distribution registry (`docker-registry serve`, Debian package `docker-registry`, 2.8) on
//! a free `127.0.0.1` port, with its storage, config, log and certificates in temp dirs; killed
//! and removed on drop (set `STREAMSNAP_E2E_KEEP=1` to keep the dir; the log is printed when a
//! test panics). Any number can run at once.
//!
//! ```no_run
//! use std::time::Duration;
//! use streamsnap_e2e::secure_registry::{RegistryAuth, SecureRegistry};
//! # fn main() -> anyhow::Result<()> {
//! # let layout = std::path::Path::new("/tmp/layout");
//! let auth = RegistryAuth::token("alice", "s3cret", Duration::from_secs(5));
//! let registry = SecureRegistry::start(auth)?;
//! registry.push(layout, "v1", "app:v1")?; // skopeo, trusting the test CA, with alice's password
//! let image = registry.image_ref("app:v1"); // 127.0.0.1:PORT/app:v1
//! // Point the node at `registry.ca_cert_path()` (containerd hosts.toml `ca = ...`, a docker
//! // certs.d dir from `registry.cert_dir()`) and at the credentials under test, pull `image`,
//! // then look at what the registry and the token server saw:
//! let blob_bytes = registry.served_blob_bytes()?;
//! let tokens = registry.tokens_issued();
//! let refused = registry.token_requests_refused();
//! # Ok(()) }
//! ```
//!
//! - [`RegistryAuth::None`]: HTTPS only. `GET /v2/` answers 200.
//! - [`RegistryAuth::Basic`]: `auth.htpasswd` with a bcrypt entry made by `htpasswd -Bbn`
//!   (Debian package `apache2-utils`); the registry answers 401 with
//!   `WWW-Authenticate: Basic realm="streamsnap-e2e"` without the right password. The registry
//!   rereads the file when it changes, so [`SecureRegistry::set_password`] rotates the password
//!   of a running registry.
//! - [`RegistryAuth::Token`]: `auth.token` with an in-process HTTPS [`TokenServer`] as the realm
//!   (see its module doc for the protocol, the JWTs and how `lifetime` is made exact). The
//!   registry answers 401 with `WWW-Authenticate: Bearer realm="https://127.0.0.1:T/token",
//!   service="streamsnap-e2e-registry",scope="repository:NAME:pull"`.
//!
//! Clients under test are pointed at it with [`SecureRegistry::ca_cert_path`] (curl `--cacert`),
//! [`SecureRegistry::cert_dir`] (skopeo `--*-cert-dir`, docker `certs.d/HOST:PORT/`),
//! [`SecureRegistry::containerd_hosts_toml`] (containerd's `certs.d/HOST:PORT/hosts.toml`, as
//! the CRI plugin's `config_path` or `ctr --hosts-dir`) and, for credentials,
//! [`SecureRegistry::credentials`] or [`SecureRegistry::docker_config_json`]. Images go in with
//! the skopeo helpers of [`crate::secure_skopeo`] (`push`, `pull_dir`, `inspect_raw_as`).
//!
//! [`SecureRegistry::access_log`] and [`SecureRegistry::served_blob_bytes`] read the registry's
//! Apache combined access log, like [`crate::registry::Registry`] does, after a barrier request
//! (`GET /v2/?streamsnap-e2e-barrier=N` over HTTPS, which needs no credentials to be logged).
//! [`crate::https::https_get`] peeks at the registry from a test with the test CA trusted.
//!
//! The rig's own tests (`tests/tests/secure_registry.rs`) check it with curl, skopeo and `ctr`,
//! independently of streamsnap's registry client.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::bins::run;
use crate::registry::{AccessLogEntry, Process, free_port, parse_access_log};
use crate::test_ca::TestCa;
use crate::token_server::{TOKEN_ISSUER, TOKEN_SERVICE, TokenServer};
use crate::{http, https};

/// The realm of the registry's Basic auth challenge.
pub const BASIC_REALM: &str = "streamsnap-e2e";

/// How clients must authenticate to a [`SecureRegistry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Anyone may pull and push (over HTTPS).
    None,
    /// HTTP Basic auth of one user (htpasswd, bcrypt).
    Basic { user: String, password: String },
    /// Bearer tokens from a token server that knows one user; the registry accepts a token for
    /// `lifetime` (whole seconds, rounded up) after it was issued.
    Token {
        user: String,
        password: String,
        lifetime: Duration,
    },
}

impl RegistryAuth {
    /// [`RegistryAuth::Basic`].
    pub fn basic(user: &str, password: &str) -> Self {
        Self::Basic {
            user: user.into(),
            password: password.into(),
        }
    }

    /// [`RegistryAuth::Token`].
    pub fn token(user: &str, password: &str, lifetime: Duration) -> Self {
        Self::Token {
            user: user.into(),
            password: password.into(),
            lifetime,
        }
    }

    /// The user and password, `None` for [`RegistryAuth::None`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match self {
            Self::None => None,
            Self::Basic { user, password } | Self::Token { user, password, .. } => {
                Some((user, password))
            }
        }
    }
}

/// A running HTTPS `docker-registry` with auth. See the module doc.
#[derive(Debug)]
pub struct SecureRegistry {
    // Dropped in this order: the registry and its temp dir, the token server, the CA.
    process: Process,
    auth: RegistryAuth,
    token_server: Option<TokenServer>,
    ca: TestCa,
}

impl SecureRegistry {
    /// Generates a test CA, starts the token server for [`RegistryAuth::Token`], and starts the
    /// registry with TLS and `auth`.
    pub fn start(auth: RegistryAuth) -> anyhow::Result<Self> {
        let ca = TestCa::generate()?;
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-secure-registry.")
            .tempdir()
            .context("creating a temp dir for the registry")?;
        let token_server = match &auth {
            RegistryAuth::Token {
                user,
                password,
                lifetime,
            } => Some(TokenServer::start(&ca, user, password, *lifetime)?),
            _ => None,
        };
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic { user, password } => {
                let path = dir.path().join("htpasswd");
                write_htpasswd(&path, user, password)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: {BASIC_REALM}\n    path: {}\n",
                    path.display()
                )
            }
            RegistryAuth::Token { .. } => {
                let server = token_server.as_ref().expect("started above");
                format!(
                    "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.realm(),
                    ca.token_signer().cert.display()
                )
            }
        };
        let storage = dir.path().join("storage");
        let process = Process::start(
            dir,
            free_port,
            |addr| {
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n  tls:\n    certificate: {}\n    key: {}\n\
                     {auth_yaml}",
                    storage.display(),
                    ca.server().cert.display(),
                    ca.server().key.display(),
                )
            },
            // 200 without auth, 401 with.
            |addr| {
                https::https_get(&ca, addr, "/v2/", &[])
                    .is_ok_and(|r| matches!(r.status, 200 | 401))
            },
            "GET https:///v2/ answering 200 or 401",
        )?;
        Ok(Self {
            process,
            auth,
            token_server,
            ca,
        })
    }

    /// `127.0.0.1:PORT`, for image references.
    pub fn addr(&self) -> String {
        self.process.addr().to_owned()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.process.addr())
    }

    /// `127.0.0.1:PORT/{name}` for `name` = `repo:tag` or `repo@sha256:...`.
    pub fn image_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.process.addr())
    }

    /// The auth the registry was started with (the password as last set).
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// The user and password, `None` without auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.credentials()
    }

    /// The test CA whose certificates the registry and the token server use.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The CA certificate (PEM) a client must trust.
    pub fn ca_cert_path(&self) -> &Path {
        self.ca.ca_cert_path()
    }

    /// A directory holding only `ca.crt`, for skopeo's `--*-cert-dir` and docker `certs.d`.
    pub fn cert_dir(&self) -> PathBuf {
        self.ca.cert_dir()
    }

    /// The token server, for [`RegistryAuth::Token`].
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Tokens issued by the token server so far (0 without one).
    pub fn tokens_issued(&self) -> u64 {
        self.token_server.as_ref().map_or(0, |t| t.tokens_issued())
    }

    /// Token requests the token server refused so far (0 without one).
    pub fn token_requests_refused(&self) -> u64 {
        self.token_server
            .as_ref()
            .map_or(0, |t| t.requests_refused())
    }

    /// A docker `config.json` (`{"auths": {"127.0.0.1:PORT": {"auth": base64(user:password)}}}`)
    /// holding `creds` for this registry, for clients that read docker credentials.
    pub fn docker_config_json(&self, creds: (&str, &str)) -> serde_json::Value {
        let auth = STANDARD.encode(format!("{}:{}", creds.0, creds.1));
        serde_json::json!({"auths": {self.process.addr().to_owned(): {"auth": auth}}})
    }

    /// A containerd `hosts.toml` (for `certs.d/127.0.0.1:PORT/hosts.toml` under the CRI
    /// registry `config_path`) that reaches this registry over HTTPS trusting the test CA.
    pub fn containerd_hosts_toml(&self) -> String {
        format!(
            "server = \"https://{addr}\"\n\n[host.\"https://{addr}\"]\n  \
             capabilities = [\"pull\", \"resolve\", \"push\"]\n  ca = \"{ca}\"\n",
            addr = self.process.addr(),
            ca = self.ca_cert_path().display()
        )
    }

    /// Changes the password the registry (Basic: the htpasswd file, reread by the registry on
    /// its next request) or the token server (Token) accepts from now on.
    pub fn set_password(&mut self, password: &str) -> anyhow::Result<()> {
        let htpasswd = self.dir().join("htpasswd");
        match &mut self.auth {
            RegistryAuth::None => bail!("the registry was started without auth"),
            RegistryAuth::Basic { user, password: p } => {
                let path = htpasswd;
                write_htpasswd(&path, user, password)?;
                *p = password.to_owned();
            }
            RegistryAuth::Token { password: p, .. } => {
                self.token_server
                    .as_ref()
                    .expect("a token registry has a token server")
                    .set_password(password);
                *p = password.to_owned();
            }
        }
        Ok(())
    }

    /// The registry's stdout and stderr (logrus lines and the access log).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The temp dir holding config.yml, htpasswd, the log and the storage (`storage/`).
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// The registry's process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `GET https://{addr}{path}` trusting the test CA, with extra headers (e.g.
    /// `Authorization`).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<http::Response> {
        https::https_get(&self.ca, self.process.addr(), path, headers)
    }

    /// Every access log line so far, including requests that completed before this call.
    pub fn access_log(&self) -> anyhow::Result<Vec<AccessLogEntry>> {
        Ok(parse_access_log(&self.barrier()?))
    }

    /// Total bytes the registry wrote answering blob GETs (200 and 206) since it started.
    pub fn served_blob_bytes(&self) -> anyhow::Result<u64> {
        Ok(self
            .access_log()?
            .iter()
            .filter(|e| e.is_served_blob())
            .map(|e| e.bytes)
            .sum())
    }

    /// Without credentials the barrier request is answered 401, and logged all the same.
    fn barrier(&self) -> anyhow::Result<String> {
        self.process
            .barrier(|path| self.get(path, &[]), &[200, 401])
    }
}

/// Writes `user:BCRYPT` with `htpasswd -Bbn` to a new file renamed over `path`, so the registry
/// never reads half a file.
fn write_htpasswd(path: &Path, user: &str, password: &str) -> anyhow::Result<()> {
    let output = run(Command::new("htpasswd").args(["-Bbn", user, password]))
        .context("making a bcrypt htpasswd entry")?;
    let tmp = path.with_extension("new");
    fs::write(&tmp, &output.stdout).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
