//! The client's metrics, read from a registry's text exposition after real requests to an
//! in-process server: range reads, retries by reason, outcomes by kind, token fetches.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Credentials, Repository};

fn requests(registry: &prometheus::Registry, kind: &str, outcome: &str) -> f64 {
    metric(
        registry,
        "streamsnap_registry_requests_total",
        &[("kind", kind), ("outcome", outcome)],
    )
}

fn retries(registry: &prometheus::Registry, reason: &str) -> f64 {
    metric(
        registry,
        "streamsnap_registry_retries_total",
        &[("reason", reason)],
    )
}

/// Answers ranges properly, except that the first `bad` answers are `fault`.
fn ranged_with_faults(
    data: Bytes,
    bad: usize,
    fault: fn(Bytes, &str, usize) -> http::Response<Body>,
) -> impl Fn(&Recorded) -> http::Response<Body> + Send + Sync {
    let count = Arc::new(AtomicUsize::new(0));
    move |r| {
        let spec = r.header("range").unwrap().strip_prefix("bytes=").unwrap();
        let (a, b) = spec.split_once('-').unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        let b = b.min(data.len() - 1);
        let content_range = format!("bytes {a}-{b}/{}", data.len());
        if count.fetch_add(1, Ordering::SeqCst) < bad {
            return fault(data.slice(a..=b), &content_range, b - a + 1);
        }
        respond(
            206,
            &[("content-range", &content_range)],
            full(data.slice(a..=b)),
        )
    }
}

#[tokio::test]
async fn a_range_read_counts_one_request_its_bytes_and_its_duration() {
    let data = blob_data(1000);
    let server = Server::start(ranged_with_faults(
        data.clone(),
        0,
        |_, _, _| unreachable!(),
    ))
    .await;
    let repo = Repository::new(server.registry(), "a/b");
    let (c, registry) = metered_client(|_| {});
    let digest = Digest::sha256(&data);
    assert_eq!(
        c.read_range(&repo, &digest, 10, 20).await.unwrap(),
        data.slice(10..30)
    );
    assert_eq!(
        c.read_range(&repo, &digest, 100, 300).await.unwrap(),
        data.slice(100..400)
    );
    assert_eq!(server.requests().len(), 2);
    let m = |name| metric(&registry, name, &[]);
    assert_eq!(m("streamsnap_registry_range_requests_total"), 2.0);
    assert_eq!(m("streamsnap_registry_range_bytes_total"), 320.0);
    assert_eq!(m("streamsnap_registry_range_duration_seconds_count"), 2.0);
    assert!(m("streamsnap_registry_range_duration_seconds_sum") > 0.0);
    assert_eq!(requests(&registry, "range", "ok"), 2.0);
    // A range read is not counted again as a blob request.
    assert_eq!(requests(&registry, "blob", "ok"), 0.0);
    for reason in [
        "transport",
        "timeout",
        "server_error",
        "short_body",
        "stall",
    ] {
        assert_eq!(retries(&registry, reason), 0.0, "{reason}");
    }

    // A failed range read counts too, by how it failed.
    let e = c.read_range(&repo, &digest, 990, 20).await.unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    assert_eq!(m("streamsnap_registry_range_requests_total"), 3.0);
    assert_eq!(requests(&registry, "range", "invalid_response"), 1.0);
}

#[tokio::test]
async fn truncated_bodies_are_retries_for_short_body_and_their_bytes_count() {
    let data = blob_data(1000);
    let server = Server::start(ranged_with_faults(data.clone(), 2, |body, cr, len| {
        let half = body.slice(..len / 2);
        respond(
            206,
            &[("content-range", cr), ("content-length", &len.to_string())],
            truncated_after(half),
        )
    }))
    .await;
    let repo = Repository::new(server.registry(), "a");
    let (c, registry) = metered_client(|c| c.retries = 2);
    let got = c
        .read_range(&repo, &Digest::sha256(&data), 100, 200)
        .await
        .unwrap();
    assert_eq!(got, data.slice(100..300));
    assert_eq!(server.requests().len(), 3);
    assert_eq!(retries(&registry, "short_body"), 2.0);
    assert_eq!(retries(&registry, "transport"), 0.0);
    // One read, whose three answers brought 100 + 100 + 200 bytes.
    assert_eq!(
        metric(&registry, "streamsnap_registry_range_requests_total", &[]),
        1.0
    );
    assert_eq!(
        metric(&registry, "streamsnap_registry_range_bytes_total", &[]),
        400.0
    );
    assert_eq!(requests(&registry, "range", "ok"), 1.0);
}

#[tokio::test]
async fn a_stalled_body_is_a_stall_retry_and_ends_as_a_timeout() {
    let data = blob_data(1000);
    let server = Server::start(ranged_with_faults(
        data.clone(),
        usize::MAX,
        |body, cr, len| {
            respond(
                206,
                &[("content-range", cr), ("content-length", &len.to_string())],
                common::stalled_after(body.slice(..10)),
            )
        },
    ))
    .await;
    let repo = Repository::new(server.registry(), "a");
    let (c, registry) = metered_client(|c| {
        c.request_timeout = Duration::from_millis(200);
        c.retries = 1;
    });
    c.read_range(&repo, &Digest::sha256(&data), 0, 100)
        .await
        .unwrap_err();
    assert_eq!(server.requests().len(), 2);
    assert_eq!(retries(&registry, "stall"), 1.0);
    assert_eq!(retries(&registry, "timeout"), 0.0);
    assert_eq!(requests(&registry, "range", "timeout"), 1.0);
    assert_eq!(
        metric(&registry, "streamsnap_registry_range_bytes_total", &[]),
        20.0
    );
}

#[tokio::test]
async fn status_retries_count_by_reason_and_requests_by_final_status() {
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    let server =
        Server::start(
            move |r| match (r.method.clone(), n.fetch_add(1, Ordering::SeqCst)) {
                (Method::HEAD, 0) => respond(503, &[("retry-after", "0")], empty()),
                (Method::HEAD, 1) => respond(429, &[("retry-after", "0")], empty()),
                (Method::HEAD, _) => respond(200, &[("content-length", "123")], empty()),
                _ => status(404),
            },
        )
        .await;
    let repo = Repository::new(server.registry(), "a");
    let (c, registry) = metered_client(|c| c.retries = 3);
    assert_eq!(
        c.blob_size(&repo, &Digest::sha256(b"x")).await.unwrap(),
        Some(123)
    );
    assert_eq!(server.requests().len(), 3);
    assert_eq!(retries(&registry, "server_error"), 1.0);
    assert_eq!(retries(&registry, "too_many_requests"), 1.0);
    assert_eq!(requests(&registry, "blob", "ok"), 1.0);

    let e = c.get_manifest(&repo, "latest").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(requests(&registry, "manifest", "not_found"), 1.0);
    assert_eq!(requests(&registry, "manifest", "ok"), 0.0);
}

#[tokio::test]
async fn connection_refused_is_a_transport_retry_and_outcome() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let repo = Repository::new(addr.to_string(), "a");
    let (c, registry) = metered_client(|c| c.retries = 1);
    c.read_range(&repo, &Digest::sha256(b"x"), 0, 10)
        .await
        .unwrap_err();
    assert_eq!(retries(&registry, "transport"), 1.0);
    assert_eq!(requests(&registry, "range", "transport"), 1.0);
    assert_eq!(
        metric(&registry, "streamsnap_registry_range_bytes_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn token_fetches_count_by_outcome() {
    const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let server = Server::start_with(|addr| {
        move |r: &Recorded| {
            if r.path() == "/token" {
                return match r.header("authorization") {
                    Some("Basic dTpw") => respond(200, &[], full(r#"{"token":"t1"}"#)),
                    _ => status(401),
                };
            }
            if r.header("authorization") == Some("Bearer t1") {
                return respond(
                    200,
                    &[("content-type", media::OCI_MANIFEST)],
                    full(MANIFEST),
                );
            }
            let challenge = format!(r#"Bearer realm="http://{addr}/token",service="s""#);
            respond(401, &[("www-authenticate", &challenge)], empty())
        }
    })
    .await;
    let repo = Repository::new(server.registry(), "a/b");
    let registry_name = server.registry();
    let (c, registry) = metered_client(|c| {
        c.credentials
            .insert(&registry_name, Credentials::new("u", "p"))
    });
    c.get_manifest(&repo, "latest").await.unwrap();
    let tokens = |outcome| {
        metric(
            &registry,
            "streamsnap_registry_auth_token_fetches_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(tokens("ok"), 1.0);
    assert_eq!(requests(&registry, "token", "ok"), 1.0);
    // The 401 and the retry with the token are one manifest request.
    assert_eq!(requests(&registry, "manifest", "ok"), 1.0);
    assert_eq!(requests(&registry, "manifest", "unauthorized"), 0.0);

    // Wrong credentials: the token endpoint refuses.
    let (c, registry2) = metered_client(|c| {
        c.credentials
            .insert(&registry_name, Credentials::new("u", "wrong"))
    });
    c.get_manifest(&repo, "latest").await.unwrap_err();
    assert_eq!(
        metric(
            &registry2,
            "streamsnap_registry_auth_token_fetches_total",
            &[("outcome", "unauthorized")],
        ),
        1.0
    );
    assert_eq!(requests(&registry2, "manifest", "unauthorized"), 1.0);
    assert_eq!(tokens("unauthorized"), 0.0, "registries are separate");
}
