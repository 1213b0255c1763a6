//! Routing and the HTTP side of every call: authentication, JSON in and out, errors as
//! `{"error": "..."}` with the status of [`Error::status`]. Repository names are one
//! percent-encoded path segment (`team%2Fapp`).
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | /v1/healthz | liveness, no token |
//! | GET | /metrics | Prometheus metrics (counts only), no token |
//! | POST | /v1/registry-events | registry notifications, webhook secret |
//! | GET | /v1/repositories | states and counts |
//! | GET, PUT | /v1/repositories/{name} | one state; set it (streaming, kind or both) |
//! | GET, POST | /v1/repositories/{name}/operations | list (`?reference=`); create |
//! | GET | /v1/repositories/{name}/operations/{id} | one operation |
//! | POST | /v1/repositories/{name}/operations/{id}/cancel | cancel it |

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    self, CreateOperation, ErrorBody, OperationList, RepositoryList, UpdateRepository,
};
use crate::auth;
use crate::error::{Error, Result, chain};
use crate::events::Envelope;
use crate::metrics::METRICS_PATH;
use crate::service::Service;

/// Largest request body read (webhook envelopes and API calls are small).
const MAX_BODY: usize = 1 << 20;

pub(crate) async fn handle(
    service: &Service,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match route(service, peer, request).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            let message = chain(&error);
            if status.is_server_error() {
                tracing::warn!(%method, %path, %status, error = %message, "request failed");
            } else {
                tracing::debug!(%method, %path, %status, error = %message, "request refused");
            }
            let mut response = json(status, &ErrorBody { error: message });
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    };
    tracing::debug!(%method, %path, %peer, status = %response.status(), elapsed = ?started.elapsed(), "request");
    response
}

async fn route(
    service: &Service,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if path == api::HEALTH_PATH {
        return only(&method, &[Method::GET, Method::HEAD])
            .map(|()| json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
    }
    if path == METRICS_PATH {
        only(&method, &[Method::GET])?;
        let repositories = service.repositories(None).await?;
        let mut response = Response::new(Full::new(Bytes::from(
            service.metrics.render(&repositories),
        )));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return Ok(response);
    }
    if path == api::WEBHOOK_PATH {
        only(&method, &[Method::POST])?;
        auth::check_webhook(&service.config.webhook_secret, authorization.as_deref())?;
        let envelope: Envelope = read_json(request).await?;
        let summary = service.handle_envelope(envelope).await?;
        return Ok(json(StatusCode::OK, &summary));
    }
    let Some(rest) = path.strip_prefix("/v1/repositories") else {
        return Err(Error::not_found(format!("path {path}")));
    };
    service
        .config
        .auth
        .check(peer.ip(), authorization.as_deref())?;
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    let name_of = |segment: &str| decode(segment).map(|name| service.relative_name(name));
    let query = request.uri().query().map(str::to_owned);
    match segments.as_slice() {
        [] | [""] => {
            only(&method, &[Method::GET])?;
            let repositories = service.repositories(None).await?;
            Ok(json(StatusCode::OK, &RepositoryList { repositories }))
        }
        [name] => {
            let name = name_of(name)?;
            if method == Method::PUT {
                let update: UpdateRepository = read_json(request).await?;
                let repo = service.update_repository(&name, update).await?;
                return Ok(json(StatusCode::OK, &repo));
            }
            only(&method, &[Method::GET])?;
            let repo = service.repositories(Some(name)).await?;
            Ok(json(StatusCode::OK, &repo[0]))
        }
        [name, "operations"] => {
            let name = name_of(name)?;
            if method == Method::POST {
                let create: CreateOperation = read_json(request).await?;
                let (op, new) = service.create(&name, create).await?;
                let status = if new {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                return Ok(json(status, &op));
            }
            only(&method, &[Method::GET])?;
            let reference = query_param(query.as_deref(), "reference")?;
            let operations = service.operations(&name, reference).await?;
            Ok(json(StatusCode::OK, &OperationList { operations }))
        }
        [name, "operations", id] => {
            only(&method, &[Method::GET])?;
            let op = service.operation(&name_of(name)?, &decode(id)?).await?;
            Ok(json(StatusCode::OK, &op))
        }
        [name, "operations", id, "cancel"] => {
            only(&method, &[Method::POST])?;
            let op = service.cancel(&name_of(name)?, &decode(id)?).await?;
            let status = if op.state.is_terminal() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(json(status, &op))
        }
        _ => Err(Error::not_found(format!(
            "path {path} (repository names are one path segment: encode '/' as %2F)"
        ))),
    }
}

fn only(method: &Method, allowed: &[Method]) -> Result<()> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(Error::MethodNotAllowed(format!(
            "method {method} is not allowed here (use {})",
            allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(" or ")
        )))
    }
}

fn decode(segment: &str) -> Result<String> {
    api::decode_segment(segment)
        .ok_or_else(|| Error::BadRequest(format!("bad percent-encoding in {segment:?}")))
}

fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>> {
    for pair in query.unwrap_or_default().split('&') {
        if let Some((key, value)) = pair.split_once('=')
            && key == name
        {
            return decode(&value.replace('+', " ")).map(Some);
        }
    }
    Ok(None)
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T> {
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Error::BadRequest(format!("reading the request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| Error::BadRequest(format!("the request body is not the expected JSON: {e}")))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("API types serialize");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let q = Some("a=1&reference=sha256%3Aab&b=2");
        assert_eq!(
            query_param(q, "reference").unwrap().as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(query_param(q, "missing").unwrap(), None);
        assert_eq!(query_param(None, "reference").unwrap(), None);
        assert!(query_param(Some("reference=%zz"), "reference").is_err());
    }

    #[test]
    fn methods_outside_the_list_are_refused_with_405() {
        assert!(only(&Method::GET, &[Method::GET]).is_ok());
        let error = only(&Method::DELETE, &[Method::GET, Method::PUT]).unwrap_err();
        assert_eq!(error.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(error.to_string().contains("GET or PUT"));
    }
}
