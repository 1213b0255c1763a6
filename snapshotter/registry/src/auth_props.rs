//! Property tests of registry authentication parsing: `WWW-Authenticate` challenges (any
//! header parses without panicking, in time linear in its length; challenges written by the
//! RFC 7235 grammar read back the same) and token responses (any lifetime a token endpoint
//! sends can be cached).

use std::time::Duration;

use proptest::prelude::*;

use super::{Access, AuthCache, Cached, Challenge, Scope, TokenResponse, parse_challenges};

const TCHAR: &str = "!#$%&'*+-.^_`|~";

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z][A-Za-z0-9]{0,8}",
        1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}",
    ]
}

fn token68() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~+/-]{1,12}=*"
}

/// Values any server might quote: anything, quotes and backslashes included.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9:/._,= -]{0,20}",
        1 => ".{0,12}",
        1 => "[\"\\\\a]{0,6}",
    ]
}

fn challenge() -> impl Strategy<Value = Challenge> {
    let params = prop::collection::vec((token(), value()), 0..4);
    prop_oneof![
        4 => (token(), params).prop_map(|(scheme, params)| Challenge {
            scheme,
            params,
            token68: None,
        }),
        1 => (token(), token68()).prop_map(|(scheme, t)| Challenge {
            scheme,
            params: Vec::new(),
            token68: Some(t),
        }),
    ]
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || TCHAR.contains(c))
}

/// One way of writing the challenges: `spaces` and `bare` pick whitespace and whether a value
/// that is a token goes unquoted.
fn render(challenges: &[Challenge], spaces: &[(u8, bool)]) -> String {
    let mut pick = spaces.iter().cycle();
    let mut next = || *pick.next().unwrap_or(&(0, false));
    let ws = |n: u8| [" ", "  ", "\t", " \t "][usize::from(n % 4)];
    let mut out = String::new();
    for (i, challenge) in challenges.iter().enumerate() {
        if i > 0 {
            let (n, empty) = next();
            out.push_str(if empty { ", ," } else { "," });
            out.push_str(ws(n));
        }
        out.push_str(&challenge.scheme);
        if let Some(t) = &challenge.token68 {
            out.push_str(ws(next().0));
            out.push_str(t);
        }
        for (j, (name, value)) in challenge.params.iter().enumerate() {
            let (n, bare) = next();
            out.push_str(if j == 0 { ws(n) } else { ", " });
            out.push_str(name);
            out.push('=');
            if bare && is_token(value) {
                out.push_str(value);
            } else {
                out.push('"');
                for c in value.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out
}

fn lowercased(challenges: Vec<Challenge>) -> Vec<Challenge> {
    challenges
        .into_iter()
        .map(|c| Challenge {
            scheme: c.scheme.to_ascii_lowercase(),
            params: c
                .params
                .into_iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect(),
            token68: c.token68,
        })
        .collect()
}

/// `cases` cases, or `PROPTEST_CASES`, or `cases` times `STREAMSNAP_PROPTEST_SCALE`.
fn config(cases: u32) -> proptest::test_runner::Config {
    let scale = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let cases = scale("PROPTEST_CASES")
        .unwrap_or_else(|| cases.saturating_mul(scale("STREAMSNAP_PROPTEST_SCALE").unwrap_or(1)));
    proptest::test_runner::Config {
        cases,
        ..proptest::test_runner::Config::default()
    }
}

proptest! {
    #![proptest_config(config(32768))]

    #[test]
    fn written_challenges_read_back(
        challenges in prop::collection::vec(challenge(), 1..4),
        spaces in prop::collection::vec((any::<u8>(), any::<bool>()), 1..8),
    ) {
        let header = render(&challenges, &spaces);
        prop_assert_eq!(parse_challenges(&header), lowercased(challenges), "{}", header);
    }

    #[test]
    fn any_header_parses_without_panic(header in prop_oneof![
        ".{0,200}",
        "[ ,=\"\\\\a-cA-C0-9/+]{0,200}",
    ]) {
        let challenges = parse_challenges(&header);
        // every challenge consumed at least its scheme
        prop_assert!(challenges.len() <= header.len());
        for c in &challenges {
            prop_assert!(is_token(&c.scheme));
            prop_assert_eq!(c.scheme.to_ascii_lowercase(), c.scheme.clone());
            let _ = c.param("realm");
        }
    }

    #[test]
    fn any_token_lifetime_can_be_cached(
        token in prop::option::of("[a-z]{0,4}"),
        access_token in prop::option::of("[a-z]{0,4}"),
        expires_in in prop::option::of(prop_oneof![0u64..100_000, any::<u64>(), Just(u64::MAX)]),
    ) {
        let json = serde_json::json!({
            "token": token,
            "access_token": access_token,
            "expires_in": expires_in,
        });
        let response: TokenResponse = serde_json::from_value(json).unwrap();
        let cache = AuthCache::default();
        let scope = Scope { registry: "r.example", repository: "a/b", access: Access::Pull };
        if let Some((token, lifetime)) = response.into_token() {
            prop_assert!(!token.is_empty());
            prop_assert!(lifetime <= Duration::from_secs(expires_in.unwrap_or(60)));
            cache.store_token(&scope, token.clone(), lifetime);
            if lifetime > Duration::from_secs(1) {
                prop_assert!(matches!(cache.lookup(&scope), Cached::Bearer(t) if t == token));
            }
        }
    }
}

/// Found by `any_token_lifetime_can_be_cached`: a token response with a huge `expires_in` made
/// caching the token panic ("overflow when adding duration to instant").
#[test]
fn seed_a_token_that_never_expires_is_cached_for_a_day() {
    for expires_in in [u64::MAX, 9_223_372_036_854_770_984] {
        let response: TokenResponse = serde_json::from_value(
            serde_json::json!({"access_token": "a", "expires_in": expires_in}),
        )
        .unwrap();
        let (token, lifetime) = response.into_token().unwrap();
        assert!(lifetime <= Duration::from_secs(24 * 3600));
        let cache = AuthCache::default();
        let scope = Scope {
            registry: "r.example",
            repository: "a/b",
            access: Access::Pull,
        };
        cache.store_token(&scope, token, lifetime);
        assert!(matches!(cache.lookup(&scope), Cached::Bearer(t) if t == "a"));
    }
}
