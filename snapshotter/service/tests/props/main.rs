//! Property tests (stable-Rust fuzzing) of the registry notifications the service reads: the
//! webhook envelope, the classification of its events and the artifact probe of a manifest.
//! See docs/fuzzing.md for what each target checks and how to run them longer.
//!
//! Each target runs its own default number of cases, chosen so that every property test of the
//! workspace together takes about a minute in a debug build; `PROPTEST_CASES` sets the count of
//! every target, `STREAMSNAP_PROPTEST_SCALE` multiplies the defaults.

mod events_props;
// One generator of hostile JSON for every crate that parses registry documents.
#[path = "../../../format/tests/props/json.rs"]
mod json;

use proptest::test_runner::Config;

/// The configuration of a target whose default is `cases` cases.
pub fn config(cases: u32) -> Config {
    let scale = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let cases = scale("PROPTEST_CASES")
        .unwrap_or_else(|| cases.saturating_mul(scale("STREAMSNAP_PROPTEST_SCALE").unwrap_or(1)));
    Config {
        cases,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}
