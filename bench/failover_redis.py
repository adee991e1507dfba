"""Redis with Sentinel under fault injection: send the emails of N bookings while the Redis
primary is ``kill -9``-ed (Sentinel promotes a replica), a replica is stopped and its link to
the primary cut, and worker processes are ``kill -9``-ed, then check every email at the SMTP
server.

Each scenario is its own run on fresh servers (Postgres, an SMTP sink, and a Sentinel
deployment from ``harness.sentinel``: a primary, two replicas, three Sentinels with quorum 2 and
``down-after-milliseconds`` 1000), with ``BROKER_URL=redis+sentinel://...``:

- ``primary_kill``: ``kill -9`` of the primary under load; Sentinel promotes a replica; the old
  primary comes back and rejoins as a replica. One worker process ``kill -9``-ed as well.
- ``replica_outage``: a replica stopped and started again; then the other replica's link to the
  primary cut and restored (see ``harness.sentinel`` for how). One worker ``kill -9``-ed.
- ``combined``: all of the above in one run, plus the case that loses data by design: both
  replicas cut off while the primary goes on acknowledging enqueues, then the primary
  ``kill -9``-ed. The promoted replica never saw those enqueues (Redis replication is
  asynchronous); the reconciler finds their bookings without a delivery row after
  ``RECONCILE_GRACE_SECONDS`` and sends them. Two worker kills.

The producer, the reconciler thread (``reconcile`` every ``reconcile_every`` s, as the CronJob),
the pod supervisor, the drain and the counting are those of ``bench.chaos``.

Usage: ``python -m bench.failover_redis [--short] [--scenario NAME] [--out DIR]``. A full run
(2,000 bookings per scenario, the default 300 s reconcile grace) writes
``bench/results/failover_redis.{md,json}``; ``--short`` (the combined scenario with 250
bookings and an 8 s grace, run by ``tests/e2e/ha/test_redis_failover.py``) writes only with
``--out``. Exit status 0 means nothing lost and every duplicate explained in every scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.chaos import (
    Clock,
    Config,
    Event,
    Key,
    Run,
    fmt,
    passed,
    producer_decisions,
    received_ids,
    summarise,
)
from harness.factories import insert_venue
from harness.sentinel import RedisNode, SentinelDeployment
from harness.servers import PostgresServer, SmtpSink
from service.app import App
from service.db import migrate
from service.emails.models import EmailPayload
from service.emails.reconcile import reconcile
from service.worker import bind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCENARIOS: dict[str, tuple[tuple[str, float], ...]] = {
    "primary_kill": (("redis_primary_kill", 0.3), ("kill_9", 0.55)),
    "replica_outage": (("replica_stop", 0.2), ("link_cut", 0.45), ("kill_9", 0.65)),
    "combined": (
        ("kill_9", 0.1),
        ("replica_stop", 0.2),
        ("redis_primary_kill", 0.35),
        ("link_cut", 0.5),
        ("unreplicated_primary_kill", 0.62),
        ("kill_9", 0.8),
    ),
}
REDIS_FAULTS = ("redis_primary_kill", "replica_stop", "link_cut", "unreplicated_primary_kill")


@dataclass(frozen=True)
class FailoverConfig(Config):
    scenario: str = "combined"
    down_after_ms: int = 1000
    failover_timeout_ms: int = 6000
    replica_down: float = 10.0
    link_cut: float = 10.0
    unreplicated_window: float = 3.0
    reconcile_grace: int = 300
    produce_seconds: float = 90.0
    smtp_delay: float = 0.1
    drain_timeout: float = 480.0
    update_share: float = 0.0  # one status email per booking: the chaos run has the other mix
    scheduled_share: float = 0.0

    @classmethod
    def short_failover(cls, **overrides: Any) -> FailoverConfig:
        base = cls(
            bookings=250,
            produce_seconds=30.0,
            threads=4,
            replica_down=3.0,
            link_cut=3.0,
            heartbeat_timeout_ms=5_000,
            maintenance_interval=1.0,
            reconcile_every=4.0,
            reconcile_grace=8,
            drain_timeout=90.0,
            settle=1.0,
            short=True,
        )
        return replace(base, **overrides)


def say(text: str) -> None:
    print(f"[failover-redis] {text}", flush=True)


class FailoverRun(Run):
    """``bench.chaos.Run`` with the broker behind Sentinel and Redis faults instead of the
    chaos run's outages."""

    config: FailoverConfig

    def __init__(self, config: FailoverConfig, stack: ExitStack) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stop = threading.Event()
        self.producing_done = threading.Event()
        self.lock = threading.Lock()
        say(
            "starting Postgres, an SMTP sink and Redis with Sentinel (1 primary, 2 replicas, 3 Sentinels)"
        )
        self.pg = PostgresServer.start_new()
        stack.callback(self.pg.destroy)
        self.deployment = SentinelDeployment.start_new(
            down_after_ms=config.down_after_ms, failover_timeout_ms=config.failover_timeout_ms
        )
        stack.callback(self.deployment.destroy)
        self.sink = SmtpSink.start_new(delay=config.smtp_delay)
        stack.callback(self.sink.destroy)
        self.work = Path(tempfile.mkdtemp(prefix="booking-failover-"))
        self.database_url = self.pg.create_database("booking_failover")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.deployment.url,
            "SMTP_URL": self.sink.url,
            "EMAIL_FROM": "Failover Bistro <bookings@failover.example>",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "FLAG_CACHE_DIR": str(self.work / "flags"),
            "HEALTH_FILE": str(self.work / "health"),
            "EMAIL_MIN_BACKOFF_MS": str(config.min_backoff_ms),
            "EMAIL_MAX_BACKOFF_MS": str(config.max_backoff_ms),
            "EMAIL_MAX_RETRIES": str(config.max_retries),
            "REDIS_HEARTBEAT_TIMEOUT_MS": str(config.heartbeat_timeout_ms),
            "REDIS_MAINTENANCE_INTERVAL_SECONDS": str(config.maintenance_interval),
            "RECONCILE_GRACE_SECONDS": str(config.reconcile_grace),
            "METRICS_PORT": "0",
        }
        migrate(self.database_url)
        self.app = App.for_worker(self.env)
        bind(self.app)
        stack.callback(self._close_app)
        self.conn = self._connect()
        self.venue = insert_venue(self.conn, name="Failover Bistro")
        self._init_tallies()
        self.reconciled: dict[Key, float] = {}
        self.events = [Event(kind, at) for kind, at in SCENARIOS[config.scenario]]
        self.pod_restarts = 0
        self.worker_log = self.work / "worker.log"
        self.group = self._new_group()
        stack.callback(self._stop_group)
        self.clock = Clock()

    def redis_client(self) -> Any:
        return self.deployment.client()

    def reconciler(self) -> None:
        """``bench.chaos.Run.reconciler``, also noting when each email was re-enqueued."""
        from service.actors.emails import send_booking_email

        def enqueue(payload: EmailPayload) -> None:
            key = (str(payload.booking_id), payload.type.value, payload.revision or 0)
            self.reconciled.setdefault(key, self.clock.now())
            send_booking_email.send(**payload.as_kwargs())

        grace = timedelta(seconds=self.config.reconcile_grace)
        while not self.stop.wait(self.config.reconcile_every):
            try:
                report = reconcile(self.app.db, self.app.settings, enqueue, grace=grace)
            except Exception as error:
                self.reconciler_stats[f"run failed ({type(error).__name__})"] += 1
                continue
            self.reconciler_stats["runs"] += 1
            self.reconciler_stats["re-enqueued: no delivery record"] += len(report.missing)
            self.reconciler_stats["re-enqueued: stuck pending/retrying"] += len(report.stuck)

    # -- Redis faults -----------------------------------------------------------------------

    def disrupt(self) -> None:
        """Fire each fault once its share of the bookings has been produced (so that every
        fault lands under load), one after the other."""
        for event in self.events:
            target = event.planned * self.config.bookings
            while self.bookings_produced < target and not self.producing_done.is_set():
                if self.stop.wait(0.05):
                    return
            event.started = self.clock.now()
            event.detail["emails at SMTP"] = self.sink.count()
            try:
                getattr(self, f"_do_{event.kind}")(event)
            except Exception as error:  # recorded, never fatal: the run must still clean up
                event.detail["error"] = f"{type(error).__name__}: {error}"
            if event.ended is None:
                event.ended = self.clock.now()
            say(f"t={event.started:6.1f}s {event.kind}: {event.detail}")
            self.stop.wait(self.config.settle)

    def _replica(self) -> RedisNode:
        """A replica that is online at the primary (waiting for one that is rejoining)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            online = self.deployment.online_replicas()
            if online:
                return online[0]
            time.sleep(0.2)
        raise RuntimeError("no replica online")

    def _promote(self, event: Event, victim: RedisNode) -> None:
        killed_at = time.monotonic()
        promoted = self.deployment.wait_for_failover(victim.port, timeout=60)
        event.detail.update(
            {
                "killed": victim.name,
                "promoted": promoted.name,
                "promotion took s": round(time.monotonic() - killed_at, 2),
            }
        )
        victim.start()  # back as a replica once Sentinel reconfigures it
        event.ended = self.clock.now()

    def _do_redis_primary_kill(self, event: Event) -> None:
        """``kill -9`` the primary; Sentinel promotes a replica; the old one is started again."""
        self._promote(event, self.deployment.kill_primary())

    def _do_unreplicated_primary_kill(self, event: Event) -> None:
        """Cut every replica off and ``kill -9`` the worker pod, so that the primary alone
        acknowledges enqueues that no worker fetches, then kill the primary: the replica Sentinel
        promotes never had those messages. (With workers running, a message is fetched within
        milliseconds of its enqueue and survives in the worker's memory; what a failover loses
        is what sits in the ready list, as in a backlog.)"""
        replicas = [self._replica()]
        replicas += [n for n in self.deployment.online_replicas() if n not in replicas]
        queued_before = producer_decisions().get("queued", 0)
        for node in replicas:
            self.deployment.cut_link(node)
        with self.lock:
            group = self.group
        event.detail["worker processes killed (kill -9)"] = len(group.children())
        group.kill_all()  # the whole pod; the supervisor restarts it
        time.sleep(self.config.unreplicated_window)
        victim = self.deployment.kill_primary()
        event.detail["enqueues acknowledged by the primary alone"] = (
            producer_decisions().get("queued", 0) - queued_before
        )
        event.detail["replicas cut off"] = len(replicas)
        for node in replicas:
            self.deployment.restore_link(node)
        self._promote(event, victim)

    def _do_replica_stop(self, event: Event) -> None:
        node = self._replica()
        node.stop()
        event.detail["stopped"] = node.name
        self.stop.wait(self.config.replica_down)
        node.start()
        event.ended = self.clock.now()

    def _do_link_cut(self, event: Event) -> None:
        node = self._replica()
        self.deployment.cut_link(node)
        event.detail["cut off"] = node.name
        self.stop.wait(self.config.link_cut)
        self.deployment.restore_link(node)
        event.ended = self.clock.now()


def explain_pod_kills(result: dict[str, Any]) -> None:
    """``bench.chaos.explain_duplicate`` knows the chaos run's faults; the pod killed inside
    ``unreplicated_primary_kill`` explains duplicates the same way as a ``kill_9``."""
    kills = [e for e in result["events"] if e["kind"] == "unreplicated_primary_kill"]
    for d in result["duplicate_detail"]:
        if d["cause"] == "unexplained" and any(
            e["started"] - 2.0 <= d["first_copy_at"] <= e["started"] + 0.5 for e in kills
        ):
            d["cause"] = (
                "accepted by SMTP just before its worker pod was killed with kill -9, before the "
                "commit; the redelivered message sent it again"
            )
    result["ok"] = passed(result)


def measures(run: FailoverRun, result: dict[str, Any]) -> dict[str, Any]:
    """Per fault: time to the first delivery after it (of any email, and of an email sent after
    it, which went through the broker as it was after the fault) and until every email was in."""
    received = received_ids(run.sink)
    firsts = {key: run.clock.wall_to_run(min(ts)) for key, ts in received.times.items()}
    answered = [o for o in run.account(received).outcomes if o.answer is not None]
    all_at = result["all_delivered_at"]
    faults = []
    for e in result["events"]:
        if e["started"] is None:
            continue
        t = e["started"]
        after_any = [at for at in firsts.values() if at > t]
        after_sent = [firsts[o.answer] for o in answered if o.answer and o.request.at > t]
        faults.append(
            {
                "kind": e["kind"],
                "at": round(t, 1),
                "ended": round(e["ended"], 1) if e["ended"] is not None else None,
                "first delivery after s": round(min(after_any) - t, 2) if after_any else None,
                "first delivery of an email sent after s": round(min(after_sent) - t, 2)
                if after_sent
                else None,
                "all delivered after s": round(all_at - t, 1) if all_at is not None else None,
                "detail": e["detail"],
            }
        )
    recovered = sorted(
        firsts[o.answer] - o.request.at
        for o in answered
        if o.answer in run.reconciled and firsts[o.answer] > run.reconciled[o.answer]
    )
    return {
        "faults": faults,
        "recovered_by_reconciler": len(recovered),
        "recovered_after_s": {
            "min": round(recovered[0], 1) if recovered else None,
            "median": round(recovered[len(recovered) // 2], 1) if recovered else None,
            "max": round(recovered[-1], 1) if recovered else None,
        },
    }


def drive(run: FailoverRun) -> tuple[float, float | None, dict[str, int]]:
    """The threads of ``bench.chaos.execute``: producer, reconciler, supervisor, faults; then
    the drain. Returns when the last fault ended, when all was delivered, what was left queued."""
    config = run.config
    threads = [
        threading.Thread(target=fn, name=name, daemon=True)
        for name, fn in (
            ("producer", run.producer),
            ("reconciler", run.reconciler),
            ("supervisor", run.supervisor),
            ("disrupt", run.disrupt),
        )
    ]
    for t in threads:
        t.start()
    try:
        run.producing_done.wait(config.produce_seconds + 180)
        threads[3].join(len(run.events) * 200)
        last = max((e.ended or 0.0) for e in run.events)
        say(
            f"produced {run.bookings_produced} bookings, {len(run.requests)} email requests; "
            f"faults done at t={last:.1f}s; draining"
        )
        drained_in = run.drain()
        all_delivered_at = run.clock.now() if drained_in is not None else None
        quiet = run.wait_queue_quiet(30.0)
    finally:
        run.stop.set()
        for t in threads:
            t.join(30)
    run._stop_group()
    time.sleep(1.0)  # anything still in flight lands before the count
    return last, all_delivered_at, quiet


def execute(config: FailoverConfig) -> dict[str, Any]:
    decisions_before = producer_decisions()
    with ExitStack() as stack:
        run = FailoverRun(config, stack)
        say(
            f"scenario {config.scenario}: {config.bookings} bookings over "
            f"{config.produce_seconds:.0f}s, {config.processes} worker processes x "
            f"{config.threads} threads, reconcile grace {config.reconcile_grace}s"
        )
        for e in run.events:
            say(f"planned at {e.planned:.0%} of the bookings produced: {e.kind}")
        last_disruption, all_delivered_at, quiet = drive(run)
        result = summarise(run, last_disruption, all_delivered_at, quiet)
        explain_pod_kills(result)
        after = producer_decisions()
        result["send_decisions"] = {
            k: v - decisions_before.get(k, 0)
            for k, v in after.items()
            if v - decisions_before.get(k, 0)
        }
        result["scenario"] = config.scenario
        result["command"] = "python -m bench.failover_redis" + (" --short" if config.short else "")
        result.update(measures(run, result))
    return result


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | emails expected / received (unique) | lost | duplicates | fault | first delivery after the fault / of an email sent after it | all delivered after the fault | `.send()` fell back to immediate send / raised | emails delivered only after the reconciler re-enqueued them |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fell_back = r["send_decisions"].get("immediate_broker_down", 0)
        raised = r["producer"].get("send() raised EmailNotAccepted (retried)", 0)
        for i, f in enumerate(f for f in r["faults"]):
            head = (
                f"{r['scenario']} | {r['expected']} / {r['received_unique']} | **{r['lost']}** | "
                f"**{r['duplicates']}**"
                if i == 0
                else " | | | "
            )
            after = r["recovered_after_s"]
            tail = (
                f"{fell_back} / {raised} | {r['recovered_by_reconciler']}"
                + (
                    f" (delivered {after['min']}-{after['max']} s after `.send()`)"
                    if after["max"]
                    else ""
                )
                if i == 0
                else " | "
            )
            lines.append(
                f"| {head} | {f['kind']} at t={f['at']}s | {f['first delivery after s']} s / "
                f"{f['first delivery of an email sent after s']} s | {f['all delivered after s']} s | "
                f"{tail} |"
            )
    return "\n".join(lines)


def report(results: list[dict[str, Any]]) -> str:
    c = results[0]["config"]
    out = [
        "# Redis Sentinel failover under load",
        "",
        f"Command: `{results[0]['command']}`. Per scenario: {c['bookings']} bookings created over "
        f"{c['produce_seconds']:.0f} s by a producer calling `send_booking_email.send`; "
        f"{c['processes']} worker processes x {c['threads']} threads; the SMTP server waits "
        f"{c['smtp_delay'] * 1000:.0f} ms per recipient. `BROKER_URL=redis+sentinel://...`: a "
        f"primary, two replicas, three Sentinels (quorum 2, down-after {c['down_after_ms']} ms, "
        f"failover-timeout {c['failover_timeout_ms']} ms), AOF on. Reconcile every "
        f"{c['reconcile_every']:g} s with RECONCILE_GRACE_SECONDS={c['reconcile_grace']}; "
        f"REDIS_HEARTBEAT_TIMEOUT_MS={c['heartbeat_timeout_ms']}.",
        "",
        summary_table(results),
        "",
        "Result: "
        + ("PASS" if all(r["ok"] for r in results) else "FAIL")
        + "; wall time "
        + ", ".join(f"{r['scenario']} {r['wall_seconds']} s" for r in results)
        + ".",
    ]
    for r in results:
        out += [
            "",
            f"## {r['scenario']}",
            "",
            f"- delivery rows: {fmt(r['delivery_states'])}; dead letters: {len(r['dead_letters'])}"
            f" (replayed {r['dead_letters_replayed']}); pod restarts: {r['pod_restarts']}",
            f"- send() decisions (producer + reconciler): {fmt(r['send_decisions'])}",
            f"- producer: {fmt(r['producer'])}",
            f"- reconciler: {fmt(r['reconciler'])}",
            f"- last fault ended t={r['last_disruption_ended_at']} s; all delivered "
            f"t={r['all_delivered_at']} s; throughput {r['throughput_emails_per_s']} emails/s",
            "",
            "| t (s) | fault | detail |",
            "|---|---|---|",
        ]
        for f in r["faults"]:
            out.append(f"| {f['at']}-{f['ended']} | {f['kind']} | {fmt(f['detail'])} |")
        if r["duplicate_detail"]:
            out += ["", "Duplicates:", ""]
            out += [
                f"- {d['booking_id']} {d['type']}: {d['copies']} copies, first at t={d['first_copy_at']} s: {d['cause']}"
                for d in r["duplicate_detail"]
            ]
        if r["lost_detail"]:
            out += ["", "Lost:", ""]
            out += [f"- {d['booking_id']} {d['type']}: {d['state']}" for d in r["lost_detail"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="the combined scenario, small")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--bookings", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="where to write failover_redis.{md,json}")
    args = parser.parse_args(argv)
    scenarios = args.scenario or (["combined"] if args.short else list(SCENARIOS))
    results = []
    for name in scenarios:
        config = (
            FailoverConfig.short_failover(scenario=name, seed=args.seed)
            if args.short
            else FailoverConfig(scenario=name, seed=args.seed)
        )
        if args.bookings:
            config = replace(config, bookings=args.bookings)
        results.append(execute(config))
        say(f"{name}: {'PASS' if results[-1]['ok'] else 'FAIL'}")
    text = report(results)
    print()
    print(text)
    out = args.out if args.out else (None if args.short else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failover_redis.json").write_text(
            json.dumps({"scenarios": results}, indent=2, default=str) + "\n"
        )
        (out / "failover_redis.md").write_text(text)
        say(f"wrote {out / 'failover_redis.md'} and failover_redis.json")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
