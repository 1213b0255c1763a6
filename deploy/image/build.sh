#!/usr/bin/env bash
# Builds the streamsnap node image as an OCI image layout, without a container engine: the
# binaries (stripped), the shared libraries they link, and the CA certificates, in one layer.
#
#   deploy/image/build.sh [--bin-dir DIR] [--tag TAG] OUT_DIR
#
# DIR holds the built binaries (default target/release: `cargo build --release --locked --bins`).
# OUT_DIR becomes an OCI layout with the image tagged TAG (default: the workspace version). It
# must not exist, be empty, or be an earlier output of this script (an OCI layout holding only
# oci-layout, index.json and blobs/, which is replaced); anything else is refused untouched. Push
# it with skopeo, e.g.
#   skopeo copy oci:OUT_DIR:TAG docker://registry.example.com/streamsnap/streamsnap:TAG
# The result is reproducible: the same binaries give the same digests (SOURCE_DATE_EPOCH sets
# the timestamps, 0 by default). STRIP=0 keeps debug info.
# Needs: bash, coreutils, tar, gzip, ldd (libc-bin), strip (binutils), ca-certificates.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin_dir="$root/target/release"
tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: build.sh [--bin-dir DIR] [--tag TAG] OUT_DIR" >&2; exit 2; }
out=$1
# Refuse, before building anything, a path that holds something else: OUT_DIR is replaced.
if [ -e "$out" ] || [ -L "$out" ]; then
  if [ -L "$out" ] || [ ! -d "$out" ]; then
    echo "build.sh: $out exists and is not a directory: give a new or empty directory" >&2
    exit 1
  fi
  for entry in "$out"/* "$out"/.[!.]* "$out"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in
      oci-layout|index.json|blobs) ;;
      *)
        echo "build.sh: $out is not empty and not an OCI layout this script wrote (it holds ${entry##*/}): give a new or empty directory" >&2
        exit 1 ;;
    esac
  done
  if [ -n "$(ls -A "$out")" ] && [ ! -f "$out/oci-layout" ]; then
    echo "build.sh: $out is not empty and has no oci-layout file: give a new or empty directory" >&2
    exit 1
  fi
fi
if [ -z "$tag" ]; then
  tag=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
fi
epoch=${SOURCE_DATE_EPOCH:-0}
required=(streamsnap-snapshotterd streamsnap)
optional=(streamsnap-fuse-holder)
ca_bundle=/etc/ssl/certs/ca-certificates.crt

for b in "${required[@]}"; do
  [ -x "$bin_dir/$b" ] || {
    echo "build.sh: $bin_dir/$b not found: build it first (cargo build --release --locked --bins)" >&2
    exit 1
  }
done
[ -f "$ca_bundle" ] || { echo "build.sh: $ca_bundle missing: install ca-certificates" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" \
  "$rootfs/run/streamsnap" "$rootfs/var/lib/streamsnap" "$rootfs/etc/streamsnap"
chmod 1777 "$rootfs/tmp"

binaries=()
for b in "${required[@]}" "${optional[@]}"; do
  [ -x "$bin_dir/$b" ] || continue
  cp "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  if [ "${STRIP:-1}" != 0 ]; then strip --strip-debug "$rootfs/usr/local/bin/$b"; fi
  binaries+=("$b")
done
# The shared libraries the binaries link (glibc, libgcc_s, the loader), at the same paths.
for b in "${binaries[@]}"; do
  ldd "$bin_dir/$b" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }'
done | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cp -L "$ca_bundle" "$rootfs$ca_bundle"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
cp "$root/deploy/image/config.toml" "$rootfs/etc/streamsnap/config.toml"

# One layer: a reproducible tar (sorted, fixed owner and times), gzip without a name or time.
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$rootfs" -cf "$work/layer.tar" .
gzip -n -6 -c "$work/layer.tar" > "$work/layer.tar.gz"
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
diff_id=$(sha "$work/layer.tar")
layer_digest=$(sha "$work/layer.tar.gz")
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)

cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"$created","config":{"Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=$ca_bundle"],"Cmd":["/usr/local/bin/streamsnap-snapshotterd","--address","/run/streamsnap/snapshotter.sock","--root","/var/lib/streamsnap","--config","/etc/streamsnap/config.toml","--metrics-address","0.0.0.0:9464"],"ExposedPorts":{"9464/tcp":{}},"Labels":{"org.opencontainers.image.title":"streamsnap","org.opencontainers.image.version":"$tag","org.opencontainers.image.revision":"$revision","org.opencontainers.image.source":"https://github.com/streamsnap/streamsnap"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"$created","created_by":"deploy/image/build.sh"}]}
JSON
config_digest=$(sha "$work/config.json")
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config_digest","size":$(size "$work/config.json")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer_digest","size":$(size "$work/layer.tar.gz")}]}
JSON
manifest_digest=$(sha "$work/manifest.json")

rm -rf "$out/blobs" "$out/index.json" "$out/oci-layout"
mkdir -p "$out/blobs/sha256"
mv "$work/layer.tar.gz" "$out/blobs/sha256/$layer_digest"
mv "$work/config.json" "$out/blobs/sha256/$config_digest"
cp "$work/manifest.json" "$out/blobs/sha256/$manifest_digest"
printf '{"imageLayoutVersion":"1.0.0"}\n' > "$out/oci-layout"
cat > "$out/index.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest_digest","size":$(size "$work/manifest.json"),"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"$tag"}}]}
JSON
echo "built oci:$out:$tag (sha256:$manifest_digest, layer $(size "$out/blobs/sha256/$layer_digest") bytes, binaries: ${binaries[*]})" >&2
