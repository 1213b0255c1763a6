//! Registry authentication without I/O: `WWW-Authenticate` challenge parsing (RFC 7235), the
//! scope a request needs, and the cache of bearer tokens per (registry, scope). The HTTP part of
//! the token flow lives in `transport.rs`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::credentials::normalize_registry;

/// One challenge of a `WWW-Authenticate` header: a scheme (lowercased) and its parameters
/// (names lowercased, values unquoted), or a token68.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
    pub token68: Option<String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every challenge in one `WWW-Authenticate` value. Malformed parts are skipped: the
/// caller decides what to do when no usable challenge is left.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut p = Parser {
        chars: header.chars().collect(),
        pos: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|c| c == ' ' || c == '\t' || c == ',');
        if p.at_end() {
            break;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            p.pos += 1; // not a token character: skip it
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
            token68: None,
        };
        p.skip_ws();
        let save = p.pos;
        let t68 = p.token68();
        p.skip_ws();
        if !t68.is_empty() && (p.at_end() || p.peek() == Some(',')) {
            challenge.token68 = Some(t68);
            out.push(challenge);
            continue;
        }
        p.pos = save;
        loop {
            // Empty list elements (",,") are allowed before and between parameters.
            p.skip(|c| c == ' ' || c == '\t' || c == ',');
            let start = p.pos;
            let name = p.token();
            if name.is_empty() {
                break;
            }
            p.skip_ws();
            if p.peek() != Some('=') {
                p.pos = start; // a token without '=': the next challenge's scheme
                break;
            }
            p.pos += 1;
            p.skip_ws();
            // Unquoted values should be tokens; be lenient (some servers send bare URLs).
            let value = if p.peek() == Some('"') {
                p.quoted()
            } else {
                p.take(|c| c != ',' && c != ' ' && c != '\t')
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
            p.skip_ws();
            if p.peek() != Some(',') {
                break;
            }
        }
        out.push(challenge);
    }
    out
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip(&mut self, f: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
    }

    fn skip_ws(&mut self) {
        self.skip(|c| c == ' ' || c == '\t');
    }

    fn take(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        self.skip(f);
        self.chars[start..self.pos].iter().collect()
    }

    fn token(&mut self) -> String {
        self.take(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
    }

    fn token68(&mut self) -> String {
        let mut t = self.take(|c| c.is_ascii_alphanumeric() || "-._~+/".contains(c));
        if !t.is_empty() {
            t.push_str(&self.take(|c| c == '='));
        }
        t
    }

    /// A quoted-string starting at the opening quote; backslash escapes the next character.
    fn quoted(&mut self) -> String {
        self.pos += 1;
        let mut out = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                '"' => break,
                '\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.pos += 1;
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
}

/// What a request does to a repository, which decides the token scope it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
    Delete,
}

/// The repository a request is about, for authentication.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scope<'a> {
    pub registry: &'a str,
    pub repository: &'a str,
    pub access: Access,
}

impl Scope<'_> {
    /// The scope asked for when a challenge names none, and the token cache key.
    pub fn default_scope(&self) -> String {
        let actions = match self.access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
            Access::Delete => "delete",
        };
        format!("repository:{}:{actions}", self.repository)
    }
}

/// The JSON a token endpoint answers with (Docker token spec / OAuth2).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        Some((token, token_lifetime(self.expires_in)))
    }
}

const DEFAULT_TOKEN_SECONDS: u64 = 60;
/// Longest a token is kept, whatever its `expires_in` says (a huge one would overflow the
/// cache's clock arithmetic).
const MAX_TOKEN_SECONDS: u64 = 24 * 3600;

/// How long to use a token: its `expires_in` (default 60 s, at most a day) minus a slack of a
/// quarter of it, at most 10 s, so a token is not sent in its last moments.
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    let seconds = expires_in.unwrap_or(DEFAULT_TOKEN_SECONDS);
    let total = Duration::from_secs(seconds.min(MAX_TOKEN_SECONDS));
    total - (total / 4).min(Duration::from_secs(10))
}

/// Bearer tokens by (registry, scope), and the registries that asked for Basic auth (so later
/// requests send it right away instead of collecting a 401 each time).
#[derive(Default)]
pub(crate) struct AuthCache {
    inner: Mutex<CacheInner>,
    /// One token fetch at a time per (registry, scope): requests that hit an expired token
    /// together share one refresh.
    refreshing: Mutex<HashMap<(String, String), RefreshLock>>,
}

/// Held while a token for one (registry, scope) is fetched.
type RefreshLock = std::sync::Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
struct CacheInner {
    tokens: HashMap<(String, String), (String, Instant)>,
    basic: HashSet<String>,
}

impl fmt::Debug for AuthCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("AuthCache")
            .field("tokens", &inner.tokens.len())
            .field("basic", &inner.basic)
            .finish()
    }
}

/// What to put in the `Authorization` header of a first attempt, from the cache.
pub(crate) enum Cached {
    Bearer(String),
    Basic,
    None,
}

impl AuthCache {
    fn key(scope: &Scope<'_>) -> (String, String) {
        (normalize_registry(scope.registry), scope.default_scope())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, scope: &Scope<'_>) -> Cached {
        let key = Self::key(scope);
        let mut inner = self.lock();
        if inner.basic.contains(&key.0) {
            return Cached::Basic;
        }
        match inner.tokens.get(&key) {
            Some((token, until)) if Instant::now() < *until => Cached::Bearer(token.clone()),
            Some(_) => {
                inner.tokens.remove(&key);
                Cached::None
            }
            None => Cached::None,
        }
    }

    pub fn store_token(&self, scope: &Scope<'_>, token: String, lifetime: Duration) {
        let until = Instant::now() + lifetime;
        self.lock().tokens.insert(Self::key(scope), (token, until));
    }

    pub fn forget(&self, scope: &Scope<'_>) {
        let key = Self::key(scope);
        let mut inner = self.lock();
        inner.tokens.remove(&key);
        inner.basic.remove(&key.0);
    }

    /// The lock a token fetch for `scope` holds.
    pub fn refresh_lock(&self, scope: &Scope<'_>) -> RefreshLock {
        let mut locks = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        // Forget locks nobody holds once there are many (one per repository used).
        if locks.len() > 1024 {
            locks.retain(|_, lock| std::sync::Arc::strong_count(lock) > 1);
        }
        locks.entry(Self::key(scope)).or_default().clone()
    }

    pub fn remember_basic(&self, registry: &str) {
        self.lock().basic.insert(normalize_registry(registry));
    }
}

#[cfg(test)]
#[path = "auth_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect()
    }

    #[test]
    fn parses_a_distribution_bearer_challenge() {
        let h = r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.example/token"),
                ("service", "registry.example"),
                ("scope", "repository:a/b:pull,push"),
            ]
        );
    }

    #[test]
    fn parses_several_challenges_escapes_tokens_and_token68() {
        let h = r#"Basic realm="say \"hi\", ok", charset=UTF-8 ,  BEARER Realm=http://x/t , error="invalid_token", Negotiate abc+/==, Other"#;
        let c = parse_challenges(h);
        let schemes: Vec<&str> = c.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["basic", "bearer", "negotiate", "other"]);
        assert_eq!(
            params(&c[0]),
            [("realm", r#"say "hi", ok"#), ("charset", "UTF-8")]
        );
        assert_eq!(
            params(&c[1]),
            [("realm", "http://x/t"), ("error", "invalid_token")]
        );
        assert_eq!(c[2].token68.as_deref(), Some("abc+/=="));
        assert!(c[3].params.is_empty() && c[3].token68.is_none());
        assert_eq!(c[1].param("realm"), Some("http://x/t"));
    }

    #[test]
    fn survives_garbage() {
        for h in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "Basic ,,realm=x",
        ] {
            let _ = parse_challenges(h);
        }
        let c = parse_challenges("Bearer realm=\"unterminated");
        assert_eq!(c[0].param("realm"), Some("unterminated"));
        assert_eq!(
            parse_challenges("Basic ,,realm=x")[0].param("realm"),
            Some("x")
        );
    }

    #[test]
    fn token_cache_expires_and_forgets() {
        let cache = AuthCache::default();
        let scope = Scope {
            registry: "r.example",
            repository: "a/b",
            access: Access::Pull,
        };
        assert!(matches!(cache.lookup(&scope), Cached::None));
        cache.store_token(&scope, "t".into(), Duration::from_secs(60));
        assert!(matches!(cache.lookup(&scope), Cached::Bearer(t) if t == "t"));
        let push = Scope {
            access: Access::Push,
            ..scope
        };
        assert!(matches!(cache.lookup(&push), Cached::None));
        cache.store_token(&scope, "t".into(), Duration::ZERO);
        assert!(matches!(cache.lookup(&scope), Cached::None));
        cache.remember_basic("R.example");
        assert!(matches!(cache.lookup(&push), Cached::Basic));
        cache.forget(&push);
        assert!(matches!(cache.lookup(&push), Cached::None));
        assert!(!format!("{cache:?}").contains("\"t\""));
    }

    #[test]
    fn token_response_prefers_token_and_defaults_lifetime() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        let (t, life) = r.into_token().unwrap();
        assert_eq!((t.as_str(), life), ("a", Duration::from_secs(50)));
        let r: TokenResponse =
            serde_json::from_str(r#"{"token":"b","access_token":"a","expires_in":4}"#).unwrap();
        assert_eq!(
            r.into_token().unwrap(),
            ("b".into(), Duration::from_secs(3))
        );
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(r.into_token().is_none());
    }
}
