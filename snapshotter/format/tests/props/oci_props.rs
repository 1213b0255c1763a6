//! OCI manifests, indexes (the referrers API and fallback tag answer one), image configs and
//! digests: parsing never panics, and what is written reads back the same.

use proptest::prelude::*;
use streamsnap_format::oci::{
    Annotations, Descriptor, ImageConfig, ImageIndex, ImageManifest, Platform,
};
use streamsnap_format::{Digest, media};

use crate::{config, json};

const KEYS: &[&str] = &[
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "manifests",
    "subject",
    "annotations",
    "digest",
    "size",
    "urls",
    "platform",
    "architecture",
    "os",
    "variant",
    "os.version",
    "rootfs",
    "type",
    "diff_ids",
];
const STRINGS: &[&str] = &[
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST,
    media::ARTIFACT_TYPE,
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "sha512:00",
    "linux",
    "amd64",
    "layers",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9./+-]{0,24}", 1 => ".{0,12}"]
}

fn platform() -> impl Strategy<Value = Platform> {
    (
        text(),
        text(),
        prop::option::of(text()),
        prop::option::of(text()),
    )
        .prop_map(|(architecture, os, variant, os_version)| Platform {
            architecture,
            os,
            variant,
            os_version,
        })
}

fn annotations() -> impl Strategy<Value = Annotations> {
    prop::collection::btree_map(text(), text(), 0..3)
}

fn descriptor() -> impl Strategy<Value = Descriptor> {
    (
        text(),
        any::<[u8; 32]>(),
        any::<u64>(),
        prop::option::of(text()),
        prop::collection::vec(text(), 0..2),
        prop::option::of(platform()),
        annotations(),
    )
        .prop_map(
            |(media_type, digest, size, artifact_type, urls, platform, annotations)| Descriptor {
                media_type,
                digest: Digest::from_bytes(digest),
                size,
                artifact_type,
                urls,
                platform,
                annotations,
            },
        )
}

fn manifest() -> impl Strategy<Value = ImageManifest> {
    (
        any::<u32>(),
        prop::option::of(text()),
        prop::option::of(text()),
        descriptor(),
        prop::collection::vec(descriptor(), 0..4),
        prop::option::of(descriptor()),
        annotations(),
    )
        .prop_map(
            |(schema_version, media_type, artifact_type, config, layers, subject, annotations)| {
                ImageManifest {
                    schema_version,
                    media_type,
                    artifact_type,
                    config,
                    layers,
                    subject,
                    annotations,
                }
            },
        )
}

fn index() -> impl Strategy<Value = ImageIndex> {
    (
        any::<u32>(),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec(descriptor(), 0..4),
        prop::option::of(descriptor()),
        annotations(),
    )
        .prop_map(
            |(schema_version, media_type, artifact_type, manifests, subject, annotations)| {
                ImageIndex {
                    schema_version,
                    media_type,
                    artifact_type,
                    manifests,
                    subject,
                    annotations,
                }
            },
        )
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn manifests_round_trip(manifest in manifest()) {
        let bytes = serde_json::to_vec(&manifest).unwrap();
        prop_assert_eq!(serde_json::from_slice::<ImageManifest>(&bytes).unwrap(), manifest);
    }

    #[test]
    fn indexes_round_trip(index in index(), os in text(), architecture in text()) {
        let bytes = serde_json::to_vec(&index).unwrap();
        let back = serde_json::from_slice::<ImageIndex>(&bytes).unwrap();
        prop_assert_eq!(&back, &index);
        if let Some(found) = back.manifest_for(&os, &architecture) {
            let platform = found.platform.as_ref().unwrap();
            prop_assert!(platform.os == os && platform.architecture == architecture);
            prop_assert!(media::is_image_manifest(&found.media_type));
        }
        prop_assert!(!back.platforms().is_empty());
    }

    /// Arbitrary JSON in the shape of these documents: parsing never panics, and whatever
    /// parses writes back to something that parses to the same value.
    #[test]
    fn arbitrary_documents_never_panic(bytes in json::bytes(KEYS, STRINGS)) {
        if let Ok(manifest) = serde_json::from_slice::<ImageManifest>(&bytes) {
            let again = serde_json::to_vec(&manifest).unwrap();
            prop_assert_eq!(serde_json::from_slice::<ImageManifest>(&again).unwrap(), manifest);
        }
        if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes) {
            let _ = index.manifest_for("linux", "amd64");
            let _ = index.platforms();
            let again = serde_json::to_vec(&index).unwrap();
            prop_assert_eq!(serde_json::from_slice::<ImageIndex>(&again).unwrap(), index);
        }
        let _ = serde_json::from_slice::<ImageConfig>(&bytes);
        let _ = serde_json::from_slice::<Descriptor>(&bytes);
    }

    /// Digests: exactly `sha256:` and 64 lowercase hex digits parse, and print back the same.
    #[test]
    fn digests_parse_exactly_their_printed_form(
        text in prop_oneof![
            "sha256:[0-9a-f]{64}",
            "sha256:[0-9a-fA-F]{62,66}",
            "[a-z0-9]{0,8}:[0-9a-f]{64}",
            ".{0,80}",
        ],
        bytes in any::<[u8; 32]>(),
    ) {
        match text.parse::<Digest>() {
            Ok(digest) => prop_assert_eq!(digest.to_string(), text),
            Err(_) => {
                let valid = text.strip_prefix("sha256:").is_some_and(|hex| {
                    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
                prop_assert!(!valid, "refused {}", text);
            }
        }
        let digest = Digest::from_bytes(bytes);
        prop_assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
        let json = serde_json::to_string(&digest).unwrap();
        prop_assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), digest);
    }
}
