"""Liveness and readiness checks behind ``python -m service health``.

Liveness reads the heartbeat records of this pod's processes (no network): it fails when a
process froze (its record is older than HEALTH_MAX_AGE_SECONDS), exited while its Dramatiq
parent still runs, lost a worker or consumer thread, or runs a message past its time limit by
more than HEALTH_MAX_AGE_SECONDS. A busy process passes: its heartbeat thread keeps writing.
Readiness checks that the broker and Postgres answer within a couple of seconds, and that no
process of this pod reports itself unready in its heartbeat record (an SMTP server refusing our
credentials: see ``heartbeat.report_unready``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import typer

from service.amqp import connect
from service.config import Settings
from service.observability.heartbeat import is_running, read_records, record_is_current
from service.redis_urls import redis_client

READINESS_TIMEOUT_SECONDS = 2.0


@dataclass
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)
    summary: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok: {self.summary}"
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"fail: {self.problems[0]}{more}"


def record_problems(data: dict[str, Any], now: float, max_age: float) -> list[str]:
    """What is wrong with one current record (empty when the process is healthy)."""
    who = f"{data.get('role', 'process')} process {data['pid']}"
    if not is_running(int(data["pid"]), data.get("pid_start")):
        return [f"{who} exited"]
    problems = []
    age = now - float(data.get("time", 0))
    if age > max_age:
        problems.append(f"{who} silent for {age:.0f}s (frozen or blocked)")
    for kind in ("threads", "consumers"):
        alive, expected = data.get(kind) or (0, 0)
        if alive < expected:
            problems.append(f"{who}: {expected - alive} of {expected} {kind} stopped")
    for task in data.get("tasks") or []:
        limit = task.get("limit")
        running = now - float(task["started"])
        if limit is not None and running > float(limit) + max_age:
            problems.append(
                f"{who}: {task['name']} running for {running:.0f}s, past its {float(limit):.0f}s limit"
            )
    return problems


def liveness(settings: Settings, now: float | None = None) -> Verdict:
    now = time.time() if now is None else now
    current = [data for _, data in read_records(settings.health_file) if record_is_current(data)]
    if not current:
        return Verdict(False, [f"no live heartbeat under {settings.health_file}"])
    problems = [
        p for data in current for p in record_problems(data, now, settings.health_max_age_seconds)
    ]
    roles = sorted({str(d.get("role")) for d in current})
    return Verdict(not problems, problems, f"{len(current)} {'/'.join(roles)} process(es) alive")


def _check_broker(settings: Settings) -> None:
    url = settings.secret("broker_url")
    if settings.broker_kind == "rabbitmq":
        connect(url, timeout=READINESS_TIMEOUT_SECONDS).close()
        return
    client = redis_client(
        url,
        connect_timeout=READINESS_TIMEOUT_SECONDS,
        socket_timeout=READINESS_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()


def _check_database(settings: Settings) -> None:
    with psycopg.connect(
        settings.secret("database_url"),
        connect_timeout=max(1, int(READINESS_TIMEOUT_SECONDS)),
        options=f"-c statement_timeout={int(READINESS_TIMEOUT_SECONDS * 1000)}",
        autocommit=True,
    ) as conn:
        conn.execute("SELECT 1")


def reported_unready(settings: Settings) -> list[str]:
    """The readiness problems that this pod's live processes put in their heartbeat records."""
    problems = []
    for _, data in read_records(settings.health_file):
        if not record_is_current(data):
            continue
        who = f"{data.get('role', 'process')} process {data['pid']}"
        unready = data.get("unready") or {}
        if isinstance(unready, dict):
            problems += [f"{who}: {reason}" for _, reason in sorted(unready.items())]
    return problems


def readiness(settings: Settings) -> Verdict:
    checks: dict[str, Callable[[Settings], None]] = {
        "broker": _check_broker,
        "database": _check_database,
    }
    problems = reported_unready(settings)
    pool = ThreadPoolExecutor(max_workers=len(checks))
    try:
        futures = {name: pool.submit(check, settings) for name, check in checks.items()}
        deadline = time.monotonic() + READINESS_TIMEOUT_SECONDS + 0.5
        for name, future in futures.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                problems.append(f"{name} did not answer within {READINESS_TIMEOUT_SECONDS:.0f}s")
            except Exception as error:
                problems.append(f"{name} unreachable: {type(error).__name__}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return Verdict(not problems, problems, "broker and database answer")


def forget_own_metric_files() -> None:
    """A probe runs every few seconds: leave no multiprocess files behind (its values are 0)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in Path(directory).glob(f"*_{os.getpid()}.db"):
            path.unlink(missing_ok=True)


def health(
    ctx: typer.Context,
    check_liveness: bool = typer.Option(
        False, "--liveness", help="This pod's processes heartbeat and none is stuck (no network)."
    ),
    check_readiness: bool = typer.Option(
        False,
        "--readiness",
        help="The broker and Postgres answer within 2 s; no process reports an SMTP auth failure.",
    ),
) -> None:
    """Probe for Kubernetes: exit 0 when healthy, else 1 with a one-line reason."""
    if not (check_liveness or check_readiness):
        check_liveness = True
    settings: Settings = ctx.obj.settings
    verdicts = []
    if check_liveness:
        verdicts.append(liveness(settings))
    if check_readiness:
        verdicts.append(readiness(settings))
    forget_own_metric_files()
    failed = [v for v in verdicts if not v.ok]
    for verdict in failed or verdicts:
        typer.echo(verdict.line(), err=bool(failed))
    if failed:
        raise typer.Exit(1)
