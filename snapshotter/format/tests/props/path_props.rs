//! Entry paths: normalizing a tar name never panics, gives a path that validates, is
//! idempotent, and refuses exactly the names that could escape the layer root.

use proptest::prelude::*;
use streamsnap_format::{normalize_tar_path, validate_path};

use crate::config;

/// Tar names made of the bytes that matter to the normalizer, some long.
fn name() -> impl Strategy<Value = Vec<u8>> {
    let component = prop_oneof![
        4 => prop::sample::select(&["a", "bc", "", ".", "..", "...", ".wh.x", "é"][..])
            .prop_map(|c| c.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..4),
        1 => (1usize..300).prop_map(|n| vec![b'n'; n]),
    ];
    (
        any::<bool>(),
        prop::collection::vec(component, 0..8),
        any::<bool>(),
    )
        .prop_map(|(absolute, components, trailing)| {
            let mut name = if absolute { b"/".to_vec() } else { Vec::new() };
            name.extend(components.join(&b'/'));
            if trailing {
                name.push(b'/');
            }
            name
        })
}

fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

proptest! {
    #![proptest_config(config(32768))]

    #[test]
    fn normalized_names_validate_and_keep_their_components(raw in name()) {
        match normalize_tar_path(&raw) {
            Ok(path) => {
                prop_assert!(validate_path(&path).is_ok());
                prop_assert_eq!(normalize_tar_path(&path).unwrap(), path.clone());
                prop_assert_eq!(components(&path), components(&raw));
                prop_assert!(raw.first() != Some(&b'/'));
                prop_assert!(!components(&raw).contains(&&b".."[..]));
            }
            Err(_) => {
                let escapes = raw.first() == Some(&b'/') || components(&raw).contains(&&b".."[..]);
                let unfit = raw.contains(&0)
                    || components(&raw).iter().any(|c| c.len() > 255)
                    || components(&raw).join(&b'/').len() > 4096;
                prop_assert!(escapes || unfit, "refused {:?}", String::from_utf8_lossy(&raw));
            }
        }
    }

    #[test]
    fn valid_paths_are_their_own_normal_form(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        if validate_path(&raw).is_ok() {
            prop_assert_eq!(normalize_tar_path(&raw).unwrap(), raw);
        }
    }
}
