//! Property tests (stable-Rust fuzzing) of layer conversion: tar streams of any shape (names
//! in the header, in GNU long names or in PAX records; escaping, long, odd; PAX records of any
//! kind and value) converted to a TOC and chunk blob. See docs/fuzzing.md for what each target
//! checks and how to run them longer. The PAX record and time parsers are tested next to them
//! (src/*_props.rs).
//!
//! Each target runs its own default number of cases, chosen so that every property test of the
//! workspace together takes about a minute in a debug build; `PROPTEST_CASES` sets the count of
//! every target, `STREAMSNAP_PROPTEST_SCALE` multiplies the defaults.

mod tar_props;

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
