//! An in-process HTTP/1.1 server for the registry client's tests: every request is recorded
//! (method, path and query, headers, body) so tests can assert on what the client sent.

#![allow(dead_code)]

pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use streamsnap_format::Digest;
use streamsnap_registry::{Client, ClientConfig};

pub type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn query(&self) -> &str {
        self.uri.query().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Response<Body> + Send + Sync>;

pub struct Server {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(move |_| handler).await
    }

    /// Like `start`, for handlers that need the server's own address (absolute Locations).
    pub async fn start_with<H>(make: impl FnOnce(SocketAddr) -> H) -> Self
    where
        H: Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(make(addr));
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = task_log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            let log = log.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let recorded = Recorded {
                                    method: parts.method,
                                    uri: parts.uri,
                                    headers: parts.headers,
                                    body,
                                };
                                log.lock().unwrap().push(recorded.clone());
                                Ok::<_, Infallible>(handler(&recorded))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, log, task }
    }

    /// `127.0.0.1:<port>`, as a `Repository::registry`.
    pub fn registry(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    pub fn requests_to(&self, method: &Method, path_contains: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == *method && r.path().contains(path_contains))
            .collect()
    }
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn respond(status: u16, headers: &[(&str, &str)], body: Body) -> Response<Body> {
    let mut b = Response::builder().status(StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

pub fn status(code: u16) -> Response<Body> {
    respond(code, &[], empty())
}

/// A body that sends `first`, then never sends anything again.
pub fn stalled_after(first: Bytes) -> Body {
    let s = stream::unfold(Some(first), |state| async move {
        match state {
            Some(first) => Some((Ok(Frame::data(first)), None)),
            None => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                None
            }
        }
    });
    StreamBody::new(s).boxed()
}

/// A body that sends `first`, then breaks the connection.
pub fn truncated_after(first: Bytes) -> Body {
    let s = stream::unfold(Some(first), |state| async move {
        match state {
            Some(first) => Some((Ok(Frame::data(first)), None)),
            None => {
                // Let the headers and the first bytes reach the client before the cut.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((
                    Err(std::io::Error::other("connection cut by the test")),
                    None,
                ))
            }
        }
    });
    StreamBody::new(s).boxed()
}

/// A client with a short request timeout and no retries unless asked.
pub fn client(tweak: impl FnOnce(&mut ClientConfig)) -> Client {
    let mut config = ClientConfig {
        request_timeout: Duration::from_secs(5),
        retries: 0,
        ..ClientConfig::default()
    };
    tweak(&mut config);
    Client::new(config).unwrap()
}

pub fn blob_data(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The part of the path after `marker`, e.g. the digest after `/blobs/`.
pub fn after<'a>(path: &'a str, marker: &str) -> Option<&'a str> {
    path.find(marker).map(|i| &path[i + marker.len()..])
}

/// A small in-memory distribution registry: blobs, chunked and monolithic uploads (relative
/// Location on POST, absolute on PATCH), manifests by tag and digest, deletes, and optionally
/// the referrers API and the `OCI-Subject` header.
#[derive(Default)]
pub struct FakeRegistry {
    pub blobs: HashMap<Digest, Bytes>,
    pub uploads: HashMap<String, Vec<u8>>,
    /// reference (tag or digest) -> (media type, bytes)
    pub manifests: HashMap<String, (String, Bytes)>,
    pub referrers_api: bool,
    pub oci_subject: bool,
    /// Fail every PATCH with this status (to test cancellation).
    pub fail_patch: Option<u16>,
    next_upload: u32,
}

impl FakeRegistry {
    pub fn handle(state: &Mutex<FakeRegistry>, addr: SocketAddr, r: &Recorded) -> Response<Body> {
        let mut s = state.lock().unwrap();
        let path = r.path().to_owned();
        let name_end = ["/blobs/", "/manifests/", "/referrers/"]
            .iter()
            .filter_map(|m| path.find(m))
            .min();
        let Some(name_end) = name_end else {
            return status(404);
        };
        let name = path[4..name_end].to_owned();
        if let Some(rest) = after(&path, "/blobs/uploads/") {
            return s.upload(addr, &name, rest, r);
        }
        if let Some(digest) = after(&path, "/blobs/") {
            let Ok(digest) = digest.parse::<Digest>() else {
                return status(400);
            };
            return match (s.blobs.get(&digest), &r.method) {
                (None, _) => respond(
                    404,
                    &[("content-type", "application/json")],
                    full(
                        r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#,
                    ),
                ),
                (Some(b), &Method::HEAD) => {
                    respond(200, &[("content-length", &b.len().to_string())], empty())
                }
                (Some(b), _) => respond(200, &[], full(b.clone())),
            };
        }
        if let Some(reference) = after(&path, "/manifests/") {
            return s.manifest(reference, r);
        }
        if let Some(subject) = after(&path, "/referrers/") {
            if !s.referrers_api {
                return respond(
                    404,
                    &[("content-type", "text/plain")],
                    full("404 page not found\n"),
                );
            }
            let mut manifests = Vec::new();
            for (reference, (mt, bytes)) in &s.manifests {
                if !reference.starts_with("sha256:") {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                if v["subject"]["digest"].as_str() == Some(subject) {
                    let at = v["artifactType"].as_str().map(str::to_owned);
                    manifests.push(serde_json::json!({
                        "mediaType": mt, "digest": reference, "size": bytes.len(),
                        "artifactType": at,
                    }));
                }
            }
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
            return respond(
                200,
                &[("content-type", "application/vnd.oci.image.index.v1+json")],
                full(index.to_string()),
            );
        }
        status(404)
    }

    fn upload(&mut self, addr: SocketAddr, name: &str, rest: &str, r: &Recorded) -> Response<Body> {
        if r.method == Method::POST && rest.is_empty() {
            self.next_upload += 1;
            let id = format!("u{}", self.next_upload);
            self.uploads.insert(id.clone(), Vec::new());
            let loc = format!("/v2/{name}/blobs/uploads/{id}?_state=s0");
            return respond(202, &[("location", &loc), ("range", "0-0")], empty());
        }
        let id = rest.to_owned();
        let Some(buf) = self.uploads.get_mut(&id) else {
            return respond(
                404,
                &[],
                full(
                    r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"blob upload unknown to registry"}]}"#,
                ),
            );
        };
        match r.method {
            Method::PATCH => {
                if let Some(code) = self.fail_patch {
                    return status(code);
                }
                let range = r.header("content-range").unwrap_or_default();
                let start: usize = range.split('-').next().unwrap().parse().unwrap();
                if start != buf.len() {
                    return status(416);
                }
                buf.extend_from_slice(&r.body);
                let loc = format!(
                    "http://{addr}/v2/{name}/blobs/uploads/{id}?_state=s{}",
                    buf.len()
                );
                let range = format!("0-{}", buf.len() - 1);
                respond(202, &[("location", &loc), ("range", &range)], empty())
            }
            Method::PUT => {
                buf.extend_from_slice(&r.body);
                let want = r
                    .query()
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("digest="))
                    .unwrap_or_default()
                    .replace("%3A", ":");
                let data = Bytes::from(self.uploads.remove(&id).unwrap());
                let actual = Digest::sha256(&data);
                if want != actual.to_string() {
                    return respond(
                        400,
                        &[],
                        full(
                            r#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}"#,
                        ),
                    );
                }
                self.blobs.insert(actual, data);
                respond(
                    201,
                    &[("docker-content-digest", &actual.to_string())],
                    empty(),
                )
            }
            Method::DELETE => {
                self.uploads.remove(&id);
                status(204)
            }
            _ => status(405),
        }
    }

    fn manifest(&mut self, reference: &str, r: &Recorded) -> Response<Body> {
        match r.method {
            Method::PUT => {
                let digest = Digest::sha256(&r.body).to_string();
                let mt = r.header("content-type").unwrap_or_default().to_owned();
                self.manifests
                    .insert(reference.to_owned(), (mt.clone(), r.body.clone()));
                self.manifests.insert(digest.clone(), (mt, r.body.clone()));
                let has_subject =
                    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["subject"]
                        .is_object();
                let mut headers = vec![("docker-content-digest", digest.as_str())];
                let subject;
                if self.oci_subject && has_subject {
                    subject = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["subject"]["digest"].as_str().unwrap().to_owned();
                    headers.push(("oci-subject", subject.as_str()));
                }
                respond(201, &headers, empty())
            }
            Method::GET | Method::HEAD => match self.manifests.get(reference) {
                Some((mt, bytes)) => {
                    let digest = Digest::sha256(bytes).to_string();
                    let len = bytes.len().to_string();
                    let body = if r.method == Method::GET {
                        full(bytes.clone())
                    } else {
                        empty()
                    };
                    respond(
                        200,
                        &[
                            ("content-type", mt),
                            ("docker-content-digest", &digest),
                            ("content-length", &len),
                        ],
                        body,
                    )
                }
                None => respond(
                    404,
                    &[],
                    full(
                        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                    ),
                ),
            },
            Method::DELETE => {
                let Some((_, bytes)) = self.manifests.get(reference).cloned() else {
                    return respond(
                        404,
                        &[],
                        full(
                            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                        ),
                    );
                };
                self.manifests.retain(|_, (_, b)| *b != bytes);
                status(202)
            }
            _ => status(405),
        }
    }
}

/// Starts a [`FakeRegistry`] server; the state is shared with the test.
pub async fn fake_registry(
    setup: impl FnOnce(&mut FakeRegistry),
) -> (Server, Arc<Mutex<FakeRegistry>>) {
    let mut reg = FakeRegistry::default();
    setup(&mut reg);
    let state = Arc::new(Mutex::new(reg));
    let s = state.clone();
    let server =
        Server::start_with(move |addr| move |r: &Recorded| FakeRegistry::handle(&s, addr, r)).await;
    (server, state)
}

/// A client like [`client`] whose metrics are registered in a registry of their own.
pub fn metered_client(tweak: impl FnOnce(&mut ClientConfig)) -> (Client, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = streamsnap_registry::Metrics::register(&registry).unwrap();
    let client = client(|c| {
        c.metrics = Some(Arc::new(metrics));
        tweak(c);
    });
    (client, registry)
}

/// The value of one series in the registry's text exposition, as Prometheus would scrape it:
/// `name` with exactly `labels`; for a histogram, `name` is e.g. `<histogram>_count`. Panics if
/// the series is not exposed.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut got: Vec<String> = series_labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        got.sort();
        if series_name == name && got == wanted {
            return value.parse().unwrap();
        }
    }
    panic!("no series {name}{labels:?} in\n{text}");
}
