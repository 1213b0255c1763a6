//! Start-up profiles: decode never panics, what it accepts is within its limits, and a valid
//! profile round-trips.

use std::collections::HashSet;

use proptest::prelude::*;
use streamsnap_format::{Digest, LayerProfile, MAX_PROFILE_BLOB, PROFILE_VERSION, Profile};

use crate::{config, json};

const KEYS: &[&str] = &["version", "layers", "layer", "chunks", "ranks"];
const STRINGS: &[&str] = &[
    "sha256:6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "sha256:4bf5122f344554c53bde2ebb8cd2b7e3d1600ad631c385a5d7cce23c7785459a",
    "sha256:zz",
];

fn valid() -> impl Strategy<Value = Profile> {
    let layer = (
        any::<[u8; 32]>(),
        prop::collection::hash_set(any::<u32>(), 0..40),
        any::<bool>(),
    )
        .prop_map(|(digest, chunks, ranked)| {
            let chunks: Vec<u32> = chunks.into_iter().collect();
            LayerProfile {
                layer: Digest::from_bytes(digest),
                ranks: if ranked {
                    (0..chunks.len() as u64).map(|r| r * 3).collect()
                } else {
                    Vec::new()
                },
                chunks,
            }
        });
    prop::collection::vec(layer, 0..6).prop_map(Profile::new)
}

fn assert_valid(profile: &Profile) {
    assert_eq!(profile.version, PROFILE_VERSION);
    let mut layers = HashSet::new();
    for layer in &profile.layers {
        assert!(layers.insert(layer.layer));
        assert!(layer.ranks.is_empty() || layer.ranks.len() == layer.chunks.len());
        let unique: HashSet<u32> = layer.chunks.iter().copied().collect();
        assert_eq!(unique.len(), layer.chunks.len());
        assert_eq!(layer.ranked().count(), layer.chunks.len());
    }
    assert!(profile.len() <= 1 << 20);
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn valid_profiles_round_trip(profile in valid()) {
        let bytes = profile.encode().unwrap();
        prop_assert!(bytes.len() as u64 <= MAX_PROFILE_BLOB);
        prop_assert_eq!(Profile::decode(&bytes).unwrap(), profile);
    }

    #[test]
    fn decode_accepts_only_valid_profiles(bytes in json::bytes(KEYS, STRINGS)) {
        if let Ok(profile) = Profile::decode(&bytes) {
            assert_valid(&profile);
            prop_assert_eq!(Profile::decode(&profile.encode().unwrap()).unwrap(), profile);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(profile) = Profile::decode(&bytes) {
            assert_valid(&profile);
        }
    }
}
