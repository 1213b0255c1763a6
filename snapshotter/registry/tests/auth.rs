//! Authentication against an in-process server: the Bearer token flow (token endpoint with
//! Basic credentials, caching, expiry, revocation) and Basic auth.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use streamsnap_format::media;
use streamsnap_registry::{Credentials, Error, Repository};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

struct TokenServer {
    /// Tokens the registry accepts right now.
    valid: Vec<String>,
    issued: usize,
    expires_in: u64,
    /// Whether the challenge carries a scope.
    challenge_scope: bool,
    reject_all: bool,
}

/// A registry whose token endpoint (`/token`) requires Basic `u:p` and whose `/v2/` paths
/// require a bearer token it issued and still considers valid.
async fn bearer_registry(
    expires_in: u64,
    challenge_scope: bool,
) -> (Server, Arc<Mutex<TokenServer>>) {
    let state = Arc::new(Mutex::new(TokenServer {
        valid: Vec::new(),
        issued: 0,
        expires_in,
        challenge_scope,
        reject_all: false,
    }));
    let s = state.clone();
    let server = Server::start_with(move |addr| {
        move |r: &Recorded| {
            let mut st = s.lock().unwrap();
            if r.path() == "/token" {
                if r.header("authorization") != Some("Basic dTpw") {
                    return respond(401, &[], full(r#"{"details":"incorrect username or password"}"#));
                }
                st.issued += 1;
                let token = format!("tok-{}", st.issued);
                st.valid.push(token.clone());
                let body = serde_json::json!({"token": token, "expires_in": st.expires_in});
                return respond(200, &[("content-type", "application/json")], full(body.to_string()));
            }
            let ok = r
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| !st.reject_all && st.valid.iter().any(|v| v == t));
            if !ok {
                let mut challenge = format!(r#"Bearer realm="http://{addr}/token",service="fake registry""#);
                if st.challenge_scope {
                    challenge.push_str(r#",scope="repository:a/b:pull""#);
                }
                return respond(401, &[("www-authenticate", &challenge)], full(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#));
            }
            match r.method {
                Method::PUT => respond(201, &[], empty()),
                _ => respond(200, &[("content-type", media::OCI_MANIFEST)], full(MANIFEST)),
            }
        }
    })
    .await;
    (server, state)
}

fn with_creds(server: &Server) -> streamsnap_registry::Client {
    let registry = server.registry();
    client(move |c| c.credentials.insert(&registry, Credentials::new("u", "p")))
}

#[tokio::test]
async fn bearer_token_is_fetched_with_basic_credentials_and_cached() {
    let (server, _) = bearer_registry(300, true).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    let m = c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(m.media_type, media::OCI_MANIFEST);
    c.get_manifest(&repo, "v2").await.unwrap();
    // A clone shares the token cache.
    c.clone().get_manifest(&repo, "v3").await.unwrap();

    let reqs = server.requests();
    let paths: Vec<String> = reqs
        .iter()
        .map(|r| format!("{} {}", r.method, r.path()))
        .collect();
    assert_eq!(
        paths,
        [
            "GET /v2/a/b/manifests/v1",
            "GET /token",
            "GET /v2/a/b/manifests/v1",
            "GET /v2/a/b/manifests/v2",
            "GET /v2/a/b/manifests/v3",
        ]
    );
    assert_eq!(reqs[0].header("authorization"), None);
    assert_eq!(reqs[1].header("authorization"), Some("Basic dTpw"));
    assert_eq!(
        reqs[1].query(),
        "service=fake%20registry&scope=repository%3Aa%2Fb%3Apull"
    );
    for r in &reqs[2..] {
        assert_eq!(r.header("authorization"), Some("Bearer tok-1"));
    }
}

#[tokio::test]
async fn expired_token_is_replaced() {
    let (server, state) = bearer_registry(1, true).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    c.get_manifest(&repo, "v1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(state.lock().unwrap().issued, 2);
    let last = server.requests().pop().unwrap();
    assert_eq!(last.header("authorization"), Some("Bearer tok-2"));
}

#[tokio::test]
async fn token_rejected_by_the_registry_reruns_the_flow_once() {
    let (server, state) = bearer_registry(300, true).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    c.get_manifest(&repo, "v1").await.unwrap();
    state.lock().unwrap().valid.clear(); // the registry revokes tok-1
    c.get_manifest(&repo, "v1").await.unwrap();
    let reqs = server.requests();
    let auths: Vec<Option<&str>> = reqs[3..]
        .iter()
        .map(|r| r.header("authorization"))
        .collect();
    assert_eq!(
        auths,
        [
            Some("Bearer tok-1"),
            Some("Basic dTpw"),
            Some("Bearer tok-2")
        ]
    );
}

#[tokio::test]
async fn a_registry_that_rejects_every_token_gives_unauthorized_without_looping() {
    let (server, state) = bearer_registry(300, true).await;
    state.lock().unwrap().reject_all = true;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    let e = c.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("rejected the credentials") && msg.contains("authentication required"),
        "{msg}"
    );
    assert!(!msg.contains("tok-") && !msg.contains("dTpw"), "{msg}");
    let paths: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        ["/v2/a/b/manifests/v1", "/token", "/v2/a/b/manifests/v1"]
    );
}

#[tokio::test]
async fn token_endpoint_without_credentials_asks_for_them() {
    let (server, _) = bearer_registry(300, true).await;
    let repo = Repository::new(server.registry(), "a/b");
    let e = client(|_| {}).get_manifest(&repo, "v1").await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert!(e.to_string().contains("--username/--password-stdin"), "{e}");
    let token_req = &server.requests_to(&Method::GET, "/token")[0];
    assert_eq!(token_req.header("authorization"), None);

    let registry = server.registry();
    let wrong = client(move |c| {
        c.credentials
            .insert(&registry, Credentials::new("u", "wrong"))
    });
    let e = wrong.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(e.to_string().contains("rejected the credentials"), "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
}

#[tokio::test]
async fn push_asks_for_pull_push_scope_when_the_challenge_has_none() {
    let (server, _) = bearer_registry(300, false).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    c.get_manifest(&repo, "v1").await.unwrap();
    c.put_manifest(
        &repo,
        "v1",
        media::OCI_MANIFEST,
        Bytes::from_static(MANIFEST.as_bytes()),
    )
    .await
    .unwrap();
    let tokens = server.requests_to(&Method::GET, "/token");
    assert_eq!(tokens.len(), 2, "push needs its own token");
    assert!(
        tokens[0]
            .query()
            .ends_with("scope=repository%3Aa%2Fb%3Apull"),
        "{}",
        tokens[0].query()
    );
    assert!(
        tokens[1]
            .query()
            .ends_with("scope=repository%3Aa%2Fb%3Apull%2Cpush"),
        "{}",
        tokens[1].query()
    );
    // The PUT was sent twice (anonymous, then with the token) with the same body.
    let puts = server.requests_to(&Method::PUT, "/manifests/v1");
    assert_eq!(puts.len(), 2);
    assert_eq!(puts[1].body, MANIFEST.as_bytes());
    assert_eq!(puts[1].header("authorization"), Some("Bearer tok-2"));
}

/// A registry with Basic auth for `u:p`.
async fn basic_registry() -> Server {
    Server::start(|r| match r.header("authorization") {
        Some("Basic dTpw") => respond(200, &[("content-length", "7")], empty()),
        _ => respond(
            401,
            &[(
                "www-authenticate",
                r#"Basic realm="Registry Realm", charset="UTF-8""#,
            )],
            full(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#),
        ),
    })
    .await
}

#[tokio::test]
async fn basic_auth_uses_stored_credentials_and_then_sends_them_directly() {
    let server = basic_registry().await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    let d = streamsnap_format::Digest::sha256(b"x");
    assert_eq!(c.blob_size(&repo, &d).await.unwrap(), Some(7));
    assert_eq!(c.blob_size(&repo, &d).await.unwrap(), Some(7));
    let auths: Vec<Option<String>> = server
        .requests()
        .iter()
        .map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(
        auths,
        [None, Some("Basic dTpw".into()), Some("Basic dTpw".into())]
    );
}

#[tokio::test]
async fn basic_auth_without_or_with_wrong_credentials_is_unauthorized() {
    let server = basic_registry().await;
    let repo = Repository::new(server.registry(), "a/b");
    let d = streamsnap_format::Digest::sha256(b"x");
    let e = client(|_| {}).blob_size(&repo, &d).await.unwrap_err();
    assert!(e.to_string().contains("pass credentials"), "{e}");
    assert_eq!(server.requests().len(), 1);

    let registry = server.registry();
    let c = client(move |c| {
        c.credentials
            .insert(&registry, Credentials::new("u", "badpass"))
    });
    // A GET, so that the 401 has a body whose error code ends up in the message.
    let e = c.get_blob(&repo, &d).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert!(
        msg.contains("rejected the credentials") && msg.contains("UNAUTHORIZED"),
        "{msg}"
    );
    assert!(
        !msg.contains("badpass") && !format!("{e:?}").contains("badpass"),
        "{msg}"
    );
    assert_eq!(server.requests().len(), 3);
}

/// A source that has `u:p` for repository `a/b` only, and counts its lookups.
#[derive(Debug, Default)]
struct OneRepository {
    asked: std::sync::atomic::AtomicUsize,
}

impl streamsnap_registry::CredentialSource for OneRepository {
    fn credentials<'a>(
        &'a self,
        _registry: &'a str,
        repository: &'a str,
    ) -> streamsnap_registry::BoxFuture<'a, Option<Credentials>> {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let found = (repository == "a/b").then(|| Credentials::new("u", "p"));
        Box::pin(async move { found })
    }
}

#[tokio::test]
async fn a_credential_source_is_asked_per_repository_and_lends_nothing_to_another() {
    let (server, _) = bearer_registry(300, false).await;
    let source = Arc::new(OneRepository::default());
    let s = source.clone();
    let c = client(move |c| c.sources.push(s));
    c.get_manifest(&Repository::new(server.registry(), "a/b"), "v1")
        .await
        .unwrap();
    let err = c
        .get_manifest(&Repository::new(server.registry(), "other"), "v1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(source.asked.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn concurrent_reads_share_one_token_refresh() {
    let (server, state) = bearer_registry(300, true).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = with_creds(&server);
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(state.lock().unwrap().issued, 1);
    state.lock().unwrap().valid.clear(); // tok-1 expires at the registry
    let reads: Vec<_> = (0..16)
        .map(|i| {
            let (c, repo) = (c.clone(), repo.clone());
            tokio::spawn(async move { c.get_manifest(&repo, &format!("v{i}")).await })
        })
        .collect();
    for read in reads {
        read.await.unwrap().unwrap();
    }
    assert_eq!(
        state.lock().unwrap().issued,
        2,
        "16 reads that met an expired token fetched more than one new token"
    );
}
