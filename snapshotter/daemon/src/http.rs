//! `/metrics` (Prometheus text), `/healthz` and `/debug/profile` (the chunks the mounted
//! layers' first reads touched, as a start-up profile in JSON) on the metrics address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::metrics::Metrics;
use crate::snapshotter::Snapshotter;

/// What the endpoints look at.
#[derive(Debug)]
pub struct Endpoints {
    pub metrics: Metrics,
    pub snapshotter: Arc<Snapshotter>,
    /// Set once the snapshots API is being served.
    pub serving: Arc<AtomicBool>,
}

/// Serves until the task is dropped. Binding errors are returned at once.
pub async fn serve(
    address: SocketAddr,
    endpoints: Arc<Endpoints>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let endpoints = endpoints.clone();
                    async move { Ok::<_, Infallible>(answer(&endpoints, &request)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

fn json_text(json: Vec<u8>) -> String {
    String::from_utf8(json).expect("serde_json writes UTF-8")
}

fn answer(endpoints: &Endpoints, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        response
    };
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => {
            endpoints.snapshotter.refresh_gauges(&endpoints.metrics);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                endpoints.metrics.render(),
            )
        }
        "/healthz" => {
            if endpoints.serving.load(Ordering::Relaxed) && endpoints.snapshotter.healthy() {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not serving\n".into(),
                )
            }
        }
        "/debug/profile" => match &endpoints.snapshotter.remote {
            Some(remote) => match remote.profile().encode() {
                Ok(json) => reply(StatusCode::OK, "application/json", json_text(json)),
                Err(error) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{error}\n"),
                ),
            },
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "remote snapshots are off on this node: no profile\n".into(),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /debug/profile\n".into(),
        ),
    }
}
