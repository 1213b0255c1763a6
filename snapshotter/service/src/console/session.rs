//! Console sessions and CSRF tokens, without server-side session state.
//!
//! A session is a cookie `EXPIRES.NONCE.MAC`: when it ends (ms since the epoch), 16 random
//! bytes, and an HMAC-SHA256 of both under a key derived from the API token. So every replica
//! of the service (they share the token) accepts it, a restart keeps people logged in, and
//! changing the token ends every session. Logout clears the cookie and remembers the nonce as
//! revoked (in this process, until the session would have ended).
//!
//! CSRF: every form that changes something carries `csrf`, an HMAC of the session's nonce; a
//! POST without the right one is refused. The login form (no session yet) carries an HMAC of a
//! random pre-login cookie instead (double submit). Cookies are `HttpOnly; SameSite=Strict`,
//! and `Secure` when the request came through TLS (`X-Forwarded-Proto: https` from a proxy).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::api::Timestamp;
use crate::auth::Secret;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "streamsnap_session";
/// The pre-login cookie that the login form's CSRF token is bound to.
pub const LOGIN_COOKIE: &str = "streamsnap_login";
/// How long a session lasts after login (absolute, not sliding).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// A valid session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub nonce: String,
    pub expires: u64,
}

/// Signs and checks sessions and CSRF tokens.
pub struct Sessions {
    key: hmac::Key,
    rng: SystemRandom,
    /// Nonce -> expiry of sessions logged out before they ended.
    revoked: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    /// Keys derived from the API token (so replicas agree); without one (the loopback dev
    /// mode), a random key for this process.
    pub fn new(token: Option<&Secret>) -> Self {
        let rng = SystemRandom::new();
        let key = match token {
            Some(token) => {
                let root = hmac::Key::new(hmac::HMAC_SHA256, token.expose().as_bytes());
                let derived = hmac::sign(&root, b"streamsnap console session key v1");
                hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
            }
            None => hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .expect("the kernel's random source works"),
        };
        Self {
            key,
            rng,
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// A random 16-byte nonce, hex.
    pub fn nonce(&self) -> String {
        let mut bytes = [0u8; 16];
        self.rng
            .fill(&mut bytes)
            .expect("the kernel's random source works");
        hex(&bytes)
    }

    fn mac(&self, parts: &[&str]) -> String {
        hex(hmac::sign(&self.key, parts.join("\0").as_bytes()).as_ref())
    }

    fn check_mac(&self, parts: &[&str], mac_hex: &str) -> bool {
        let Some(mac) = unhex(mac_hex) else {
            return false;
        };
        hmac::verify(&self.key, parts.join("\0").as_bytes(), &mac).is_ok()
    }

    /// A new session's cookie value, ending `SESSION_LIFETIME` from `now`.
    pub fn create(&self, now: Timestamp) -> (Session, String) {
        let lifetime = u64::try_from(SESSION_LIFETIME.as_millis()).unwrap_or(u64::MAX);
        let expires = now.0.saturating_add(lifetime);
        let nonce = self.nonce();
        let expires_text = expires.to_string();
        let mac = self.mac(&["session", &expires_text, &nonce]);
        let value = format!("{expires_text}.{nonce}.{mac}");
        (Session { nonce, expires }, value)
    }

    /// The session of a cookie value, if it is genuine, not expired and not logged out.
    pub fn verify(&self, value: &str, now: Timestamp) -> Option<Session> {
        let mut parts = value.splitn(3, '.');
        let (expires_text, nonce, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if !self.check_mac(&["session", expires_text, nonce], mac) {
            return None;
        }
        let expires: u64 = expires_text.parse().ok()?;
        if expires <= now.0 {
            return None;
        }
        if self
            .revoked
            .lock()
            .expect("revoked lock")
            .contains_key(nonce)
        {
            return None;
        }
        Some(Session {
            nonce: nonce.to_owned(),
            expires,
        })
    }

    /// Ends a session before its time (logout).
    pub fn revoke(&self, session: &Session, now: Timestamp) {
        let mut revoked = self.revoked.lock().expect("revoked lock");
        revoked.retain(|_, expires| *expires > now.0);
        revoked.insert(session.nonce.clone(), session.expires);
    }

    /// The CSRF token of a session's forms.
    pub fn csrf(&self, session: &Session) -> String {
        self.mac(&["csrf", &session.nonce])
    }

    pub fn check_csrf(&self, session: &Session, given: Option<&str>) -> bool {
        given.is_some_and(|g| self.check_mac(&["csrf", &session.nonce], g))
    }

    /// The CSRF token of the login form, bound to the pre-login cookie's nonce.
    pub fn login_csrf(&self, login_nonce: &str) -> String {
        self.mac(&["login", login_nonce])
    }

    pub fn check_login_csrf(&self, login_nonce: Option<&str>, given: Option<&str>) -> bool {
        match (login_nonce, given) {
            (Some(nonce), Some(given)) if !nonce.is_empty() => {
                self.check_mac(&["login", nonce], given)
            }
            _ => false,
        }
    }
}

/// A `Set-Cookie` value: `HttpOnly; SameSite=Strict; Path=/`, `Secure` over TLS; `max_age`
/// `None` deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let age = max_age.map_or(0, |d| d.as_secs());
    let value = if max_age.is_some() { value } else { "" };
    format!(
        "{name}={value}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(token: &str) -> Sessions {
        Sessions::new(Secret::new(token).as_ref())
    }

    #[test]
    fn sessions_verify_until_they_expire_or_are_revoked() {
        let s = sessions("token");
        let now = Timestamp(1_000_000);
        let (session, cookie) = s.create(now);
        assert_eq!(s.verify(&cookie, now), Some(session.clone()));
        let later = Timestamp(session.expires);
        assert_eq!(s.verify(&cookie, later), None, "expired");
        // Another replica with the same token agrees; another token does not.
        assert!(sessions("token").verify(&cookie, now).is_some());
        assert!(sessions("other").verify(&cookie, now).is_none());
        s.revoke(&session, now);
        assert_eq!(s.verify(&cookie, now), None, "logged out");
    }

    #[test]
    fn forged_or_mangled_cookies_are_refused() {
        let s = sessions("token");
        let now = Timestamp(1_000_000);
        let (_, cookie) = s.create(now);
        let (expires, rest) = cookie.split_once('.').unwrap();
        let later: u64 = expires.parse::<u64>().unwrap() + 1;
        for bad in [
            String::new(),
            "x".into(),
            format!("{later}.{rest}"),
            cookie.replace('.', ""),
            format!("{cookie}0"),
            format!("{expires}.{}", "0".repeat(32)),
        ] {
            assert_eq!(s.verify(&bad, now), None, "{bad}");
        }
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let s = sessions("token");
        let now = Timestamp(1);
        let (a, _) = s.create(now);
        let (b, _) = s.create(now);
        let token = s.csrf(&a);
        assert!(s.check_csrf(&a, Some(&token)));
        assert!(!s.check_csrf(&b, Some(&token)));
        assert!(!s.check_csrf(&a, None));
        assert!(!s.check_csrf(&a, Some("")));
        let login = s.nonce();
        let field = s.login_csrf(&login);
        assert!(s.check_login_csrf(Some(&login), Some(&field)));
        assert!(!s.check_login_csrf(None, Some(&field)));
        assert!(!s.check_login_csrf(Some(&s.nonce()), Some(&field)));
    }

    #[test]
    fn cookies_are_parsed_and_set_strictly() {
        let header = Some("a=1; streamsnap_session=x.y.z; b=2");
        assert_eq!(cookie(header, SESSION_COOKIE), Some("x.y.z"));
        assert_eq!(cookie(header, "c"), None);
        let set = set_cookie("n", "v", Some(Duration::from_secs(60)), true);
        assert_eq!(
            set,
            "n=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
        assert!(set_cookie("n", "v", None, false).starts_with("n=; Path=/; Max-Age=0;"));
    }
}
