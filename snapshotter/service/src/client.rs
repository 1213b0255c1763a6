//! The API client the `streamsnap artifact-streaming --server URL` verbs use. HTTP or HTTPS
//! (system roots); the token goes in `Authorization: Bearer` and nowhere else.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    self, CreateOperation, ErrorBody, Operation, OperationList, Repository, RepositoryList,
    UpdateRepository, encode_segment,
};
use crate::auth::Secret;
use crate::error::ClientError;

type Result<T> = std::result::Result<T, ClientError>;

/// How long one call may take (a cancel waits up to 10 s on the server).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read.
const MAX_ANSWER: usize = 16 << 20;

/// A client of one service. Cheap to clone.
#[derive(Clone)]
pub struct ServiceClient {
    base: String,
    token: Option<HeaderValue>,
    http: hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl ServiceClient {
    /// `url` is the service's base URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(url: &str, token: Option<&Secret>) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let invalid = |reason| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: http::Uri = base.parse().map_err(|_| invalid("not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(invalid("use http:// or https://"));
        }
        if uri.authority().is_none() {
            return Err(invalid("no host"));
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
            return Err(invalid("give the base URL only, without a path or query"));
        }
        let token = token
            .map(|t| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", t.expose()))
                    .map_err(|_| ClientError::InvalidToken)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
        Ok(Self { base, token, http })
    }

    pub async fn repositories(&self) -> Result<Vec<Repository>> {
        let list: RepositoryList = self.get("/v1/repositories").await?;
        Ok(list.repositories)
    }

    pub async fn repository(&self, name: &str) -> Result<Repository> {
        self.get(&repo_path(name)).await
    }

    /// Sets a repository's streaming state, its artifact kind, or both (what `update` leaves
    /// out stays as it is).
    pub async fn update_repository(
        &self,
        name: &str,
        update: &UpdateRepository,
    ) -> Result<Repository> {
        Ok(self
            .call(Method::PUT, &repo_path(name), Some(update))
            .await?
            .1)
    }

    /// Starts an operation; the flag tells whether it is new (false: an existing operation
    /// of the same manifest was returned).
    pub async fn create_operation(
        &self,
        name: &str,
        request: &CreateOperation,
    ) -> Result<(Operation, bool)> {
        let path = format!("{}/operations", repo_path(name));
        let (status, op) = self.call(Method::POST, &path, Some(request)).await?;
        Ok((op, status == StatusCode::CREATED))
    }

    pub async fn operation(&self, name: &str, id: &str) -> Result<Operation> {
        self.get(&format!(
            "{}/operations/{}",
            repo_path(name),
            encode_segment(id)
        ))
        .await
    }

    /// Operations of a repository, newest first; with `reference` (tag or digest), those of
    /// the manifest it names.
    pub async fn operations(&self, name: &str, reference: Option<&str>) -> Result<Vec<Operation>> {
        let mut path = format!("{}/operations", repo_path(name));
        if let Some(reference) = reference {
            path.push_str(&format!("?reference={}", encode_segment(reference)));
        }
        let list: OperationList = self.get(&path).await?;
        Ok(list.operations)
    }

    pub async fn cancel_operation(&self, name: &str, id: &str) -> Result<Operation> {
        let path = format!(
            "{}/operations/{}/cancel",
            repo_path(name),
            encode_segment(id)
        );
        Ok(self.call::<(), _>(Method::POST, &path, None).await?.1)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.call::<(), _>(Method::GET, path, None).await?.1)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, T)> {
        let url = format!("{}{path}", self.base);
        let shown = format!(
            "{}{}",
            self.base,
            path.split('?').next().unwrap_or_default()
        );
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, token.clone());
        }
        let bytes = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).expect("API types serialize"))
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(bytes))
            .map_err(|_| ClientError::InvalidUrl {
                url: shown.clone(),
                reason: "not a valid request URL",
            })?;
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|source| ClientError::Connect {
                        url: shown.clone(),
                        source,
                    })?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Status {
                    url: shown.clone(),
                    status,
                    message: format!("unreadable answer: {e}"),
                })?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Status {
                url: shown.clone(),
                status: StatusCode::GATEWAY_TIMEOUT,
                message: format!("no answer within {CALL_TIMEOUT:?}"),
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(500).collect());
            return Err(ClientError::Status {
                url: shown,
                status,
                message,
            });
        }
        let value = serde_json::from_slice(&body)
            .map_err(|source| ClientError::InvalidJson { url: shown, source })?;
        Ok((status, value))
    }
}

fn repo_path(name: &str) -> String {
    format!("{}/repositories/{}", api::PREFIX, encode_segment(name))
}
