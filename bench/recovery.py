"""Crash recovery: from ``kill -9`` of a busy worker process to redelivery of its messages.

Four cases, each in its own process with its own servers:

- ``redis-ours``: ``python -m service worker`` with our settings (heartbeat timeout 15 s,
  maintenance every 5 s per worker process), sending real emails to an SMTP server that waits
  0.3 s per recipient so that workers are busy when one is killed.
- ``redis-stock``: ``dramatiq bench.raw_actors`` on a stock RedisBroker (heartbeat timeout
  60 s, maintenance on 0.1 % of commands), an actor that sleeps 0.3 s.
- ``rabbitmq-ours`` / ``rabbitmq-stock``: the same two on RabbitMQ.

Like Kubernetes restarting the pod, the workers are started again as soon as Dramatiq's
parent has exited (it stops the surviving processes when one dies). On Redis, "requeued" is
when the killed process's ack sets are empty again (maintenance moved its messages back);
"all done" is when every message has been processed. RabbitMQ returns unacked messages when
the connection drops, so only "all done" is observable there. The stock Redis case is bounded;
past the bound it reports "> bound" and the expected time computed from the command rate
measured while waiting. Target: at most 30 s on Redis (ours).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
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

NAME = "recovery"
TARGET_SECONDS = 30.0
MESSAGES = 40
BUSY_SECONDS = 0.3
CASES = ("redis-ours", "redis-stock", "rabbitmq-ours", "rabbitmq-stock")
QUEUE = "pending-booking-emails"


def _ack_sets(client: Any, queue: str) -> dict[bytes, int]:
    return {
        k: int(client.scard(k))
        for k in client.keys(f"dramatiq:__acks__.*.{queue}")
        if client.scard(k)
    }


def _evalsha_calls(client: Any) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def run_case(case: str, bound: float) -> dict[str, Any]:
    """One kill -9 and recovery; runs in a process of its own (the broker is chosen at import)."""
    from harness.workers import WorkerGroup

    broker_kind, flavour = case.split("-")
    ours = flavour == "ours"
    with servers(
        postgres=ours, redis=broker_kind == "redis", smtp=ours, smtp_delay=BUSY_SECONDS
    ) as found:
        broker_url = found.env["BROKER_URL"]
        if broker_kind == "rabbitmq":
            from harness.servers import RabbitServer

            rabbit = RabbitServer.start_new()
            found.stack.callback(rabbit.stop)
            broker_url = rabbit.url
        done_dir = Path(tempfile.mkdtemp(prefix="booking-bench-done-"))
        log = Path(tempfile.mkdtemp(prefix="booking-bench-rec-")) / "workers.log"
        env = {
            **found.env,
            "BROKER_URL": broker_url,
            "LOG_LEVEL": "WARNING",
            "BENCH_DONE_DIR": str(done_dir),
            "BENCH_SLOW_SECONDS": str(BUSY_SECONDS),
        }
        if ours:
            import psycopg

            from harness.factories import insert_booking, insert_venue
            from service.actors.emails import send_booking_email

            found.stack.enter_context(service_app(env))
            with psycopg.connect(found.database_url, autocommit=True) as conn:
                venue = insert_venue(conn)
                ids = [insert_booking(conn, venue, status="confirmed") for _ in range(MESSAGES)]
            for booking_id in ids:
                send_booking_email.send(str(booking_id), "confirmed")
            assert found.smtp is not None
            smtp = found.smtp

            def done() -> int:
                return smtp.count()

            module, queue = None, QUEUE
        else:
            from bench.stock_actors import SLOW_QUEUE, declare, stock_broker

            stock = declare(stock_broker(broker_url))
            found.stack.callback(stock.broker.close)
            for i in range(MESSAGES):
                stock.slow.send(i)

            def done() -> int:
                return sum(1 for _ in done_dir.iterdir())

            module, queue = "bench.raw_actors", SLOW_QUEUE
        client = None
        if broker_kind == "redis":
            import redis

            assert found.redis is not None
            client = redis.Redis.from_url(found.redis.url)

        def group() -> WorkerGroup:
            return WorkerGroup(env, processes=2, threads=4, module=module, log_path=log).start()

        workers = group()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            busy = client is None or sum(_ack_sets(client, queue).values()) > 0
            if done() >= 3 and busy:
                break
            time.sleep(0.05)
        else:
            workers.kill_all()
            raise RuntimeError(f"{case}: the workers never got busy; see {log}")
        done_before = done()
        killed_at = time.monotonic()
        victim = workers.kill_child()
        if workers.wait_exit(90) is None:
            workers.kill_all()
            raise RuntimeError(f"{case}: Dramatiq's parent did not exit after kill -9")
        orphaned = _ack_sets(client, queue) if client is not None else {}
        parent_exit = time.monotonic() - killed_at
        workers = group()
        restarted = time.monotonic() - killed_at
        result: dict[str, Any] = {
            "case": case,
            "messages": MESSAGES,
            "done_before_kill": done_before,
            "orphaned_messages": sum(orphaned.values()) if client is not None else None,
            "parent_exit_s": parent_exit,
            "restarted_s": restarted,
            "requeued_s": None,
            "all_done_s": None,
            "bounded_at_s": bound,
        }
        calls0, t0 = (_evalsha_calls(client), time.monotonic()) if client is not None else (0, 0.0)
        try:
            while time.monotonic() - killed_at < bound:
                now = time.monotonic() - killed_at
                if (
                    client is not None
                    and result["requeued_s"] is None
                    and not _ack_sets(client, queue).keys() & orphaned.keys()
                ):
                    result["requeued_s"] = now
                if result["all_done_s"] is None and done() >= MESSAGES:
                    result["all_done_s"] = now
                if result["all_done_s"] is not None and (client is None or result["requeued_s"]):
                    break
                time.sleep(0.1)
            if client is not None:
                elapsed = time.monotonic() - t0
                rate = (_evalsha_calls(client) - calls0) / elapsed
                result["dispatch_calls_per_s"] = rate
                if not ours:
                    from dramatiq.brokers.redis import (
                        DEFAULT_HEARTBEAT_TIMEOUT,
                        DEFAULT_MAINTENANCE_CHANCE,
                        MAINTENANCE_SCALE,
                    )

                    # Idle consumers poll the queue and its delay queue alike: half the calls
                    # concern the queue whose acks the maintenance pass must visit.
                    chance = DEFAULT_MAINTENANCE_CHANCE / MAINTENANCE_SCALE
                    per_queue = rate / 2
                    result["expected_requeue_s"] = DEFAULT_HEARTBEAT_TIMEOUT / 1000 + (
                        1 / (chance * per_queue) if per_queue else float("inf")
                    )
                    result["maintenance_chance"] = chance
        finally:
            workers.stop()
        result["victim_pid"] = victim
        return result


def _run_in_subprocess(case: str, bound: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recovery", "--case", case, "--bound", str(bound)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=bound + 600,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"recovery case {case} failed (exit {proc.returncode})")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 1 if quick else 3
    stock_bound = 120.0 if quick else 300.0
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    for case in CASES:
        n = 1 if case == "redis-stock" else repeats
        for k in range(n):
            bound = stock_bound if case == "redis-stock" else 180.0
            say(f"{case} run {k + 1}/{n} (bounded at {bound:.0f} s)")
            r = _run_in_subprocess(case, bound)
            say(f"{case}: requeued {r['requeued_s']}, all done {r['all_done_s']}")
            results[case].append(r)

    def med(case: str, key: str) -> float | None:
        values = [r[key] for r in results[case] if r[key] is not None]
        return median(values) if len(values) == len(results[case]) else None

    summary = {
        case: {
            "requeued_s": med(case, "requeued_s"),
            "all_done_s": med(case, "all_done_s"),
            "restarted_s": med(case, "restarted_s"),
        }
        for case in CASES
    }
    stock = results["redis-stock"][0]
    summary["redis-stock"]["expected_requeue_s"] = stock.get("expected_requeue_s")
    ours = summary["redis-ours"]["all_done_s"]
    result = {
        "target_seconds_max": TARGET_SECONDS,
        "messages": MESSAGES,
        "busy_seconds_per_message": BUSY_SECONDS,
        "repeats": repeats,
        "stock_bound_s": stock_bound,
        "summary": summary,
        "runs": results,
        "met": ours is not None and ours <= TARGET_SECONDS,
    }
    write_json(NAME, result)
    _chart(result)
    return result


def _fmt(value: float | None, bound: float) -> str:
    return f"> {bound:.0f} s (bound)" if value is None else f"{value:.1f} s"


def _chart(result: dict[str, Any]) -> None:
    fig, (ax,) = figure(width=7)
    s = result["summary"]
    labels, values, colors = [], [], []
    for case in CASES:
        v = s[case]["all_done_s"]
        labels.append(case)
        values.append(v if v is not None else result["stock_bound_s"])
        colors.append("#36c" if case.endswith("ours") else ("#c63" if v is None else "#999"))
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(
        bars,
        labels=[
            f"{v:.0f}s" if s[c]["all_done_s"] is not None else f">{v:.0f}s (bound)"
            for c, v in zip(CASES, values, strict=True)
        ],
    )
    expected = s["redis-stock"].get("expected_requeue_s")
    if expected:
        ax.scatter(
            ["redis-stock"],
            [expected],
            marker="x",
            color="black",
            zorder=3,
            label=f"stock Redis expected ≈ {expected:.0f} s",
        )
    ax.axhline(
        TARGET_SECONDS, color="red", linestyle="--", label=f"target {TARGET_SECONDS:.0f} s (Redis)"
    )
    ax.set_yscale("log")
    ax.set_ylabel("seconds from kill -9 to every message processed")
    ax.set_title("Crash recovery (median)")
    ax.legend(fontsize=8)
    save_png(NAME, fig)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    bound = result["stock_bound_s"]
    rows = []
    for case in CASES:
        requeued = s[case]["requeued_s"]
        row = [
            f"`{case}`",
            "n/a (on connection loss)" if case.startswith("rabbit") else _fmt(requeued, bound),
            _fmt(s[case]["all_done_s"], bound if case == "redis-stock" else 180.0),
            f"{s[case]['restarted_s']:.1f} s",
            "",
        ]
        if case == "redis-ours":
            row[4] = f"≤ {TARGET_SECONDS:.0f} s: {verdict(result['met'])}"
        if case == "redis-stock" and s[case].get("expected_requeue_s"):
            row[4] = f"expected ≈ {s[case]['expected_requeue_s']:.0f} s"
        rows.append(row)
    return (
        "### 3. Crash recovery after `kill -9` of a busy worker\n\n"
        f"{result['messages']} messages of {result['busy_seconds_per_message']} s each, 2 processes x "
        f"4 threads, workers restarted as soon as Dramatiq's parent exits; median of "
        f"{result['repeats']} run(s) (stock Redis: one run, bounded at {bound:.0f} s; its "
        "expected time = 60 s heartbeat timeout + 1 / (0.1 % x dispatch calls per second on "
        "the queue, measured while waiting)).\n\n"
        + md_table(
            [
                "case",
                "requeued after kill",
                "all processed after kill",
                "workers back after",
                "target",
            ],
            rows,
        )
        + "\n\n![recovery](recovery.png)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", choices=CASES, help="run one case here and print its JSON")
    parser.add_argument("--bound", type=float, default=180.0)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.bound)), flush=True)
        return
    write_section(NAME, markdown(run(args.quick)))


if __name__ == "__main__":
    main()
