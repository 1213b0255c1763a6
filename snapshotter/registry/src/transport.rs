//! Sending one logical request: timeouts, retries with backoff, redirects, and the 401 ->
//! challenge -> token/Basic -> retry flow. Everything above this file deals in statuses.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use tracing::Instrument as _;

use crate::auth::{Cached, Challenge, Scope, TokenResponse, parse_challenges};
use crate::blob::BlobStream;
use crate::client::{Client, display_url, encode_query, leaves_tls, redact_str, resolve_location};
use crate::credentials::{Credentials, normalize_registry};
use crate::error::{Error, JsonFault, Result, registry_message};
use crate::metrics::{Kind, Outcome, RetryReason};

const MAX_REDIRECTS: usize = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How much of an error body is read to find the registry's error message.
const ERROR_BODY_LIMIT: u64 = 64 << 10;
const TOKEN_BODY_LIMIT: u64 = 1 << 20;
/// Bytes per second a request body is allowed to take on top of the request timeout.
const MIN_UPLOAD_RATE: u64 = 256 << 10;

const CREDENTIALS_HINT: &str =
    "pass credentials (a docker config.json, or --username/--password-stdin)";

/// One request as the callers describe it. The body is kept as `Bytes` so that retries and the
/// auth flow can send it again.
pub(crate) struct Call<'a> {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The repository the request is about; `None` for requests that carry no registry auth
    /// (the token endpoint).
    pub scope: Option<Scope<'a>>,
    pub follow_redirects: bool,
    /// What the request is for, in metrics.
    pub kind: Kind,
}

impl<'a> Call<'a> {
    pub fn new(kind: Kind, method: Method, uri: Uri, scope: Scope<'a>) -> Self {
        let follow_redirects = method == Method::GET || method == Method::HEAD;
        Self {
            method,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            scope: Some(scope),
            follow_redirects,
            kind,
        }
    }

    /// Sets a header. Values come from this crate (media types, ranges): a value that is not a
    /// valid header is a bug, and is dropped with a debug line rather than sent mangled.
    pub fn header(mut self, name: HeaderName, value: &str) -> Self {
        match HeaderValue::from_str(value) {
            Ok(v) => {
                self.headers.insert(name, v);
            }
            Err(_) => tracing::debug!(%name, "dropping a header value that is not valid"),
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }
}

/// A response with what is needed to read it or turn it into an error.
pub(crate) struct Response {
    pub method: Method,
    /// The URL that answered (after redirects).
    pub uri: Uri,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Incoming,
    /// The answer came from the registry host itself, not from a redirect target elsewhere.
    pub from_origin: bool,
    pub timeout: Duration,
}

impl Response {
    pub fn url(&self) -> String {
        display_url(&self.uri)
    }

    pub fn header_str(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header_str(header::CONTENT_LENGTH)?.trim().parse().ok()
    }

    /// `Location` resolved against the URL that answered.
    pub fn location(&self) -> Result<Uri> {
        let location = self
            .header_str(header::LOCATION)
            .ok_or_else(|| self.unexpected("no Location header".into()))?;
        resolve_location(&self.uri, location)
    }

    pub fn unexpected(&self, reason: String) -> Error {
        Error::UnexpectedResponse {
            method: self.method.clone(),
            url: self.url(),
            reason,
        }
    }

    pub fn into_stream(self) -> BlobStream {
        BlobStream::new(self)
    }

    /// The error for a status the caller did not expect, with the registry's error code and
    /// message when the body has them.
    pub async fn into_error(self) -> Error {
        let (method, url, status) = (self.method.clone(), self.url(), self.status);
        let body = self
            .into_stream()
            .read_all(ERROR_BODY_LIMIT)
            .await
            .unwrap_or_default();
        let (code, message) = registry_error(&body);
        if status == StatusCode::NOT_FOUND {
            Error::NotFound {
                method,
                url,
                code,
                message,
            }
        } else {
            Error::Status {
                method,
                url,
                status,
                code,
                message,
            }
        }
    }

    /// `Ok(self)` when the status is one of `ok`, else the error for it.
    pub async fn expect(self, ok: &[StatusCode]) -> Result<Self> {
        if ok.contains(&self.status) {
            Ok(self)
        } else {
            Err(self.into_error().await)
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The first `{"errors":[{"code","message"}]}` entry, or a short plain-text body as message.
fn registry_error(body: &[u8]) -> (Option<String>, Option<String>) {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body)
        && let Some(first) = parsed.errors.into_iter().next()
    {
        return (first.code, first.message);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if !text.is_empty() && text.len() <= 200 && !text.starts_with(['{', '<']) {
        return (None, Some(text.to_owned()));
    }
    (None, None)
}

/// Attempts left for one logical request, shared by every phase that may retry it.
pub(crate) struct Retry {
    done: u32,
    max: u32,
}

impl Retry {
    pub fn new(max: u32) -> Self {
        Self { done: 0, max }
    }

    /// The delay before the next attempt, or `None` when none is left.
    pub fn backoff(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
        if self.done >= self.max {
            return None;
        }
        let exp = FIRST_BACKOFF.saturating_mul(1u32 << self.done.min(16));
        self.done += 1;
        Some(exp.max(retry_after.unwrap_or_default()).min(MAX_BACKOFF))
    }
}

/// Errors worth another attempt of an idempotent request.
pub(crate) fn is_transient(error: &Error) -> bool {
    matches!(
        error,
        Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Body { .. }
            | Error::ShortBody { .. }
    )
}

fn is_idempotent(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme() && a.authority() == b.authority()
}

impl Client {
    /// Sends `call`: cached auth first, the challenge flow on a 401 (once), retries for
    /// transient failures, redirects when the call follows them. Counted in the requests metric
    /// by the status it ends with, except range reads, which `read_range` counts once their
    /// body is read.
    pub(crate) async fn execute(&self, call: &Call<'_>, retry: &mut Retry) -> Result<Response> {
        let span = tracing::debug_span!("registry_request", method = %call.method, path = %call.uri.path());
        let result = self.execute_inner(call, retry).instrument(span).await;
        if call.kind != Kind::Range {
            let outcome = match &result {
                Ok(response) => Outcome::of_status(response.status),
                Err(e) => Outcome::of_error(e),
            };
            self.metrics().request(call.kind, outcome);
        }
        result
    }

    async fn execute_inner(&self, call: &Call<'_>, retry: &mut Retry) -> Result<Response> {
        let Some(scope) = call.scope else {
            return self.send_retrying(call, None, retry).await;
        };
        let credentials = self.credentials_for(&scope).await;
        let credentials = credentials.as_ref();
        let mut authorization = match self.inner.auth.lookup(&scope) {
            Cached::Bearer(token) => Some(format!("Bearer {token}")),
            Cached::Basic => credentials.map(|c| c.basic_header()),
            Cached::None => None,
        };
        let mut flow_ran = false;
        loop {
            let response = self
                .send_retrying(call, authorization.as_deref(), retry)
                .await?;
            if response.status != StatusCode::UNAUTHORIZED || !response.from_origin {
                return Ok(response);
            }
            if flow_ran {
                let error = response.into_error().await;
                let detail = match &error {
                    Error::Status { code, message, .. } => registry_message(code, message),
                    _ => String::new(),
                };
                let reason = if credentials.is_some() {
                    format!(
                        "the registry rejected the credentials for {}{detail}",
                        scope.registry
                    )
                } else {
                    format!("authentication required{detail}; {CREDENTIALS_HINT}")
                };
                return Err(Error::Unauthorized {
                    registry: scope.registry.to_owned(),
                    reason,
                });
            }
            flow_ran = true;
            // One refresh per scope at a time: a request that waited finds the token another
            // one fetched and retries with it.
            let lock = self.inner.auth.refresh_lock(&scope);
            let _refreshing = lock.lock().await;
            if let Cached::Bearer(token) = self.inner.auth.lookup(&scope) {
                let fresh = format!("Bearer {token}");
                if authorization.as_deref() != Some(fresh.as_str()) {
                    drop(response);
                    authorization = Some(fresh);
                    continue;
                }
            }
            self.inner.auth.forget(&scope);
            let challenges: Vec<Challenge> = response
                .headers
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            drop(response);
            authorization = Some(
                self.authenticate(&call.uri, &scope, credentials, &challenges)
                    .await?,
            );
        }
    }

    /// The credentials for `scope`: the first [`CredentialSource`] that has some for its
    /// repository, else the credential store (a docker config, its helpers).
    async fn credentials_for(&self, scope: &Scope<'_>) -> Option<Credentials> {
        let registry = normalize_registry(scope.registry);
        for source in &self.config().sources {
            if let Some(credentials) = source.credentials(&registry, scope.repository).await {
                return Some(credentials);
            }
        }
        self.config().credentials.lookup(&registry).await
    }

    /// Answers a 401's challenges with an `Authorization` value. `origin` is the URL that
    /// answered 401: a registry reached over HTTPS gets no token from a plain-HTTP realm.
    async fn authenticate(
        &self,
        origin: &Uri,
        scope: &Scope<'_>,
        credentials: Option<&Credentials>,
        challenges: &[Challenge],
    ) -> Result<String> {
        let unauthorized = |reason: String| Error::Unauthorized {
            registry: scope.registry.to_owned(),
            reason,
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = bearer
                .param("realm")
                .filter(|r| !r.is_empty())
                .ok_or_else(|| unauthorized("bearer challenge without a realm".into()))?;
            if let Ok(realm_uri) = realm.parse::<Uri>()
                && leaves_tls(origin, &realm_uri)
            {
                return Err(Error::InsecureRealm {
                    registry: scope.registry.to_owned(),
                    realm: display_url(&realm_uri),
                });
            }
            let scopes: Vec<String> = match bearer.param("scope").filter(|s| !s.is_empty()) {
                Some(s) => s
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => vec![scope.default_scope()],
            };
            let (token, lifetime) = self
                .fetch_token(scope, credentials, realm, bearer.param("service"), &scopes)
                .await?;
            self.inner.auth.store_token(scope, token.clone(), lifetime);
            return Ok(format!("Bearer {token}"));
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(credentials) = credentials else {
                return Err(unauthorized(format!(
                    "the registry asks for Basic authentication; {CREDENTIALS_HINT}"
                )));
            };
            self.inner.auth.remember_basic(scope.registry);
            return Ok(credentials.basic_header());
        }
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        Err(unauthorized(if schemes.is_empty() {
            "401 without a usable WWW-Authenticate challenge".into()
        } else {
            format!(
                "unsupported authentication scheme(s): {}",
                schemes.join(", ")
            )
        }))
    }

    /// Gets a bearer token from `realm`, counted as a token request and a token fetch.
    async fn fetch_token(
        &self,
        scope: &Scope<'_>,
        credentials: Option<&Credentials>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration)> {
        let result = self
            .fetch_token_inner(scope, credentials, realm, service, scopes)
            .await;
        let outcome = Outcome::of(&result);
        self.metrics().request(Kind::Token, outcome);
        self.metrics().token_fetch(outcome);
        result
    }

    async fn fetch_token_inner(
        &self,
        scope: &Scope<'_>,
        credentials: Option<&Credentials>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration)> {
        let unauthorized = |reason: String| Error::Unauthorized {
            registry: scope.registry.to_owned(),
            reason,
        };
        let mut url = realm.to_owned();
        let mut sep = if realm.contains('?') { '&' } else { '?' };
        if let Some(service) = service {
            url.push_str(&format!("{sep}service={}", encode_query(service)));
            sep = '&';
        }
        for s in scopes {
            url.push_str(&format!("{sep}scope={}", encode_query(s)));
            sep = '&';
        }
        let uri: Uri = url
            .parse()
            .ok()
            .filter(|u: &Uri| matches!(u.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| Error::InvalidUrl {
                url: redact_str(realm),
                reason: "bearer realm is not an http(s) URL",
            })?;
        let call = Call {
            method: Method::GET,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            scope: None,
            follow_redirects: true,
            kind: Kind::Token,
        }
        .header(header::ACCEPT, "application/json");
        let basic = credentials.map(|c| c.basic_header());
        let mut retry = Retry::new(self.config().retries);
        tracing::debug!(realm = %redact_str(realm), with_credentials = credentials.is_some(), "fetching registry token");
        let response = self
            .send_retrying(&call, basic.as_deref(), &mut retry)
            .await?;
        match response.status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let realm = response.url();
                return Err(unauthorized(if credentials.is_some() {
                    format!("the token endpoint {realm} rejected the credentials")
                } else {
                    format!("the token endpoint {realm} requires credentials; {CREDENTIALS_HINT}")
                }));
            }
            _ => return Err(response.into_error().await),
        }
        let url = response.url();
        let body = response.into_stream().read_all(TOKEN_BODY_LIMIT).await?;
        // The body holds a token: a parse error says where, never what (serde_json quotes).
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| Error::InvalidTokenResponse {
                url,
                fault: JsonFault::from(&e),
            })?;
        let (token, lifetime) = parsed
            .into_token()
            .ok_or_else(|| unauthorized("the token endpoint answered without a token".into()))?;
        if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(unauthorized(
                "the token endpoint answered with a token that cannot be sent in a header".into(),
            ));
        }
        Ok((token, lifetime))
    }

    /// Sends with retries: transport errors, timeouts, 429 and 5xx for GET/HEAD; connect
    /// errors for every method (nothing reached the server).
    pub(crate) async fn send_retrying(
        &self,
        call: &Call<'_>,
        authorization: Option<&str>,
        retry: &mut Retry,
    ) -> Result<Response> {
        let idempotent = is_idempotent(&call.method);
        loop {
            let result = self.send_following(call, authorization).await;
            let (transient, retry_after) = match &result {
                Ok(r)
                    if r.status == StatusCode::TOO_MANY_REQUESTS
                        || (r.status.is_server_error()
                            && r.status != StatusCode::NOT_IMPLEMENTED
                            && r.status != StatusCode::HTTP_VERSION_NOT_SUPPORTED) =>
                {
                    (idempotent, retry_after(&r.headers))
                }
                Ok(_) => return result,
                Err(Error::Transport { source, .. }) => (idempotent || source.is_connect(), None),
                Err(e) => (idempotent && is_transient(e), None),
            };
            if !transient {
                return result;
            }
            let Some(delay) = retry.backoff(retry_after) else {
                return result;
            };
            let reason = match &result {
                Ok(r) => {
                    tracing::debug!(status = %r.status, ?delay, "retrying");
                    RetryReason::of_status(r.status)
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?delay, "retrying");
                    RetryReason::of_error(e)
                }
            };
            self.metrics().retry(reason);
            drop(result);
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt, following redirects when the call allows. `Authorization` is sent only to
    /// the registry's own scheme and host; a redirect elsewhere drops it. A redirect from HTTPS
    /// to plain HTTP is refused, not followed.
    async fn send_following(
        &self,
        call: &Call<'_>,
        authorization: Option<&str>,
    ) -> Result<Response> {
        let mut uri = call.uri.clone();
        let mut authorization = authorization;
        let mut hops = 0;
        loop {
            let response = self.send_once(call, &uri, authorization).await?;
            let status = response.status();
            let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            if !(call.follow_redirects && redirect) {
                let (parts, body) = response.into_parts();
                return Ok(Response {
                    method: call.method.clone(),
                    from_origin: same_origin(&call.uri, &uri),
                    uri,
                    status,
                    headers: parts.headers,
                    body,
                    timeout: self.config().request_timeout,
                });
            }
            if hops == MAX_REDIRECTS {
                return Err(Error::TooManyRedirects {
                    method: call.method.clone(),
                    url: display_url(&call.uri),
                    limit: MAX_REDIRECTS,
                });
            }
            hops += 1;
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Error::UnexpectedResponse {
                    method: call.method.clone(),
                    url: display_url(&uri),
                    reason: format!("{status} without a Location header"),
                })?;
            let next = resolve_location(&uri, location)?;
            if !same_origin(&uri, &next) {
                authorization = None;
            }
            tracing::debug!(%status, to = %display_url(&next), "following redirect");
            uri = next;
        }
    }

    async fn send_once(
        &self,
        call: &Call<'_>,
        uri: &Uri,
        authorization: Option<&str>,
    ) -> Result<http::Response<Incoming>> {
        let mut request = http::Request::new(Full::new(call.body.clone()));
        *request.method_mut() = call.method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = call.headers.clone();
        let headers = request.headers_mut();
        headers.insert(header::USER_AGENT, self.inner.user_agent.clone());
        if !is_idempotent(&call.method) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(call.body.len()));
        }
        if let Some(value) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
            let mut value = value;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        // The wait for the answer includes sending the body: allow for it at a slow link's
        // speed on top, so that a 16 MiB PATCH is not cut at request_timeout.
        let sending = Duration::from_secs(call.body.len() as u64 / MIN_UPLOAD_RATE);
        let timeout = self.config().request_timeout + sending;
        match tokio::time::timeout(timeout, self.inner.http.request(request)).await {
            Err(_) => Err(Error::Timeout {
                method: call.method.clone(),
                url: display_url(uri),
                phase: "response headers",
                after: timeout,
            }),
            Ok(Err(source)) => Err(Error::Transport {
                method: call.method.clone(),
                url: display_url(uri),
                source,
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_and_caps_at_5s() {
        let mut r = Retry::new(7);
        let delays: Vec<u128> = std::iter::from_fn(|| r.backoff(None))
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        let mut r = Retry::new(1);
        assert_eq!(
            r.backoff(Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(r.backoff(None), None);
        let mut r = Retry::new(1);
        assert_eq!(r.backoff(Some(Duration::from_secs(60))), Some(MAX_BACKOFF));
    }

    #[test]
    fn registry_errors_are_extracted() {
        let body = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:x"}]}"#;
        assert_eq!(
            registry_error(body),
            (
                Some("BLOB_UNKNOWN".into()),
                Some("blob unknown to registry".into())
            )
        );
        assert_eq!(
            registry_error(b"404 page not found\n"),
            (None, Some("404 page not found".into()))
        );
        assert_eq!(registry_error(b"<html>...</html>"), (None, None));
        assert_eq!(registry_error(b""), (None, None));
    }
}
