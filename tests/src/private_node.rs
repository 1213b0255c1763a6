//! A streaming node that pulls from a private registry ([`SecureRegistry`]: HTTPS with a test
//! CA, Basic or bearer-token auth) with no docker config of its own, and the credential sources
//! the daemon can be given instead: a kubelet credential provider plugin ([`CredentialPlugin`],
//! a `sh` script speaking the real `credentialprovider.kubelet.k8s.io/v1` JSON protocol), a
//! docker credential helper ([`CredentialHelper`], `docker-credential-NAME get`), or the pull
//! secrets its CRI proxy sees. Both count their runs in a file.
//!
//! [`find_secrets`] looks for passwords and tokens everywhere the daemon leaves text: its log
//! and root (every regular file, FUSE mounts not entered), the containerd log, `/metrics`,
//! `/debug/profile`, and the command lines and environments of the daemon and its FUSE holder.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use streamsnap_format::Digest;
use tempfile::TempDir;

use crate::image::{Compression, ImageSpec, LayerBlob, OciLayout, WrittenImage};
use crate::registry::AccessLogEntry;
use crate::secure_registry::SecureRegistry;
use crate::targen::pseudo_random_bytes;
use crate::{Containerd, Snapshotterd, TarGen, workspace_bin};

/// Data files in a [`PrivateImage`]: incompressible, 3 chunks each.
pub const DATA_FILES: usize = 8;
pub const DATA_FILE_SIZE: usize = 3 << 20;

/// A converted image in a private registry: busybox and a layer of data files.
#[derive(Debug)]
pub struct PrivateImage {
    /// `127.0.0.1:PORT/REPO:v1`.
    pub reference: String,
    pub written: WrittenImage,
    /// (path in the image, sha256 hex) of every data file.
    pub files: Vec<(String, String)>,
}

impl PrivateImage {
    /// Builds the image (data seeded by `seed`), pushes it as `repo:v1` with the registry's
    /// credentials and converts it with the CLI over verified TLS.
    pub fn push_and_convert(
        registry: &SecureRegistry,
        repo: &str,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let mut tar = TarGen::new();
        tar.dir("data", 0o755);
        let mut files = Vec::new();
        for i in 0..DATA_FILES {
            let data = pseudo_random_bytes(seed * 100 + i as u64, DATA_FILE_SIZE);
            let path = format!("data/f{i}.bin");
            tar.file(&path, 0o644, &data);
            files.push((format!("/{path}"), Digest::sha256(&data).hex()));
        }
        let spec = ImageSpec::busybox(vec![LayerBlob::new(tar.finish(), Compression::Gzip)])?;
        let mut layout = OciLayout::new()?;
        let written = layout.write_image(&spec, "v1")?;
        registry.push(layout.path(), "v1", &format!("{repo}:v1"))?;
        let reference = registry.image_ref(&format!("{repo}:v1"));
        let output = streamsnap_tls(
            registry,
            &[
                "artifact-streaming",
                "create",
                "--image",
                &reference,
                "--https",
            ],
            true,
        )?;
        ensure!(
            output.status.success(),
            "converting {reference} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(Self {
            reference,
            written,
            files,
        })
    }

    /// The digests of the image's own layers.
    pub fn layer_digests(&self) -> Vec<String> {
        self.written
            .layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect()
    }
}

/// `streamsnap ARGS` trusting the registry's CA through `SSL_CERT_FILE` alone, with no docker
/// config (an empty `DOCKER_CONFIG`), and with the registry's user and password
/// (`--username U --password-stdin`) when `with_credentials`.
pub fn streamsnap_tls(
    registry: &SecureRegistry,
    args: &[&str],
    with_credentials: bool,
) -> anyhow::Result<Output> {
    let no_docker_config = tempfile::tempdir()?;
    let mut command = Command::new(workspace_bin("streamsnap")?);
    command
        .args(args)
        .env("SSL_CERT_FILE", registry.ca_cert_path())
        .env("DOCKER_CONFIG", no_docker_config.path())
        .env_remove("STREAMSNAP_USERNAME")
        .env_remove("STREAMSNAP_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let password = match registry.credentials().filter(|_| with_credentials) {
        Some((user, password)) => {
            command.args(["--username", user, "--password-stdin"]);
            Some(password.to_owned())
        }
        None => None,
    };
    command.stdin(if password.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().context("starting streamsnap")?;
    if let (Some(password), Some(mut stdin)) = (password, child.stdin.take()) {
        use std::io::Write as _;
        stdin.write_all(password.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// `streamsnap pull --containerd-socket SOCKET IMAGE`, passing `creds` in the CRI
/// `PullImageRequest.auth` (`--username U --password-stdin`) as the kubelet passes a pull secret.
pub fn cri_pull(socket: &Path, image: &str, creds: Option<(&str, &str)>) -> anyhow::Result<Output> {
    let mut command = Command::new(workspace_bin("streamsnap")?);
    command
        .arg("pull")
        .arg("--containerd-socket")
        .arg(socket)
        .args(["--timeout", "300", image])
        .env_remove("STREAMSNAP_USERNAME")
        .env_remove("STREAMSNAP_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((user, _)) = creds {
        command.args(["--username", user, "--password-stdin"]);
    }
    command.stdin(if creds.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().context("starting streamsnap pull")?;
    if let (Some((_, password)), Some(mut stdin)) = (creds, child.stdin.take()) {
        use std::io::Write as _;
        stdin.write_all(password.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Makes the CRI plugin of `containerd` reach `registry` over HTTPS trusting its CA
/// (`hosts.d/127.0.0.1:PORT/hosts.toml`).
pub fn trust_registry(containerd: &Containerd, registry: &SecureRegistry) -> anyhow::Result<()> {
    let dir = containerd.hosts_dir().join(registry.addr());
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("hosts.toml"), registry.containerd_hosts_toml())?;
    Ok(())
}

/// The daemon's `[registry.hosts."127.0.0.1:PORT"]`: HTTPS although loopback, trusting the
/// registry's CA with `ca_file` when `ca_file` (else the system roots, e.g. `SSL_CERT_FILE`).
pub fn daemon_host_config(registry: &SecureRegistry, ca_file: bool) -> String {
    let mut toml = format!(
        "[registry.hosts.\"{}\"]\nplain_http = false\n",
        registry.addr()
    );
    if ca_file {
        toml.push_str(&format!(
            "ca_file = {:?}\n",
            registry.ca_cert_path().display().to_string()
        ));
    }
    toml
}

/// Writes an executable script.
fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Lines in a counter file (0 when it does not exist).
fn count_lines(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// A kubelet credential provider plugin and the `CredentialProviderConfig` naming it, in a temp
/// dir: the plugin reads the `CredentialProviderRequest` on stdin (kept, one per line, in
/// `requests.jsonl`) and answers a `CredentialProviderResponse` with `cacheKeyType: Registry`
/// holding the credentials for the registry.
#[derive(Debug)]
pub struct CredentialPlugin {
    dir: TempDir,
}

/// The plugin's file name in its bin dir.
pub const PLUGIN_NAME: &str = "e2e-credential-provider";

impl CredentialPlugin {
    /// A plugin answering `user`/`password` for `registry_addr`, its answers cached
    /// `cache_duration` (a Go duration).
    pub fn new(
        registry_addr: &str,
        user: &str,
        password: &str,
        cache_duration: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ss-plugin-").tempdir()?;
        let bin = dir.path().join("bin");
        fs::create_dir(&bin)?;
        let response = serde_json::json!({
            "kind": "CredentialProviderResponse",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "cacheKeyType": "Registry",
            "cacheDuration": cache_duration,
            "auth": {registry_addr: {"username": user, "password": password}},
        });
        let requests = dir.path().join("requests.jsonl");
        let script = format!(
            "#!/bin/sh\nset -e\nrequest=$(cat)\nprintf '%s\\n' \"$request\" >> '{}'\ncat <<'EOF'\n{}\nEOF\n",
            requests.display(),
            response
        );
        write_script(&bin.join(PLUGIN_NAME), &script)?;
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  \
             - name: {PLUGIN_NAME}\n    matchImages:\n      - \"{registry_addr}\"\n    \
             defaultCacheDuration: \"1m\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
        );
        fs::write(dir.path().join("config.yaml"), config)?;
        Ok(Self { dir })
    }

    /// `--image-credential-provider-config FILE --image-credential-provider-bin-dir DIR`.
    pub fn daemon_args(&self) -> Vec<String> {
        vec![
            "--image-credential-provider-config".into(),
            self.dir.path().join("config.yaml").display().to_string(),
            "--image-credential-provider-bin-dir".into(),
            self.dir.path().join("bin").display().to_string(),
        ]
    }

    /// The requests the plugin got, parsed, oldest first.
    pub fn requests(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = fs::read_to_string(self.dir.path().join("requests.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    /// How many times the plugin ran.
    pub fn runs(&self) -> usize {
        count_lines(&self.dir.path().join("requests.jsonl"))
    }
}

/// A docker credential helper `docker-credential-e2e` in a temp bin dir and a docker config
/// naming it for one registry (`credHelpers`), holding no credentials itself. The helper answers
/// `get` for that registry with the credentials, and "credentials not found" for any other.
#[derive(Debug)]
pub struct CredentialHelper {
    dir: TempDir,
}

impl CredentialHelper {
    pub fn new(registry_addr: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ss-helper-").tempdir()?;
        let bin = dir.path().join("bin");
        let config = dir.path().join("docker");
        fs::create_dir(&bin)?;
        fs::create_dir(&config)?;
        let answer = serde_json::json!({
            "ServerURL": registry_addr,
            "Username": user,
            "Secret": password,
        });
        let runs = dir.path().join("runs");
        let script = format!(
            "#!/bin/sh\nserver=$(cat)\necho \"$1 $server\" >> '{}'\n\
             if [ \"$1\" = get ] && [ \"$server\" = '{registry_addr}' ]; then\n  \
             cat <<'EOF'\n{answer}\nEOF\n  exit 0\nfi\n\
             echo 'credentials not found in native keychain'\nexit 1\n",
            runs.display()
        );
        write_script(&bin.join("docker-credential-e2e"), &script)?;
        let docker_config = serde_json::json!({"credHelpers": {registry_addr: "e2e"}});
        fs::write(
            config.join("config.json"),
            serde_json::to_vec(&docker_config)?,
        )?;
        Ok(Self { dir })
    }

    /// `PATH` with the helper's dir first and `DOCKER_CONFIG` naming its config, for the daemon.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_default();
        vec![
            (
                "PATH".into(),
                format!("{}:{path}", self.dir.path().join("bin").display()),
            ),
            (
                "DOCKER_CONFIG".into(),
                self.dir.path().join("docker").display().to_string(),
            ),
        ]
    }

    /// Each run: `ACTION SERVER`.
    pub fn runs(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("runs"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// An empty dir for `DOCKER_CONFIG`: the daemon finds no docker config (the node has none).
pub fn no_docker_config() -> anyhow::Result<(TempDir, (String, String))> {
    let dir = tempfile::Builder::new().prefix("ss-nodocker-").tempdir()?;
    let env = ("DOCKER_CONFIG".to_owned(), dir.path().display().to_string());
    Ok((dir, env))
}

/// What the registry did with one image's blobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobReads {
    /// GETs of the image's own layers that served content (a download): 0 when lazy.
    pub layer_downloads: usize,
    /// Bytes of those.
    pub layer_bytes: u64,
    /// 206 answers to blob GETs (range reads), of any blob of the repository.
    pub range_reads: usize,
    /// 401 answers (requests that came without valid credentials).
    pub unauthorized: usize,
}

/// Counts `log`'s blob reads of `image` (its repository's blobs for range reads).
pub fn blob_reads(log: &[AccessLogEntry], image: &PrivateImage) -> BlobReads {
    let layers = image.layer_digests();
    let repo = image
        .reference
        .split_once('/')
        .and_then(|(_, r)| r.rsplit_once(':'))
        .map_or("", |(r, _)| r);
    let prefix = format!("/v2/{repo}/blobs/");
    let mut reads = BlobReads::default();
    for entry in log {
        if entry.status == 401 && entry.uri.starts_with(&format!("/v2/{repo}/")) {
            reads.unauthorized += 1;
        }
        if !entry.is_served_blob() || !entry.uri.starts_with(&prefix) {
            continue;
        }
        if entry.status == 206 {
            reads.range_reads += 1;
        }
        if entry
            .blob_get_digest()
            .is_some_and(|d| layers.iter().any(|l| l == d))
        {
            reads.layer_downloads += 1;
            reads.layer_bytes += entry.bytes;
        }
    }
    reads
}

/// Where [`find_secrets`] found a secret, and how much it read.
#[derive(Debug, Default)]
pub struct SecretScan {
    /// `(place, which secret)` of every find.
    pub found: Vec<(String, String)>,
    /// Places read (files, endpoints, /proc entries).
    pub places: usize,
    /// Bytes read.
    pub bytes: u64,
}

impl SecretScan {
    fn check(&mut self, place: &str, text: &[u8], secrets: &[(&str, Vec<u8>)]) {
        self.places += 1;
        self.bytes += text.len() as u64;
        for (name, secret) in secrets {
            if !secret.is_empty() && text.windows(secret.len()).any(|w| w == secret.as_slice()) {
                self.found.push((place.to_owned(), (*name).to_owned()));
            }
        }
    }

    /// Every regular file below `dir`, not entering other file systems (FUSE layer mounts).
    fn check_tree(&mut self, dir: &Path, device: u64, secrets: &[(&str, Vec<u8>)]) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(meta) = path.symlink_metadata() else {
                continue;
            };
            if meta.dev() != device {
                continue;
            }
            if meta.is_dir() {
                self.check_tree(&path, device, secrets);
            } else if meta.is_file()
                && let Ok(data) = fs::read(&path)
            {
                self.check(&path.display().to_string(), &data, secrets);
            }
        }
    }
}

/// The secrets to look for, named: `password`, `basic` (base64 of `user:password`, as in an
/// `Authorization: Basic` header or a docker config) and, with a token server, `token`: the
/// first part of every token it signs (the JWT header, the same for all of them).
pub fn secrets_of(registry: &SecureRegistry) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let (user, password) = registry
        .credentials()
        .context("the registry has no credentials")?;
    let mut secrets = vec![
        ("password", password.as_bytes().to_vec()),
        (
            "basic",
            STANDARD.encode(format!("{user}:{password}")).into_bytes(),
        ),
    ];
    if let Some(tokens) = registry.token_server() {
        let token = tokens.sign(user, &[], std::time::Duration::from_secs(1))?;
        let header = token.split('.').next().context("a token without parts")?;
        secrets.push(("token", header.as_bytes().to_vec()));
    }
    Ok(secrets)
}

/// Looks for `secrets` in the daemon's dir (log, config, root: every regular file), the
/// containerd log, the daemon's `/metrics` and `/debug/profile`, and `/proc/PID/cmdline` and
/// `environ` of the daemon and its FUSE holder. `sanity` must be found in the daemon's log (the
/// scan reads what it should).
pub fn find_secrets(
    daemon: &Snapshotterd,
    containerd: &Containerd,
    secrets: &[(&str, Vec<u8>)],
    sanity: &str,
) -> anyhow::Result<SecretScan> {
    let mut scan = SecretScan::default();
    let log = fs::read(daemon.log_path())?;
    ensure!(
        log.windows(sanity.len()).any(|w| w == sanity.as_bytes()),
        "the daemon's log does not name {sanity}: the scan would prove nothing"
    );
    let device = fs::metadata(daemon.dir())?.dev();
    scan.check_tree(daemon.dir(), device, secrets);
    scan.check(
        &containerd.log_path().display().to_string(),
        &fs::read(containerd.log_path())?,
        secrets,
    );
    for path in ["/metrics", "/debug/profile"] {
        scan.check(path, &daemon.get(path)?, secrets);
    }
    let mut pids = vec![daemon.pid()];
    pids.extend(daemon.holder_pids());
    for pid in pids {
        for part in ["cmdline", "environ"] {
            let path = PathBuf::from(format!("/proc/{pid}/{part}"));
            if let Ok(data) = fs::read(&path) {
                scan.check(&path.display().to_string(), &data, secrets);
            }
        }
    }
    Ok(scan)
}
