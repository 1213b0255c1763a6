//! Property tests of the PAX record parser: records written by the format's rule (the length
//! counts the whole record, itself included) read back whatever bytes keys and values hold,
//! and no input makes it panic.

use proptest::prelude::*;

use super::parse_pax_records;

/// `cases` cases, or `PROPTEST_CASES`, or `cases` times `STREAMSNAP_PROPTEST_SCALE`.
fn config(cases: u32) -> proptest::test_runner::Config {
    let scale = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let cases = scale("PROPTEST_CASES")
        .unwrap_or_else(|| cases.saturating_mul(scale("STREAMSNAP_PROPTEST_SCALE").unwrap_or(1)));
    proptest::test_runner::Config {
        cases,
        ..proptest::test_runner::Config::default()
    }
}

/// One record, `"<len> <key>=<value>\n"`, its length found as the format does (it counts its
/// own digits).
fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + 1 + value.len() + 1;
    let mut len = body + 2;
    while len != body + 1 + len.to_string().len() {
        len = body + 1 + len.to_string().len();
    }
    [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(
            &[
                "path",
                "linkpath",
                "mtime",
                "SCHILY.xattr.user.x",
                "size",
                ""
            ][..]
        )
        .prop_map(|k| k.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>().prop_filter("no '='", |b| *b != b'='), 0..12),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(
            prop::sample::select(&[b'\n', b'=', b' ', 0, b'9'][..]),
            0..16
        ),
        (90usize..110).prop_map(|n| vec![b'v'; n]),
    ]
}

proptest! {
    #![proptest_config(config(32768))]

    #[test]
    fn written_records_read_back(
        records in prop::collection::vec((key(), value()), 0..6),
        padding in 0usize..600,
    ) {
        let mut data: Vec<u8> = records.iter().flat_map(|(k, v)| record(k, v)).collect();
        data.resize(data.len() + padding, 0);
        prop_assert_eq!(parse_pax_records(&data).unwrap(), records);
    }

    #[test]
    fn any_header_data_parses_or_is_refused(
        data in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(prop::sample::select(&[b'1', b'9', b' ', b'=', b'\n', 0, b'a'][..]), 0..64),
        ],
    ) {
        if let Ok(records) = parse_pax_records(&data) {
            for (key, _) in &records {
                prop_assert!(!key.contains(&b'='));
            }
            let total: usize = records.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
            prop_assert!(total <= data.len());
        }
    }
}
