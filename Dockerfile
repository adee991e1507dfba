# syntax=docker/dockerfile:1
#
# The booking-durability-service worker image.
#   builder: installs the locked dependencies, then the package, into a virtualenv.
#   runtime: the virtualenv, the SQL migrations and nothing else; runs as an unprivileged uid.
#
# Reproducible: every dependency (and the build backend, setuptools and wheel) is installed from
# requirements.lock, pinned with hashes (`make lock` regenerates it from pyproject.toml), in a
# layer of its own before the source is copied, so a code change rebuilds only the last layers.
# The package itself is installed with --no-deps and without build isolation: nothing is
# resolved at build time.
#
# The Helm chart's defaults match this file (tests/helm/test_chart.py checks it): the uid/gid,
# the entrypoint, the metrics port and the writable paths, which the chart mounts as emptyDirs
# because pods run with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-deps --no-build-isolation . \
 && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 booking \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin booking \
 && mkdir -p /var/lib/booking/prometheus /var/cache/booking/flags \
 && chown -R 10001:10001 /var/lib/booking /var/cache/booking
COPY --from=builder /opt/venv /opt/venv
COPY db/migrations /app/db/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIGRATIONS_DIR=/app/db/migrations \
    PROMETHEUS_MULTIPROC_DIR=/var/lib/booking/prometheus \
    FLAG_CACHE_DIR=/var/cache/booking/flags \
    HEALTH_FILE=/tmp/booking-worker-health \
    METRICS_PORT=9191
WORKDIR /app
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 9191
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service", "health", "--liveness"]
# `worker` execs Dramatiq, so Dramatiq itself is PID 1 and receives SIGTERM from the runtime.
ENTRYPOINT ["python", "-m", "service"]
CMD ["worker", "--processes", "2", "--threads", "8", "--queue", "pending-booking-emails", "--shutdown-timeout-ms", "25000"]
