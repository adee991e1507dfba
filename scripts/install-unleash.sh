#!/usr/bin/env bash
# Install the Unleash test server (unleash-server 8.x and a Node 22 runtime from npm) into
# .cache/unleash/ once; later runs reuse it. Versions are pinned in harness/unleash.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
exec "$python" -m harness.unleash install
