//! Property tests (stable-Rust fuzzing) of everything this crate decodes from a registry: the
//! TOC and chunk table, chunk frames, start-up profiles, entry paths, digests and the OCI JSON
//! documents. See docs/fuzzing.md for what each target checks and how to run them longer.
//!
//! Each target runs its own default number of cases, chosen so that every property test of the
//! workspace together takes about a minute in a debug build; `PROPTEST_CASES` sets the count of
//! every target, `STREAMSNAP_PROPTEST_SCALE` multiplies the defaults.

mod chunk_props;
mod gzip_props;
mod json;
mod oci_props;
mod path_props;
mod profile_props;
mod toc;
mod toc_props;

use proptest::test_runner::Config;

/// The configuration of a target whose default is `cases` cases.
pub fn config(cases: u32) -> Config {
    let scale = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let cases = scale("PROPTEST_CASES")
        .unwrap_or_else(|| cases.saturating_mul(scale("STREAMSNAP_PROPTEST_SCALE").unwrap_or(1)));
    Config {
        cases,
        // Shrinking a failure of a large input can take long; the seed is kept either way.
        max_shrink_iters: 4096,
        ..Config::default()
    }
}
