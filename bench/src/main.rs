//! `streamsnap-bench`: benchmark programs. Each prints its figures (median, min/max over runs,
//! and the ratio to a baseline measured in the same run); none asserts on time. Results and how
//! to read them: docs/benchmarks.md.

mod convert;
mod fleet;
mod memory;
mod realistic;
mod service;
mod startup;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "streamsnap-bench",
    about = "streamsnap benchmarks (print figures)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Conversion throughput of a generated layer against `ctr-remote image convert --estargz`.
    Convert(convert::Args),
    /// Container start-up: lazy (streamsnap) against a full pull (overlayfs), cold.
    Startup(startup::Args),
    /// Time to ready on a realistic multi-GB image behind a shaped link: full pull, streamsnap
    /// cold and warm, the physical limit, a growth series over the data layer's size.
    Realistic(realistic::Args),
    /// Daemon memory as images pile up (VmRSS per mounted entry, idle, restart), and the lstat
    /// of every entry, against another build of the daemon.
    Memory(memory::Args),
    /// N nodes start one image at once, with and without a pull-through mirror (issue 16).
    Fleet(fleet::Args),
    /// Conversions per minute of 1, 2 and 3 replicas of `streamsnap serve` sharing one
    /// PostgreSQL database.
    Service(service::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Convert(args) => convert::run(args),
        Bench::Startup(args) => startup::run(args),
        Bench::Realistic(args) => realistic::run(args),
        Bench::Memory(args) => memory::run(args),
        Bench::Service(args) => service::run(args),
        Bench::Fleet(args) => fleet::run(args),
    }
}
