"""Shared pieces of the benchmarks: throwaway servers, service environment, statistics, output.

Every benchmark writes ``bench/results/<name>.json`` and ``<name>.png`` and returns a
markdown section that ``python -m bench`` gathers into ``bench/results/summary.md``. The
service's settings live in ``Servers.env``: the in-process ``App`` (``service_app``) and the
worker processes are built from it; ``os.environ`` is never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.app import bound_app
from harness.servers import PostgresServer, RedisServer, SmtpSink
from service.app import App

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

EMAIL_FROM = "Bench Bistro <bookings@bench.example>"


def say(text: str) -> None:
    """Progress line on stderr (stdout carries the markdown)."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Servers:
    """The throwaway servers one benchmark started, stopped by the ExitStack that owns them."""

    stack: ExitStack
    pg: PostgresServer | None = None
    redis: RedisServer | None = None
    smtp: SmtpSink | None = None
    database_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    """This process's environment with the service's settings for these servers: what
    ``service_app`` and the worker processes are built from."""


@contextmanager
def servers(
    *, postgres: bool = True, redis: bool = True, smtp: bool = True, smtp_delay: float = 0.0
) -> Iterator[Servers]:
    """Start the requested servers on free loopback ports, with the service's settings for them
    in ``env``; everything is stopped on exit."""
    with ExitStack() as stack:
        found = Servers(stack)
        if postgres:
            found.pg = PostgresServer.start_new()
            stack.callback(found.pg.destroy)
            found.database_url = found.pg.create_database("booking_bench")
        if redis:
            found.redis = RedisServer.start_new(appendonly=True)
            stack.callback(found.redis.destroy)
        if smtp:
            found.smtp = SmtpSink.start_new(delay=smtp_delay)
            stack.callback(found.smtp.destroy)
        found.env = {
            **os.environ,
            "DATABASE_URL": found.database_url or "postgresql://bench@127.0.0.1:1/unused",
            "BROKER_URL": found.redis.url if found.redis else "redis://127.0.0.1:1/0",
            "SMTP_URL": found.smtp.url if found.smtp else "smtp://127.0.0.1:1",
            "EMAIL_FROM": EMAIL_FROM,
            "LOG_LEVEL": "WARNING",
            "FLAG_CACHE_DIR": tempfile.mkdtemp(prefix="booking-bench-flags-"),
        }
        if postgres:
            from service.db import migrate

            migrate(found.database_url)
        yield found


def service_app(env: Mapping[str, str]) -> AbstractContextManager[App]:
    """The benchmark's in-process App, with logging set from its settings (see ``bound_app``)."""
    return bound_app(env, configure_logging=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2) + "\n")
    return path


def read_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def figure(ncols: int = 1, width: float = 6.5, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib figure without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_png(name: str, fig: Any) -> Path:
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "**missed**")


def write_section(name: str, markdown: str) -> None:
    """Keep one benchmark's markdown next to its JSON, for the combined summary."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown, flush=True)


def run_cli(
    doc: str | None, name: str, run: Callable[[bool], Any], markdown: Callable[[Any], str]
) -> None:
    """The command line of one benchmark module: ``python -m bench.<name> [--quick]``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    write_section(name, markdown(run(args.quick)))
