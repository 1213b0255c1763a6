#!/usr/bin/env bash
# The streamsnap demo on a fresh Debian 12 machine, as root:
#
#   bash deploy/demo.sh            install what the demo needs, build it, run it, clean up
#   bash deploy/demo.sh --keep     the same, but leave the registry, containerd and the snapshotter
#                                  daemon running in the background and print next steps to try
#   bash deploy/demo.sh --stop     stop what --keep left running and remove its data
#   bash deploy/demo.sh --help     this text
#
# It installs only the Debian packages in deploy/demo.packages (apt-get, when missing), builds
# only the four binaries the demo runs (release mode; the first build takes about 5 minutes on 2
# cores, later ones seconds), and runs everything on private ports, sockets and temp dirs, so it
# does not touch a containerd or registry the machine already has. Needs Rust 1.88 or newer
# (https://rustup.rs); CARGO_TARGET_DIR is honoured. STREAMSNAP_DEMO_PROFILE=dev builds the
# debug binaries instead (what CI does: the tests build them anyway; the figures are slower).
set -euo pipefail
cd "$(dirname "$0")/.."

state_dir=/run/streamsnap-demo
min_rust=1.88
binaries=(streamsnap-demo streamsnap streamsnap-snapshotterd streamsnap-fuse-holder)

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf '==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

keep=0
stop=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --keep) keep=1 ;;
    --stop) stop=1 ;;
    *) printf 'demo.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run it as root (it starts containerd and mounts FUSE file systems): as a user with sudo, sudo -E bash deploy/demo.sh"

stop_kept() {
  local pid
  if [ ! -f "$state_dir/pid" ]; then
    echo "demo.sh: nothing to stop: no demo started with --keep is running"
    return 0
  fi
  pid=$(cat "$state_dir/pid")
  if ! grep -qs streamsnap-demo "/proc/$pid/cmdline"; then
    echo "demo.sh: the demo (pid $pid) is no longer running"
    rm -f "$state_dir/pid" "$state_dir/ready"
    return 0
  fi
  say "stopping the demo (pid $pid): containerd, the snapshotter daemon, the registry"
  kill -TERM "$pid"
  for _ in $(seq 1 1200); do
    [ -d "/proc/$pid" ] || break
    sleep 0.1
  done
  [ ! -d "/proc/$pid" ] || die "pid $pid did not stop within 120 s; its log: $state_dir/demo.log"
  tail -n 2 "$state_dir/demo.log"
  rm -f "$state_dir/pid" "$state_dir/ready"
}

if [ "$stop" = 1 ]; then
  stop_kept
  exit 0
fi
if [ -f "$state_dir/pid" ] && grep -qs streamsnap-demo "/proc/$(cat "$state_dir/pid")/cmdline"; then
  die "a demo started with --keep is still running (pid $(cat "$state_dir/pid")): bash deploy/demo.sh --stop first"
fi

# Rust: rustup's, also when this shell has not sourced ~/.cargo/env yet.
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
rust_help="install Rust $min_rust or newer with rustup (Debian's cargo is too old):
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  . \"\$HOME/.cargo/env\"
then run this script again"
command -v cargo >/dev/null || die "cargo not found: $rust_help"
rust_version=$(rustc --version 2>/dev/null | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$min_rust" "${rust_version:-0}" | sort -V | head -1)" != "$min_rust" ]; then
  die "rustc ${rust_version:-?} is older than $min_rust (rustup update, or $rust_help)"
fi

say "Debian packages the demo needs (deploy/demo.packages)"
bash .ci/install-packages deploy/demo.packages

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || die "cannot find cargo's target directory (cargo metadata)"
case "${STREAMSNAP_DEMO_PROFILE:-release}" in
  release) profile=release; profile_flag=--release; bin_dir=$target_dir/release ;;
  dev|debug) profile=dev; profile_flag=; bin_dir=$target_dir/debug ;;
  *) die "STREAMSNAP_DEMO_PROFILE is release (the default) or dev, not ${STREAMSNAP_DEMO_PROFILE}" ;;
esac
if [ -x "$bin_dir/streamsnap-demo" ]; then
  say "building ${binaries[*]} ($profile, into $bin_dir; up to date in seconds)"
else
  say "building ${binaries[*]} ($profile, into $bin_dir): the first build takes about 5 minutes on 2 cores"
fi
started=$(date +%s)
cargo build $profile_flag --locked \
  -p streamsnap-e2e --bin streamsnap-demo \
  -p streamsnap-cli --bin streamsnap \
  -p streamsnap-snapshotter --bin streamsnap-snapshotterd \
  -p streamsnap-holder --bin streamsnap-fuse-holder
say "built in $(( $(date +%s) - started )) s"

if [ "$keep" = 0 ]; then
  exec "$bin_dir/streamsnap-demo"
fi

# --keep: the demo runs in its own session, in the background; this shell shows its output until
# everything runs, then returns. The demo stops everything on SIGTERM (--stop).
mkdir -p "$state_dir"
rm -f "$state_dir/ready"
setsid "$bin_dir/streamsnap-demo" --keep --ready-file "$state_dir/ready" \
  </dev/null >"$state_dir/demo.log" 2>&1 &
pid=$!
echo "$pid" > "$state_dir/pid"
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 130' INT
tail -n +1 -f --pid="$pid" "$state_dir/demo.log" &
tail_pid=$!
while [ ! -f "$state_dir/ready" ] && [ -d "/proc/$pid" ]; do sleep 0.2; done
sleep 0.5
kill "$tail_pid" 2>/dev/null || true
trap - INT
if [ ! -f "$state_dir/ready" ]; then
  rm -f "$state_dir/pid"
  wait "$pid" || die "the demo failed; its log: $state_dir/demo.log"
  exit 1
fi
say "the demo keeps running in the background (pid $pid, log $state_dir/demo.log)"
