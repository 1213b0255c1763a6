//! Property tests (stable-Rust fuzzing) of the layer filesystem: the inode table built from any
//! valid TOC (`Table::build`, through `LayerFs::new`) and the operations over it. See
//! docs/fuzzing.md for what each target checks and how to run them longer.
//!
//! Each target runs its own default number of cases, chosen so that every property test of the
//! workspace together takes about a minute in a debug build; `PROPTEST_CASES` sets the count of
//! every target, `STREAMSNAP_PROPTEST_SCALE` multiplies the defaults.

mod layer_props;
mod read_props;

pub use streamsnap_fs::{BoxFuture, ChunkReader, ChunkTable, ReadError};

#[path = "../../src/testutil.rs"]
pub mod testutil;

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

/// A runtime for the async reads of one case.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}
