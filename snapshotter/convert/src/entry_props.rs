//! Property tests of PAX time and id parsing: `[-]seconds[.fraction]` reads with floor
//! semantics whatever its digits, and no text makes either parser panic.

use proptest::prelude::*;

use super::{parse_pax_id, parse_pax_time};

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

/// The time the text means, floored to whole nanoseconds, as (seconds, nanoseconds).
fn model(negative: bool, whole: &str, fraction: &str) -> Option<(i64, u32)> {
    let secs: i128 = whole.parse::<i64>().ok()?.into();
    let mut nanos: i128 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += i128::from(digit - b'0') * 10i128.pow(8 - i as u32);
    }
    let total = secs * 1_000_000_000 + nanos;
    let total = if negative { -total } else { total };
    let secs = i64::try_from(total.div_euclid(1_000_000_000)).ok()?;
    Some((secs, total.rem_euclid(1_000_000_000) as u32))
}

proptest! {
    #![proptest_config(config(32768))]

    #[test]
    fn times_read_with_floor_semantics(
        negative in any::<bool>(),
        whole in prop_oneof!["[0-9]{1,19}", any::<i64>().prop_map(|n| n.unsigned_abs().to_string())],
        fraction in prop::option::of("[0-9]{0,14}"),
    ) {
        let text = format!(
            "{}{whole}{}",
            if negative { "-" } else { "" },
            fraction.as_ref().map(|f| format!(".{f}")).unwrap_or_default()
        );
        let expected = model(negative, &whole, fraction.as_deref().unwrap_or(""));
        prop_assert_eq!(parse_pax_time(text.as_bytes()), expected, "{}", text);
    }

    #[test]
    fn any_text_parses_or_is_refused(text in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..24),
        "[-+.0-9e ]{0,24}".prop_map(String::into_bytes),
    ]) {
        if let Some((_, nanos)) = parse_pax_time(&text) {
            prop_assert!(nanos < 1_000_000_000);
        }
        let _ = parse_pax_id(&text);
    }
}
