//! Registry notifications: the distribution registry's envelope (`{"events": [...]}`, media
//! type `application/vnd.docker.distribution.events.v1+json`) and what each event means for
//! the service. Pure: no I/O.
//!
//! Distribution 2.8 sends one event per request, retries a failed delivery (any answer but
//! 2xx/3xx, or no answer) until it succeeds, and sends the same event `id` each time. A push
//! event names the manifest's media type, digest and, when it was pushed by tag, the tag; a
//! manifest delete names only the digest (the manifest is gone by then); a tag delete names
//! only the tag. Blob events carry `application/octet-stream`.

use serde::Deserialize;
use streamsnap_format::{Digest, media};

/// A notification envelope.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub target: Target,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    #[serde(default)]
    pub media_type: String,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub tag: String,
}

/// What an event asks of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A manifest or index was pushed by tag: convert it if the repository is Active (and the
    /// manifest is not an artifact, see [`is_artifact_manifest`]).
    Push {
        event_id: String,
        repository: String,
        digest: Digest,
        tag: String,
    },
    /// A manifest was deleted: delete its streaming artifacts.
    Delete { repository: String, digest: Digest },
    /// Nothing to do, and why.
    Ignore(&'static str),
}

/// Classifies one event from its fields alone.
pub fn classify(event: &Event) -> Action {
    let target = &event.target;
    if target.repository.is_empty() {
        return Action::Ignore("no repository");
    }
    match event.action.as_str() {
        "push" => {
            if !is_manifest_media_type(&target.media_type) {
                return Action::Ignore("not a manifest push");
            }
            let Ok(digest) = target.digest.parse::<Digest>() else {
                return Action::Ignore("no valid digest");
            };
            if target.tag.is_empty() {
                // Index entries and referrers are pushed by digest; an image is converted
                // through the tag that names it (an index through its linux/amd64 entry).
                return Action::Ignore("pushed by digest only");
            }
            if is_fallback_tag(&target.tag) {
                return Action::Ignore("referrers fallback index");
            }
            if event.id.is_empty() {
                return Action::Ignore("no event id");
            }
            Action::Push {
                event_id: event.id.clone(),
                repository: target.repository.clone(),
                digest,
                tag: target.tag.clone(),
            }
        }
        "delete" => {
            if !target.tag.is_empty() {
                return Action::Ignore("tag delete");
            }
            match target.digest.parse::<Digest>() {
                Ok(digest) => Action::Delete {
                    repository: target.repository.clone(),
                    digest,
                },
                Err(_) => Action::Ignore("repository delete"),
            }
        }
        _ => Action::Ignore("not a push or delete"),
    }
}

fn is_manifest_media_type(media_type: &str) -> bool {
    media::is_image_manifest(media_type) || media::is_index(media_type)
}

/// The referrers tag schema's tags: `sha256-` and 64 lowercase hex digits.
pub fn is_fallback_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether a manifest's bytes describe an artifact rather than an image to convert: a
/// referrer (it has a `subject`: streaming artifacts, signatures, SBOMs), a streaming artifact
/// (its `artifactType`, or TOC or chunk layers), or any manifest with an `artifactType`.
/// Unparseable bytes are not an artifact: the conversion reports what is wrong with them.
pub fn is_artifact_manifest(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        artifact_type: Option<String>,
        #[serde(default)]
        subject: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        layers: Vec<Layer>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Layer {
        #[serde(default)]
        media_type: String,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(bytes) else {
        return false;
    };
    probe.subject.is_some()
        || probe.artifact_type.is_some()
        || probe
            .layers
            .iter()
            .any(|l| l.media_type == media::TOC || l.media_type == media::CHUNKS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:bdbd8d34a27a6a4972ad494c46805cfd493e266fbfd468d11a7112d1f0b2619d";

    /// As distribution 2.8.2 sent them (trimmed of request/actor/source).
    fn envelope(event: &str) -> Envelope {
        serde_json::from_str(&format!("{{\"events\":[{event}]}}")).unwrap()
    }

    fn push(media_type: &str, tag: &str) -> String {
        format!(
            r#"{{"id":"886ae15e-b74a-44b9-b863-fa1a222dbeec","timestamp":"2026-11-28T11:35:12.401238484Z",
            "action":"push","target":{{"mediaType":"{media_type}","size":418,"digest":"{DIGEST}",
            "length":418,"repository":"a/b","url":"http://127.0.0.1:5000/v2/a/b/manifests/{DIGEST}",
            "tag":"{tag}"}},"request":{{"method":"PUT","useragent":"skopeo/1.9.3"}},"actor":{{}},
            "source":{{"addr":"vm:5000","instanceID":"21abbafd"}}}}"#
        )
    }

    fn classify_one(event: &str) -> Action {
        let envelope = envelope(event);
        assert_eq!(envelope.events.len(), 1);
        classify(&envelope.events[0])
    }

    #[test]
    fn tagged_manifest_and_index_pushes_are_conversions() {
        for media_type in [
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST,
            media::OCI_INDEX,
        ] {
            assert_eq!(
                classify_one(&push(media_type, "v1")),
                Action::Push {
                    event_id: "886ae15e-b74a-44b9-b863-fa1a222dbeec".into(),
                    repository: "a/b".into(),
                    digest: DIGEST.parse().unwrap(),
                    tag: "v1".into(),
                }
            );
        }
    }

    #[test]
    fn blobs_pulls_untagged_manifests_and_fallback_indexes_are_ignored() {
        let fallback = format!("sha256-{}", &DIGEST[7..]);
        for event in [
            push("application/octet-stream", ""),
            push(media::OCI_MANIFEST, ""),
            push(media::OCI_INDEX, &fallback),
            push(media::OCI_MANIFEST, "").replace("\"push\"", "\"pull\""),
            push(media::OCI_MANIFEST, "v1").replace("\"push\"", "\"mount\""),
            push(media::DOCKER_SCHEMA1_SIGNED, "v1"),
            push(media::OCI_MANIFEST, "v1").replace(DIGEST, "sha256:zz"),
        ] {
            assert!(matches!(classify_one(&event), Action::Ignore(_)), "{event}");
        }
        assert!(!is_fallback_tag("sha256-abc"));
        assert!(is_fallback_tag(&fallback));
    }

    #[test]
    fn manifest_deletes_are_cascades_and_tag_deletes_are_not() {
        let manifest = format!(
            r#"{{"id":"54b9","action":"delete","target":{{"digest":"{DIGEST}","repository":"a/b"}}}}"#
        );
        assert_eq!(
            classify_one(&manifest),
            Action::Delete {
                repository: "a/b".into(),
                digest: DIGEST.parse().unwrap()
            }
        );
        let tag = r#"{"id":"6f5c","action":"delete","target":{"repository":"a/b","tag":"v1"}}"#;
        assert!(matches!(classify_one(tag), Action::Ignore("tag delete")));
        let repo = r#"{"id":"6f5d","action":"delete","target":{"repository":"a/b"}}"#;
        assert!(matches!(classify_one(repo), Action::Ignore(_)));
    }

    #[test]
    fn an_envelope_may_hold_many_events_or_none() {
        let e: Envelope = serde_json::from_str(&format!(
            "{{\"events\":[{},{}]}}",
            push(media::OCI_MANIFEST, "a"),
            push(media::OCI_MANIFEST, "b")
        ))
        .unwrap();
        assert_eq!(e.events.len(), 2);
        assert!(
            serde_json::from_str::<Envelope>("{}")
                .unwrap()
                .events
                .is_empty()
        );
    }

    #[test]
    fn artifacts_and_referrers_are_recognized() {
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json"},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip"}]}"#;
        assert!(!is_artifact_manifest(image));
        let streaming = format!(
            r#"{{"schemaVersion":2,"artifactType":"{}","layers":[]}}"#,
            media::ARTIFACT_TYPE
        );
        assert!(is_artifact_manifest(streaming.as_bytes()));
        let toc_layers = format!(r#"{{"layers":[{{"mediaType":"{}"}}]}}"#, media::TOC);
        assert!(is_artifact_manifest(toc_layers.as_bytes()));
        let signature = br#"{"layers":[],"subject":{"digest":"sha256:00"}}"#;
        assert!(is_artifact_manifest(signature));
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(!is_artifact_manifest(index));
        assert!(!is_artifact_manifest(b"not json"));
    }
}
