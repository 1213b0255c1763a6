//! An in-process token server for the distribution registry's bearer token auth
//! (`auth.token` in the registry's config), over HTTPS with the [`TestCa`]'s server certificate.
//! A node must refuse a plain-HTTP realm for an HTTPS registry, so the realm is HTTPS.
//!
//! It implements the token protocol of docker/distribution (`docs/spec/auth/token.md`, `oauth.md`):
//! - `GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]` with HTTP Basic auth of
//!   the configured user; several scopes may also be given space-separated in one parameter;
//! - `POST /token` with a form body `grant_type=password&username=U&password=P&service=S&scope=...`
//!   (the OAuth2 password grant that containerd tries first);
//! - answer `200 {"token": JWT, "access_token": JWT, "expires_in": SECONDS, "issued_at": RFC3339}`;
//!   wrong or no credentials get `401` (counted in [`TokenServer::requests_refused`]), any other
//!   path `404`. Every requested action is granted to the configured user.
//!
//! The JWT is ES256, signed with the test CA's token-signing key; its header carries the signing
//! certificate as `x5c` (base64 DER). distribution 2.8 (`registry/auth/token/token.go`) verifies
//! an `x5c` chain against `rootcertbundle` (which holds that certificate), and checks `iss`, `aud`
//! (one string, the service), `exp` and `nbf` with a leeway of 60 s, then `access`.
//!
//! Expiry: so that the registry refuses a token `lifetime` after it was issued (not 60 s later),
//! the claims are written as if issued [`REGISTRY_LEEWAY`] earlier: `iat = nbf = now - 60 s`,
//! `exp = iat + lifetime`. The response's `expires_in` is the lifetime in whole seconds (rounded
//! up) and `issued_at` the real time: a client that renews on `expires_in` never holds a token the
//! registry refuses, and a request with a token older than `lifetime` + 1 s gets 401.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

use crate::http::Response;
use crate::https::{Handler, HttpsServer, Request, parse_form};
use crate::test_ca::TestCa;

/// The registry's `auth.token.service`, and the `aud` of every token.
pub const TOKEN_SERVICE: &str = "streamsnap-e2e-registry";
/// The registry's `auth.token.issuer`, and the `iss` of every token.
pub const TOKEN_ISSUER: &str = "streamsnap-e2e-token-server";
/// distribution 2.8's leeway on `exp` and `nbf` (`token.Leeway`).
pub const REGISTRY_LEEWAY: Duration = Duration::from_secs(60);

/// One requested access: `type:name:actions` of a scope, as it appears in a token's `access`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `repository` or `registry`.
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    /// Parses `repository:NAME:pull,push` (the name may itself hold colons, e.g. a port).
    pub fn parse_scope(scope: &str) -> Option<Self> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        Some(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions.split(',').map(str::to_owned).collect(),
        })
    }

    /// `repository:NAME:ACTIONS`.
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        Self {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// A request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The user name the client sent, if any (never the password).
    pub user: Option<String>,
    pub service: Option<String>,
    /// The scopes asked for, as sent.
    pub scopes: Vec<String>,
    /// Whether a token was issued.
    pub granted: bool,
}

/// A running token server. See the module doc. Stopped on drop.
#[derive(Debug)]
pub struct TokenServer {
    server: HttpsServer,
    state: Arc<State>,
}

struct State {
    user: String,
    password: Mutex<String>,
    lifetime: Duration,
    key: EcdsaKeyPair,
    /// The signing certificate, base64 (standard) DER, for the JWT header's `x5c`.
    x5c: String,
    rng: SystemRandom,
    issued: AtomicU64,
    refused: AtomicU64,
    next_jti: AtomicU64,
    requests: Mutex<Vec<TokenRequest>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("user", &self.user)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts a token server on a free loopback port issuing tokens that live `lifetime`
    /// (rounded up to whole seconds) to `user` with `password`.
    pub fn start(
        ca: &TestCa,
        user: &str,
        password: &str,
        lifetime: Duration,
    ) -> anyhow::Result<Self> {
        let signer = ca.token_signer();
        let key_der = std::fs::read(&signer.key_der)
            .with_context(|| format!("reading {}", signer.key_der.display()))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_der, &rng)
            .map_err(|e| anyhow::anyhow!("the token-signing key is not P-256 PKCS#8: {e}"))?;
        let cert_der = std::fs::read(&signer.cert_der)
            .with_context(|| format!("reading {}", signer.cert_der.display()))?;
        let state = Arc::new(State {
            user: user.to_owned(),
            password: Mutex::new(password.to_owned()),
            lifetime,
            key,
            x5c: STANDARD.encode(cert_der),
            rng,
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            next_jti: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let handler: Arc<Handler> = {
            let state = Arc::clone(&state);
            Arc::new(move |request: &Request| state.handle(request))
        };
        let server = HttpsServer::start(ca, handler)?;
        Ok(Self { server, state })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.server.addr()
    }

    /// `https://127.0.0.1:PORT/token`: the registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.server.addr())
    }

    /// How long an issued token is accepted by the registry.
    pub fn lifetime(&self) -> Duration {
        self.state.lifetime
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused so far (wrong or no credentials, unsupported grant).
    pub fn requests_refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().expect("not poisoned").clone()
    }

    /// Changes the password the server accepts from now on (a credential rotation); tokens
    /// already issued stay valid until they expire.
    pub fn set_password(&self, password: &str) {
        *self.state.password.lock().expect("not poisoned") = password.to_owned();
    }

    /// Signs a token for `subject` granting `access` that the registry accepts for `lifetime`
    /// from now, without a request: for tests that need a token of their own making. Not counted
    /// in [`Self::tokens_issued`].
    pub fn sign(
        &self,
        subject: &str,
        access: &[Access],
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        self.state.sign(subject, access, lifetime)
    }
}

impl State {
    fn handle(&self, request: &Request) -> Response {
        if request.path() != "/token" {
            return json_response(404, &json!({"errors": [{"code": "NOT_FOUND"}]}), &[]);
        }
        let (params, credentials, grant_ok) = match request.method.as_str() {
            "GET" => (
                request.query(),
                request.header("authorization").and_then(basic_credentials),
                true,
            ),
            "POST" => {
                let form = parse_form(&String::from_utf8_lossy(&request.body));
                let get = |name: &str| form.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                let credentials = get("username").cloned().zip(get("password").cloned());
                let grant_ok = get("grant_type").is_some_and(|g| g == "password");
                (form, credentials, grant_ok)
            }
            _ => return json_response(405, &json!({"errors": [{"code": "UNSUPPORTED"}]}), &[]),
        };
        let service = params
            .iter()
            .find(|(n, _)| n == "service")
            .map(|(_, v)| v.clone());
        let scopes: Vec<String> = params
            .iter()
            .filter(|(n, _)| n == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        let user = credentials.as_ref().map(|(u, _)| u.clone());
        let authorized = credentials.as_ref().is_some_and(|(u, p)| {
            *u == self.user && *p == *self.password.lock().expect("not poisoned")
        });
        let token = if grant_ok && authorized {
            let access: Vec<Access> = scopes
                .iter()
                .filter_map(|s| Access::parse_scope(s))
                .collect();
            self.sign(&self.user, &access, self.lifetime).ok()
        } else {
            None
        };
        self.requests
            .lock()
            .expect("not poisoned")
            .push(TokenRequest {
                method: request.method.clone(),
                user,
                service,
                scopes: scopes.clone(),
                granted: token.is_some(),
            });
        let Some(token) = token else {
            self.refused.fetch_add(1, Ordering::SeqCst);
            if !grant_ok {
                return json_response(400, &json!({"error": "unsupported_grant_type"}), &[]);
            }
            return json_response(
                401,
                &json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}),
                &[("WWW-Authenticate", "Basic realm=\"streamsnap-e2e-token\"")],
            );
        };
        self.issued.fetch_add(1, Ordering::SeqCst);
        json_response(
            200,
            &json!({
                "token": token,
                "access_token": token,
                "expires_in": whole_seconds(self.lifetime),
                "issued_at": rfc3339(SystemTime::now()),
                "scope": scopes.join(" "),
            }),
            &[],
        )
    }

    fn sign(&self, subject: &str, access: &[Access], lifetime: Duration) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let now_ceil = whole_seconds(now);
        let iat = now_ceil - REGISTRY_LEEWAY.as_secs();
        let exp = iat + whole_seconds(lifetime);
        let jti = self.next_jti.fetch_add(1, Ordering::SeqCst);
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let access: Vec<_> = access
            .iter()
            .map(|a| json!({"type": a.kind, "name": a.name, "actions": a.actions}))
            .collect();
        let claims = json!({
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": exp,
            "nbf": iat,
            "iat": iat,
            "jti": format!("streamsnap-e2e-{}-{jti}", now.as_nanos()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing a token failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// `(user, password)` of an `Authorization: Basic ...` header.
fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn json_response(status: u16, body: &serde_json::Value, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    all.extend(
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
    );
    Response {
        status,
        headers: all,
        body: body.to_string().into_bytes(),
    }
}

/// Seconds, rounded up.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `2026-12-06T10:25:17Z` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = i64::try_from(days).unwrap_or(i64::MAX) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::https::https_request;

    #[test]
    fn formats_rfc3339() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_553_917), "2026-12-06T10:45:17Z");
    }

    #[test]
    fn parses_scopes() {
        assert_eq!(
            Access::parse_scope("repository:a/b:pull,push"),
            Some(Access::repository("a/b", &["pull", "push"]))
        );
        assert_eq!(
            Access::parse_scope("registry:catalog:*").map(|a| a.kind),
            Some("registry".to_owned())
        );
        assert_eq!(Access::parse_scope("nonsense"), None);
    }

    #[test]
    fn issues_signed_tokens_to_the_right_user_only() {
        let ca = TestCa::generate().unwrap();
        let server = TokenServer::start(&ca, "alice", "s3cret", Duration::from_secs(30)).unwrap();
        let path = format!("/token?service={TOKEN_SERVICE}&scope=repository:a/b:pull");
        let basic = |user: &str, password: &str| {
            format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
        };
        let good = basic("alice", "s3cret");
        let r = https_request(
            &ca,
            &server.addr(),
            "GET",
            &path,
            &[("Authorization", &good)],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["expires_in"], 30);
        let token = body["token"].as_str().unwrap();
        assert_eq!(body["access_token"], token);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], TOKEN_SERVICE);
        assert_eq!(claims["access"][0]["name"], "a/b");
        assert_eq!(claims["access"][0]["actions"], json!(["pull"]));
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            30
        );
        // The signature verifies with the signing certificate's public key.
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let public = ring::signature::KeyPair::public_key(&server.state.key).as_ref();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();

        for auth in [basic("alice", "wrong"), basic("bob", "s3cret")] {
            let r = https_request(
                &ca,
                &server.addr(),
                "GET",
                &path,
                &[("Authorization", &auth)],
            )
            .unwrap();
            assert_eq!(r.status, 401);
        }
        assert_eq!(
            https_request(&ca, &server.addr(), "GET", &path, &[])
                .unwrap()
                .status,
            401
        );
        assert_eq!((server.tokens_issued(), server.requests_refused()), (1, 3));
        let requests = server.requests();
        assert_eq!(requests[0].user.as_deref(), Some("alice"));
        assert_eq!(requests[0].scopes, ["repository:a/b:pull"]);
        assert_eq!(requests[3].user, None);
    }
}
