#!/usr/bin/env bash
# Time to ready on a realistic image: streamsnap (cold and warm chunk cache) against a full pull
# with containerd's overlayfs snapshotter and against the physical limit, behind a shaped link
# (1 Gbit/s, 2 ms RTT). Run as root on Debian 12:
#
#   bash bench/run.sh                 # growth series 1, 2, 4, 8 GiB (sizes the disk cannot hold
#                                     # are skipped), 5 runs each; writes docs/benchmarks.md and
#                                     # docs/benchmark-startup.png
#   bash bench/run.sh --quick         # the 1 GiB point, 3 runs each, no file-system figures
#   SIZES=1,2,4 bash bench/run.sh     # another growth series (GiB, comma-separated)
#
# More arguments go to `streamsnap-bench realistic` (see its --help), e.g. --mbit 500 --rtt-ms 10.
# The rootfs (debootstrap + apt + pip), the layer blobs and a venv with matplotlib are cached
# under CACHE_DIR (default /var/cache/streamsnap-bench). The last line printed is
#   time-to-ready speedup vs full pull: X.Xx; vs physical limit: Y.Yx
# (medians, at the 4 GiB point when measured, else the largest measured).
set -euo pipefail
cd "$(dirname "$0")/.."
export CACHE_DIR=${CACHE_DIR:-/var/cache/streamsnap-bench}
SIZES=${SIZES:-1,2,4,8}
command="bash bench/run.sh"
[ "$SIZES" = 1,2,4,8 ] || command="SIZES=$SIZES bash bench/run.sh"
quick=0
if [ "${1:-}" = --quick ]; then
    quick=1
    shift
fi
# The command the Markdown section shows: with the arguments passed on.
[ $# -eq 0 ] || command="$command $*"
log() { printf '\n== %s\n' "$*" >&2; }
started=$(date +%s)

need=()
for tool in debootstrap docker-registry skopeo containerd ctr-remote runc protoc; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages (missing: ${need[*]})"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap \
        $(grep -v '^#' .ci/packages) >&2
fi

log "building release binaries"
cargo build --release --workspace --bins --locked >&2

log "building the image's rootfs (cached under $CACHE_DIR/rootfs)"
bash bench/image/build-rootfs.sh

mkdir -p "$CACHE_DIR/results"
stamp=$(date +%Y%m%d-%H%M%S)
if [ "$quick" = 1 ]; then
    log "benchmark, quick: the 1 GiB point, 3 runs of each contender"
    ./target/release/streamsnap-bench realistic --runs 3 --sizes-gib 1 --skip-fs --registry-tmpfs \
        --cache-dir "$CACHE_DIR" --json "$CACHE_DIR/results/quick-$stamp.json" "$@" \
        | tee "$CACHE_DIR/results/quick-$stamp.txt"
else
    log "benchmark: growth series ($SIZES GiB), 5 runs of each contender"
    ./target/release/streamsnap-bench realistic --runs 5 --sizes-gib "$SIZES" --registry-tmpfs \
        --cache-dir "$CACHE_DIR" --json "$CACHE_DIR/results/full-$stamp.json" \
        --doc docs/benchmarks.md --plot benchmark-startup.png \
        --command "$command" "$@" | tee "$CACHE_DIR/results/full-$stamp.txt"
    log "plotting"
    if [ ! -x "$CACHE_DIR/venv/bin/python" ]; then
        python3 -m venv "$CACHE_DIR/venv" >&2
        "$CACHE_DIR/venv/bin/pip" install -q matplotlib >&2
    fi
    "$CACHE_DIR/venv/bin/python" bench/plot.py "$CACHE_DIR/results/full-$stamp.json" \
        docs/benchmark-startup.png >&2
fi
log "done in $(($(date +%s) - started)) s; results in $CACHE_DIR/results/"
# the headline again, as the last line
tail -n 1 "$CACHE_DIR/results/$([ "$quick" = 1 ] && echo quick || echo full)-$stamp.txt"
