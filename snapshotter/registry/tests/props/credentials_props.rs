//! Docker config files: any file parses or is refused without panicking, credentials written
//! under any key form are found under every form of their host, and none is ever shown.

use std::io::Write;

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::json;
use streamsnap_registry::CredentialStore;

use crate::config;

const KEYS: &[&str] = &[
    "auths",
    "auth",
    "username",
    "password",
    "identitytoken",
    "credsStore",
    "credHelpers",
    "https://index.docker.io/v1/",
    "r.example",
    "127.0.0.1:5000",
];
/// base64 of "u:p", ":", "nocolon", and a string that is not base64.
const STRINGS: &[&str] = &[
    "dTpw",
    "Og==",
    "bm9jb2xvbg==",
    "not base64!",
    "",
    "desktop",
    "u",
];

fn store_of(text: &[u8]) -> Result<CredentialStore, streamsnap_registry::Error> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text).unwrap();
    CredentialStore::from_docker_config_file(file.path())
}

/// Hosts and the ways a docker config may write each.
const HOSTS: &[(&str, &[&str])] = &[
    (
        "docker.io",
        &[
            "https://index.docker.io/v1/",
            "docker.io",
            "registry-1.docker.io",
            "HTTPS://Index.Docker.IO/v2/",
        ],
    ),
    (
        "ghcr.io",
        &["ghcr.io", "https://ghcr.io", "https://GHCR.io/v1/"],
    ),
    (
        "127.0.0.1:5000",
        &["127.0.0.1:5000", "http://127.0.0.1:5000/"],
    ),
    (
        "r.example",
        &["r.example", "  r.example  ", "https://r.example/token"],
    ),
];

fn entries() -> impl Strategy<Value = Vec<(usize, usize, String, String, u8)>> {
    let entry = (
        any::<prop::sample::Index>(),
        "[a-z]{1,8}",
        "[ -~]{0,12}",
        0u8..3,
    );
    prop::collection::vec(entry, 0..4).prop_map(|specs| {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, (form, user, pass, kind)) in specs.into_iter().enumerate() {
            let host = i % HOSTS.len();
            if seen.contains(&host) {
                continue;
            }
            seen.push(host);
            out.push((
                host,
                form.index(HOSTS[host].1.len()),
                user,
                format!("s3cr3t{pass}"),
                kind,
            ));
        }
        out
    })
}

proptest! {
    #![proptest_config(config(16384))]

    #[test]
    fn any_config_file_parses_or_is_refused(text in crate::json::bytes(KEYS, STRINGS)) {
        if let Ok(store) = store_of(&text) {
            let _ = store.get("r.example");
            let _ = format!("{store:?}");
        }
    }

    #[test]
    fn credentials_are_found_under_every_form_of_their_host(entries in entries()) {
        let mut auths = serde_json::Map::new();
        for (host, form, user, pass, kind) in &entries {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            let entry = match kind {
                0 => json!({ "auth": b64 }),
                1 => json!({ "username": user, "password": pass }),
                _ => json!({ "auth": b64, "username": "ignored", "password": "ignored" }),
            };
            auths.insert(HOSTS[*host].1[*form].to_owned(), entry);
        }
        let text = serde_json::to_vec(&json!({ "auths": auths, "credsStore": "desktop" })).unwrap();
        let store = store_of(&text).unwrap();
        for (host, _, user, pass, _) in &entries {
            for alias in HOSTS[*host].1.iter().chain([&HOSTS[*host].0]) {
                let found = store.get(alias).unwrap();
                prop_assert_eq!((found.username.as_str(), found.password()), (user.as_str(), pass.as_str()));
            }
        }
        for (i, (host, aliases)) in HOSTS.iter().enumerate() {
            if !entries.iter().any(|e| e.0 == i) {
                prop_assert!(store.get(host).is_none());
                prop_assert!(aliases.iter().all(|a| store.get(a).is_none()));
            }
        }
        let shown = format!("{store:?} {store:#?}");
        prop_assert!(!shown.contains("s3cr3t"), "{}", shown);
    }

    /// A damaged config is refused by where it is wrong, never with a value from the file.
    #[test]
    fn errors_never_show_a_value_of_the_file(
        entries in entries(),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(&[b'"', b'{', b'}', b':', b',', b'7', b'x', b'\\', b' '][..]),
        cut in any::<bool>(),
    ) {
        let mut auths = serde_json::Map::new();
        let mut secrets = Vec::new();
        for (host, form, user, pass, kind) in &entries {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            secrets.push(b64.clone());
            let entry = match kind {
                0 => json!({ "auth": b64 }),
                _ => json!({ "username": user, "password": pass }),
            };
            auths.insert(HOSTS[*host].1[*form].to_owned(), entry);
        }
        let mut text = serde_json::to_vec(&json!({ "auths": auths })).unwrap();
        let at = at.index(text.len());
        if cut {
            text.truncate(at);
        } else {
            text[at] = byte;
        }
        if let Err(error) = store_of(&text) {
            let mut shown = format!("{error} {error:?}");
            let mut source = std::error::Error::source(&error);
            while let Some(inner) = source {
                shown.push_str(&format!(" {inner} {inner:?}"));
                source = inner.source();
            }
            prop_assert!(!shown.contains("s3cr3t"), "{}", shown);
            for secret in &secrets {
                prop_assert!(!shown.contains(secret.as_str()), "{}", shown);
            }
        }
    }
}
