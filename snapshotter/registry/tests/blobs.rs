//! Blob reads against an in-process server: ranges, servers that ignore Range, truncated and
//! stalled bodies, redirects to another host, retries.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Method;
use streamsnap_format::Digest;
use streamsnap_registry::{Credentials, Error, Repository};

fn range_of(r: &Recorded) -> (usize, usize) {
    let spec = r.header("range").unwrap().strip_prefix("bytes=").unwrap();
    let (a, b) = spec.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// A blob server that answers Range requests properly.
fn ranged(data: Bytes) -> impl Fn(&Recorded) -> http::Response<Body> + Send + Sync {
    move |r| match r.header("range") {
        Some(_) => {
            let (a, b) = range_of(r);
            let b = b.min(data.len() - 1);
            let cr = format!("bytes {a}-{b}/{}", data.len());
            respond(206, &[("content-range", &cr)], full(data.slice(a..=b)))
        }
        None => respond(200, &[], full(data.clone())),
    }
}

#[tokio::test]
async fn range_read_sends_range_and_checks_206() {
    let data = blob_data(1000);
    let server = Server::start(ranged(data.clone())).await;
    let repo = Repository::new(server.registry(), "a/b");
    let digest = Digest::sha256(&data);
    let c = client(|_| {});
    let got = c.read_range(&repo, &digest, 10, 20).await.unwrap();
    assert_eq!(got, data.slice(10..30));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path(), format!("/v2/a/b/blobs/{digest}"));
    assert_eq!(reqs[0].header("range"), Some("bytes=10-29"));
    assert!(
        reqs[0]
            .header("user-agent")
            .unwrap()
            .starts_with("streamsnap/")
    );

    // Past the end: the server clamps the range, the client must not return short data.
    let e = c.read_range(&repo, &digest, 990, 20).await.unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(c.read_range(&repo, &digest, 5, 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn range_read_rejects_a_206_for_another_offset() {
    let data = blob_data(100);
    let server = Server::start(move |_| {
        respond(
            206,
            &[("content-range", "bytes 0-9/100")],
            full(data.slice(0..10)),
        )
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let e = client(|_| {})
        .read_range(&repo, &Digest::sha256(b"x"), 50, 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("asked for bytes from 50"), "{e}");
}

#[tokio::test]
async fn range_read_slices_a_full_200_when_range_is_ignored() {
    let data = blob_data(256 << 10);
    let d2 = data.clone();
    let server = Server::start(move |_| respond(200, &[], full(d2.clone()))).await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|_| {});
    let got = c
        .read_range(&repo, &Digest::sha256(&data), 100_000, 5000)
        .await
        .unwrap();
    assert_eq!(got, data.slice(100_000..105_000));
    // Past the end of a full body is an error, not short data.
    let e = c
        .read_range(&repo, &Digest::sha256(&data), (256 << 10) - 10, 20)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
}

/// A pull-through cache that has not cached the blob yet answers a range with the whole blob
/// (distribution in proxy mode: 200 and every byte); this one sends the first 64 KiB of a
/// 1 GiB body, then stalls.
fn whole_blob_then_stall(prefix: Bytes) -> impl Fn(&Recorded) -> http::Response<Body> {
    move |_| {
        respond(
            200,
            &[("content-length", &(1u64 << 30).to_string())],
            stalled_after(prefix.clone()),
        )
    }
}

#[tokio::test]
async fn a_whole_blob_answer_is_not_read_through_past_the_bound() {
    let prefix = blob_data(64 << 10);
    let server = Server::start(whole_blob_then_stall(prefix.clone())).await;
    let repo = Repository::new(server.registry(), "a");
    let digest = Digest::sha256(b"x");
    let (c, registry) = metered_client(|c| c.retries = 2);
    // Far into the blob: the read ends at the headers, without waiting for the body (which
    // would stall for the request timeout) and without retrying.
    let started = Instant::now();
    let e = c
        .read_range_within(&repo, &digest, 512 << 20, 4096, 4 << 20)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{e}");
    assert!(
        matches!(
            e,
            Error::RangeIgnored {
                offset: 536_870_912,
                max_skip: 4_194_304,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("ignored Range"), "{e}");
    assert!(!e.is_transient());
    assert_eq!(server.requests().len(), 1, "not retried");
    assert_eq!(
        server.requests()[0].header("range"),
        Some("bytes=536870912-536875007")
    );
    let requests = |outcome| {
        metric(
            &registry,
            "streamsnap_registry_requests_total",
            &[("kind", "range"), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("range_ignored"), 1.0);
    assert!(
        metric(&registry, "streamsnap_registry_range_bytes_total", &[]) < (64 << 10) as f64,
        "the body was not read"
    );

    // Within the bound the whole body is read through to the range, as before.
    let got = c
        .read_range_within(&repo, &digest, 1000, 2000, 4 << 20)
        .await
        .unwrap();
    assert_eq!(got, prefix.slice(1000..3000));
    // At the bound exactly, too: the bound is on the bytes skipped.
    let got = c
        .read_range_within(&repo, &digest, 60 << 10, 1024, 60 << 10)
        .await
        .unwrap();
    assert_eq!(got, prefix.slice((60 << 10)..(61 << 10)));
    assert_eq!(requests("ok"), 2.0);
}

#[tokio::test]
async fn a_head_tells_whether_ranges_are_served() {
    let server = Server::start(|r| match r.path() {
        p if p.starts_with("/v2/cached/") => respond(
            200,
            &[("accept-ranges", "bytes"), ("content-length", "10")],
            empty(),
        ),
        p if p.starts_with("/v2/cold/") => respond(200, &[("content-length", "10")], empty()),
        _ => status(404),
    })
    .await;
    let c = client(|_| {});
    let repo = |name: &str| Repository::new(server.registry(), name);
    let digest = Digest::sha256(b"x");
    assert!(
        c.blob_accepts_ranges(&repo("cached"), &digest)
            .await
            .unwrap()
    );
    assert!(!c.blob_accepts_ranges(&repo("cold"), &digest).await.unwrap());
    let e = c
        .blob_accepts_ranges(&repo("gone"), &digest)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert!(server.requests().iter().all(|r| r.method == Method::HEAD));
}

#[tokio::test]
async fn a_206_is_read_whatever_the_bound() {
    let data = blob_data(1 << 20);
    let server = Server::start(ranged(data.clone())).await;
    let repo = Repository::new(server.registry(), "a");
    let got = client(|_| {})
        .read_range_within(&repo, &Digest::sha256(&data), 900_000, 1000, 0)
        .await
        .unwrap();
    assert_eq!(got, data.slice(900_000..901_000));
}

#[tokio::test]
async fn truncated_range_body_is_an_error_and_is_retried() {
    let data = blob_data(1000);
    let count = Arc::new(AtomicUsize::new(0));
    let (d, n) = (data.clone(), count.clone());
    let server = Server::start(move |r| {
        let (a, b) = range_of(r);
        let cr = format!("bytes {a}-{b}/1000");
        // The first two answers are cut half way.
        if n.fetch_add(1, Ordering::SeqCst) < 2 {
            let half = d.slice(a..a + (b - a).div_ceil(2));
            respond(
                206,
                &[
                    ("content-range", &cr),
                    ("content-length", &(b - a + 1).to_string()),
                ],
                truncated_after(half),
            )
        } else {
            respond(206, &[("content-range", &cr)], full(d.slice(a..=b)))
        }
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let digest = Digest::sha256(&data);
    let e = client(|c| c.retries = 0)
        .read_range(&repo, &digest, 100, 200)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Body { .. } | Error::ShortBody { .. }),
        "{e:?}"
    );
    assert_eq!(server.requests().len(), 1);
    // Second answer truncated too, third complete: one client call with 2 retries succeeds.
    let got = client(|c| c.retries = 2)
        .read_range(&repo, &digest, 100, 200)
        .await
        .unwrap();
    assert_eq!(got, data.slice(100..300));
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn short_200_body_is_an_error() {
    let server = Server::start(|_| respond(200, &[], full(blob_data(50)))).await;
    let repo = Repository::new(server.registry(), "a");
    let e = client(|_| {})
        .read_range(&repo, &Digest::sha256(b"x"), 40, 20)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("past the end") || matches!(e, Error::ShortBody { .. }),
        "{e}"
    );
}

#[tokio::test]
async fn redirect_to_another_host_drops_authorization() {
    let data = blob_data(4096);
    let storage = Server::start(ranged(data.clone())).await;
    let target = format!("{}/bucket/blob?X-Signature=topsecretsig", storage.url());
    let registry = Server::start(move |r| match r.header("authorization") {
        None => respond(401, &[("www-authenticate", "Basic realm=\"reg\"")], empty()),
        Some(_) => respond(307, &[("location", &target)], empty()),
    })
    .await;
    let repo = Repository::new(registry.registry(), "a/b");
    let digest = Digest::sha256(&data);
    let c = client(|c| {
        c.credentials
            .insert(&registry.registry(), Credentials::new("user", "pw"))
    });

    let got = c.read_range(&repo, &digest, 1000, 100).await.unwrap();
    assert_eq!(got, data.slice(1000..1100));
    let mut stream = c.get_blob(&repo, &digest).await.unwrap();
    assert_eq!(stream.content_length(), Some(4096));
    let mut all = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.unwrap() {
        all.extend_from_slice(&chunk);
    }
    assert_eq!(all, data);
    assert_eq!(
        c.get_blob_bytes(&repo, &digest, 1 << 20).await.unwrap(),
        data
    );

    let reg = registry.requests();
    assert_eq!(reg[0].header("authorization"), None);
    assert_eq!(reg[1].header("authorization"), Some("Basic dXNlcjpwdw=="));
    let sto = storage.requests();
    assert_eq!(sto.len(), 3);
    for r in &sto {
        assert_eq!(
            r.header("authorization"),
            None,
            "credentials leaked to {}",
            r.path()
        );
        assert_eq!(r.path(), "/bucket/blob");
    }
    assert_eq!(sto[0].header("range"), Some("bytes=1000-1099"));
}

#[tokio::test]
async fn errors_after_redirect_do_not_show_signed_query() {
    let storage = Server::start(|_| respond(500, &[], full("storage broke"))).await;
    let target = format!("{}/bucket/blob?X-Signature=topsecretsig", storage.url());
    let registry = Server::start(move |_| respond(302, &[("location", &target)], empty())).await;
    let repo = Repository::new(registry.registry(), "a");
    let e = client(|_| {})
        .get_blob(&repo, &Digest::sha256(b"x"))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("/bucket/blob") && msg.contains("500"), "{msg}");
    assert!(!msg.contains("topsecretsig"), "{msg}");
}

#[tokio::test]
async fn redirect_loops_stop() {
    let server = Server::start_with(|addr| {
        move |_: &Recorded| {
            respond(
                302,
                &[("location", &format!("http://{addr}/loop"))],
                empty(),
            )
        }
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let e = client(|_| {})
        .get_blob(&repo, &Digest::sha256(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::TooManyRedirects { limit: 5, .. }),
        "{e:?}"
    );
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test]
async fn get_is_retried_after_503_but_put_is_not() {
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    let server = Server::start(move |r| {
        if r.method == Method::PUT || n.fetch_add(1, Ordering::SeqCst) == 0 {
            respond(
                503,
                &[("retry-after", "0")],
                full(r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#),
            )
        } else {
            respond(200, &[("content-length", "123")], empty())
        }
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|c| c.retries = 3);
    let started = Instant::now();
    assert_eq!(
        c.blob_size(&repo, &Digest::sha256(b"x")).await.unwrap(),
        Some(123)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "no backoff"
    );
    assert_eq!(server.requests().len(), 2);

    let e = c
        .put_manifest(
            &repo,
            "t",
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    assert!(e.to_string().contains("UNAVAILABLE: try later"), "{e}");
    assert_eq!(server.requests_to(&Method::PUT, "/manifests/").len(), 1);
}

#[tokio::test]
async fn persistent_5xx_gives_up_after_the_retries() {
    let server = Server::start(|_| status(502)).await;
    let repo = Repository::new(server.registry(), "a");
    let e = client(|c| c.retries = 2)
        .blob_size(&repo, &Digest::sha256(b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(http::StatusCode::BAD_GATEWAY));
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn stalled_body_times_out_within_the_bound() {
    let server = Server::start(|_| {
        respond(
            200,
            &[("content-length", "1000")],
            stalled_after(Bytes::from_static(b"0123456789")),
        )
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|c| c.request_timeout = Duration::from_millis(300));
    let mut stream = c.get_blob(&repo, &Digest::sha256(b"x")).await.unwrap();
    assert_eq!(
        stream.next_chunk().await.unwrap().unwrap().as_ref(),
        b"0123456789"
    );
    let started = Instant::now();
    let e = stream.next_chunk().await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // read_range over the same stall fails too, within (1 + retries) timeouts plus backoff.
    let c = client(|c| {
        c.request_timeout = Duration::from_millis(300);
        c.retries = 1;
    });
    let started = Instant::now();
    let e = c
        .read_range(&repo, &Digest::sha256(b"x"), 0, 100)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_that_never_answers_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let repo = Repository::new(addr.to_string(), "a");
    let c = client(|c| c.request_timeout = Duration::from_millis(300));
    let started = Instant::now();
    let e = c.blob_size(&repo, &Digest::sha256(b"x")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Timeout {
                phase: "response headers",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    hold.abort();
}

#[tokio::test]
async fn connection_refused_is_a_transport_error_naming_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let repo = Repository::new(addr.to_string(), "a");
    let e = client(|c| c.retries = 1)
        .blob_size(&repo, &Digest::sha256(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("HEAD http://{addr}/v2/a/blobs/sha256:")),
        "{e}"
    );
}

#[tokio::test]
async fn whole_blob_reads_verify_digest_and_size() {
    let data = blob_data(3000);
    let d = data.clone();
    let server = Server::start(move |_| respond(200, &[], full(d.clone()))).await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|_| {});
    assert_eq!(
        c.get_blob_bytes(&repo, &Digest::sha256(&data), 3000)
            .await
            .unwrap(),
        data
    );
    let e = c
        .get_blob_bytes(&repo, &Digest::sha256(&data), 2999)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { limit: 2999, .. }), "{e:?}");
    let e = c
        .get_blob_bytes(&repo, &Digest::sha256(b"other"), 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
}

#[tokio::test]
async fn missing_blob_is_none_or_not_found() {
    let (server, _) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|_| {});
    assert_eq!(
        c.blob_size(&repo, &Digest::sha256(b"x")).await.unwrap(),
        None
    );
    let e = c.get_blob(&repo, &Digest::sha256(b"x")).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert!(
        e.to_string()
            .contains("BLOB_UNKNOWN: blob unknown to registry"),
        "{e}"
    );
}
