//! Arbitrary JSON documents that look enough like the real ones to get past the first field:
//! object keys and strings are drawn from the names a document type uses, mixed with noise.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// A JSON value whose object keys come from `keys` (or are arbitrary) and whose strings come
/// from `strings` (or are arbitrary), nested a few levels.
pub fn value(
    keys: &'static [&'static str],
    strings: &'static [&'static str],
) -> BoxedStrategy<Value> {
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_owned),
        1 => ".{0,8}",
    ];
    let string = prop_oneof![
        3 => prop::sample::select(strings).prop_map(str::to_owned),
        1 => ".{0,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..4).prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        string.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        let key = key.clone();
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
    .boxed()
}

/// `value` as bytes, sometimes cut short or with a byte changed.
pub fn bytes(
    keys: &'static [&'static str],
    strings: &'static [&'static str],
) -> BoxedStrategy<Vec<u8>> {
    (
        value(keys, strings),
        any::<prop::sample::Index>(),
        any::<u8>(),
        0u8..4,
    )
        .prop_map(|(value, at, byte, damage)| {
            let mut bytes = serde_json::to_vec(&value).expect("a Value serializes");
            if !bytes.is_empty() {
                let at = at.index(bytes.len());
                match damage {
                    0 => bytes.truncate(at),
                    1 => bytes[at] = byte,
                    _ => {}
                }
            }
            bytes
        })
        .boxed()
}
