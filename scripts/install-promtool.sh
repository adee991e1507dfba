#!/usr/bin/env bash
# Provide a `promtool` binary for checking and unit-testing the alert rules, without installing a
# Prometheus server: download Debian's `prometheus` package (not install it), extract only
# usr/bin/promtool into a project-local cache, and print the binary's path on stdout.
#
#   scripts/install-promtool.sh            # prints e.g. /repo/.cache/tools/promtool
#   PROMTOOL=$(scripts/install-promtool.sh) && "$PROMTOOL" check rules helm/.../alerts.rules.yaml
#
# Idempotent: when the cached binary exists and runs, the script exits at once. `apt-get update`
# runs only when the download fails because the package lists are missing or stale.
#
# Environment:
#   PROMTOOL_CACHE_DIR   where the binary goes (default: <repo>/.cache/tools, gitignored)
#   PROMTOOL_PACKAGE     the Debian package to take it from (default: prometheus)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${PROMTOOL_CACHE_DIR:-$repo_root/.cache/tools}"
package="${PROMTOOL_PACKAGE:-prometheus}"
target="$cache_dir/promtool"

log() { printf 'install-promtool: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

works() { [[ -x "$1" ]] && "$1" --version >/dev/null 2>&1; }

# Fast path: nothing to do.
if works "$target"; then
    printf '%s\n' "$target"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian-based system"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found: this script needs a Debian-based system"

mkdir -p "$cache_dir"

# Serialise concurrent runs (parallel test workers) on one lock file.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_dir/.promtool.lock"
    flock 9
    if works "$target"; then
        printf '%s\n' "$target"
        exit 0
    fi
fi

work="$(mktemp -d "$cache_dir/.promtool.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt drops privileges to the `_apt` user for downloads when it can; let it write here.
chmod 0777 "$work"

download() {
    (cd "$work" && apt-get download -q "$package") >"$work/apt.log" 2>&1
}

lists_missing() {
    # The package is unknown (no lists at all) or the lists name a file the mirror no longer has.
    grep -qE "Unable to locate package|Can't select (candidate|versions)|has no installation candidate|No packages found|404 +Not Found" \
        "$work/apt.log"
}

log "downloading Debian package '$package' (promtool only; the server is not installed)"
if ! download; then
    if lists_missing; then
        log "package lists missing or stale; running apt-get update"
        update=(apt-get update -q)
        if [[ "$(id -u)" != 0 ]]; then
            command -v sudo >/dev/null 2>&1 || die "apt-get update needs root (or sudo); run it once, then retry"
            update=(sudo -n "${update[@]}")
        fi
        "${update[@]}" >"$work/update.log" 2>&1 || {
            cat "$work/update.log" >&2
            die "apt-get update failed"
        }
        download || { cat "$work/apt.log" >&2; die "apt-get download $package failed after apt-get update"; }
    else
        cat "$work/apt.log" >&2
        die "apt-get download $package failed"
    fi
fi

shopt -s nullglob
debs=("$work"/"$package"_*.deb)
[[ ${#debs[@]} -eq 1 ]] || die "expected one ${package}_*.deb after download, found ${#debs[@]}"

dpkg-deb -x "${debs[0]}" "$work/root"
[[ -f "$work/root/usr/bin/promtool" ]] || die "usr/bin/promtool is not in ${debs[0]##*/}"

install -m 0755 "$work/root/usr/bin/promtool" "$work/promtool.new"
works "$work/promtool.new" || die "the extracted promtool does not run"
mv -f "$work/promtool.new" "$target"   # atomic within one file system

log "installed $("$target" --version 2>&1 | head -n1)"
printf '%s\n' "$target"
