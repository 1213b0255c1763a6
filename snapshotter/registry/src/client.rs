//! The client handle, its configuration, and how registry URLs are built, resolved and shown.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::auth::AuthCache;
use crate::credentials::{CredentialSource, CredentialStore, normalize_registry};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reference::{DOCKER_HUB, Repository};

/// How the client reaches registries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub credentials: CredentialStore,
    /// Asked before `credentials`, in order, for each repository (kubelet credential provider
    /// plugins, pull secrets a CRI proxy saw).
    pub sources: Vec<Arc<dyn CredentialSource>>,
    /// Registries (`host[:port]`) reached over plain HTTP. `localhost`, `127.0.0.0/8` and `[::1]`
    /// are too, unless listed in `https`; every other registry is reached over HTTPS, verified
    /// with the system roots (`SSL_CERT_FILE`, `SSL_CERT_DIR` honoured) and its `ca_files`.
    pub plain_http: Vec<String>,
    /// Loopback registries reached over HTTPS all the same.
    pub https: Vec<String>,
    /// CA certificates (PEM files) trusted for one registry each, beside the system roots:
    /// `(host[:port], file)`; the port is ignored (TLS verifies the host name).
    pub ca_files: Vec<(String, std::path::PathBuf)>,
    pub connect_timeout: Duration,
    /// Bound on waiting for response headers, and on any stall between body chunks. Requests
    /// with a body get one more second per 256 KiB of it, for sending it.
    pub request_timeout: Duration,
    /// Extra attempts for GET/HEAD on connect errors, resets, timeouts, 429 and 5xx (and for
    /// any request whose connection could not be established), with exponential backoff from
    /// 200 ms capped at 5 s.
    pub retries: u32,
    /// Size of each PATCH of a chunked upload.
    pub upload_chunk_size: usize,
    pub user_agent: String,
    /// Where the client counts its requests, range reads, retries and token fetches. `None`:
    /// handles registered nowhere (see [`Metrics::register`] to export them).
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            credentials: CredentialStore::default(),
            sources: Vec::new(),
            plain_http: Vec::new(),
            https: Vec::new(),
            ca_files: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            retries: 3,
            upload_chunk_size: 16 << 20,
            user_agent: concat!("streamsnap/", env!("CARGO_PKG_VERSION")).to_owned(),
            metrics: None,
        }
    }
}

type HttpClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An OCI distribution client. Cheap to clone: clones share connections and the token cache.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    pub http: HttpClient,
    pub auth: AuthCache,
    pub user_agent: HeaderValue,
    pub metrics: Arc<Metrics>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self> {
        let user_agent =
            HeaderValue::from_str(&config.user_agent).map_err(|_| Error::InvalidConfig {
                field: "user_agent",
                reason: "not a valid HTTP header value",
            })?;
        if config.upload_chunk_size == 0 {
            return Err(Error::InvalidConfig {
                field: "upload_chunk_size",
                reason: "must be at least 1 byte",
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = crate::tls::verifier(provider.clone(), &config.ca_files)?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(Error::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        let metrics = config.metrics.clone().unwrap_or_default();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                auth: AuthCache::default(),
                user_agent,
                metrics,
            }),
        })
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The metrics this client counts into (those of [`ClientConfig::metrics`], or its own).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// `<scheme>://<host>/v2/<name>/<tail>`.
    pub(crate) fn url(&self, repo: &Repository, tail: &str) -> Result<Uri> {
        let scheme = if self.is_plain_http(&repo.registry) {
            "http"
        } else {
            "https"
        };
        let host = api_host(&repo.registry);
        let url = format!("{scheme}://{host}/v2/{}/{tail}", repo.name);
        url.parse().map_err(|_| Error::InvalidUrl {
            url: redact_str(&url),
            reason: "not a valid URL",
        })
    }

    fn is_plain_http(&self, registry: &str) -> bool {
        let wanted = normalize_registry(registry);
        let listed = |list: &[String]| list.iter().any(|r| normalize_registry(r) == wanted);
        (is_loopback(registry) && !listed(&self.inner.config.https))
            || listed(&self.inner.config.plain_http)
    }
}

/// The host API requests go to: Docker Hub's API is not on `docker.io` itself.
fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        registry
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Going from `from` to `to` leaves TLS: `from` is HTTPS and `to` is not. A request to a
/// registry reached over HTTPS is never sent on in clear (its credentials, its token, a signed
/// URL's query, an upload's state), whoever asks for it: the registry, or someone rewriting its
/// answers.
pub(crate) fn leaves_tls(from: &Uri, to: &Uri) -> bool {
    from.scheme() == Some(&Scheme::HTTPS) && to.scheme() != Some(&Scheme::HTTPS)
}

/// Resolves a `Location` (or `Link`) target against the URL of the request it answered:
/// absolute, scheme-relative, absolute-path or relative-path forms. A target that would take a
/// request made over HTTPS to plain HTTP is refused ([`leaves_tls`]).
pub(crate) fn resolve_location(base: &Uri, location: &str) -> Result<Uri> {
    let invalid = |reason| Error::InvalidUrl {
        url: redact_str(location),
        reason,
    };
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let absolute = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else if location.contains("://") {
        return Err(invalid("only http and https locations are followed"));
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{scheme}://{authority}{dir}/{location}")
    };
    let uri: Uri = absolute.parse().map_err(|_| invalid("not a valid URL"))?;
    if uri.authority().is_none() {
        return Err(invalid("no host"));
    }
    if leaves_tls(base, &uri) {
        return Err(Error::InsecureRedirect {
            url: display_url(base),
            location: display_url(&uri),
        });
    }
    Ok(uri)
}

/// Adds `key=value` (value percent-encoded) to the query of `uri`, keeping what is there.
pub(crate) fn with_query(uri: &Uri, key: &str, value: &str) -> Result<Uri> {
    let s = uri.to_string();
    let sep = match uri.query() {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    let url = format!("{s}{sep}{key}={}", encode_query(value));
    url.parse().map_err(|_| Error::InvalidUrl {
        url: redact_str(&url),
        reason: "not a valid URL",
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL as it may appear in errors and logs: scheme, host and path, without userinfo and query
/// (upload state and signed redirect URLs keep their secrets in the query).
pub(crate) fn display_url(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match uri.scheme_str() {
        Some(scheme) => format!("{scheme}://{host}{}", uri.path()),
        None => uri.path().to_owned(),
    }
}

/// [`display_url`] for a string that may not parse as a URL.
pub(crate) fn redact_str(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => no_query.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(plain: &[&str]) -> Client {
        Client::new(ClientConfig {
            plain_http: plain.iter().map(|s| s.to_string()).collect(),
            ..ClientConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn scheme_is_http_only_for_loopback_and_listed_registries() {
        let c = client(&["reg.lan:5000"]);
        let url = |r: &str| {
            c.url(&Repository::new(r, "a/b"), "tags/list")
                .unwrap()
                .to_string()
        };
        assert_eq!(
            url("127.0.0.1:5000"),
            "http://127.0.0.1:5000/v2/a/b/tags/list"
        );
        assert_eq!(url("127.1.2.3"), "http://127.1.2.3/v2/a/b/tags/list");
        assert_eq!(url("localhost"), "http://localhost/v2/a/b/tags/list");
        assert_eq!(url("[::1]:5000"), "http://[::1]:5000/v2/a/b/tags/list");
        assert_eq!(url("reg.lan:5000"), "http://reg.lan:5000/v2/a/b/tags/list");
        assert_eq!(url("reg.lan:5001"), "https://reg.lan:5001/v2/a/b/tags/list");
        assert_eq!(url("128.0.0.1"), "https://128.0.0.1/v2/a/b/tags/list");
        assert_eq!(
            url("docker.io"),
            "https://registry-1.docker.io/v2/a/b/tags/list"
        );
    }

    #[test]
    fn locations_resolve_in_every_form() {
        let base: Uri = "http://r:5000/v2/a/blobs/uploads/x?_state=1"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l).unwrap().to_string();
        assert_eq!(
            r("/v2/a/blobs/uploads/y?_state=2"),
            "http://r:5000/v2/a/blobs/uploads/y?_state=2"
        );
        assert_eq!(
            r("https://s3.example/b?sig=1"),
            "https://s3.example/b?sig=1"
        );
        assert_eq!(r("//cdn.example/b"), "http://cdn.example/b");
        assert_eq!(r("z?q=1"), "http://r:5000/v2/a/blobs/uploads/z?q=1");
        assert!(resolve_location(&base, "ftp://x/y").is_err());
    }

    #[test]
    fn locations_never_take_https_to_plain_http() {
        let base: Uri = "https://r.example/v2/a/blobs/uploads/x?_state=1"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l);
        assert_eq!(
            r("//cdn.example/b").unwrap().to_string(),
            "https://cdn.example/b"
        );
        assert_eq!(
            r("/v2/a/blobs/uploads/y").unwrap().to_string(),
            "https://r.example/v2/a/blobs/uploads/y"
        );
        let e = r("http://r.example/v2/a/blobs/uploads/y?_state=secret").unwrap_err();
        assert!(matches!(e, Error::InsecureRedirect { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(
            shown.contains("https://r.example/v2/a/blobs/uploads/x")
                && shown.contains("http://r.example/v2/a/blobs/uploads/y")
                && shown.contains("https://")
                && !shown.contains("secret")
                && !shown.contains("_state"),
            "{shown}"
        );
        let upper: Uri = "HTTPS://r.example/v2/".parse().unwrap();
        assert!(resolve_location(&upper, "http://r.example/v2/").is_err());
        let plain: Uri = "http://127.0.0.1:5000/v2/a".parse().unwrap();
        assert!(resolve_location(&plain, "http://127.0.0.1:5001/b").is_ok());
        assert!(leaves_tls(
            &base,
            &"http://auth.example/token".parse().unwrap()
        ));
        assert!(!leaves_tls(
            &plain,
            &"http://auth.example/token".parse().unwrap()
        ));
        assert!(!leaves_tls(
            &plain,
            &"https://auth.example/token".parse().unwrap()
        ));
    }

    #[test]
    fn query_params_append_and_encode() {
        let u: Uri = "http://r/up/1?_state=abc".parse().unwrap();
        assert_eq!(
            with_query(&u, "digest", "sha256:ab").unwrap().to_string(),
            "http://r/up/1?_state=abc&digest=sha256%3Aab"
        );
        let u: Uri = "http://r/up/1".parse().unwrap();
        assert_eq!(
            with_query(&u, "a", "b c").unwrap().to_string(),
            "http://r/up/1?a=b%20c"
        );
    }

    #[test]
    fn displayed_urls_drop_userinfo_and_query() {
        let u: Uri = "https://user:pw@s3.example:443/b/c?X-Amz-Signature=s"
            .parse()
            .unwrap();
        assert_eq!(display_url(&u), "https://s3.example:443/b/c");
        assert_eq!(redact_str("https://user:pw@h/p?sig=1#f"), "https://h/p");
        assert_eq!(redact_str("/rel?x"), "/rel");
    }

    #[test]
    fn bad_config_is_refused() {
        let bad = ClientConfig {
            user_agent: "a\nb".into(),
            ..ClientConfig::default()
        };
        assert!(Client::new(bad).is_err());
        let bad = ClientConfig {
            upload_chunk_size: 0,
            ..ClientConfig::default()
        };
        assert!(Client::new(bad).is_err());
    }

    #[test]
    fn client_is_send_sync_and_debug_hides_secrets() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Client>();
        let mut config = ClientConfig::default();
        config
            .credentials
            .insert("r", crate::Credentials::new("u", "topsecret"));
        let c = Client::new(config).unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
