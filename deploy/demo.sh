#!/usr/bin/env bash
# The streamsnap demo, from a fresh Debian 12 machine (as root): installs the Debian packages,
# builds streamsnap, then runs the demo (private registry, demo image, conversion).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-packages
cargo build --release --locked --workspace --bins
exec ./target/release/streamsnap-demo "$@"
