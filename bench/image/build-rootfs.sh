#!/usr/bin/env bash
# Builds the software layers of the realistic benchmark image as overlayfs upper directories, the
# way a Dockerfile build makes them, under CACHE_DIR (default /var/cache/streamsnap-bench):
#
#   rootfs/base/upper     Debian bookworm, debootstrap --variant=minbase
#   rootfs/python/upper   + python3, pip, venv, headers and a C toolchain (apt)
#   rootfs/stack/upper    + the scientific Python stack from PyPI (pip, into /usr/local)
#
# Each stage is skipped when its `done` marker exists (delete the stage dir to rebuild it and the
# ones above it). Deleted files show in an upper dir as 0/0 character devices and replaced
# directories carry trusted.overlay.opaque=y: streamsnap-bench turns them into OCI whiteouts when
# it writes the layer tars. Needs root, debootstrap, and network access to deb.debian.org and PyPI.
set -euo pipefail

CACHE_DIR=${CACHE_DIR:-/var/cache/streamsnap-bench}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT="$CACHE_DIR/rootfs"
# What the stack layer installs. Changing this list: delete $ROOT/stack.
PIP_PACKAGES="numpy pandas scipy scikit-learn matplotlib pyarrow sympy statsmodels numba polars jupyterlab"
APT_PACKAGES="python3 python3-pip python3-venv python3-dev build-essential ca-certificates libgomp1"

log() { printf '[build-rootfs] %s\n' "$*" >&2; }
mkdir -p "$ROOT"

MOUNTED=()
cleanup() {
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount -l "${MOUNTED[$i]}" 2>/dev/null || true
    done
    MOUNTED=()
}
trap cleanup EXIT

# mount_stage NAME LOWERDIRS: the stage's merged view, with /proc, /dev and resolv.conf for a
# chroot (bind mounts land in the merged view only, never in the upper dir).
mount_stage() {
    local name=$1 lower=$2 dir="$ROOT/$1"
    rm -rf "$dir"
    mkdir -p "$dir/upper" "$dir/work" "$dir/merged"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged"
    MOUNTED+=("$dir/merged")
    mount -t proc proc "$dir/merged/proc"
    MOUNTED+=("$dir/merged/proc")
    mount --rbind /dev "$dir/merged/dev"
    MOUNTED+=("$dir/merged/dev")
    # a file to bind resolv.conf onto, removed again before the upper dir is used
    if [ ! -e "$dir/merged/etc/resolv.conf" ]; then
        touch "$dir/merged/etc/resolv.conf"
        TOUCHED_RESOLV=1
    else
        TOUCHED_RESOLV=0
    fi
    mount --bind /etc/resolv.conf "$dir/merged/etc/resolv.conf"
    MOUNTED+=("$dir/merged/etc/resolv.conf")
}

finish_stage() {
    local name=$1 dir="$ROOT/$1"
    cleanup
    if [ "$TOUCHED_RESOLV" = 1 ]; then
        rm -f "$dir/upper/etc/resolv.conf"
    fi
    rm -rf "$dir/work" "$dir/merged"
    du -sh "$dir/upper" >&2
    touch "$dir/done"
}

if [ ! -e "$ROOT/base/done" ]; then
    log "stage base: debootstrap bookworm (minbase)"
    rm -rf "$ROOT/base" "$ROOT/python" "$ROOT/stack"
    mkdir -p "$ROOT/base"
    debootstrap --variant=minbase bookworm "$ROOT/base/upper" "$MIRROR" >"$ROOT/base.log" 2>&1 ||
        { tail -20 "$ROOT/base.log" >&2; exit 1; }
    rm -rf "$ROOT/base/upper/var/cache/apt/archives/"*.deb "$ROOT/base/upper/var/lib/apt/lists/"*
    : >"$ROOT/base/upper/etc/resolv.conf"
    du -sh "$ROOT/base/upper" >&2
    touch "$ROOT/base/done"
fi

if [ ! -e "$ROOT/python/done" ]; then
    log "stage python: apt-get install $APT_PACKAGES"
    rm -rf "$ROOT/stack"
    mount_stage python "$ROOT/base/upper"
    chroot "$ROOT/python/merged" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive sh -c "apt-get update -q && \
        apt-get install -y -q --no-install-recommends $APT_PACKAGES && apt-get clean && \
        rm -rf /var/lib/apt/lists/*" >"$ROOT/python.log" 2>&1 ||
        { tail -20 "$ROOT/python.log" >&2; exit 1; }
    finish_stage python
fi

if [ ! -e "$ROOT/stack/done" ]; then
    log "stage stack: pip install $PIP_PACKAGES"
    mount_stage stack "$ROOT/python/upper:$ROOT/base/upper"
    # The host's CA bundle, for a machine whose HTTPS goes through an intercepting proxy; the
    # file is deleted again inside the chroot, so it never reaches the layer.
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/stack/merged/tmp/host-ca.crt"
    chroot "$ROOT/stack/merged" /usr/bin/env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root PIP_CERT=/tmp/host-ca.crt PIP_DEFAULT_TIMEOUT=180 sh -c "pip install \
        --no-cache-dir --break-system-packages --root-user-action=ignore $PIP_PACKAGES && \
        rm -f /tmp/host-ca.crt && \
        python3 -c 'import numpy, pandas, scipy, sklearn, matplotlib; print(\"imports ok\")'" \
        >"$ROOT/stack.log" 2>&1 || { tail -20 "$ROOT/stack.log" >&2; exit 1; }
    # pip's byte-compiled files are part of the image, as in any pip-installed image
    rm -rf "$ROOT/stack/upper/root/.cache"
    finish_stage stack
fi
log "software layers ready under $ROOT"
