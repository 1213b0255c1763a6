//! A registry reached over HTTPS never gets a request sent on in clear: a plain-HTTP bearer
//! realm and a redirect or upload location from HTTPS to plain HTTP are refused before anything
//! (credentials, a token, a signed URL, upload data) goes out. The same flows over HTTPS work,
//! which shows the TLS front the refusals are tested through is sound.
//!
//! One test function: the client trusts the test CA through `SSL_CERT_FILE`, set once before
//! any other thread of this binary runs.

mod common;

use bytes::Bytes;
use common::tls::{TlsFront, fixture};
use common::*;
use http::Method;
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, Credentials, Error, Repository};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

#[test]
fn a_registry_reached_over_https_is_never_followed_to_plain_http() {
    // SAFETY: this binary has this one test, and nothing else has started a thread that reads
    // the environment yet: the runtime is built below, after the variable is set.
    unsafe { std::env::set_var("SSL_CERT_FILE", fixture("ca.pem")) };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        https_realm_works_and_a_plain_http_realm_is_refused().await;
        https_to_http_redirects_are_refused().await;
        an_upload_location_to_plain_http_is_refused().await;
    });
}

fn with_creds(registry: &str) -> Client {
    client(|c| c.credentials.insert(registry, Credentials::new("u", "p")))
}

/// A registry behind TLS answering 401 with a bearer challenge whose realm is `realm`, in which
/// `{tls}` stands for the TLS front's port and `{plain}` for the server's own (plain-HTTP)
/// address; its token endpoint is `/token`, reachable both ways.
async fn bearer_registry(realm: &'static str) -> (Server, TlsFront, Client) {
    let front_port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
    let port = front_port.clone();
    let server = Server::start_with(move |addr| {
        move |r: &Recorded| {
            if r.path() == "/token" {
                return respond(
                    200,
                    &[("content-type", "application/json")],
                    full(r#"{"token":"tok-1"}"#),
                );
            }
            if r.header("authorization") != Some("Bearer tok-1") {
                let realm = realm
                    .replace("{tls}", &port.get().unwrap().to_string())
                    .replace("{plain}", &addr.to_string());
                let challenge = format!(r#"Bearer realm="{realm}",service="reg""#);
                return respond(401, &[("www-authenticate", &challenge)], empty());
            }
            respond(
                200,
                &[("content-type", media::OCI_MANIFEST)],
                full(MANIFEST),
            )
        }
    })
    .await;
    let front = TlsFront::start(server.addr);
    front_port.set(front.addr.port()).unwrap();
    let client = with_creds(&front.registry());
    (server, front, client)
}

async fn https_realm_works_and_a_plain_http_realm_is_refused() {
    let (server, front, c) = bearer_registry("https://[::ffff:127.0.0.1]:{tls}/token").await;
    let repo = Repository::new(front.registry(), "a/b");
    let m = c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(m.media_type, media::OCI_MANIFEST);
    let token = server.requests_to(&Method::GET, "/token");
    assert_eq!(token.len(), 1);
    assert_eq!(token[0].header("authorization"), Some("Basic dTpw"));

    // The same token endpoint in clear: it would answer, but nothing may be sent there.
    let (server, front, c) = bearer_registry("http://{plain}/token").await;
    let repo = Repository::new(front.registry(), "a/b");
    let e = c.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(matches!(e, Error::InsecureRealm { .. }), "{e:?}");
    let shown = e.to_string();
    assert!(
        shown.contains(&front.registry())
            && shown.contains(&format!("http://{}/token", server.addr))
            && shown.contains("https:// realm"),
        "{shown}"
    );
    assert!(
        !shown.contains("dTpw") && !shown.contains("scope="),
        "{shown}"
    );
    let paths: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.path().to_owned())
        .collect();
    assert_eq!(paths, ["/v2/a/b/manifests/v1"], "only the 401 was asked");
}

async fn https_to_http_redirects_are_refused() {
    let data = blob_data(4096);
    let digest = Digest::sha256(&data);
    let body = data.clone();
    let storage = Server::start(move |_| respond(200, &[], full(body.clone()))).await;
    let storage_addr = storage.addr;
    let registry = Server::start(move |_| {
        let target = format!("http://{storage_addr}/bucket/blob?X-Signature=topsecretsig");
        respond(307, &[("location", &target)], empty())
    })
    .await;
    let storage_tls = TlsFront::start(storage.addr);
    let front = TlsFront::start(registry.addr);
    let c = with_creds(&front.registry());

    let plain = Repository::new(front.registry(), "plain");
    for result in [
        c.get_blob_bytes(&plain, &digest, 1 << 20).await.map(|_| ()),
        c.read_range(&plain, &digest, 10, 10).await.map(|_| ()),
    ] {
        let e = result.unwrap_err();
        assert!(matches!(e, Error::InsecureRedirect { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("{}/v2/plain/blobs/", front.url()))
                && shown.contains(&format!("http://{storage_addr}/bucket/blob"))
                && !shown.contains("topsecretsig"),
            "{shown}"
        );
    }
    assert!(storage.requests().is_empty(), "a request went out in clear");

    // The same redirect to an https:// location is followed (the control for the above).
    let tls_port = storage_tls.addr.port();
    let registry_tls = Server::start(move |_| {
        let target = format!("https://[::ffff:127.0.0.1]:{tls_port}/bucket/blob?X-Signature=s");
        respond(307, &[("location", &target)], empty())
    })
    .await;
    let front_tls = TlsFront::start(registry_tls.addr);
    let repo = Repository::new(front_tls.registry(), "tls");
    let got = client(|_| {})
        .get_blob_bytes(&repo, &digest, 1 << 20)
        .await
        .unwrap();
    assert_eq!(got, data);
    assert_eq!(storage.requests().len(), 1);
}

async fn an_upload_location_to_plain_http_is_refused() {
    let sink = Server::start(|_| status(202)).await;
    let sink_addr = sink.addr;
    let registry = Server::start(move |r| match r.method {
        Method::HEAD => status(404),
        Method::POST => {
            let loc = format!("http://{sink_addr}/v2/a/blobs/uploads/u1?_state=secretstate");
            respond(202, &[("location", &loc), ("range", "0-0")], empty())
        }
        _ => status(405),
    })
    .await;
    let front = TlsFront::start(registry.addr);
    let repo = Repository::new(front.registry(), "a");
    let data = Bytes::from_static(b"layer data");
    let e = with_creds(&front.registry())
        .push_blob(&repo, &Digest::sha256(&data), data)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InsecureRedirect { .. }), "{e:?}");
    assert!(!e.to_string().contains("secretstate"), "{e}");
    assert!(sink.requests().is_empty(), "upload data went out in clear");
}
