#!/usr/bin/env bash
# Build the crossdraft CPU image where Docker Hub cannot be reached but Debian's and PyPI's mirrors can
# (as on this project's machines): a Debian base made with debootstrap and `docker import`, the torch CPU
# wheel taken from a local folder. Elsewhere, build docker/Dockerfile directly (docs/kubernetes.md, "Docker").
#
#   bash scripts/build_image_local.sh [TAG]      # default crossdraft:0.1.0
#
# Needs root, a running Docker daemon (Debian: apt-get install docker.io debootstrap; dockerd &), and
# TORCH_WHEEL_DIR (default /opt/wheels) holding torch's CPU wheel for Python 3.11. About 1 minute for
# debootstrap and 1 for the build on a 2-core machine, once the packages are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-crossdraft:0.1.0}
BASE=crossdraft-base:bookworm
WHEELS=${TORCH_WHEEL_DIR:-/opt/wheels}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker info >/dev/null 2>&1 || { echo "build_image_local.sh: no Docker daemon answers" >&2; exit 1; }
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "build_image_local.sh: debootstrap is needed" >&2; exit 1; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR"
    # the host's CA bundle, so that pip inside the build trusts what the host trusts (a TLS proxy, if any)
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    tar -C "$root" -c . | docker import - "$BASE"
fi
torch=$(ls "$WHEELS"/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1)
[ -n "$torch" ] || { echo "build_image_local.sh: no torch CPU wheel for Python 3.11 in $WHEELS" >&2; exit 1; }
cp -f "$torch" docker/wheels/
docker build -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t "$TAG" .
echo "built $TAG"
