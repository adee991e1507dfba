"""Worker throughput of the whole email pipeline beside a plain Dramatiq job and the SMTP
server alone, in two scenarios, in one run.

Three loads, in rotating order each round, on the same servers and machine:

- ``pipeline``: real ``python -m service worker`` processes (production settings: INFO JSON logs,
  Prometheus multiprocess mode) consume ``send_booking_email`` messages with every guarantee:
  load the booking, claim the request row with a lease, render, send over SMTP, record the delivery.
- ``plain``: the plain-job baseline (``bench.plain_job``, ``python -m dramatiq
  bench.plain_actors``): stock Dramatiq with the same processes and threads doing the same work
  without those guarantees: select the booking, insert a claim row, build the email with
  ``email.mime`` + icalendar, send it over one SMTP connection per thread, update the row;
  autocommit, a pool of at most one connection per thread.
- ``smtp``: the same SMTP server driven by as many plain SMTP clients (processes x threads), each
  sending a pre-rendered booking email: the SMTP server's ceiling at that concurrency.

Scenarios: ``zero-latency`` (the SMTP server answers at once; the worker's default threads) and
``smtp-100ms`` (the server answers each DATA after 100 ms, an asyncio sleep; 2 x 32 threads,
``DB_POOL_MAX_SIZE=2`` for the pipeline; several sink processes share the port through
SO_REUSEPORT so that the server is not the bottleneck, and its alone figure is measured).

The SMTP server (aiosmtpd, storing each message as a file) runs in its own processes. Rates are
taken over the 20 % to 90 % completion window, so worker boot and the tail are excluded. CPU per
email of every process involved (workers, Postgres, Redis, SMTP server; the SMTP clients for the
``smtp`` load) is read from ``/proc`` over the same window, and a separate thread samples the
Postgres connections not idle every 0.5 s. A single-threaded in-process run of ``deliver()``
times its phases.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    ROOT,
    figure,
    md_table,
    median,
    save_png,
    say,
    servers,
    service_app,
    verdict,
    write_json,
    write_section,
)
from harness.servers import SmtpSink

NAME = "throughput"
WINDOW = (0.2, 0.9)
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_PROCESS = "bench (this process)"
KINDS = ("pipeline", "plain", "smtp")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    data_delay: float
    processes: int
    threads: int
    emails: int
    quick_emails: int
    smtp_processes: int
    pipeline_env: dict[str, str] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)


SCENARIOS = (
    Scenario(
        "zero-latency",
        "SMTP answers at once",
        data_delay=0.0,
        processes=2,
        threads=8,  # the worker's threads in the chart (2 x 8)
        emails=5000,
        quick_emails=800,
        smtp_processes=1,
        targets={"pipeline_to_plain_rate_min": 1.2, "pipeline_to_plain_cpu_max": 0.9},
    ),
    Scenario(
        "smtp-100ms",
        "SMTP answers each DATA after 100 ms",
        data_delay=0.1,
        processes=2,
        threads=32,
        emails=3000,
        quick_emails=500,
        smtp_processes=4,
        pipeline_env={"DB_POOL_MAX_SIZE": "2"},
        targets={
            "pipeline_to_smtp_rate_min": 0.8,
            "pipeline_to_plain_rate_min": 1.2,
            "max_active_connections": 4,
        },
    ),
)


# --- process CPU accounting -------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 1000:
        p = todo.pop()
        found.append(p)
        todo += _children(p)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def postmaster_pid(datadir: Path) -> int:
    return int((datadir / "postmaster.pid").read_text().split()[0])


@dataclass
class LoadRun:
    """One load's completion curve and CPU use over the measurement window."""

    kind: str
    total: int
    rate: float
    window_seconds: float
    cpu_ms_per_message: dict[str, float]
    curve: list[tuple[float, int]] = field(default_factory=list)
    active_connections: list[int] = field(default_factory=list)
    """Postgres connections not idle, sampled every 0.5 s within the window."""

    @property
    def cpu_ms_total(self) -> float:
        """Every process involved but this one (the benchmark only polls)."""
        return sum(v for k, v in self.cpu_ms_per_message.items() if k != BENCH_PROCESS)


class ActiveConnections:
    """Every 0.5 s, on a connection of its own (which it does not count), the benchmark
    database's connections whose state is not ``idle`` (active, idle in transaction, ...)."""

    QUERY = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state <> 'idle' AND pid <> pg_backend_pid()"
    )

    def __init__(self, database_url: str, start: float, interval: float = 0.5) -> None:
        import psycopg

        self.samples: list[tuple[float, int]] = []
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._start, self._interval = start, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-active-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            row = self._conn.execute(self.QUERY).fetchone()
            self.samples.append((time.monotonic() - self._start, int(row[0]) if row else 0))
            self._stopped.wait(self._interval)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(10)
        self._conn.close()


def _crossing(samples: list[tuple[float, int, dict[str, float]]], target: float) -> float:
    """Time at which the completed count reached ``target`` (linear between samples)."""
    for (t0, n0, _), (t1, n1, _) in itertools.pairwise(samples):
        if n1 >= target:
            return t0 if n1 == n0 else t0 + (t1 - t0) * (target - n0) / (n1 - n0)
    raise ValueError("target never reached")


def _cpu_at(samples: list[tuple[float, int, dict[str, float]]], when: float) -> dict[str, float]:
    best = min(samples, key=lambda s: abs(s[0] - when))
    return best[2]


def measure(
    kind: str,
    total: int,
    done: Callable[[], int],
    groups: dict[str, Callable[[], list[int]]],
    timeout: float,
    interval: float = 0.05,
    failed: Callable[[], str | None] = lambda: None,
    database_url: str | None = None,
) -> LoadRun:
    """Poll ``done()`` until ``total`` (bounded by ``timeout``), sampling each group's CPU and,
    with ``database_url``, the Postgres connections not idle."""
    start = time.monotonic()
    samples: list[tuple[float, int, dict[str, float]]] = []
    sampler = ActiveConnections(database_url, start) if database_url else None
    try:
        while True:
            now = time.monotonic() - start
            n = done()
            cpu = {name: cpu_seconds(pids()) for name, pids in groups.items()}
            cpu[BENCH_PROCESS] = sum(os.times()[:2])
            samples.append((now, n, cpu))
            if n >= total:
                break
            problem = failed()
            if problem:
                raise RuntimeError(f"{kind}: {problem} ({n}/{total} done)")
            if now > timeout:
                raise TimeoutError(f"{kind}: only {n}/{total} done after {timeout:.0f} s")
            time.sleep(interval)
    finally:
        if sampler is not None:
            sampler.stop()
    t_lo, t_hi = (_crossing(samples, total * q) for q in WINDOW)
    window = max(t_hi - t_lo, 1e-6)
    per_msg = total * (WINDOW[1] - WINDOW[0])
    c_lo, c_hi = _cpu_at(samples, t_lo), _cpu_at(samples, t_hi)
    cpu_ms = {name: (c_hi[name] - c_lo.get(name, 0.0)) * 1000 / per_msg for name in c_hi}
    curve = [(round(t, 3), n) for t, n, _ in samples]
    active = [n for t, n in sampler.samples if t_lo <= t <= t_hi] if sampler else []
    return LoadRun(kind, total, per_msg / window, window, cpu_ms, curve, active)


def eml_count(store: Path) -> int:
    with os.scandir(store) as entries:
        return sum(1 for e in entries if e.name.endswith(".eml"))


# --- the three loads ----------------------------------------------------------------------------


@dataclass
class Setup:
    found: Any
    app: Any
    scenario: Scenario
    sink: SmtpSink
    bookings: list[str]
    message_file: Path
    log_dir: Path
    plain_actor: Any

    @property
    def processes(self) -> int:
        return self.scenario.processes

    @property
    def threads(self) -> int:
        return self.scenario.threads

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.found.env, "SMTP_URL": self.sink.url, **extra}

    def base_groups(self) -> dict[str, Callable[[], list[int]]]:
        found, sink = self.found, self.sink
        pg_pid = postmaster_pid(found.pg.datadir)
        return {
            "smtp server": lambda: list(sink.pids),
            "postgres": lambda: tree(pg_pid),
            "redis": lambda: [found.redis.proc.pid],
        }


def _exited(group: Any) -> str | None:
    code = group.proc.poll() if group.proc else None
    return None if code is None else f"the workers exited with {code}; see their log"


def _reset(s: Setup, table: str) -> None:
    import psycopg
    import redis

    with psycopg.connect(s.found.database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
    redis.Redis.from_url(s.found.redis.url).flushdb()
    s.sink.clear()


def _run_workers(s: Setup, kind: str, env: dict[str, str], module: str | None) -> LoadRun:
    from harness.workers import WorkerGroup

    group = WorkerGroup(
        env,
        processes=s.processes,
        threads=s.threads,
        module=module,
        log_path=s.log_dir / f"{s.scenario.name}-{kind}-workers.log",
    )
    group.start(wait_for_children=False)
    try:
        return measure(
            kind,
            len(s.bookings),
            lambda: eml_count(s.sink.store),
            {"workers": lambda: tree(group.pid), **s.base_groups()},
            timeout=600.0,
            failed=lambda: _exited(group),
            database_url=s.found.database_url,
        )
    finally:
        group.stop()


def _sent_rows(s: Setup, table: str) -> int:
    import psycopg

    with psycopg.connect(s.found.database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE state = 'sent'").fetchone()
    return int(row[0]) if row else 0


def run_pipeline(s: Setup) -> LoadRun:
    from service.actors.emails import send_booking_email

    _reset(s, "email_deliveries, dead_letters")
    for booking_id in s.bookings:
        send_booking_email.send(booking_id, "confirmed")
    env = s.env(
        LOG_LEVEL="INFO",
        PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="booking-bench-prom-"),
        **s.scenario.pipeline_env,
    )
    result = _run_workers(s, "pipeline", env, module=None)
    sent = _sent_rows(s, "email_deliveries")
    if eml_count(s.sink.store) != len(s.bookings) or sent != len(s.bookings):
        raise RuntimeError(f"pipeline run inconsistent: {sent} rows sent for {len(s.bookings)}")
    return result


def run_plain(s: Setup) -> LoadRun:
    _reset(s, "bench_plain_claims")
    for booking_id in s.bookings:
        s.plain_actor.send(booking_id, "confirmed")
    env = s.env(BENCH_PLAIN_POOL_SIZE=str(s.threads))
    result = _run_workers(s, "plain", env, module="bench.plain_actors")
    sent = _sent_rows(s, "bench_plain_claims")
    if eml_count(s.sink.store) != len(s.bookings) or sent != len(s.bookings):
        raise RuntimeError(f"plain run inconsistent: {sent} rows sent for {len(s.bookings)}")
    return result


def run_smtp(s: Setup) -> LoadRun:
    s.sink.clear()
    total = len(s.bookings)
    shares = [total // s.processes + (i < total % s.processes) for i in range(s.processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.smtp_load",
                "--port",
                str(s.sink.port),
                "--message",
                str(s.message_file),
                "--count",
                str(share),
                "--threads",
                str(s.threads),
            ],
            cwd=ROOT,
        )
        for share in shares
    ]
    try:
        groups = {"smtp clients": lambda: [p.pid for p in procs], **s.base_groups()}
        result = measure(
            "smtp",
            total,
            lambda: eml_count(s.sink.store),
            groups,
            timeout=600.0,
            failed=lambda: "an SMTP client failed" if any(p.poll() for p in procs) else None,
            database_url=s.found.database_url,
        )
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    if any(p.returncode for p in procs):
        raise RuntimeError("an SMTP load client failed")
    return result


# --- where the pipeline's time goes --------------------------------------------------------------


def phase_profile(s: Setup, count: int) -> dict[str, Any]:
    """Run ``deliver()`` ``count`` times in this process, one thread, timing each phase."""
    import psycopg

    from service.emails import deliveries, pipeline
    from service.emails.models import EmailPayload
    from service.emails.rules import Attempt

    found = s.found
    with psycopg.connect(found.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE email_deliveries, dead_letters")
    s.sink.clear()
    room = s.app.mailroom
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall[name] = wall.get(name, 0.0) + time.perf_counter() - w0
                cpu[name] = cpu.get(name, 0.0) + time.thread_time() - c0

        return wrapper

    originals: dict[tuple[Any, str], Callable[..., Any]] = {
        (module, attr): getattr(module, attr)
        for module, attr in (
            (deliveries, "claim"),
            (deliveries, "finish"),
            (pipeline, "render"),
        )
    }
    labels = {
        "claim": "DB: load booking + claim the request row with a lease (1 query)",
        "finish": "DB: record sent under the lease (1 query)",
        "render": "render to wire bytes (Jinja text + HTML, iCalendar, MIME)",
    }
    smtp_label = "SMTP: send the bytes over the reused connection"
    payloads = [EmailPayload.from_call((b, "confirmed"), None) for b in s.bookings[:count]]
    warm = 20
    for p in payloads[:warm]:
        pipeline.deliver(room, p, Attempt(1, False))
    timed_room = replace(room, send=timed(smtp_label, room.send))
    try:
        for (module, attr), fn in originals.items():
            setattr(module, attr, timed(labels[attr], fn))
        w0, c0 = time.perf_counter(), time.thread_time()
        for p in payloads[warm:]:
            pipeline.deliver(timed_room, p, Attempt(1, False))
        total_wall, total_cpu = time.perf_counter() - w0, time.thread_time() - c0
    finally:
        for (module, attr), fn in originals.items():
            setattr(module, attr, fn)
    n = len(payloads) - warm
    rest_wall = total_wall - sum(wall.values())
    rest_cpu = total_cpu - sum(cpu.values())
    phases = {
        name: {"wall_us": wall[name] / n * 1e6, "cpu_us": cpu[name] / n * 1e6} for name in wall
    }
    phases["the rest: two pool checkouts, payload, decisions, metrics, logs"] = {
        "wall_us": rest_wall / n * 1e6,
        "cpu_us": rest_cpu / n * 1e6,
    }
    return {
        "emails": n,
        "total_wall_us": total_wall / n * 1e6,
        "total_cpu_us": total_cpu / n * 1e6,
        "phases": phases,
    }


def pyinstrument_profile(s: Setup, count: int) -> str:
    """A pyinstrument text profile of ``deliver()`` in this process (written next to the JSON)."""
    import psycopg
    from pyinstrument import Profiler

    from service.emails import pipeline
    from service.emails.models import EmailPayload
    from service.emails.rules import Attempt

    with psycopg.connect(s.found.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE email_deliveries, dead_letters")
    payloads = [EmailPayload.from_call((b, "confirmed"), None) for b in s.bookings[:count]]
    room = s.app.mailroom
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for p in payloads:
        pipeline.deliver(room, p, Attempt(1, False))
    profiler.stop()
    text = str(profiler.output_text(unicode=False, color=False, show_all=False))
    text = text.replace(f"{ROOT}/", "")  # paths relative to the repository
    (RESULTS / f"{NAME}_profile.txt").write_text(text)
    return text


# --- the benchmark ----------------------------------------------------------------------------


def _seed(database_url: str, count: int) -> list[str]:
    import psycopg

    from bench.plain_job import CLAIMS_DDL
    from harness.factories import insert_booking, insert_venue

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(CLAIMS_DDL)
        venue = insert_venue(conn, name="Bench Bistro")
        with conn.transaction():
            return [str(insert_booking(conn, venue, status="confirmed")) for _ in range(count)]


def _message_file(app: Any, booking_id: str, directory: Path) -> Path:
    """One booking email rendered exactly as the pipeline renders it: its wire bytes."""
    import uuid

    from service.emails import deliveries
    from service.emails.models import utcnow
    from service.emails.render import render
    from service.emails.rules import EmailType

    with app.db.transaction() as conn:
        booking = deliveries.load_booking(conn, uuid.UUID(booking_id))
    assert booking is not None
    path = directory / "message.eml"
    path.write_bytes(render(booking, EmailType.CONFIRMED, app.settings.sender, utcnow()).data)
    return path


def _thin(curve: list[tuple[float, int]], points: int = 100) -> list[tuple[float, int]]:
    """At most about ``points`` samples of a completion curve, its last one kept."""
    step = max(1, len(curve) // points)
    return curve[::step] + ([curve[-1]] if curve and (len(curve) - 1) % step else [])


def _summary(runs: dict[str, list[LoadRun]], per_round: list[dict[str, LoadRun]]) -> dict[str, Any]:
    def ratio(a: str, b: str, of: Callable[[LoadRun], float]) -> dict[str, Any]:
        values = [of(r[a]) / of(r[b]) for r in per_round]
        return {"median": median(values), "samples": values}

    return {
        "rates_per_second": {
            k: {"median": median([r.rate for r in rs]), "samples": [r.rate for r in rs]}
            for k, rs in runs.items()
        },
        "cpu_ms_per_email_total": {
            k: {
                "median": median([r.cpu_ms_total for r in rs]),
                "samples": [r.cpu_ms_total for r in rs],
            }
            for k, rs in runs.items()
        },
        "cpu_ms_per_email": {
            k: {
                name: median([r.cpu_ms_per_message.get(name, 0.0) for r in rs])
                for name in rs[0].cpu_ms_per_message
            }
            for k, rs in runs.items()
        },
        "active_connections": {
            k: {
                "max": max(max(r.active_connections, default=0) for r in rs),
                "median": median([v for r in rs for v in r.active_connections] or [0]),
                "samples": sum(len(r.active_connections) for r in rs),
            }
            for k, rs in runs.items()
        },
        "ratios": {
            "pipeline_to_plain_rate": ratio("pipeline", "plain", lambda r: r.rate),
            "pipeline_to_smtp_rate": ratio("pipeline", "smtp", lambda r: r.rate),
            "pipeline_to_plain_cpu": ratio("pipeline", "plain", lambda r: r.cpu_ms_total),
        },
        "curves": {k: [_thin(r.curve) for r in rs] for k, rs in runs.items()},
    }


def _verdicts(sc: Scenario, summary: dict[str, Any]) -> dict[str, bool]:
    ratios, t = summary["ratios"], sc.targets
    met: dict[str, bool] = {}
    if "pipeline_to_plain_rate_min" in t:
        met["pipeline_to_plain_rate"] = (
            ratios["pipeline_to_plain_rate"]["median"] >= t["pipeline_to_plain_rate_min"]
        )
    if "pipeline_to_plain_cpu_max" in t:
        met["pipeline_to_plain_cpu"] = (
            ratios["pipeline_to_plain_cpu"]["median"] <= t["pipeline_to_plain_cpu_max"]
        )
    if "pipeline_to_smtp_rate_min" in t:
        met["pipeline_to_smtp_rate"] = (
            ratios["pipeline_to_smtp_rate"]["median"] >= t["pipeline_to_smtp_rate_min"]
        )
    if "max_active_connections" in t:
        met["max_active_connections"] = (
            summary["active_connections"]["pipeline"]["max"] <= t["max_active_connections"]
        )
    return met


def run_scenario(s: Setup, rounds: int) -> dict[str, Any]:
    sc = s.scenario
    loads: dict[str, Callable[[], LoadRun]] = {
        "pipeline": lambda: run_pipeline(s),
        "plain": lambda: run_plain(s),
        "smtp": lambda: run_smtp(s),
    }
    runs: dict[str, list[LoadRun]] = {k: [] for k in KINDS}
    per_round: list[dict[str, LoadRun]] = []
    for k in range(rounds):
        this_round: dict[str, LoadRun] = {}
        for kind in KINDS[k % 3 :] + KINDS[: k % 3]:
            run = loads[kind]()
            this_round[kind] = run
            runs[kind].append(run)
            say(
                f"{sc.name} round {k + 1}/{rounds} {kind}: {run.rate:,.0f} emails/s, "
                f"{run.cpu_ms_total:.2f} ms CPU/email, "
                f"max {max(run.active_connections, default=0)} connections not idle"
            )
        per_round.append(this_round)
    summary = _summary(runs, per_round)
    return {
        "scenario": sc.name,
        "title": sc.title,
        "smtp_data_delay_seconds": sc.data_delay,
        "processes": sc.processes,
        "threads": sc.threads,
        "emails": len(s.bookings),
        "smtp_server_processes": sc.smtp_processes,
        "pipeline_env": sc.pipeline_env,
        "rounds": rounds,
        "targets": sc.targets,
        **summary,
        "met": _verdicts(sc, summary),
    }


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    load_before = os.getloadavg()[0]
    n_max = max(sc.quick_emails if quick else sc.emails for sc in SCENARIOS)
    with servers(postgres=True, redis=True, smtp=False) as found:
        from bench.plain_job import declare
        from bench.stock_actors import stock_broker

        assert found.redis is not None
        sinks = {
            sc.name: SmtpSink.start_new(data_delay=sc.data_delay, processes=sc.smtp_processes)
            for sc in SCENARIOS
        }
        for sink in sinks.values():
            found.stack.callback(sink.destroy)
        first = sinks[SCENARIOS[0].name]
        found.env["SMTP_URL"] = first.url  # the in-process App (phase profile) sends there
        app = found.stack.enter_context(service_app(found.env))
        plain_broker = stock_broker(found.redis.url)
        found.stack.callback(plain_broker.close)
        plain_actor = declare(plain_broker)
        work = Path(tempfile.mkdtemp(prefix="booking-bench-tp-"))
        say(f"seeding {n_max} confirmed bookings")
        bookings = _seed(found.database_url, n_max)
        message = _message_file(app, bookings[0], work)
        scenarios: list[dict[str, Any]] = []
        for sc in SCENARIOS:
            n = sc.quick_emails if quick else sc.emails
            s = Setup(found, app, sc, sinks[sc.name], bookings[:n], message, work, plain_actor)
            scenarios.append(run_scenario(s, rounds))
        s = Setup(found, app, SCENARIOS[0], first, bookings, message, work, plain_actor)
        say("timing deliver() phases in-process")
        phases = phase_profile(s, 300 if quick else 1000)
        say("pyinstrument profile of deliver()")
        pyinstrument_profile(s, 300)
    result = {
        "window": list(WINDOW),
        "quick": quick,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "scenarios": scenarios,
        "deliver_phases_single_thread": phases,
    }
    write_json(NAME, result)
    _chart(result)
    return result


def _chart(result: dict[str, Any]) -> None:
    fig, axes = figure(ncols=len(result["scenarios"]), width=5.0)
    colours = {"pipeline": "#36c", "plain": "#c63", "smtp": "#6a9"}
    for ax, sc in zip(axes, result["scenarios"], strict=True):
        rates = [sc["rates_per_second"][k]["median"] for k in KINDS]
        bars = ax.bar(
            ["pipeline", "plain job", "SMTP alone"], rates, color=[colours[k] for k in KINDS]
        )
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel("emails per second (median)")
        ax.set_title(f"{sc['title']}\n{sc['processes']} processes x {sc['threads']} threads")
    save_png(NAME, fig)


def _scenario_markdown(sc: dict[str, Any]) -> str:
    r, cpu, act, ratios = (
        sc["rates_per_second"],
        sc["cpu_ms_per_email_total"],
        sc["active_connections"],
        sc["ratios"],
    )
    names = {"pipeline": "**pipeline**", "plain": "plain Dramatiq job", "smtp": "SMTP server alone"}
    rows = [
        [
            names[k],
            f"{r[k]['median']:,.0f}",
            f"{cpu[k]['median']:.2f}",
            f"{act[k]['max']} / {act[k]['median']:.0f}",
        ]
        for k in KINDS
    ]
    met, t = sc["met"], sc["targets"]

    def ratio(name: str) -> str:
        samples = ", ".join(f"{v:.2f}" for v in ratios[name]["samples"])
        return f"{ratios[name]['median']:.2f}x" + (f" ({samples})" if sc["rounds"] > 1 else "")

    checks = [
        ["pipeline / plain, emails/s", ratio("pipeline_to_plain_rate"),
         f"≥ {t['pipeline_to_plain_rate_min']}x: {verdict(met.get('pipeline_to_plain_rate'))}"
         if "pipeline_to_plain_rate_min" in t else ""],
        ["pipeline / plain, CPU per email", ratio("pipeline_to_plain_cpu"),
         f"≤ {t['pipeline_to_plain_cpu_max']}x: {verdict(met.get('pipeline_to_plain_cpu'))}"
         if "pipeline_to_plain_cpu_max" in t else ""],
        ["pipeline / SMTP alone, emails/s", ratio("pipeline_to_smtp_rate"),
         f"≥ {t['pipeline_to_smtp_rate_min']}x: {verdict(met.get('pipeline_to_smtp_rate'))}"
         if "pipeline_to_smtp_rate_min" in t else ""],
        ["pipeline, Postgres connections not idle (max)", str(act["pipeline"]["max"]),
         f"≤ {t['max_active_connections']:.0f}: {verdict(met.get('max_active_connections'))}"
         if "max_active_connections" in t else ""],
    ]  # fmt: skip
    env = ", ".join(f"`{k}={v}`" for k, v in sc["pipeline_env"].items())
    cpu_by = sc["cpu_ms_per_email"]
    procs = sorted({n for k in cpu_by.values() for n in k if n != BENCH_PROCESS})
    cpu_rows = [[n, *(f"{cpu_by[k].get(n, 0.0):.2f}" for k in KINDS)] for n in procs]
    return (
        f"#### {sc['title']}: {sc['processes']} processes x {sc['threads']} threads, "
        f"{sc['emails']:,} emails\n\n"
        f"SMTP server: {sc['smtp_server_processes']} aiosmtpd process(es) on one port"
        + (f", each DATA answered after {sc['smtp_data_delay_seconds'] * 1000:.0f} ms" if sc["smtp_data_delay_seconds"] else "")
        + (f"; pipeline workers with {env}" if env else "")
        + f". Medians of {sc['rounds']} round(s).\n\n"
        + md_table(["load", "emails/s", "CPU ms per email (all processes)", "Postgres connections not idle, max / median"], rows)
        + "\n\n"
        + md_table(["measure", "median (each round)", "target"], checks)
        + "\n\nCPU ms per email by process:\n\n"
        + md_table(["process", "pipeline", "plain job", "SMTP alone"], cpu_rows)
        + "\n"
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    ph = result["deliver_phases_single_thread"]
    phase_rows = [
        [name, f"{v['wall_us']:.0f}", f"{v['cpu_us']:.0f}"]
        for name, v in sorted(ph["phases"].items(), key=lambda kv: -kv[1]["wall_us"])
    ]
    phase_rows.append(
        ["**deliver() total**", f"**{ph['total_wall_us']:.0f}**", f"**{ph['total_cpu_us']:.0f}**"]
    )
    return (
        "### 2. Worker throughput: the pipeline beside a plain Dramatiq job and the SMTP server\n\n"
        "Loads in rotating order each round, on the same servers; rate over the 20-90 % "
        "completion window; CPU per email of every process involved (workers, Postgres, Redis, "
        "SMTP server; the SMTP clients for the SMTP-alone load) from `/proc` over that window; "
        "Postgres connections not idle sampled every 0.5 s"
        + (" (quick run)" if result["quick"] else "")
        + ". The machine's 1-minute load average was "
        + "{start:.1f} at the start and {end:.1f} at the end".format(**result["load_average_1min"])
        + " (2 cores, shared: above 2, other work competed with every load).\n\n"
        + "\n".join(_scenario_markdown(sc) for sc in result["scenarios"])
        + f"\n`deliver()` phases, one thread in-process ({ph['emails']} emails, µs per email):\n\n"
        + md_table(["phase", "wall µs", "CPU µs"], phase_rows)
        + "\n\npyinstrument profile: [throughput_profile.txt](throughput_profile.txt).\n"
        + "\n![throughput](throughput.png)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    write_section(NAME, markdown(run(args.quick)))


if __name__ == "__main__":
    main()
