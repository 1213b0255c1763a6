//! Start-up profiles: which chunks of which layers a workload read when it started, in the
//! order it first read them. A node that finds a profile for an image fetches those chunks
//! ahead of the reads, in a few large range requests instead of hundreds of small serial ones.
//!
//! A profile is JSON (`application/vnd.streamsnap.profile.v1+json`), the only layer of an OCI
//! artifact (`artifactType` [`PROFILE_ARTIFACT_TYPE`](crate::media::PROFILE_ARTIFACT_TYPE))
//! whose subject is the image manifest. It is only ever a hint: a wrong profile costs bandwidth,
//! never correctness, because every chunk is verified against its layer's TOC.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The profile format version this build writes and reads.
pub const PROFILE_VERSION: u32 = 1;
/// Largest profile blob accepted.
pub const MAX_PROFILE_BLOB: u64 = 16 << 20;
/// Most layers a profile may name.
const MAX_LAYERS: usize = 1024;
/// Most chunks a profile may name in all.
const MAX_CHUNKS: usize = 1 << 20;

/// The chunks each layer's start-up read, first read first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    pub layers: Vec<LayerProfile>,
}

/// One layer of a [`Profile`]: its original (image) layer digest and the indices of the chunks
/// read, in the TOC's chunk table, in the order they were first read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    pub layer: Digest,
    pub chunks: Vec<u32>,
    /// When each chunk was first read, as a position in the order of first reads across every
    /// layer of the profile (same length as `chunks`), so a reader can fetch the layers'
    /// chunks in the order the start needs them. Optional: without, the layers' lists are
    /// interleaved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<u64>,
}

impl LayerProfile {
    /// Chunk index and rank pairs (the rank is the index's position when there are no ranks).
    pub fn ranked(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .map(|(i, &chunk)| (chunk, self.ranks.get(i).copied().unwrap_or(i as u64)))
    }
}

impl Profile {
    pub fn new(layers: Vec<LayerProfile>) -> Self {
        Self {
            version: PROFILE_VERSION,
            layers,
        }
    }

    /// Parses and checks a profile blob: its version, sizes within bounds, every layer named
    /// once and every chunk once per layer.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidProfile(reason);
        if bytes.len() as u64 > MAX_PROFILE_BLOB {
            return Err(invalid(format!(
                "{} bytes, more than the limit of {MAX_PROFILE_BLOB}",
                bytes.len()
            )));
        }
        let profile: Profile =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("malformed JSON: {e}")))?;
        profile.validate()?;
        Ok(profile)
    }

    /// The profile as the JSON blob that is pushed, after the checks [`decode`](Self::decode)
    /// makes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        Ok(serde_json::to_vec(self).expect("a profile always serializes"))
    }

    fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::InvalidProfile(reason);
        if self.version != PROFILE_VERSION {
            return Err(invalid(format!(
                "version {} is not supported (this build reads {PROFILE_VERSION})",
                self.version
            )));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(invalid(format!(
                "{} layers, more than the limit of {MAX_LAYERS}",
                self.layers.len()
            )));
        }
        let total: usize = self.layers.iter().map(|l| l.chunks.len()).sum();
        if total > MAX_CHUNKS {
            return Err(invalid(format!(
                "{total} chunks, more than the limit of {MAX_CHUNKS}"
            )));
        }
        let mut layers = HashSet::new();
        for layer in &self.layers {
            if !layers.insert(layer.layer) {
                return Err(invalid(format!("layer {} is listed twice", layer.layer)));
            }
            if !layer.ranks.is_empty() && layer.ranks.len() != layer.chunks.len() {
                return Err(invalid(format!(
                    "layer {} has {} chunks and {} ranks",
                    layer.layer,
                    layer.chunks.len(),
                    layer.ranks.len()
                )));
            }
            let mut chunks = HashSet::with_capacity(layer.chunks.len());
            if let Some(chunk) = layer.chunks.iter().find(|c| !chunks.insert(**c)) {
                return Err(invalid(format!(
                    "chunk {chunk} of layer {} is listed twice",
                    layer.layer
                )));
            }
        }
        Ok(())
    }

    /// What the profile lists for `layer`.
    pub fn layer(&self, layer: &Digest) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.layer == *layer)
    }

    /// How many chunks the profile lists in all.
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.chunks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, chunks: &[u32]) -> LayerProfile {
        LayerProfile {
            layer: Digest::sha256(&[n]),
            chunks: chunks.to_vec(),
            ranks: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_answers_by_layer() {
        let mut second = layer(2, &[0, 4]);
        second.ranks = vec![1, 5];
        let profile = Profile::new(vec![layer(1, &[7, 2, 9]), second]);
        let decoded = Profile::decode(&profile.encode().unwrap()).unwrap();
        assert_eq!(decoded, profile);
        let first = decoded.layer(&Digest::sha256(&[1])).unwrap();
        assert_eq!(
            first.ranked().collect::<Vec<_>>(),
            vec![(7, 0), (2, 1), (9, 2)]
        );
        let second = decoded.layer(&Digest::sha256(&[2])).unwrap();
        assert_eq!(second.ranked().collect::<Vec<_>>(), vec![(0, 1), (4, 5)]);
        assert!(decoded.layer(&Digest::sha256(&[3])).is_none());
        assert_eq!(decoded.len(), 5);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{".to_vec(), "malformed JSON"),
            (
                br#"{"version":2,"layers":[]}"#.to_vec(),
                "version 2 is not supported",
            ),
            (
                br#"{"version":1,"layers":[],"extra":1}"#.to_vec(),
                "unknown field",
            ),
            (
                Profile::new(vec![layer(1, &[1]), layer(1, &[2])]).encode_unchecked(),
                "listed twice",
            ),
            (
                Profile::new(vec![layer(1, &[4, 5, 4])]).encode_unchecked(),
                "chunk 4 of layer",
            ),
            (
                br#"{"version":1,"layers":[{"layer":"sha256:6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d","chunks":[1,2],"ranks":[3]}]}"#.to_vec(),
                "2 chunks and 1 ranks",
            ),
            (
                vec![b' '; MAX_PROFILE_BLOB as usize + 1],
                "more than the limit",
            ),
        ];
        for (bytes, expected) in cases {
            let error = Profile::decode(&bytes).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
        let too_many = Profile::new(vec![layer(
            1,
            &(0..MAX_CHUNKS as u32 + 1).collect::<Vec<_>>(),
        )]);
        assert!(too_many.encode().is_err());
    }

    impl Profile {
        fn encode_unchecked(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap()
        }
    }
}
