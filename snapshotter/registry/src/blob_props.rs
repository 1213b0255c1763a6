//! Property tests of `Content-Range` parsing (a 206's header decides which bytes are taken as
//! the range asked for): it accepts exactly RFC 9110's `bytes first-last/length` and
//! `bytes first-last/*` with `first <= last < length`, and never panics.

use proptest::prelude::*;

use super::parse_content_range;

/// The RFC's grammar, written independently of the parser.
fn model(value: &str) -> Option<(u64, u64)> {
    let value = value.trim_matches([' ', '\t']);
    let unit = value.get(..6)?;
    if !unit.eq_ignore_ascii_case("bytes ") {
        return None;
    }
    let (span, length) = value[6..].split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = (number(first)?, number(last)?);
    let fits = match length {
        "*" => true,
        length => last < number(length)?,
    };
    (first <= last && fits).then_some((first, last))
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u64..1000).prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => Just(u64::MAX.to_string()),
        1 => Just("18446744073709551616".to_owned()),
        1 => "[0-9]{0,3}[ +-]?[0-9]{0,3}",
        1 => Just("*".to_owned()),
    ]
}

/// Headers around the valid form: right and wrong units, spaces, signs, missing parts.
fn header() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(
        &[
            "bytes ", "BYTES ", "bytes", "bytes  ", "items ", "", " bytes ",
        ][..],
    );
    let sep = prop::sample::select(&["-", "/", " - ", "", "--"][..]);
    let slash = prop::sample::select(&["/", " /", "", "//"][..]);
    prop_oneof![
        8 => (unit, number(), sep, number(), slash, number())
            .prop_map(|(u, a, s, b, sl, c)| format!("{u}{a}{s}{b}{sl}{c}")),
        1 => ".{0,40}",
    ]
}

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

proptest! {
    #![proptest_config(config(65536))]

    #[test]
    fn content_range_accepts_exactly_the_valid_forms(value in header()) {
        prop_assert_eq!(parse_content_range(&value), model(&value), "{:?}", value);
    }

    #[test]
    fn every_valid_range_parses(first in any::<u64>(), len in any::<u64>(), total in prop::option::of(any::<u64>())) {
        let last = first.saturating_add(len);
        let value = match total {
            Some(total) => format!("bytes {first}-{last}/{total}"),
            None => format!("bytes {first}-{last}/*"),
        };
        let valid = total.is_none_or(|total| last < total);
        prop_assert_eq!(parse_content_range(&value), valid.then_some((first, last)));
    }
}

/// Found by the properties above: forms the old parser took (no space after the unit, signs,
/// spaces inside, a last byte at or past the stated length), and a range ending at `u64::MAX`
/// (whose length, `last - first + 1`, overflowed in the caller).
#[test]
fn seed_lenient_and_overflowing_forms() {
    for value in [
        "bytes0-0/0",
        "bytes 0-4746856681319624704/0",
        "bytes +1-2/3",
        "bytes 1 - 2/3",
        "bytes 0-9/9",
    ] {
        assert_eq!(parse_content_range(value), None, "{value}");
    }
    assert_eq!(
        parse_content_range("bytes 0-18446744073709551615/*"),
        Some((0, u64::MAX))
    );
    assert_eq!(parse_content_range(" Bytes 0-9/10 "), Some((0, 9)));
}
