//! Image references: parsing never panics, a parsed reference prints back to itself, and the
//! references the grammar allows parse to their parts.

use proptest::prelude::*;
use streamsnap_format::Digest;
use streamsnap_registry::{DOCKER_HUB, Reference};

use crate::config;

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                "docker.io",
                "index.docker.io",
                "ghcr.io",
                "localhost",
                "localhost:5000",
                "127.0.0.1:5000",
                "[::1]:5000",
                "Registry"
            ][..]
        )
        .prop_map(str::to_owned),
        "[a-z0-9]{1,6}(\\.[a-z0-9]{1,6}){1,2}(:[0-9]{1,5})?",
    ]
}

/// `path-component ('/' path-component)*` of the distribution grammar.
fn name() -> impl Strategy<Value = String> {
    let component = "[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,2}";
    prop::collection::vec(component, 1..4).prop_map(|parts| parts.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"
}

/// Strings near the grammar: its characters, schemes, digests of every length.
fn near_reference() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9._:/@-]{0,40}",
        2 => ("[a-z0-9.:/-]{0,20}", "@sha256:[0-9a-f]{60,66}").prop_map(|(a, b)| a + &b),
        1 => ("[a-z]{1,6}://", "[a-z0-9./:]{0,20}").prop_map(|(a, b)| a + &b),
        1 => ".{0,40}",
    ]
}

proptest! {
    #![proptest_config(config(65536))]

    #[test]
    fn parsed_references_print_back_to_themselves(text in near_reference()) {
        if let Ok(reference) = Reference::parse(&text) {
            let printed = reference.to_string();
            prop_assert_eq!(Reference::parse(&printed).unwrap(), reference.clone(), "{} -> {}", text, printed);
            prop_assert!(reference.tag.is_some() || reference.digest.is_some());
            let name = &reference.repository.name;
            prop_assert!(!name.is_empty() && !name.starts_with('/') && !name.ends_with('/'));
            prop_assert!(!name.chars().any(|c| c.is_ascii_uppercase()));
            if Reference::is_short_name(&text) {
                prop_assert_eq!(reference.repository.registry.as_str(), DOCKER_HUB);
            }
            let manifest_ref = reference.reference();
            prop_assert!(manifest_ref == reference.tag.clone().unwrap_or_default()
                || reference.digest.is_some_and(|d| d.to_string() == manifest_ref));
        }
    }

    #[test]
    fn grammatical_references_parse_to_their_parts(
        host in prop::option::of(host()),
        name in name(),
        tag in prop::option::of(tag()),
        digest in prop::option::of(any::<[u8; 32]>().prop_map(Digest::from_bytes)),
    ) {
        // without a host, a first component with a '.' would be taken for one
        let name = match (&host, name.split_once('/')) {
            (None, Some((first, rest))) => format!("{}/{rest}", first.replace('.', "-")),
            _ => name,
        };
        let mut text = match &host {
            Some(host) => format!("{host}/{name}"),
            None => name.clone(),
        };
        if let Some(tag) = &tag {
            text = format!("{text}:{tag}");
        }
        if let Some(digest) = &digest {
            text = format!("{text}@{digest}");
        }
        let registry = match host.as_deref() {
            Some("index.docker.io") | None => DOCKER_HUB,
            Some(host) => host,
        };
        let full_name = if registry == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.clone()
        };
        let parsed = Reference::parse(&text);
        if registry.len() + 1 + full_name.len() > 255 {
            prop_assert!(parsed.is_err());
        } else {
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.repository.registry.as_str(), registry);
            prop_assert_eq!(&parsed.repository.name, &full_name);
            prop_assert_eq!(&parsed.digest, &digest);
            let expected_tag = tag.or_else(|| digest.is_none().then(|| "latest".to_owned()));
            prop_assert_eq!(parsed.tag, expected_tag);
        }
    }
}
