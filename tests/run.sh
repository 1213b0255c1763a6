#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit tests, crate integration tests and the
# end-to-end tests against the real docker-registry, containerd, runc and FUSE (needs root and the
# packages in .ci/packages, which it installs first when they are missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-packages
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n== %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked
step "tests"
cargo test --workspace --locked
echo "all tests passed" >&2
