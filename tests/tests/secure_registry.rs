//! Tests of the private-registry rig itself (`SecureRegistry`, the test CA, the token server),
//! checked with curl and skopeo so the rig is validated independently of streamsnap's client.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout, WrittenImage};
use streamsnap_e2e::secure_registry::{BASIC_REALM, RegistryAuth, SecureRegistry};
use streamsnap_e2e::test_ca::TestCa;
use streamsnap_e2e::token_server::{Access, TOKEN_SERVICE, TokenServer};
use streamsnap_e2e::{
    Containerd, ContainerdOptions, TarGen, require_root, require_root_tools, run,
};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "curl", "openssl", "htpasswd"];

/// A response as curl saw it.
struct Curl {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Curl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Curl")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl Curl {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Runs `curl -sS -i -H 'Accept: <OCI manifest>' ARGS...` (the registry answers 404 for an OCI
/// manifest the request does not accept); `Err` when curl itself fails (TLS, connection), with its exit
/// code in the message (`curl exit 60` is a certificate curl does not trust).
fn curl(args: &[&str]) -> anyhow::Result<Curl> {
    let output = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "-H", MANIFEST_ACCEPT])
        .args(args)
        .output()
        .context("running curl")?;
    if !output.status.success() {
        anyhow::bail!(
            "curl exit {}: {}",
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let raw = output.stdout;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers in curl's output")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line in curl's output")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Curl {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// `curl --cacert CA [-u user:password] URL` (GET).
fn curl_get(ca: &Path, url: &str, user: Option<(&str, &str)>) -> anyhow::Result<Curl> {
    let ca = ca.display().to_string();
    let mut args = vec!["--cacert", &ca];
    let user = user.map(|(u, p)| format!("{u}:{p}"));
    if let Some(user) = &user {
        args.extend(["-u", user]);
    }
    args.push(url);
    curl(&args)
}

fn curl_bearer(registry: &SecureRegistry, path: &str, token: &str) -> anyhow::Result<Curl> {
    let ca = registry.ca_cert_path().display().to_string();
    let auth = format!("Authorization: Bearer {token}");
    let url = format!("{}{path}", registry.url());
    curl(&["--cacert", &ca, "-H", &auth, &url])
}

/// A one-layer image written to a fresh OCI layout under tag `v1`.
fn small_image() -> anyhow::Result<(OciLayout, WrittenImage)> {
    let mut layout = OciLayout::new()?;
    let tar = TarGen::new()
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"private\n")
        .finish();
    let image = layout.write_image(
        &ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::Gzip)]),
        "v1",
    )?;
    Ok((layout, image))
}

const MANIFEST_ACCEPT: &str = "Accept: application/vnd.oci.image.manifest.v1+json";

#[test]
fn tls_with_the_test_ca_works_and_fails_without_it() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let registry = SecureRegistry::start(RegistryAuth::None)?;
    let ca = registry.ca_cert_path();

    let r = curl_get(ca, &format!("{}/v2/", registry.url()), None)?;
    ensure!(r.status == 200, "GET /v2/ with the CA: {r:?}");
    let port = registry.addr().rsplit_once(':').map(|(_, p)| p.to_owned());
    let by_name = format!("https://localhost:{}/v2/", port.unwrap_or_default());
    ensure!(
        curl_get(ca, &by_name, None)?.status == 200,
        "localhost is in the SAN"
    );

    // The machine's trust store does not have the test CA; another test CA does not do either.
    let err = curl(&[&format!("{}/v2/", registry.url())]).unwrap_err();
    ensure!(format!("{err}").contains("curl exit 60"), "{err}");
    let other = TestCa::generate()?;
    let err = curl_get(
        other.ca_cert_path(),
        &format!("{}/v2/", registry.url()),
        None,
    )
    .unwrap_err();
    ensure!(format!("{err}").contains("curl exit 60"), "{err}");
    // Plain HTTP on the TLS port is refused by the registry.
    let r = curl(&[&format!("http://{}/v2/", registry.addr())])?;
    ensure!(r.status == 400, "plain HTTP: {r:?}");

    // skopeo pushes and pulls with the CA's cert dir (TLS verification on), and fails without.
    let (layout, image) = small_image()?;
    registry.push(layout.path(), "v1", "app:v1")?;
    let raw = registry.inspect_raw_as("app:v1", None)?;
    ensure!(
        raw == image.manifest_json,
        "the registry serves another manifest"
    );
    let pulled = tempfile::tempdir()?;
    registry.pull_dir("app:v1", pulled.path())?;
    let err = streamsnap_e2e::skopeo::skopeo(&[
        "inspect",
        "--raw",
        &format!("docker://{}", registry.image_ref("app:v1")),
    ])
    .unwrap_err();
    ensure!(format!("{err:#}").contains("x509"), "{err:#}");

    // A blob GET is counted in the served bytes.
    let before = registry.served_blob_bytes()?;
    let layer = &image.layers[0];
    let r = curl_get(
        ca,
        &format!("{}/v2/app/blobs/{}", registry.url(), layer.digest),
        None,
    )?;
    ensure!(r.status == 200 && r.body == layout.read_blob(&layer.digest)?);
    ensure!(registry.served_blob_bytes()? - before == layer.size);
    Ok(())
}

#[test]
fn basic_auth_needs_the_right_password_to_push_and_pull() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let mut registry = SecureRegistry::start(RegistryAuth::basic("alice", "s3cret"))?;
    let ca = registry.ca_cert_path().to_owned();
    let (layout, image) = small_image()?;

    for creds in [None, Some(("alice", "wrong")), Some(("bob", "s3cret"))] {
        let err = registry
            .push_as(layout.path(), "v1", "app:v1", creds)
            .unwrap_err();
        ensure!(
            format!("{err:#}").contains("authentication required")
                || format!("{err:#}").contains("unauthorized"),
            "push with {creds:?}: {err:#}"
        );
    }
    registry.push(layout.path(), "v1", "app:v1")?;

    let manifest_url = format!("{}/v2/app/manifests/v1", registry.url());
    let r = curl_get(&ca, &manifest_url, None)?;
    ensure!(r.status == 401, "no credentials: {r:?}");
    let challenge = format!("Basic realm=\"{BASIC_REALM}\"");
    ensure!(
        r.header("www-authenticate") == Some(challenge.as_str()),
        "{r:?}"
    );
    ensure!(curl_get(&ca, &manifest_url, Some(("alice", "wrong")))?.status == 401);
    let r = curl_get(&ca, &manifest_url, Some(("alice", "s3cret")))?;
    ensure!(r.status == 200 && r.body == image.manifest_json, "{r:?}");

    let pulled = tempfile::tempdir()?;
    registry.pull_dir("app:v1", pulled.path())?;
    ensure!(registry.pull_dir_as("app:v1", pulled.path(), None).is_err());
    ensure!(
        registry
            .pull_dir_as("app:v1", pulled.path(), Some(("alice", "wrong")))
            .is_err()
    );

    // A password rotation takes effect on the running registry.
    registry.set_password("n3w")?;
    ensure!(curl_get(&ca, &manifest_url, Some(("alice", "s3cret")))?.status == 401);
    ensure!(curl_get(&ca, &manifest_url, Some(("alice", "n3w")))?.status == 200);
    ensure!(registry.credentials() == Some(("alice", "n3w")));
    registry.pull_dir("app:v1", tempfile::tempdir()?.path())?;

    // A docker config.json with the credentials works for a client that reads one.
    let auth_file = tempfile::NamedTempFile::new()?;
    let config = registry.docker_config_json(("alice", "n3w"));
    std::fs::write(auth_file.path(), serde_json::to_vec(&config)?)?;
    let cert_dir = registry.cert_dir().display().to_string();
    let auth_path = auth_file.path().display().to_string();
    let raw = streamsnap_e2e::skopeo::skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &cert_dir,
        "--authfile",
        &auth_path,
        &format!("docker://{}", registry.image_ref("app:v1")),
    ])?;
    ensure!(raw.stdout == image.manifest_json);

    let log = registry.access_log()?;
    ensure!(
        log.iter()
            .any(|e| e.status == 401 && e.uri == "/v2/app/manifests/v1")
    );
    ensure!(
        log.iter()
            .any(|e| e.status == 200 && e.uri == "/v2/app/manifests/v1")
    );
    Ok(())
}

/// The `key="value"` parameters of a `WWW-Authenticate: Bearer ...` challenge.
fn bearer_params(challenge: &str) -> Vec<(String, String)> {
    let rest = challenge.strip_prefix("Bearer ").unwrap_or_default();
    rest.split("\",")
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[test]
fn token_auth_issues_tokens_the_registry_accepts_until_they_expire() -> anyhow::Result<()> {
    require_root_tools(TOOLS)?;
    let lifetime = Duration::from_secs(4);
    let registry = SecureRegistry::start(RegistryAuth::token("alice", "s3cret", lifetime))?;
    let tokens = registry
        .token_server()
        .context("a token registry has a token server")?;
    let ca = registry.ca_cert_path().to_owned();
    let (layout, image) = small_image()?;

    // The registry challenges with the token server's HTTPS realm.
    let r = curl_get(
        &ca,
        &format!("{}/v2/app/manifests/v1", registry.url()),
        None,
    )?;
    ensure!(r.status == 401, "{r:?}");
    let params = bearer_params(r.header("www-authenticate").context("no challenge")?);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    ensure!(
        param("realm") == Some(tokens.realm().as_str()),
        "{params:?}"
    );
    ensure!(param("service") == Some(TOKEN_SERVICE), "{params:?}");
    ensure!(param("scope") == Some("repository:app:pull"), "{params:?}");

    // skopeo gets tokens with the right password only; the counters count.
    ensure!(
        registry
            .push_as(layout.path(), "v1", "app:v1", Some(("alice", "wrong")))
            .is_err()
    );
    let refused = registry.token_requests_refused();
    ensure!(refused >= 1 && registry.tokens_issued() == 0);
    registry.push(layout.path(), "v1", "app:v1")?;
    let issued = registry.tokens_issued();
    ensure!(issued >= 1, "skopeo's push got no token");
    ensure!(
        tokens
            .requests()
            .iter()
            .any(|r| r.granted && r.scopes.iter().any(|s| s.contains("app:pull,push"))),
        "{:?}",
        tokens.requests()
    );
    let raw = registry.inspect_raw_as("app:v1", registry.credentials())?;
    ensure!(raw == image.manifest_json);
    ensure!(registry.tokens_issued() > issued);
    ensure!(registry.inspect_raw_as("app:v1", None).is_err());

    // curl: the token endpoint refuses wrong and missing credentials...
    let token_url = format!(
        "{}?service={TOKEN_SERVICE}&scope=repository:app:pull",
        tokens.realm()
    );
    let refused = registry.token_requests_refused();
    ensure!(curl_get(&ca, &token_url, Some(("alice", "wrong")))?.status == 401);
    ensure!(curl_get(&ca, &token_url, None)?.status == 401);
    ensure!(registry.token_requests_refused() == refused + 2);
    // ... and issues a token the registry accepts (GET with Basic auth).
    let issued = registry.tokens_issued();
    let r = curl_get(&ca, &token_url, registry.credentials())?;
    let issued_at = Instant::now();
    ensure!(r.status == 200, "{r:?}");
    ensure!(registry.tokens_issued() == issued + 1);
    let body = r.json()?;
    ensure!(body["expires_in"] == lifetime.as_secs(), "{body}");
    ensure!(body["issued_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    let token = body["token"].as_str().context("no token")?.to_owned();
    ensure!(body["access_token"] == token.as_str());

    let manifest_path = "/v2/app/manifests/v1";
    let r = curl_bearer(&registry, manifest_path, &token)?;
    ensure!(r.status == 200, "{r:?}");
    let ca_str = ca.display().to_string();
    ensure!(r.body == image.manifest_json, "{r:?}");
    let layer = &image.layers[0];
    let before = registry.served_blob_bytes()?;
    let r = curl_bearer(
        &registry,
        &format!("/v2/app/blobs/{}", layer.digest),
        &token,
    )?;
    ensure!(r.status == 200 && r.body == layout.read_blob(&layer.digest)?);
    ensure!(registry.served_blob_bytes()? - before == layer.size);
    // A pull token is not a push token, nor one for another repository.
    let r = curl_bearer(&registry, "/v2/other/manifests/v1", &token)?;
    ensure!(r.status == 401, "{r:?}");

    // The OAuth2 password grant (POST), as containerd tries first.
    let form = format!(
        "grant_type=password&username=alice&password=s3cret&service={TOKEN_SERVICE}\
         &scope=repository%3Aapp%3Apull&client_id=streamsnap-e2e"
    );
    let r = curl(&["--cacert", &ca_str, "--data", &form, &tokens.realm()])?;
    ensure!(r.status == 200, "{r:?}");
    let posted = r.json()?["access_token"]
        .as_str()
        .context("no access_token")?
        .to_owned();
    ensure!(curl_bearer(&registry, manifest_path, &posted)?.status == 200);
    let wrong = form.replace("s3cret", "wrong");
    ensure!(curl(&["--cacert", &ca_str, "--data", &wrong, &tokens.realm()])?.status == 401);

    // A token signed by a key outside the registry's rootcertbundle is refused.
    let stranger = TestCa::generate()?;
    let forger = TokenServer::start(&stranger, "alice", "s3cret", lifetime)?;
    let forged = forger.sign("alice", &[Access::repository("app", &["pull"])], lifetime)?;
    ensure!(curl_bearer(&registry, manifest_path, &forged)?.status == 401);

    // The token expires `lifetime` after it was issued (within the second it is rounded to),
    // not 60 s later (the registry's leeway): still good shortly before, refused after.
    let nearly_expired = issued_at + lifetime - Duration::from_millis(1500);
    thread::sleep(nearly_expired.saturating_duration_since(Instant::now()));
    ensure!(curl_bearer(&registry, manifest_path, &token)?.status == 200);
    let expired_at = issued_at + lifetime + Duration::from_millis(1500);
    thread::sleep(expired_at.saturating_duration_since(Instant::now()));
    let r = curl_bearer(&registry, manifest_path, &token)?;
    ensure!(r.status == 401, "a token past its lifetime: {r:?}");
    let log = std::fs::read_to_string(registry.log_path())?;
    ensure!(
        log.contains("token not to be used after"),
        "refused for another reason"
    );
    let fresh = curl_get(&ca, &token_url, registry.credentials())?.json()?;
    let fresh = fresh["token"].as_str().context("no token")?;
    ensure!(curl_bearer(&registry, manifest_path, fresh)?.status == 200);
    Ok(())
}

/// containerd's own registry client (in `ctr`, the code the CRI plugin uses) reaches the token
/// registry through the rig's `hosts.toml` (test CA) and gets its token by the OAuth2 password
/// grant (POST) it tries first.
#[test]
fn containerd_fetches_through_hosts_toml_with_a_token() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(&["containerd", "ctr", "docker-registry", "skopeo", "htpasswd"])?;
    let registry = SecureRegistry::start(RegistryAuth::token(
        "alice",
        "s3cret",
        Duration::from_secs(60),
    ))?;
    let tokens = registry.token_server().context("no token server")?;
    let (layout, image) = small_image()?;
    registry.push(layout.path(), "v1", "app:v1")?;
    let containerd = Containerd::start(ContainerdOptions::default())?;
    let hosts = containerd.hosts_dir().join(registry.addr());
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(hosts.join("hosts.toml"), registry.containerd_hosts_toml())?;
    let hosts_dir = containerd.hosts_dir().display().to_string();
    let image_ref = registry.image_ref("app:v1");
    let fetch = |user: &str| {
        run(&mut containerd.ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            &hosts_dir,
            "--user",
            user,
            &image_ref,
        ]))
    };

    let refused = registry.token_requests_refused();
    ensure!(fetch("alice:wrong").is_err());
    ensure!(registry.token_requests_refused() > refused);
    let issued = registry.tokens_issued();
    fetch("alice:s3cret")?;
    ensure!(registry.tokens_issued() > issued);
    ensure!(
        tokens
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.granted),
        "containerd used no password grant: {:?}",
        tokens.requests()
    );
    let listed = run(&mut containerd.ctr(&["content", "ls", "-q"]))?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for digest in [&image.manifest.digest, &image.layers[0].digest] {
        ensure!(listed.contains(&digest.to_string()), "{digest} not fetched");
    }
    Ok(())
}
