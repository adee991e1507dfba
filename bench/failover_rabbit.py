"""Failover of a three-node RabbitMQ cluster with quorum queues, under a steady booking load.

The machinery of ``bench/chaos.py`` (a producer calling ``send_booking_email.send`` for each
new booking, real worker pods restarted by a supervisor when their parent exits, a reconciler
thread, the drain and the SMTP count) on a cluster from ``harness/rabbit_cluster.py`` with
``RABBITMQ_QUEUE_TYPE=quorum`` and ``BROKER_URL`` listing the three nodes. Scenarios (each by
itself, then all in one run):

- ``leader_kill``: ``kill -9`` the node leading ``pending-booking-emails`` (the first listed
  node, which every client is connected to), restart it ``--node-down`` seconds later;
- ``partition``: cut the leader off from the other two nodes (its cluster veth link down) for
  ``--partition`` seconds; ``pause_minority`` makes it close its clients' connections;
- during each, ``kill -9`` of a worker process (Dramatiq's parent then stops the pod and the
  supervisor restarts it, as Kubernetes would);
- ``combined``: both faults one after the other, with their worker kills, in one run.

For each: lost and duplicate emails at the SMTP server (by Message-ID), time from the fault to
the first delivery after it, time until every email was delivered, ``.send()`` calls that fell
back to immediate send or raised, and what the reconciler re-enqueued.

Usage: ``python -m bench.failover_rabbit [--short] [--only NAME] [--bookings N] [--out DIR]``;
a full run writes ``bench/results/failover_rabbit.{md,json}``. ``--short`` is the combined run
with 250 bookings (``tests/e2e/ha/test_rabbit_failover.py``). Needs root (network namespaces).
Exit status 0 when nothing was lost and every duplicate is explained.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.chaos import (
    QUEUE,
    Clock,
    Config,
    Event,
    Run,
    fmt,
    passed,
    producer_decisions,
    received_ids,
    summarise,
)
from harness.factories import insert_venue
from harness.rabbit_cluster import RabbitCluster
from harness.servers import PostgresServer, SmtpSink
from service.amqp import connect
from service.app import App
from service.worker import bind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("leader_kill", "partition", "combined")


def say(text: str) -> None:
    print(f"[failover-rabbit] {text}", flush=True)


PLAN = {
    "leader_kill": [("leader_kill", 0.3)],
    "partition": [("partition", 0.3)],
    "combined": [("leader_kill", 0.2), ("partition", 0.55)],
}


@dataclass(frozen=True)
class FailoverConfig(Config):
    scenario: str = "combined"
    node_down: float = 10.0
    partition_seconds: float = 30.0
    worker_kill_after: float = 2.0
    delivery_limit: int = 10
    update_share: float = 0.0  # one status email per booking: the chaos run has the other mix
    scheduled_share: float = 0.0

    @classmethod
    def short_failover(cls, **overrides: Any) -> FailoverConfig:
        base = cls(
            bookings=250,
            produce_seconds=25.0,
            threads=2,
            smtp_delay=0.2,
            kills=0,
            reconcile_every=4.0,
            reconcile_grace=60,
            node_down=5.0,
            partition_seconds=30.0,
            drain_timeout=120.0,
            short=True,
        )
        return replace(base, **overrides)


class FailoverRun(Run):
    """chaos.Run on the cluster: its producer, reconciler, supervisor, worker kills and drain."""

    config: FailoverConfig

    def __init__(self, config: FailoverConfig, stack: ExitStack) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stop = threading.Event()
        self.producing_done = threading.Event()
        self.lock = threading.Lock()
        say(f"[{config.scenario}] starting Postgres, an SMTP sink and a 3-node RabbitMQ cluster")
        self.pg = PostgresServer.start_new()
        stack.callback(self.pg.destroy)
        self.sink = SmtpSink.start_new(delay=config.smtp_delay)
        stack.callback(self.sink.destroy)
        started = time.monotonic()
        self.cluster = RabbitCluster.start_new()
        stack.callback(self.cluster.destroy)
        self.cluster_start_seconds = round(time.monotonic() - started, 1)
        self.work = Path(tempfile.mkdtemp(prefix="booking-failover-"))
        self.database_url = self.pg.create_database("booking_failover")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.cluster.broker_url(),
            "RABBITMQ_QUEUE_TYPE": "quorum",
            "RABBITMQ_DELIVERY_LIMIT": str(config.delivery_limit),
            "SMTP_URL": self.sink.url,
            "EMAIL_FROM": "Failover Bistro <bookings@failover.example>",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "FLAG_CACHE_DIR": str(self.work / "flags"),
            "HEALTH_FILE": str(self.work / "health"),
            "EMAIL_MIN_BACKOFF_MS": str(config.min_backoff_ms),
            "EMAIL_MAX_BACKOFF_MS": str(config.max_backoff_ms),
            "EMAIL_MAX_RETRIES": str(config.max_retries),
            "RECONCILE_GRACE_SECONDS": str(config.reconcile_grace),
            "METRICS_PORT": "0",
        }
        from service.db import migrate

        migrate(self.database_url)
        self.app = App.for_worker(self.env)
        bind(self.app)
        stack.callback(self._close_app)
        self.conn = self._connect()
        self.venue = insert_venue(self.conn, name="Failover Bistro")
        self._init_tallies()
        self.events = [Event(kind, at) for kind, at in PLAN[config.scenario]]
        self.worker_kills: list[Event] = []
        self.pod_restarts = 0
        self.worker_log = self.work / "worker.log"
        self.group = self._new_group()
        stack.callback(self._stop_group)
        self.clock = Clock()

    def queue_counts(self) -> dict[str, int]:
        connection = connect(self.env["BROKER_URL"], timeout=5)
        try:
            channel = connection.channel()
            ready = channel.queue_declare(QUEUE, passive=True).method.message_count
            delayed = channel.queue_declare(f"{QUEUE}.DQ", passive=True).method.message_count
        finally:
            connection.close()
        return {"messages": ready, "delayed": delayed}  # AMQP does not count unacked ones

    def _kill_a_worker(self) -> None:
        """``kill -9`` a worker process while the fault lasts (scenario 5 of the issue)."""
        if self.stop.wait(self.config.worker_kill_after):
            return
        kill = Event("kill_9", 0.0, started=self.clock.now())
        try:
            self._do_kill_9(kill)
        except Exception as error:
            kill.detail["error"] = f"{type(error).__name__}: {error}"
        kill.ended = self.clock.now()
        self.worker_kills.append(kill)

    def _leader(self, event: Event) -> int:
        leader = self.cluster.leader_of(QUEUE)
        event.detail["leader"] = self.cluster.nodes[leader].nodename
        return leader

    def _do_leader_kill(self, event: Event) -> None:
        leader = self._leader(event)
        self.cluster.kill_9(leader)
        event.detail["fault_wall"] = time.time()
        self._kill_a_worker()
        self.stop.wait(max(0.0, self.config.node_down - self.config.worker_kill_after))
        self.cluster.restart(leader)
        event.ended = self.clock.now()
        with suppress(Exception):
            event.detail["new leader"] = self.cluster.nodes[self.cluster.leader_of(QUEUE)].nodename
        self.cluster.wait_running(180)
        event.detail["cluster whole again at"] = round(self.clock.now(), 1)

    def _do_partition(self, event: Event) -> None:
        leader = self._leader(event)
        self.cluster.cut(leader)
        event.detail["fault_wall"] = time.time()
        try:
            self._kill_a_worker()
            self.stop.wait(max(0.0, self.config.partition_seconds - self.config.worker_kill_after))
        finally:
            self.cluster.heal(leader)
        event.ended = self.clock.now()
        self.cluster.wait_running(180)
        event.detail["cluster whole again at"] = round(self.clock.now(), 1)
        with suppress(Exception):
            event.detail["new leader"] = self.cluster.nodes[self.cluster.leader_of(QUEUE)].nodename


def explain(first_copy: float, events: list[Event]) -> str:
    for e in events:
        if (
            e.kind == "kill_9"
            and e.started is not None
            and e.started - 2.0 <= first_copy <= e.started + 0.2
        ):
            return (
                "accepted by SMTP just before its worker was killed with kill -9, before the "
                "commit; the redelivered message sent it again (same Message-ID)"
            )
    return "unexplained"


def execute(config: FailoverConfig) -> dict[str, Any]:
    decided_before = producer_decisions()  # the registry counts every run of this process
    with ExitStack() as stack:
        run = FailoverRun(config, stack)
        say(
            f"[{config.scenario}] {config.bookings} bookings over {config.produce_seconds:.0f}s, "
            f"{config.processes} worker processes x {config.threads} threads"
        )
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
            run.producing_done.wait(config.produce_seconds + 240)
            threads[3].join(600)
            last = max((e.ended or 0.0) for e in run.events)
            say(f"[{config.scenario}] faults done at t={last:.1f}s; draining")
            drained_in = run.drain()
            all_delivered_at = run.clock.now() if drained_in is not None else None
            quiet = run.wait_queue_quiet(30.0)
        finally:
            run.stop.set()
            for t in threads:
                t.join(30)
        run._stop_group()
        time.sleep(1.0)
        faults = list(run.events)
        run.events = sorted(faults + run.worker_kills, key=lambda e: e.started or 0.0)
        result = summarise(run, last, all_delivered_at, quiet)
        for dup in result["duplicate_detail"]:
            dup["cause"] = explain(dup["first_copy_at"], run.events)
        result["ok"] = passed(result)
        result["send_decisions"] = {
            k: v - decided_before.get(k, 0)
            for k, v in result["send_decisions"].items()
            if v != decided_before.get(k, 0)
        }
        result["scenario"] = config.scenario
        result["command"] = "python -m bench.failover_rabbit" + (
            " --short" if config.short else f" --only {config.scenario}"
        )
        result["cluster_start_seconds"] = run.cluster_start_seconds
        result["faults"] = [fault_figures(run, e, all_delivered_at) for e in faults]
        result["worker_kills"] = len(run.worker_kills)
        return result


def fault_figures(run: FailoverRun, event: Event, all_delivered_at: float | None) -> dict[str, Any]:
    """Seconds from the fault to the first delivery after it (often a message a worker already
    held), to the first delivery of an email produced after the fault (through the failed-over
    queue), and to every email delivered."""
    received = received_ids(run.sink)
    wall = event.detail.get("fault_wall")
    start = event.started or 0.0
    after = sorted(t for times in received.times.values() for t in times if wall and t > wall)
    fresh = sorted(
        received.first(o.answer)
        for o in run.account(received).outcomes
        if wall and o.answer is not None and o.request.at > run.clock.wall_to_run(wall)
    )
    return {
        "kind": event.kind,
        "at": round(start, 1),
        "lasted": round((event.ended or start) - start, 1),
        "first_delivery_after": round(after[0] - wall, 2) if after and wall else None,
        "first_fresh_delivery_after": round(fresh[0] - wall, 2) if fresh and wall else None,
        "all_delivered_after": round(all_delivered_at - start, 1)
        if all_delivered_at is not None
        else None,
        "detail": {k: v for k, v in event.detail.items() if k != "fault_wall"},
    }


def fallbacks(result: dict[str, Any]) -> str:
    decisions = result["send_decisions"]
    immediate = sum(v for k, v in decisions.items() if k.startswith("immediate"))
    raised = sum(v for k, v in result["producer"].items() if "raised" in k or "never" in k)
    return f"{immediate} / {raised}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | emails | lost | duplicates | fault → first delivery after it / of an email sent after it | fault → all delivered | `.send()` fell back to immediate send / raised | re-enqueued by the reconciler | worker kill -9 | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for i, f in enumerate(r["faults"]):
            first = f["first_delivery_after"]
            reconciler = r["reconciler"]
            recovered = reconciler.get("re-enqueued: no delivery record", 0) + reconciler.get(
                "re-enqueued: stuck pending/retrying", 0
            )
            label = f"{r['scenario']}: {f['kind']}" + (
                f" ({f['lasted']:.0f} s)" if f["kind"] == "partition" else ""
            )
            head = i == 0
            lines.append(
                f"| {label} | {r['expected'] if head else ''} | {r['lost'] if head else ''} | "
                f"{r['duplicates'] if head else ''} | "
                f"{'-' if first is None else f'{first:.1f} s'} / "
                f"{'-' if f['first_fresh_delivery_after'] is None else str(f['first_fresh_delivery_after']) + ' s'} | "
                f"{'-' if f['all_delivered_after'] is None else str(f['all_delivered_after']) + ' s'} | "
                f"{fallbacks(r) if head else ''} | {recovered if head else ''} | "
                f"{r['worker_kills'] if head else ''} | {('PASS' if r['ok'] else 'FAIL') if head else ''} |"
            )
    return "\n".join(lines)


def report(results: list[dict[str, Any]], command: str) -> str:
    c = results[0]["config"]
    out = [
        "# RabbitMQ cluster failover",
        "",
        f"Command: `{command}`. Per scenario: {c['bookings']} bookings created over "
        f"{c['produce_seconds']:.0f} s by a producer calling `send_booking_email.send`; "
        f"{c['processes']} worker processes x {c['threads']} threads; SMTP server waits "
        f"{c['smtp_delay'] * 1000:.0f} ms per recipient; a 3-node cluster "
        "(`harness/rabbit_cluster.py`: one network namespace per node, "
        "`cluster_partition_handling = pause_minority`, `net_ticktime` 10 s), "
        f"`RABBITMQ_QUEUE_TYPE=quorum`, `RABBITMQ_DELIVERY_LIMIT={c['delivery_limit']}`, "
        "`BROKER_URL` listing the three nodes; a leader is down "
        f"{c['node_down']:g} s, a partition lasts {c['partition_seconds']:g} s; one worker "
        f"process is killed with kill -9 {c['worker_kill_after']:g} s into each fault; "
        f"reconcile every {c['reconcile_every']:g} s with a {c['reconcile_grace']} s grace.",
        "",
        table(results),
        "",
    ]
    for r in results:
        out += [f"## {r['scenario']}", ""]
        out.append(
            f"Cluster started in {r['cluster_start_seconds']} s; received unique / total "
            f"{r['received_unique']} / {r['received_total']}; delivery rows: "
            f"{fmt(r['delivery_states'])}; send() decisions: {fmt(r['send_decisions'])}; "
            f"producer: {fmt(r['producer'])}; reconciler: {fmt(r['reconciler'])}; "
            f"dead letters: {len(r['dead_letters'])}; pod restarts: {r['pod_restarts']}; "
            f"throughput incl. faults: {r['throughput_emails_per_s']} emails/s; "
            f"wall time {r['wall_seconds']} s."
        )
        out += ["", "| t (s) | event | detail |", "|---|---|---|"]
        for e in r["events"]:
            when = "-" if e["started"] is None else f"{e['started']:.1f}-{(e['ended'] or 0):.1f}"
            detail = {k: v for k, v in e["detail"].items() if k != "fault_wall"}
            out.append(f"| {when} | {e['kind']} | {fmt(detail)} |")
        if r["duplicate_detail"]:
            out += ["", "Duplicates:", ""]
            out += [
                f"- {d['booking_id']} {d['type']}: {d['copies']} copies, {d['cause']}"
                for d in r["duplicate_detail"]
            ]
        if r["lost_detail"]:
            out += ["", "Lost:", ""]
            out += [f"- {d['booking_id']} {d['type']}: {d['state']}" for d in r["lost_detail"]]
        out.append("")
    return "\n".join(out)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_producer(rounds: int = 7, batch: int = 300) -> dict[str, Any]:
    """``send_booking_email.send()`` on a single node with classic queues (the baseline) against
    the 3-node cluster with quorum queues (confirm after a Raft majority), in alternating rounds
    from one thread, same process; both record their requests in the same Postgres."""
    from harness.servers import RabbitServer
    from service.actors import ACTORS
    from service.actors.emails import send_booking_email
    from service.db import migrate

    types = ("request_received", "confirmed", "updated", "cancelled")
    work = Path(tempfile.mkdtemp(prefix="booking-failover-producer-"))
    with ExitStack() as stack:
        say("producer cost: a single node (classic queues) and a 3-node cluster (quorum)")
        pg = PostgresServer.start_new()  # .send() records each request before it enqueues
        stack.callback(pg.destroy)
        database_url = pg.create_database("booking_producer")
        migrate(database_url)
        base = {
            "DATABASE_URL": database_url,
            "FLAG_CACHE_DIR": str(work / "flags"),
            "LOG_LEVEL": "WARNING",
        }
        single = RabbitServer.start_new()
        stack.callback(single.stop)
        cluster = RabbitCluster.start_new()
        stack.callback(cluster.destroy)
        apps = {
            "single node, classic": App.for_producer({**base, "BROKER_URL": single.url}),
            "3-node cluster, quorum": App.for_producer(
                {**base, "BROKER_URL": cluster.broker_url(), "RABBITMQ_QUEUE_TYPE": "quorum"}
            ),
        }
        for app in apps.values():
            stack.callback(app.close)
        ids = [str(uuid.uuid4()) for _ in range(batch)]
        calls: dict[str, list[float]] = {label: [] for label in apps}
        rates: dict[str, list[float]] = {label: [] for label in apps}

        def batch_of(label: str, n: int) -> None:
            bind(apps[label])
            try:
                started = time.perf_counter()
                for i in range(n):
                    t0 = time.perf_counter()
                    send_booking_email.send(ids[i % batch], types[i % 4])
                    calls[label].append(time.perf_counter() - t0)
                rates[label].append(n / (time.perf_counter() - started))
            finally:
                for actor in ACTORS:
                    actor.unbind()

        for label in apps:  # warm up: connections, declarations
            batch_of(label, 100)
        calls = {label: [] for label in apps}
        rates = {label: [] for label in apps}
        labels = list(apps)
        for k in range(rounds):
            for label in labels if k % 2 == 0 else labels[::-1]:
                batch_of(label, batch)
    out: dict[str, Any] = {"rounds": rounds, "calls_per_round": batch}
    for label in calls:
        out[label] = {
            "sends_per_s": round(sorted(rates[label])[len(rates[label]) // 2]),
            "p50_us": round(_percentile(calls[label], 0.5) * 1e6),
            "p99_us": round(_percentile(calls[label], 0.99) * 1e6),
        }
    single_p50 = out["single node, classic"]["p50_us"]
    out["ratio_p50_quorum_to_single"] = round(
        out["3-node cluster, quorum"]["p50_us"] / single_p50, 2
    )
    return out


def producer_table(p: dict[str, Any]) -> str:
    lines = [
        f"Producer cost: `send_booking_email.send()` from one thread, {p['rounds']} alternating "
        f"rounds of {p['calls_per_round']} calls (publisher confirms on both):",
        "",
        "| broker | `.send()` per second | latency p50 | latency p99 |",
        "|---|---|---|---|",
    ]
    for label in ("single node, classic", "3-node cluster, quorum"):
        row = p[label]
        lines.append(
            f"| {label} | {row['sends_per_s']:,} | {row['p50_us']:,} µs | {row['p99_us']:,} µs |"
        )
    lines += [
        "",
        f"Quorum on the cluster / classic on one node, p50: **{p['ratio_p50_quorum_to_single']}x**.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="the combined run, 250 bookings")
    parser.add_argument("--only", choices=SCENARIOS, action="append")
    parser.add_argument("--bookings", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--no-producer", action="store_true", help="skip the producer cost measurement"
    )
    parser.add_argument("--producer-only", action="store_true", help="only the producer cost")
    args = parser.parse_args(argv)
    if args.producer_only:
        print(producer_table(measure_producer(rounds=11)))
        return 0
    if args.short:
        configs = [FailoverConfig.short_failover(seed=args.seed)]
    else:
        configs = [
            FailoverConfig(scenario=s, seed=args.seed, kills=0) for s in args.only or SCENARIOS
        ]
    if args.bookings:
        configs = [replace(c, bookings=args.bookings) for c in configs]
    results = []
    for config in configs:
        results.append(execute(config))
        say(f"[{config.scenario}] {'PASS' if results[-1]['ok'] else 'FAIL'}")
    command = "python -m bench.failover_rabbit" + (" --short" if args.short else "")
    text = report(results, command)
    producer = None
    if not args.short and not args.no_producer:
        producer = measure_producer()
        text += "\n## Producer cost of confirms against a majority\n\n" + producer_table(producer)
    print()
    print(text)
    out = args.out if args.out else (None if args.short else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "results": results, "producer": producer}
        (out / "failover_rabbit.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (out / "failover_rabbit.md").write_text(text)
        say(f"wrote {out / 'failover_rabbit.md'} and failover_rabbit.json")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
