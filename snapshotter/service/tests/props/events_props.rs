//! The webhook envelope: any body parses or is refused without panicking, and every event is
//! classified by the rules of `events::classify` (a push to convert has a manifest media type,
//! a valid digest, a tag that is not a referrers fallback tag and an event id; a delete has a
//! digest and no tag).

use proptest::prelude::*;
use serde_json::json;
use streamsnap_format::{Digest, media};
use streamsnap_service::events::{self, Action, Envelope, Event};

use crate::{config, json};

const KEYS: &[&str] = &[
    "events",
    "id",
    "action",
    "target",
    "mediaType",
    "digest",
    "repository",
    "tag",
    "subject",
    "artifactType",
    "layers",
];
const STRINGS: &[&str] = &[
    "push",
    "delete",
    "pull",
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST,
    media::TOC,
    "application/octet-stream",
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "sha256-44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "library/busybox",
    "latest",
];

fn field(values: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(values).prop_map(str::to_owned),
        1 => ".{0,10}",
    ]
}

/// Events shaped as distribution sends them, fields drawn from real and wrong values.
fn event() -> impl Strategy<Value = serde_json::Value> {
    (
        field(&["", "e1", "0f9b"]),
        field(&["push", "delete", "pull", ""]),
        field(&[media::OCI_MANIFEST, media::OCI_INDEX, media::DOCKER_MANIFEST, media::DOCKER_MANIFEST_LIST, "application/octet-stream", ""]),
        prop_oneof![
            any::<[u8; 32]>().prop_map(|d| Digest::from_bytes(d).to_string()),
            field(&["", "sha256:00", "sha512:00"]),
        ],
        field(&["a/b", "library/busybox", ""]),
        prop_oneof![
            field(&["", "latest", "v1"]),
            any::<[u8; 32]>().prop_map(|d| format!("sha256-{}", Digest::from_bytes(d).hex())),
        ],
    )
        .prop_map(|(id, action, media_type, digest, repository, tag)| {
            json!({
                "id": id,
                "action": action,
                "target": {"mediaType": media_type, "digest": digest, "repository": repository, "tag": tag},
                "request": {"useragent": "x"},
            })
        })
}

fn check(event: &Event) -> Result<(), TestCaseError> {
    let target = &event.target;
    match events::classify(event) {
        Action::Push {
            event_id,
            repository,
            digest,
            tag,
        } => {
            prop_assert_eq!(event.action.as_str(), "push");
            prop_assert!(
                media::is_image_manifest(&target.media_type) || media::is_index(&target.media_type)
            );
            prop_assert_eq!(target.digest.parse::<Digest>().unwrap(), digest);
            prop_assert!(!tag.is_empty() && !events::is_fallback_tag(&tag));
            prop_assert!(!event_id.is_empty());
            prop_assert_eq!(
                (&event_id, &repository, &tag),
                (&event.id, &target.repository, &target.tag)
            );
        }
        Action::Delete { repository, digest } => {
            prop_assert_eq!(event.action.as_str(), "delete");
            prop_assert!(target.tag.is_empty());
            prop_assert_eq!(target.digest.parse::<Digest>().unwrap(), digest);
            prop_assert_eq!(&repository, &target.repository);
        }
        Action::Ignore(reason) => prop_assert!(!reason.is_empty()),
    }
    if target.repository.is_empty() {
        prop_assert_eq!(events::classify(event), Action::Ignore("no repository"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(32768))]

    #[test]
    fn shaped_envelopes_classify_by_the_rules(events in prop::collection::vec(event(), 0..6)) {
        let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
        let envelope: Envelope = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(envelope.events.len(), events.len());
        for event in &envelope.events {
            check(event)?;
        }
    }

    #[test]
    fn any_body_parses_or_is_refused(body in json::bytes(KEYS, STRINGS)) {
        if let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) {
            for event in &envelope.events {
                check(event)?;
            }
        }
        let _ = events::is_artifact_manifest(&body);
    }

    #[test]
    fn fallback_tags_are_exactly_sha256_dash_hex(tag in prop_oneof![
        "sha256-[0-9a-f]{64}",
        "sha256-[0-9a-fA-F]{62,66}",
        "[a-z0-9]{0,6}-[0-9a-f]{64}",
        ".{0,70}",
    ]) {
        let expected = tag.strip_prefix("sha256-").is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        prop_assert_eq!(events::is_fallback_tag(&tag), expected);
    }

    /// A manifest with a subject or an artifactType is an artifact, whatever else it holds.
    #[test]
    fn referrers_and_typed_manifests_are_artifacts(
        extra in json::value(KEYS, STRINGS),
        subject in any::<bool>(),
    ) {
        let mut manifest = json!({ "schemaVersion": 2, "layers": [], "extra": extra });
        if subject {
            manifest["subject"] = json!({ "mediaType": media::OCI_MANIFEST, "digest": STRINGS[8], "size": 1 });
        } else {
            manifest["artifactType"] = json!("application/example");
        }
        prop_assert!(events::is_artifact_manifest(&serde_json::to_vec(&manifest).unwrap()));
    }
}
