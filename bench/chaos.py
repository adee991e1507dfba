"""``make chaos``: send the emails of N bookings while workers, Redis, Postgres and SMTP fail.

A producer thread creates bookings at a steady rate and calls ``send_booking_email.send`` for
each, as the booking service would. Real worker processes consume the queue. At random moments
(seeded) the run:

- ``kill -9``s a worker process (Dramatiq's parent then stops its siblings and exits; a
  supervisor restarts the group, as Kubernetes restarts the pod);
- restarts Redis (append-only file on: the queue comes back from the AOF);
- empties Redis (``FLUSHALL``: only the reconciler can recover what was queued);
- restarts Postgres;
- takes the SMTP server down for ``--smtp-down`` seconds.

A reconciler thread runs ``reconcile`` every few seconds, as the chart's CronJob does. Dead
letters, if any, are replayed after the disruptions (the runbook's procedure). The run ends when
every expected email is recorded ``sent`` and has reached the SMTP server, or at a deadline.
It then counts unique Message-IDs at the SMTP server: lost = expected - received, duplicates =
copies beyond the first; each duplicate is matched to the disruption that caused it.

Usage: ``python -m bench.chaos [--bookings N] [--seed S] [--short] [--out DIR]``. A full run
writes ``bench/results/chaos.md`` and ``chaos.json``; ``--short`` is the small version that
``tests/e2e/chaos/test_chaos_short.py`` runs (results only with ``--out``). Exit status 0 means
nothing lost, every duplicate explained and every dead letter accounted for.
"""

from __future__ import annotations

import argparse
import email
import itertools
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from email import policy
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from harness.factories import insert_booking, insert_venue
from harness.servers import PostgresServer, RedisServer, SmtpSink
from harness.workers import WorkerGroup
from service.actors import ACTORS
from service.app import App
from service.worker import bind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUEUE = "pending-booking-emails"
STATUS_MIX = ("pending", "confirmed", "confirmed", "cancelled")
EXPECTED_TYPE = {"pending": "request_received", "confirmed": "confirmed", "cancelled": "cancelled"}


@dataclass(frozen=True)
class Config:
    """One chaos run. Durations in seconds unless the name says otherwise."""

    bookings: int = 2000
    seed: int = 1
    produce_seconds: float = 60.0
    processes: int = 2
    threads: int = 4
    smtp_delay: float = 0.2
    kills: int = 3
    redis_down: float = 5.0
    postgres_down: float = 3.0
    smtp_down: float = 30.0
    heartbeat_timeout_ms: int = 15_000
    maintenance_interval: float = 5.0
    min_backoff_ms: int = 500
    max_backoff_ms: int = 5_000
    max_retries: int = 20
    reconcile_every: float = 10.0
    reconcile_grace: int = 60
    restart_delay: float = 1.0
    settle: float = 3.0
    drain_timeout: float = 300.0
    short: bool = False

    @classmethod
    def short_run(cls, **overrides: Any) -> Config:
        """The version inside ``make test``: ~200 bookings, each disruption once, shorter timers."""
        base = cls(
            bookings=200,
            produce_seconds=10.0,
            threads=2,
            smtp_delay=0.3,
            kills=1,
            redis_down=2.0,
            postgres_down=2.0,
            smtp_down=5.0,
            heartbeat_timeout_ms=5_000,
            maintenance_interval=1.0,
            reconcile_every=4.0,
            reconcile_grace=8,
            drain_timeout=75.0,
            short=True,
        )
        return replace(base, **overrides)


@dataclass
class Event:
    """A disruption: ``planned`` is the share of emails sent that triggers it; ``started`` and
    ``ended`` are seconds since the run started."""

    kind: str
    planned: float
    started: float | None = None
    ended: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def say(text: str) -> None:
    print(f"[chaos] {text}", flush=True)


class Clock:
    def __init__(self) -> None:
        self.t0_wall = time.time()
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall_to_run(self, wall: float) -> float:
        return wall - self.t0_wall

    def sleep_until(self, at: float, stop: threading.Event) -> bool:
        """Sleep until run time ``at``; False if ``stop`` was set meanwhile."""
        return not stop.wait(max(0.0, at - self.now()))


def plan(config: Config, rng: random.Random) -> list[Event]:
    """Random, seeded moments, as fractions of the expected emails already at the SMTP server.

    Tying the moments to progress (not to the clock) puts every disruption in the middle of the
    sending on any machine. The infrastructure outages are at least a tenth of the run apart and
    run one after the other, so each one's effect can be told apart; the kills fall anywhere.
    """
    kinds = ("redis_restart", "redis_flushall", "postgres_restart", "smtp_outage")
    for _ in range(10_000):
        points = sorted(rng.uniform(0.05, 0.8) for _ in kinds)
        if all(b - a >= 0.1 for a, b in itertools.pairwise(points)):
            break
    else:  # pragma: no cover - four points fit easily in [0.05, 0.8]
        raise RuntimeError("could not place the outages")
    order = list(kinds)
    rng.shuffle(order)
    events = [Event(kind, round(at, 3)) for kind, at in zip(order, points, strict=True)]
    events += [Event("kill_9", round(rng.uniform(0.05, 0.9), 3)) for _ in range(config.kills)]
    return sorted(events, key=lambda e: e.planned)


class Run:
    """The servers, the worker pod, the producer, the reconciler and the disruptions."""

    def __init__(self, config: Config, stack: ExitStack) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stop = threading.Event()
        self.producing_done = threading.Event()
        self.lock = threading.Lock()
        say("starting throwaway Postgres, Redis (append-only file on) and an SMTP sink")
        self.pg = PostgresServer.start_new()
        stack.callback(self.pg.destroy)
        self.redis = RedisServer.start_new(appendonly=True)
        stack.callback(self.redis.destroy)
        self.sink = SmtpSink.start_new(delay=config.smtp_delay)
        stack.callback(self.sink.destroy)
        self.work = Path(tempfile.mkdtemp(prefix="booking-chaos-"))
        self.database_url = self.pg.create_database("booking_chaos")
        # The producer's App and the worker pods are built from these; os.environ is left alone.
        self.env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.redis.url,
            "SMTP_URL": self.sink.url,
            "EMAIL_FROM": "Chaos Bistro <bookings@chaos.example>",
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
        from service.db import migrate

        migrate(self.database_url)
        self.app = App.for_worker(self.env)
        bind(self.app)
        stack.callback(self._close_app)
        self.conn = self._connect()
        self.venue = insert_venue(self.conn, name="Chaos Bistro")
        self.expected: dict[tuple[str, str], float] = {}
        self.producer_stats: Counter[str] = Counter()
        self.reconciler_stats: Counter[str] = Counter()
        self.replayed: list[dict[str, Any]] = []
        self.events = plan(config, self.rng)
        self.pod_restarts = 0
        self.worker_log = self.work / "worker.log"
        self.group = self._new_group()
        stack.callback(self._stop_group)
        self.clock = Clock()

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(
            self.database_url, autocommit=True, row_factory=dict_row, connect_timeout=3
        )

    def _close_app(self) -> None:
        for actor in ACTORS:
            actor.unbind()
        self.app.close()

    def _new_group(self) -> WorkerGroup:
        return WorkerGroup(
            dict(self.env),
            processes=self.config.processes,
            threads=self.config.threads,
            log_path=self.worker_log,
        ).start()

    def _stop_group(self) -> None:
        with self.lock:
            group = self.group
        group.stop(timeout=40)

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=2)

    def queue_counts(self) -> dict[str, int]:
        r = self.redis_client()
        acks = sum(int(r.scard(k)) for k in r.keys(f"dramatiq:__acks__.*.{QUEUE}*"))
        return {
            "ready": int(r.llen(f"dramatiq:{QUEUE}")),
            "messages": int(r.hlen(f"dramatiq:{QUEUE}.msgs")),
            "delayed": int(r.hlen(f"dramatiq:{QUEUE}.DQ.msgs")),
            "unacked": acks,
        }

    # -- the actors of the run --------------------------------------------------------------

    def producer(self) -> None:
        """Create each booking, then call ``send_booking_email.send`` like the booking service."""
        from service.actors.emails import EmailNotAccepted, send_booking_email

        rate = self.config.bookings / self.config.produce_seconds
        conn = self._connect()
        for i in range(self.config.bookings):
            if not self.clock.sleep_until(i / rate, self.stop):
                return
            status = self.rng.choice(STATUS_MIX)
            booking_id = None
            for _ in range(120):  # a request the booking service would retry, ~60 s at most
                try:
                    booking_id = insert_booking(conn, self.venue, status=status)
                    break
                except psycopg.OperationalError:
                    self.producer_stats["booking insert retried (Postgres down)"] += 1
                    with suppress(Exception):
                        conn.close()
                    time.sleep(0.5)
                    with suppress(psycopg.OperationalError):
                        conn = self._connect()
            if booking_id is None:
                self.producer_stats["booking not created"] += 1
                continue
            key = (str(booking_id), EXPECTED_TYPE[status])
            self.expected[key] = self.clock.now()
            for _ in range(120):
                try:
                    send_booking_email.send(str(booking_id), EXPECTED_TYPE[status])
                    self.producer_stats["send() accepted"] += 1
                    break
                except EmailNotAccepted:
                    self.producer_stats["send() raised EmailNotAccepted (retried)"] += 1
                    time.sleep(0.5)
            else:
                self.producer_stats["send() never accepted"] += 1
        self.producing_done.set()
        with suppress(Exception):
            conn.close()

    def reconciler(self) -> None:
        """``reconcile`` every few seconds, as the CronJob runs it; failures wait for the next run."""
        from service.actors.emails import send_booking_email
        from service.emails.models import EmailPayload
        from service.emails.reconcile import reconcile

        def enqueue(payload: EmailPayload) -> None:
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

    def supervisor(self) -> None:
        """Restart the worker group whenever its parent exits (Kubernetes restarting the pod)."""
        while not self.stop.wait(0.2):
            with self.lock:
                group = self.group
            if group.proc is None or group.proc.poll() is None:
                continue
            if self.stop.wait(self.config.restart_delay):
                return
            try:
                fresh = self._new_group()
            except RuntimeError:
                continue
            with self.lock:
                self.group = fresh
            self.pod_restarts += 1

    # -- disruptions ------------------------------------------------------------------------

    def disrupt(self) -> None:
        """Fire each disruption once its share of the emails has reached the SMTP server."""
        for event in self.events:
            target = event.planned * self.config.bookings
            deadline = time.monotonic() + 180  # fire anyway if progress stalls
            while self.sink.count() < target and time.monotonic() < deadline:
                if self.stop.wait(0.1):
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

    def _do_kill_9(self, event: Event) -> None:
        """``kill -9`` one worker process (not the pod's metrics process, which Dramatiq forks
        after its workers and therefore has a higher PID)."""
        workers: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the pod may still be restarting from an earlier kill
            with self.lock:
                group = self.group
            workers = sorted(group.children())[: self.config.processes]
            if len(workers) == self.config.processes and all(map(_running, workers)):
                break
            time.sleep(0.2)
        with suppress(Exception):
            event.detail["unacked messages at kill"] = self.queue_counts()["unacked"]
        victim = self.rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        event.detail["killed pid"] = victim

    def _do_redis_restart(self, event: Event) -> None:
        before = self.queue_counts()
        self.redis.stop()
        time.sleep(self.config.redis_down)
        self.redis.start()
        event.ended = self.clock.now()
        after = self.queue_counts()
        event.detail.update(
            {
                "queued messages before": before["messages"] + before["delayed"],
                "after restart (from AOF)": after["messages"] + after["delayed"],
            }
        )

    def _do_redis_flushall(self, event: Event) -> None:
        counts = self.queue_counts()
        self.redis_client().flushall()
        event.detail["messages dropped"] = counts["messages"] + counts["delayed"]

    def _do_postgres_restart(self, event: Event) -> None:
        self.pg.stop()
        time.sleep(self.config.postgres_down)
        self.pg.start()
        event.ended = self.clock.now()

    def _do_smtp_outage(self, event: Event) -> None:
        self.sink.stop()
        self.stop.wait(self.config.smtp_down)
        self.sink.start()
        event.ended = self.clock.now()

    # -- after the storm --------------------------------------------------------------------

    def delivery_states(self) -> dict[tuple[str, str], str]:
        rows = self.conn.execute(
            "SELECT DISTINCT ON (booking_id, email_type) booking_id, email_type, state"
            " FROM email_deliveries ORDER BY booking_id, email_type, revision DESC"
        )
        return {(str(r["booking_id"]), r["email_type"]): r["state"] for r in rows.fetchall()}

    def replay_dead_letters(self) -> None:
        """The runbook's replay: re-enqueue each open email dead letter (not invalid payloads)."""
        from service.actors.emails import send_booking_email

        rows = self.conn.execute(
            "SELECT message_id, message, reason, error FROM dead_letters"
            " WHERE replayed_at IS NULL AND purged_at IS NULL AND reason <> 'invalid_payload'"
            "   AND actor_name = 'send_booking_email'"
        ).fetchall()
        for row in rows:
            kwargs = row["message"].get("kwargs") or {}
            send_booking_email.send(**kwargs)
            self.conn.execute(
                "UPDATE dead_letters SET replayed_at = now() WHERE message_id = %s",
                (row["message_id"],),
            )
            self.replayed.append({"message_id": row["message_id"], "reason": row["reason"]})

    def drain(self) -> float | None:
        """Wait until every expected email is sent and at the SMTP server; seconds it took."""
        started = self.clock.now()
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            with suppress(psycopg.Error):
                if self.conn.closed:
                    self.conn = self._connect()
                self.replay_dead_letters()
                states = self.delivery_states()
                if all(states.get(k) == "sent" for k in self.expected):
                    received = set(received_ids(self.sink).ids)
                    if set(self.expected) <= received:
                        return self.clock.now() - started
            time.sleep(1.0)
        return None

    def wait_queue_quiet(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        counts = self.queue_counts()
        while time.monotonic() < deadline and (counts["messages"] or counts["delayed"]):
            time.sleep(0.5)
            counts = self.queue_counts()
        return counts


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Received:
    ids: Counter[tuple[str, str]]
    times: dict[tuple[str, str], list[float]]
    foreign: int


def received_ids(sink: SmtpSink) -> Received:
    """Count the SMTP server's messages by (booking, type), from their deterministic Message-ID."""
    ids: Counter[tuple[str, str]] = Counter()
    times: dict[tuple[str, str], list[float]] = {}
    foreign = 0
    for path in sorted(sink.store.glob("*.eml")):
        with path.open("rb") as fh:
            head = fh.read(8192)
        msg = email.message_from_bytes(head, policy=policy.compat32)
        mid = str(msg.get("Message-ID", "")).strip().strip("<>")
        try:
            local = mid.split("@", 1)[0].removeprefix("booking-")
            booking, kind = local.split(".", 2)[:2]  # <booking-ID.TYPE.rREVISION@...>
        except ValueError:
            foreign += 1
            continue
        ids[(booking, kind)] += 1
        times.setdefault((booking, kind), []).append(path.stat().st_mtime)
    return Received(ids, times, foreign)


def explain_duplicate(first_copy: float, events: list[Event]) -> str:
    """Match a duplicate's first copy (run time it reached SMTP) to the disruption behind it."""
    for e in events:
        if e.started is None:
            continue
        end = e.ended if e.ended is not None else e.started
        if e.kind == "postgres_restart" and e.started - 1.0 <= first_copy <= end + 1.0:
            return (
                "accepted by SMTP while Postgres was going down: the transaction that would mark "
                "it sent was cut, so the retry found no 'sent' record and sent it again"
            )
        if e.kind == "kill_9" and e.started - 2.0 <= first_copy <= e.started + 0.2:
            return (
                "accepted by SMTP just before its worker was killed with kill -9, before the "
                "commit; the redelivered message sent it again"
            )
        if e.kind == "smtp_outage" and e.started - 1.0 <= first_copy <= e.started + 0.2:
            return (
                "stored by the SMTP server just before it was killed, before its 250 reached the "
                "worker; the worker saw a dropped connection and retried"
            )
    return "unexplained"


def execute(config: Config) -> dict[str, Any]:
    """Run the whole scenario and return its results (also the JSON written to disk)."""
    with ExitStack() as stack:
        run = Run(config, stack)
        clock = run.clock
        say(
            f"{config.bookings} bookings over {config.produce_seconds:.0f}s, "
            f"{config.processes} worker processes x {config.threads} threads, seed {config.seed}"
        )
        for e in run.events:
            say(f"planned at {e.planned:.0%} of the emails sent: {e.kind}")
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
            threads[3].join(len(run.events) * 200 + config.smtp_down)
            last_disruption = max((e.ended or 0.0) for e in run.events)
            say(
                f"produced {len(run.expected)} bookings; all disruptions done at "
                f"t={last_disruption:.1f}s; draining"
            )
            drained_in = run.drain()
            all_delivered_at = clock.now() if drained_in is not None else None
            quiet = run.wait_queue_quiet(30.0)
        finally:
            run.stop.set()
            for t in threads:
                t.join(30)
        run._stop_group()
        time.sleep(1.0)  # anything still in flight lands before the count
        return summarise(run, last_disruption, all_delivered_at, quiet)


def summarise(
    run: Run, last_disruption: float, all_delivered_at: float | None, quiet: dict[str, int]
) -> dict[str, Any]:
    config, clock = run.config, run.clock
    received = received_ids(run.sink)
    expected = set(run.expected)
    lost = sorted(expected - set(received.ids))
    unexpected = sorted(set(received.ids) - expected)
    duplicates: list[dict[str, Any]] = []
    for key, n in sorted(received.ids.items()):
        if n > 1:
            first = clock.wall_to_run(min(received.times[key]))
            duplicates.append(
                {
                    "booking_id": key[0],
                    "type": key[1],
                    "copies": n,
                    "first_copy_at": round(first, 2),
                    "cause": explain_duplicate(first, run.events),
                }
            )
    states = run.delivery_states()
    state_counts = Counter(states.get(k, "missing") for k in expected)
    dead_rows = run.conn.execute(
        "SELECT message_id, message, reason, error, failed_at, replayed_at FROM dead_letters"
        " ORDER BY failed_at"
    ).fetchall()
    dead_letters = []
    for row in dead_rows:
        kwargs = row["message"].get("kwargs") or {}
        key = (str(kwargs.get("booking_id")), str(kwargs.get("type")))
        dead_letters.append(
            {
                "message_id": row["message_id"],
                "reason": row["reason"],
                "error": row["error"],
                "booking_id": key[0],
                "type": key[1],
                "replayed": row["replayed_at"] is not None,
                "final_state": states.get(key, "missing"),
                "received": received.ids.get(key, 0),
            }
        )
    accounted = all(d["final_state"] == "sent" and d["received"] >= 1 for d in dead_letters)
    lost_detail = [
        {"booking_id": b, "type": t, "state": states.get((b, t), "missing")} for b, t in lost
    ]
    total_dups = sum(d["copies"] - 1 for d in duplicates)
    ok = (
        not lost
        and all(d["cause"] != "unexplained" for d in duplicates)
        and accounted
        and all_delivered_at is not None
    )
    return {
        "ok": ok,
        "command": "python -m bench.chaos"
        + (" --short" if config.short else "")
        + (
            ""
            if config.bookings == (200 if config.short else 2000)
            else f" --bookings {config.bookings}"
        )
        + ("" if config.seed == 1 else f" --seed {config.seed}"),
        "config": asdict(config),
        "expected": len(expected),
        "received_unique": len(received.ids),
        "received_total": sum(received.ids.values()),
        "lost": len(lost),
        "lost_detail": lost_detail,
        "duplicates": total_dups,
        "duplicate_detail": duplicates,
        "unexpected_emails": len(unexpected) + received.foreign,
        "delivery_states": dict(state_counts),
        "dead_letters": dead_letters,
        "dead_letters_replayed": len(run.replayed),
        "dead_letters_accounted": accounted,
        "events": [asdict(e) for e in run.events],
        "producer": dict(run.producer_stats),
        "send_decisions": producer_decisions(),
        "reconciler": dict(run.reconciler_stats),
        "pod_restarts": run.pod_restarts,
        "last_disruption_ended_at": round(last_disruption, 1),
        "all_delivered_at": None if all_delivered_at is None else round(all_delivered_at, 1),
        "queue_left_over": quiet,
        "wall_seconds": round(clock.now(), 1),
        "throughput_emails_per_s": round(len(expected) / all_delivered_at, 1)
        if all_delivered_at
        else None,
    }


def producer_decisions() -> dict[str, int]:
    from prometheus_client import REGISTRY

    out = {}
    for metric in REGISTRY.collect():
        if metric.name == "booking_email_producer_decisions":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["decision"]] = int(sample.value)
    return out


def table(result: dict[str, Any]) -> str:
    c = result["config"]
    ev = {e["kind"]: e for e in result["events"]}
    kills = [e for e in result["events"] if e["kind"] == "kill_9"]
    rows = [
        ("bookings / emails expected", f"{c['bookings']} / {result['expected']}"),
        (
            "received at SMTP: unique Message-IDs / messages",
            f"{result['received_unique']} / {result['received_total']}",
        ),
        ("**lost**", f"**{result['lost']}**"),
        (
            "**duplicates**",
            f"**{result['duplicates']}**"
            + (" (each explained below)" if result["duplicates"] else ""),
        ),
        ("delivery rows of the expected emails", fmt(result["delivery_states"])),
        (
            "dead letters (replayed)",
            f"{len(result['dead_letters'])} ({result['dead_letters_replayed']})",
        ),
        (
            "kill -9 of a worker process",
            ", ".join(f"t={k['started']:.0f}s" for k in kills)
            + f" ({result['pod_restarts']} pod restarts)",
        ),
        (
            "Redis restart (AOF on)",
            span(ev.get("redis_restart"))
            + f", queued before/after: {ev['redis_restart']['detail'].get('queued messages before')}"
            f"/{ev['redis_restart']['detail'].get('after restart (from AOF)')}",
        ),
        (
            "Redis FLUSHALL",
            span(ev.get("redis_flushall"))
            + f", messages dropped: {ev['redis_flushall']['detail'].get('messages dropped')}",
        ),
        ("Postgres restart", span(ev.get("postgres_restart"))),
        ("SMTP server down", span(ev.get("smtp_outage"))),
        ("send() decisions (producer + reconciler)", fmt(result["send_decisions"])),
        ("producer retries", fmt(result["producer"])),
        ("reconciler", fmt(result["reconciler"])),
        (
            "last disruption ended / all delivered",
            f"t={result['last_disruption_ended_at']}s / t={result['all_delivered_at']}s",
        ),
        ("throughput incl. disruptions", f"{result['throughput_emails_per_s']} emails/s"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"


def span(e: dict[str, Any] | None) -> str:
    if not e or e.get("started") is None:
        return "not run"
    return f"t={e['started']:.0f}s-{e['ended']:.0f}s"


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    out = [
        "# Chaos run",
        "",
        f"Command: `{result['command']}` (`make chaos`). "
        f"{c['bookings']} bookings created over {c['produce_seconds']:.0f} s by a producer calling "
        f"`send_booking_email.send`; {c['processes']} worker processes x {c['threads']} threads; "
        f"SMTP server waits {c['smtp_delay'] * 1000:.0f} ms per recipient; seed {c['seed']}.",
        "",
        f"Settings: EMAIL_MIN_BACKOFF_MS={c['min_backoff_ms']}, EMAIL_MAX_BACKOFF_MS="
        f"{c['max_backoff_ms']}, EMAIL_MAX_RETRIES={c['max_retries']}, "
        f"REDIS_HEARTBEAT_TIMEOUT_MS={c['heartbeat_timeout_ms']}, "
        f"REDIS_MAINTENANCE_INTERVAL_SECONDS={c['maintenance_interval']:g}; reconcile every "
        f"{c['reconcile_every']:g} s with a {c['reconcile_grace']} s grace.",
        "",
        table(result),
        "",
        f"Result: {'PASS' if result['ok'] else 'FAIL'}; wall time {result['wall_seconds']} s.",
        "",
        "## Timeline",
        "",
        "| t (s) | disruption | detail |",
        "|---|---|---|",
    ]
    for e in result["events"]:
        when = "-" if e["started"] is None else f"{e['started']:.1f}-{e['ended']:.1f}"
        out.append(f"| {when} | {e['kind']} | {fmt(e['detail'])} |")
    out += ["", "## Duplicates", ""]
    if result["duplicate_detail"]:
        out += [
            "| booking | type | copies | first copy at t (s) | cause |",
            "|---|---|---|---|---|",
        ]
        out += [
            f"| {d['booking_id']} | {d['type']} | {d['copies']} | {d['first_copy_at']} | {d['cause']} |"
            for d in result["duplicate_detail"]
        ]
    else:
        out.append("None.")
    out += ["", "## Dead letters", ""]
    if result["dead_letters"]:
        out += [
            "| booking | type | reason | error | replayed | final state |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {d['booking_id']} | {d['type']} | {d['reason']} | {d['error']} | "
            f"{d['replayed']} | {d['final_state']} |"
            for d in result["dead_letters"]
        ]
    else:
        out.append("None.")
    if result["lost_detail"]:
        out += ["", "## Lost", ""]
        out += [
            f"- {d['booking_id']} {d['type']}: delivery row {d['state']}"
            for d in result["lost_detail"]
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bookings", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="the small version run by make test")
    parser.add_argument("--out", type=Path, help="where to write chaos.md and chaos.json")
    args = parser.parse_args(argv)
    config = Config.short_run(seed=args.seed) if args.short else Config(seed=args.seed)
    if args.bookings:
        scale = args.bookings / config.bookings
        config = replace(
            config,
            bookings=args.bookings,
            produce_seconds=max(30.0, config.produce_seconds * scale),
        )
    result = execute(config)
    text = report(result)
    print()
    print(text)
    out = args.out if args.out else (None if args.short else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / "chaos.md").write_text(text)
        say(f"wrote {out / 'chaos.md'} and chaos.json")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
