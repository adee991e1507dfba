#!/usr/bin/env bash
# Make sure VENV is a virtualenv with a working pip, built by PYTHON; never accept a half-built one.
#
# Usage: scripts/ensure-venv.sh PYTHON VENV
#
# On Debian and Ubuntu the interpreter's venv support (ensurepip) is a separate package,
# python3-venv. Without it `python3 -m venv` fails half-way and leaves a directory with a python
# but no pip, which a plain `test -x VENV/bin/python` would accept forever after. So an existing
# VENV is accepted only when its pip runs; otherwise it is removed and built again, and a build
# that fails is removed at once. (It is built in place rather than renamed: a virtualenv's
# scripts and activate file hold its path.)
set -euo pipefail

python="${1:?usage: ensure-venv.sh PYTHON VENV}"
venv="${2:?usage: ensure-venv.sh PYTHON VENV}"
venv="${venv%/}"

say() { echo "ensure-venv: $*" >&2; }
pip_works() { [[ -x "$1/bin/python" ]] && "$1/bin/python" -m pip --version >/dev/null 2>&1; }

hint_venv_package() {
    local version
    version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)"
    say "$python cannot create virtualenvs with pip: its venv/ensurepip support is missing."
    say "On Debian or Ubuntu install it, then run make again:"
    say "    apt-get install python3-venv      (or python${version}-venv for that exact version)"
    say "or point make at another interpreter: make PYTHON=/path/to/python3.11"
}

if pip_works "$venv"; then
    exit 0
fi
if [[ -e "$venv" || -L "$venv" ]]; then
    say "$venv exists but has no working pip (a half-built virtualenv?): removing it and building it again"
    rm -rf "$venv"
fi

command -v "$python" >/dev/null 2>&1 || { say "no Python interpreter '$python' on PATH (set PYTHON=...)"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    say "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); this project needs 3.11 or newer (make PYTHON=python3.11)"
    exit 1
}
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    hint_venv_package
    exit 1
fi

say "creating the virtualenv $venv with $python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$python" -m venv "$venv" >"$log" 2>&1 || ! pip_works "$venv"; then
    cat "$log" >&2
    rm -rf "$venv"
    say "removed the half-built $venv"
    hint_venv_package
    exit 1
fi
