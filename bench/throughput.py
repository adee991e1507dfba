"""Worker throughput of the whole email pipeline beside two ceilings, in one run.

Three loads, in rotating order each round, on the same servers and machine:

- ``pipeline``: real ``python -m service worker`` processes (production settings: INFO JSON logs,
  Prometheus multiprocess mode) consume ``send_booking_email`` messages; each loads the
  booking and claims the request row, renders, sends over SMTP and records the delivery.
- ``raw``: a stock Dramatiq no-op actor with the same processes and threads (Dramatiq's ceiling).
- ``smtp``: the same SMTP server driven by as many plain SMTP clients (processes x threads),
  each sending a pre-rendered booking email (the SMTP server's ceiling).

The SMTP server (aiosmtpd, storing each message as a file) runs in its own process. Rates are
taken over the 20 % to 90 % completion window, so worker boot and the tail are excluded. CPU
seconds per message of every process involved are sampled from ``/proc`` over the same
window, and a single-threaded in-process run of ``deliver()`` times its phases.
Target: the pipeline at least 0.7x the SMTP-server-alone ceiling.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
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

NAME = "throughput"
TARGET_RATIO = 0.7
WINDOW = (0.2, 0.9)
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
) -> LoadRun:
    """Poll ``done()`` until ``total`` (bounded by ``timeout``), sampling each group's CPU."""
    start = time.monotonic()
    samples: list[tuple[float, int, dict[str, float]]] = []
    while True:
        now = time.monotonic() - start
        n = done()
        cpu = {name: cpu_seconds(pids()) for name, pids in groups.items()}
        cpu["bench (this process)"] = sum(os.times()[:2])
        samples.append((now, n, cpu))
        if n >= total:
            break
        problem = failed()
        if problem:
            raise RuntimeError(f"{kind}: {problem} ({n}/{total} done)")
        if now > timeout:
            raise TimeoutError(f"{kind}: only {n}/{total} done after {timeout:.0f} s")
        time.sleep(interval)
    t_lo, t_hi = (_crossing(samples, total * q) for q in WINDOW)
    window = max(t_hi - t_lo, 1e-6)
    per_msg = total * (WINDOW[1] - WINDOW[0])
    c_lo, c_hi = _cpu_at(samples, t_lo), _cpu_at(samples, t_hi)
    cpu_ms = {name: (c_hi[name] - c_lo.get(name, 0.0)) * 1000 / per_msg for name in c_hi}
    curve = [(round(t, 3), n) for t, n, _ in samples]
    return LoadRun(kind, total, per_msg / window, window, cpu_ms, curve)


def eml_count(store: Path) -> int:
    with os.scandir(store) as entries:
        return sum(1 for e in entries if e.name.endswith(".eml"))


# --- the three loads ----------------------------------------------------------------------------


@dataclass
class Setup:
    found: Any
    app: Any
    stock: Any
    processes: int
    threads: int
    bookings: list[str]
    message_file: Path
    log_dir: Path

    def base_groups(self) -> dict[str, Callable[[], list[int]]]:
        found = self.found
        pg_pid = postmaster_pid(found.pg.datadir)
        return {
            "smtp server": lambda: [found.smtp.proc.pid],
            "postgres": lambda: tree(pg_pid),
            "redis": lambda: [found.redis.proc.pid],
        }


def _exited(group: Any) -> str | None:
    code = group.proc.poll() if group.proc else None
    return None if code is None else f"the workers exited with {code}; see their log"


def run_pipeline(s: Setup, timeout: float) -> LoadRun:
    import psycopg
    import redis

    from harness.workers import WorkerGroup
    from service.actors.emails import send_booking_email

    found = s.found
    with psycopg.connect(found.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE email_deliveries, dead_letters")
    redis.Redis.from_url(found.redis.url).flushdb()
    found.smtp.clear()
    for booking_id in s.bookings:
        send_booking_email.send(booking_id, "confirmed")
    metrics_dir = tempfile.mkdtemp(prefix="booking-bench-prom-")
    env = {**found.env, "LOG_LEVEL": "INFO", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    group = WorkerGroup(
        env, processes=s.processes, threads=s.threads, log_path=s.log_dir / "pipeline-workers.log"
    )
    group.start(wait_for_children=False)
    try:
        groups = {"workers": lambda: tree(group.pid), **s.base_groups()}
        result = measure(
            "pipeline",
            len(s.bookings),
            lambda: eml_count(found.smtp.store),
            groups,
            timeout,
            failed=lambda: _exited(group),
        )
    finally:
        group.stop()
    with psycopg.connect(found.database_url) as conn:
        sent = conn.execute("SELECT count(*) FROM email_deliveries WHERE state = 'sent'").fetchone()
    if eml_count(found.smtp.store) != len(s.bookings) or not sent or sent[0] != len(s.bookings):
        raise RuntimeError(f"pipeline run inconsistent: {sent} rows sent for {len(s.bookings)}")
    return result


def run_raw(s: Setup, total: int, timeout: float) -> LoadRun:
    import redis

    from bench.stock_actors import RAW_QUEUE
    from harness.workers import WorkerGroup

    client = redis.Redis.from_url(s.found.redis.url)
    client.flushdb()
    for i in range(total):
        s.stock.noop.send(s.bookings[i % len(s.bookings)], "confirmed")
    key = f"dramatiq:{RAW_QUEUE}.msgs"
    group = WorkerGroup(
        dict(s.found.env),
        processes=s.processes,
        threads=s.threads,
        module="bench.raw_actors",
        log_path=s.log_dir / "raw-workers.log",
    )
    group.start(wait_for_children=False)
    try:
        groups = {"workers": lambda: tree(group.pid), **s.base_groups()}
        return measure(
            "raw",
            total,
            lambda: total - int(client.hlen(key)),
            groups,
            timeout,
            failed=lambda: _exited(group),
        )
    finally:
        group.stop()


def run_smtp(s: Setup, total: int, timeout: float) -> LoadRun:
    found = s.found
    found.smtp.clear()
    shares = [total // s.processes + (i < total % s.processes) for i in range(s.processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.smtp_load",
                "--port",
                str(found.smtp.port),
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
            lambda: eml_count(found.smtp.store),
            groups,
            timeout,
            failed=lambda: "an SMTP client failed" if any(p.poll() for p in procs) else None,
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
    found.smtp.clear()
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
        "render": "render (Jinja text + HTML, iCalendar, MIME)",
    }
    smtp_label = "SMTP: serialise + send over the reused connection"
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
    flatten = _flatten_cost(s, 200)
    rest_wall = total_wall - sum(wall.values())
    rest_cpu = total_cpu - sum(cpu.values())
    phases = {
        name: {"wall_us": wall[name] / n * 1e6, "cpu_us": cpu[name] / n * 1e6} for name in wall
    }
    phases["DB: pool checkout, BEGIN, COMMIT and the rest"] = {
        "wall_us": rest_wall / n * 1e6,
        "cpu_us": rest_cpu / n * 1e6,
    }
    return {
        "mime_serialisation_us": flatten,
        "emails": n,
        "total_wall_us": total_wall / n * 1e6,
        "total_cpu_us": total_cpu / n * 1e6,
        "phases": phases,
    }


def _flatten_cost(s: Setup, count: int) -> float:
    """CPU µs to flatten one rendered message to bytes the way ``smtplib.send_message`` does."""
    import io
    import uuid
    from email.generator import BytesGenerator

    from service.emails import deliveries
    from service.emails.models import utcnow
    from service.emails.render import render
    from service.emails.rules import EmailType

    with s.app.db.transaction() as conn:
        booking = deliveries.load_booking(conn, uuid.UUID(s.bookings[0]))
    assert booking is not None
    msg = render(booking, EmailType.CONFIRMED, s.app.settings.sender, utcnow())
    c0 = time.thread_time()
    for _ in range(count):
        BytesGenerator(io.BytesIO()).flatten(msg, linesep="\r\n")
    return (time.thread_time() - c0) / count * 1e6


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

    from harness.factories import insert_booking, insert_venue

    with psycopg.connect(database_url, autocommit=True) as conn:
        venue = insert_venue(conn, name="Bench Bistro")
        with conn.transaction():
            return [str(insert_booking(conn, venue, status="confirmed")) for _ in range(count)]


def _message_file(app: Any, booking_id: str, directory: Path) -> Path:
    """One booking email rendered exactly as the pipeline renders it, as bytes."""
    import uuid

    from service.emails import deliveries
    from service.emails.models import utcnow
    from service.emails.render import render
    from service.emails.rules import EmailType

    with app.db.transaction() as conn:
        booking = deliveries.load_booking(conn, uuid.UUID(booking_id))
    assert booking is not None
    msg = render(booking, EmailType.CONFIRMED, app.settings.sender, utcnow())
    path = directory / "message.eml"
    path.write_bytes(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))  # as smtplib sends it
    return path


def run(quick: bool = False, processes: int = 2, threads: int = 8) -> dict[str, Any]:
    rounds = 1 if quick else 3
    n_mail = 1000 if quick else 3000
    n_raw = 5000 if quick else 20000
    timeout = 300.0
    with servers(postgres=True, redis=True, smtp=True, smtp_delay=0.0) as found:
        from bench.stock_actors import declare, stock_broker

        assert found.redis is not None
        app = found.stack.enter_context(service_app(found.env))
        stock = declare(stock_broker(found.redis.url))
        found.stack.callback(stock.broker.close)
        work = Path(tempfile.mkdtemp(prefix="booking-bench-tp-"))
        say(f"seeding {n_mail} confirmed bookings")
        bookings = _seed(found.database_url, n_mail)
        s = Setup(
            found,
            app,
            stock,
            processes,
            threads,
            bookings,
            _message_file(app, bookings[0], work),
            work,
        )
        loads: dict[str, Callable[[], LoadRun]] = {
            "smtp": lambda: run_smtp(s, n_mail, timeout),
            "raw": lambda: run_raw(s, n_raw, timeout),
            "pipeline": lambda: run_pipeline(s, timeout),
        }
        order = list(loads)
        runs: dict[str, list[LoadRun]] = {k: [] for k in loads}
        ratios_smtp: list[float] = []
        ratios_raw: list[float] = []
        for k in range(rounds):
            this_round: dict[str, LoadRun] = {}
            for kind in order[k % 3 :] + order[: k % 3]:
                this_round[kind] = loads[kind]()
                say(f"round {k + 1}/{rounds} {kind}: {this_round[kind].rate:,.0f} messages/s")
                runs[kind].append(this_round[kind])
            ratios_smtp.append(this_round["pipeline"].rate / this_round["smtp"].rate)
            ratios_raw.append(this_round["pipeline"].rate / this_round["raw"].rate)
        say("timing deliver() phases in-process")
        phases = phase_profile(s, 300 if quick else 1000)
        say("pyinstrument profile of deliver()")
        pyinstrument_profile(s, 300)

    rates = {kind: median([r.rate for r in rs]) for kind, rs in runs.items()}
    cpu = {
        kind: {
            name: median([r.cpu_ms_per_message.get(name, 0.0) for r in rs])
            for name in rs[0].cpu_ms_per_message
        }
        for kind, rs in runs.items()
    }
    ratio = median(ratios_smtp)
    result = {
        "target_ratio_min": TARGET_RATIO,
        "processes": processes,
        "threads": threads,
        "rounds": rounds,
        "messages": {"pipeline": n_mail, "smtp": n_mail, "raw": n_raw},
        "window": list(WINDOW),
        "rates_per_second": {
            kind: {"median": rates[kind], "samples": [r.rate for r in rs]}
            for kind, rs in runs.items()
        },
        "ratio_pipeline_to_smtp": {"median": ratio, "samples": ratios_smtp},
        "ratio_pipeline_to_raw": {"median": median(ratios_raw), "samples": ratios_raw},
        "cpu_ms_per_message": cpu,
        "deliver_phases_single_thread": phases,
        "met": ratio >= TARGET_RATIO,
        "curves": {kind: [r.curve for r in rs] for kind, rs in runs.items()},
    }
    write_json(NAME, result)
    _chart(result, runs)
    return result


def _chart(result: dict[str, Any], runs: dict[str, list[LoadRun]]) -> None:
    fig, (left, right) = figure(ncols=2, width=5.5)
    names = {"raw": "raw no-op actor", "smtp": "SMTP server alone", "pipeline": "pipeline"}
    kinds = ["raw", "smtp", "pipeline"]
    rates = [result["rates_per_second"][k]["median"] for k in kinds]
    bars = left.bar([names[k] for k in kinds], rates, color=["#999", "#6a9", "#36c"])
    left.bar_label(bars, fmt="%.0f")
    smtp = result["rates_per_second"]["smtp"]["median"]
    left.axhline(
        TARGET_RATIO * smtp, color="red", linestyle="--", label=f"target {TARGET_RATIO}x SMTP alone"
    )
    left.set_yscale("log")
    left.set_ylabel("messages per second (median, log scale)")
    left.set_title(f"{result['processes']} processes x {result['threads']} threads")
    left.legend(fontsize=8)
    for kind in ("smtp", "pipeline"):
        curve = runs[kind][-1].curve
        right.plot([t for t, _ in curve], [n for _, n in curve], label=names[kind])
    right.set_xlabel("seconds since start")
    right.set_ylabel("messages done")
    right.set_title("Completion over time (last round)")
    right.legend(fontsize=8)
    save_png(NAME, fig)


def markdown(result: dict[str, Any]) -> str:
    r = result["rates_per_second"]
    rows = [
        ["raw no-op Dramatiq actor", f"{r['raw']['median']:,.0f} msg/s", ""],
        ["SMTP server alone (plain clients)", f"{r['smtp']['median']:,.0f} msg/s", ""],
        ["**pipeline**", f"**{r['pipeline']['median']:,.0f} emails/s**", ""],
        [
            "**pipeline / SMTP alone**",
            f"**{result['ratio_pipeline_to_smtp']['median']:.2f}x**",
            f"≥ {TARGET_RATIO}x: {verdict(result['met'])}",
        ],
        ["pipeline / raw actor", f"{result['ratio_pipeline_to_raw']['median']:.2f}x", ""],
    ]
    cpu = result["cpu_ms_per_message"]
    names = sorted({n for kind in cpu.values() for n in kind})
    cpu_rows = [
        [name, *(f"{cpu[k].get(name, 0.0):.2f}" for k in ("pipeline", "smtp", "raw"))]
        for name in names
    ]
    cpu_rows.append(
        ["**total**", *(f"**{sum(cpu[k].values()):.2f}**" for k in ("pipeline", "smtp", "raw"))]
    )
    ph = result["deliver_phases_single_thread"]
    phase_rows = [
        [name, f"{v['wall_us']:.0f}", f"{v['cpu_us']:.0f}"]
        for name, v in sorted(ph["phases"].items(), key=lambda kv: -kv[1]["wall_us"])
    ]
    phase_rows.append(
        ["**deliver() total**", f"**{ph['total_wall_us']:.0f}**", f"**{ph['total_cpu_us']:.0f}**"]
    )
    return (
        "### 2. Worker throughput: the whole pipeline beside two ceilings\n\n"
        f"{result['processes']} worker processes x {result['threads']} threads; medians of "
        f"{result['rounds']} rounds, loads in rotating order; rate over the 20-90 % completion "
        "window; SMTP server (aiosmtpd) in its own process.\n\n"
        + md_table(["load", "median", "target"], rows)
        + "\n\nCPU milliseconds per message over the same window (all processes on the 2 cores):\n\n"
        + md_table(["process", "pipeline", "SMTP alone", "raw actor"], cpu_rows)
        + f"\n\n`deliver()` phases, one thread in-process ({ph['emails']} emails, µs per email):\n\n"
        + md_table(["phase", "wall µs", "CPU µs"], phase_rows)
        + f"\n\nOf the SMTP phase, flattening the MIME message to bytes alone costs "
        f"{ph['mime_serialisation_us']:.0f} µs of CPU. pyinstrument profile: "
        "[throughput_profile.txt](throughput_profile.txt).\n"
        + "\n\n![throughput](throughput.png)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=8, help="per process (the chart's email workers: 2 x 8)"
    )
    args = parser.parse_args()
    write_section(NAME, markdown(run(args.quick, args.processes, args.threads)))


if __name__ == "__main__":
    main()
