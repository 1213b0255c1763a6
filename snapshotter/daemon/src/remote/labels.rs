//! The labels containerd puts on Prepare while pulling, and what a remote prepare needs of them.

use std::collections::BTreeMap;

use streamsnap_format::Digest;

/// The chain ID the layer is to be committed as (containerd sets it on every unpack).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// Set by containerd's CRI image handler (with `disable_snapshot_annotations = false`).
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set by `ctr-remote image rpull`.
const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// A layer containerd is about to unpack, as far as the labels tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRequest {
    /// The image reference as containerd resolved it, e.g. `registry:5000/app:v1`.
    pub image: String,
    pub layer_digest: Digest,
    /// The image's platform manifest, when the labels name it (CRI does).
    pub manifest_digest: Option<Digest>,
}

impl LayerRequest {
    /// `None` when the labels do not name an image and a layer: an ordinary prepare.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |a: &str, b: &str| {
            labels
                .get(a)
                .or_else(|| labels.get(b))
                .filter(|v| !v.is_empty())
        };
        let image = get(CRI_IMAGE_REF, STARGZ_REFERENCE)?.clone();
        let layer_digest = get(CRI_LAYER_DIGEST, STARGZ_DIGEST)?.parse().ok()?;
        let manifest_digest = labels.get(CRI_MANIFEST_DIGEST).and_then(|d| d.parse().ok());
        Some(Self {
            image,
            layer_digest,
            manifest_digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn cri_and_stargz_labels_both_name_a_layer() {
        let cri = labels(&[
            (CRI_IMAGE_REF, "r:5000/a:1"),
            (CRI_LAYER_DIGEST, D),
            (CRI_MANIFEST_DIGEST, D),
        ]);
        let request = LayerRequest::from_labels(&cri).unwrap();
        assert_eq!(request.image, "r:5000/a:1");
        assert_eq!(request.manifest_digest, Some(D.parse().unwrap()));
        let stargz = labels(&[(STARGZ_REFERENCE, "r:5000/a:1"), (STARGZ_DIGEST, D)]);
        let request = LayerRequest::from_labels(&stargz).unwrap();
        assert_eq!(request.layer_digest.to_string(), D);
        assert_eq!(request.manifest_digest, None);
    }

    #[test]
    fn incomplete_or_malformed_labels_mean_an_ordinary_prepare() {
        assert!(LayerRequest::from_labels(&labels(&[(TARGET_LABEL, D)])).is_none());
        assert!(
            LayerRequest::from_labels(&labels(&[
                (CRI_IMAGE_REF, "a"),
                (CRI_LAYER_DIGEST, "sha256:zz")
            ]))
            .is_none()
        );
        assert!(LayerRequest::from_labels(&labels(&[(CRI_LAYER_DIGEST, D)])).is_none());
    }
}
