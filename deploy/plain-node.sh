#!/usr/bin/env bash
# streamsnap on a plain node without systemd (a VM or a host managed by hand, OpenRC, runit, a
# containerd started by a script), as root. docs/deploy.md, "A plain node".
#
#   deploy/plain-node.sh install     copy the binaries and the sample config (kept if present)
#   deploy/plain-node.sh start       start the daemon, supervised by `streamsnap node run`, which
#                                    points containerd at it once it serves (and restarts
#                                    containerd with $RESTART_CONTAINERD)
#   deploy/plain-node.sh status      whether it runs and containerd uses it
#   deploy/plain-node.sh stop        stop it for good: containerd gets its original config back
#                                    (and is restarted), the daemon and its FUSE holder exit
#   deploy/plain-node.sh uninstall   stop, then remove the binaries (--purge: also the config,
#                                    the chunk cache and the snapshots under $STATE_DIR)
#
# Settings (environment; defaults in brackets):
#   RESTART_CONTAINERD  shell command that restarts containerd and returns once it runs again,
#                       e.g. "service containerd restart", "rc-service containerd restart",
#                       "sv restart containerd" [systemctl restart containerd]
#   CONTAINERD_CONFIG   containerd's config file [/etc/containerd/config.toml]
#   BIN_DIR             where `install` takes the binaries from [target/release of this checkout]
#   PREFIX              where they go: $PREFIX/bin [/usr/local]
#   CONFIG_DIR          [/etc/streamsnap]      STATE_DIR  [/var/lib/streamsnap]
#   RUN_DIR             [/run/streamsnap]      LOG_FILE   [/var/log/streamsnap-snapshotterd.log]
#   METRICS_ADDRESS     the daemon's /metrics and /healthz [127.0.0.1:9464]
#
# Drain containers started from streamed images before `stop`: once the daemon stops for good,
# their lazily mounted files are no longer served. Restarting the daemon in place keeps them
# (`node run` restarts a crashed daemon; its FUSE holder keeps the mounts).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$here/.." && pwd)
RESTART_CONTAINERD=${RESTART_CONTAINERD:-systemctl restart containerd}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
BIN_DIR=${BIN_DIR:-$checkout/target/release}
PREFIX=${PREFIX:-/usr/local}
CONFIG_DIR=${CONFIG_DIR:-/etc/streamsnap}
STATE_DIR=${STATE_DIR:-/var/lib/streamsnap}
RUN_DIR=${RUN_DIR:-/run/streamsnap}
LOG_FILE=${LOG_FILE:-/var/log/streamsnap-snapshotterd.log}
METRICS_ADDRESS=${METRICS_ADDRESS:-127.0.0.1:9464}

binaries=(streamsnap-snapshotterd streamsnap streamsnap-fuse-holder)
pid_file=$RUN_DIR/node-run.pid
socket=$RUN_DIR/snapshotter.sock
marker=$CONTAINERD_CONFIG.streamsnap-installed

die() { printf 'plain-node.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

running_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q ' node run ' || return 1
  echo "$pid"
}

cmd_install() {
  for b in "${binaries[@]}"; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found: build it first (cargo build --release --locked --bins), or set BIN_DIR"
  done
  install -d -m 0755 "$PREFIX/bin"
  for b in "${binaries[@]}"; do
    install -m 0755 "$BIN_DIR/$b" "$PREFIX/bin/$b"
  done
  install -d -m 0755 "$CONFIG_DIR"
  if [ -e "$CONFIG_DIR/config.toml" ]; then
    say "kept the existing $CONFIG_DIR/config.toml"
  else
    install -m 0644 "$here/image/config.toml" "$CONFIG_DIR/config.toml"
    say "installed the sample config $CONFIG_DIR/config.toml (every key with its default, commented)"
  fi
  say "installed ${binaries[*]} into $PREFIX/bin; next: deploy/plain-node.sh start"
}

cmd_start() {
  local pid
  if pid=$(running_pid); then
    say "already running (node run pid $pid)"
    return 0
  fi
  [ -x "$PREFIX/bin/streamsnap" ] || die "not installed: run deploy/plain-node.sh install first"
  [ -f "$CONTAINERD_CONFIG" ] || die "containerd's config $CONTAINERD_CONFIG not found: set CONTAINERD_CONFIG"
  install -d -m 0755 "$RUN_DIR"
  install -d -m 0700 "$STATE_DIR"
  install -d -m 0755 "$(dirname "$LOG_FILE")"
  local log_start
  log_start=$(stat -c %s "$LOG_FILE" 2>/dev/null || echo 0)
  # Its own session, so it outlives this shell; the log gets both programs' output.
  setsid "$PREFIX/bin/streamsnap" node run \
      --containerd-config "$CONTAINERD_CONFIG" --socket "$socket" \
      --restart-command "$RESTART_CONTAINERD" -- \
    "$PREFIX/bin/streamsnap-snapshotterd" --address "$socket" --root "$STATE_DIR" \
      --config "$CONFIG_DIR/config.toml" --metrics-address "$METRICS_ADDRESS" \
    </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" > "$pid_file"
  say "started (node run pid $pid, log $LOG_FILE); waiting for containerd to use it"
  # `node run` says so once containerd's config is patched and containerd restarted on it.
  for _ in $(seq 1 600); do
    if tail -c +"$((log_start + 1))" "$LOG_FILE" | grep -q "the daemon serves on"; then
      say "serving on $socket; containerd's config $CONTAINERD_CONFIG points at it"
      return 0
    fi
    [ -d "/proc/$pid" ] || { tail -n 20 "$LOG_FILE" >&2; rm -f "$pid_file"; die "node run exited; its log is above"; }
    sleep 0.1
  done
  tail -n 20 "$LOG_FILE" >&2
  die "containerd was not pointed at the daemon within 60 s (see $LOG_FILE); deploy/plain-node.sh stop undoes the start"
}

cmd_status() {
  local pid
  if pid=$(running_pid); then
    echo "running: node run pid $pid, socket $socket"
  else
    echo "not running"
  fi
  if [ -e "$marker" ]; then
    echo "containerd's config $CONTAINERD_CONFIG uses streamsnap (original kept beside it)"
  else
    echo "containerd's config $CONTAINERD_CONFIG is its own"
  fi
}

cmd_stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pid_file"
    if [ -e "$marker" ] && [ -x "$PREFIX/bin/streamsnap" ]; then
      say "not running, but containerd's config is still patched: restoring it"
      "$PREFIX/bin/streamsnap" node uninstall --containerd-config "$CONTAINERD_CONFIG" \
        --restart-command "$RESTART_CONTAINERD"
    else
      say "not running"
    fi
    return 0
  fi
  # SIGINT: stopping for good (SIGTERM would hand the mounts over for a restart).
  say "stopping (node run pid $pid): containerd gets its original config back, the daemon exits"
  kill -INT "$pid"
  for _ in $(seq 1 1200); do
    [ -d "/proc/$pid" ] || break
    sleep 0.1
  done
  [ ! -d "/proc/$pid" ] || die "node run (pid $pid) did not stop within 120 s; see $LOG_FILE"
  rm -f "$pid_file"
  [ ! -e "$marker" ] || die "containerd's config is still patched; see $LOG_FILE"
  say "stopped"
}

cmd_uninstall() {
  local purge=0
  [ "${1:-}" = --purge ] && purge=1
  cmd_stop
  for b in "${binaries[@]}"; do rm -f "$PREFIX/bin/$b"; done
  say "removed ${binaries[*]} from $PREFIX/bin"
  if [ "$purge" = 1 ]; then
    if findmnt -rn -o TARGET | grep -q "^$STATE_DIR/"; then
      die "file systems are still mounted under $STATE_DIR (findmnt | grep $STATE_DIR): unmount them first"
    fi
    rm -rf "$CONFIG_DIR" "$STATE_DIR" "$LOG_FILE"
    say "removed $CONFIG_DIR, $STATE_DIR and $LOG_FILE"
  else
    say "kept $CONFIG_DIR and $STATE_DIR (uninstall --purge removes them)"
  fi
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
verb=$1
shift
case "$verb" in
  -h|--help|help) usage; exit 0 ;;
esac
[ "$(id -u)" = 0 ] || die "run it as root"
case "$verb" in
  install) cmd_install ;;
  start) cmd_start ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  uninstall) cmd_uninstall "$@" ;;
  *) printf 'plain-node.sh: unknown command %s\n\n' "$verb" >&2; usage >&2; exit 2 ;;
esac
