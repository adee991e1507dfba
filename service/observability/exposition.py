"""The pod's single ``/metrics`` endpoint (METRICS_PORT, default 9191).

Worker pods: Dramatiq's CLI forks ``run_worker_exposition`` once (it is the ``forks`` entry of
our Prometheus middleware) after the worker processes booted. It merges every process's
multiprocess files (our counters and Dramatiq's) with ``MultiProcessCollector`` and adds the
scrape-time collectors. Other long-running processes (the outbox relay) call ``serve_metrics``,
which serves the same way from a thread of their own.
"""

from __future__ import annotations

import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from service.config import Settings
from service.logs import get_logger
from service.observability.collectors import ScrapeCollector, Source
from service.observability.heartbeat import is_running

log = get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_PREFIXES = tuple(
    f"gauge_live{mode}_" for mode in ("all", "sum", "max", "min", "mostrecent")
)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def forget_dead_processes(directory: Path) -> None:
    """Drop the live-gauge files of processes that died without a clean shutdown (kill -9)."""
    for path in directory.glob("gauge_live*.db"):
        name = path.name
        prefix = next((p for p in _LIVE_GAUGE_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            continue
        pid = name[len(prefix) : -len(".db")]
        if pid.isdigit() and not is_running(int(pid), None):
            prom_multiprocess.mark_process_dead(int(pid), str(directory))


class _Refresh:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def collect(self) -> list[Any]:
        if self.directory is not None:
            forget_dead_processes(self.directory)
        return []


def build_registry(sources: list[Source]) -> CollectorRegistry:
    """Multiprocess values (or this process's own registry without multiprocess mode) plus the
    scrape-time collectors."""
    directory = multiprocess_dir()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Refresh(directory))
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        prom_multiprocess.MultiProcessCollector(registry, path=str(directory))
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(ScrapeCollector(sources))
    return registry


class _Delegate:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Any:
        return self.registry.collect()


def _handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                body = generate_latest(registry)
            except Exception as error:
                log.error("metrics exposition failed", error=type(error).__name__)
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def make_server(
    settings: Settings, sources: list[Source], port: int | None = None
) -> ThreadingHTTPServer:
    registry = build_registry(sources)
    address = (settings.metrics_bind_address, settings.metrics_port if port is None else port)
    server = ThreadingHTTPServer(address, _handler(registry))
    server.daemon_threads = True
    return server


def _unavailable(settings: Settings, error: OSError) -> None:
    log.error(
        "metrics port unavailable; carrying on without /metrics",
        address=settings.metrics_bind_address,
        port=settings.metrics_port,
        error=str(error),
    )


def run_worker_exposition(settings: Settings, sources: list[Source]) -> int:
    """The worker pod's metrics until SIGTERM (the Dramatiq CLI forks a process for it).

    A taken port is logged and the pod carries on without metrics (the fork then just waits for
    the shutdown, since Dramatiq stops every process when one of its forks exits).
    """
    if multiprocess_dir() is None:
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: worker processes' metrics are missing")
    try:
        server = make_server(settings, sources)
    except OSError as error:
        _unavailable(settings, error)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        return 0
    log.info("metrics exposition listening", port=server.server_address[1])
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def serve_metrics(
    settings: Settings, sources: list[Source], port: int | None = None
) -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` from a daemon thread of this process; returns the server, or None
    when the port is taken (logged; the process carries on without metrics).

    For processes outside Dramatiq (the outbox relay). Scrape-time gauges from Postgres and the
    heartbeat records are included, as ``sources`` says.
    """
    try:
        server = make_server(settings, sources, port)
    except OSError as error:
        _unavailable(settings, error)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics exposition listening", port=server.server_address[1])
    return server
