"""Metrics exposition, scrape-time collectors, heartbeats and health probes.

- ``serve_metrics()``: ``/metrics`` on METRICS_PORT from a thread (processes outside Dramatiq).
- ``heartbeat()``: this process's heartbeat record, read by ``python -m service health``.
- ``prepare_worker_environment()``: call before exec'ing the Dramatiq CLI.

Worker pods need none of these calls beyond the last: the broker's middleware
(``service.observability.middleware``) writes heartbeats and forks the exposition server.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from service.observability.exposition import serve_metrics
from service.observability.heartbeat import heartbeat

__all__ = ["heartbeat", "prepare_worker_environment", "serve_metrics"]


def prepare_worker_environment(env: dict[str, str] | None = None) -> Path:
    """Point multiprocess metrics at one directory and empty it, before the workers start.

    Sets PROMETHEUS_MULTIPROC_DIR (default: a directory under the temp dir) and Dramatiq's
    ``dramatiq_prom_db`` to the same path in ``env`` (default ``os.environ``), and removes the
    metric files a previous run left there (an emptyDir outlives container restarts).
    """
    target = os.environ if env is None else env
    directory = Path(
        target.get("PROMETHEUS_MULTIPROC_DIR")
        or Path(tempfile.gettempdir()) / f"booking-prometheus-{os.getuid()}"
    )
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    target["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    target["dramatiq_prom_db"] = str(directory)
    return directory
