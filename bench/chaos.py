"""``make chaos``: send the emails of N bookings while workers, Redis, Postgres and SMTP fail.

A producer thread creates bookings at a steady rate and calls ``send_booking_email.send`` for
each, as the booking service would: the status email of every booking, and for a share of the
confirmed ones (spread evenly over them) real changes (``party_size`` + 1, which bumps
``bookings.revision``) each followed by an ``updated`` email:

- ``update_share`` of them change twice, the second change a few seconds after the first, so
  that some first ``updated`` emails are sent before the second change and some are superseded
  by it (coalesced into the later revision, nothing sent);
- ``scheduled_share`` of them change once and ask for an ``updated`` email ``scheduled_for``
  minutes ahead (seconds in ``--short``), which must never be sent before its time.

Real worker processes consume the queue. At random moments (seeded) the run:

- ``kill -9``s a worker process (Dramatiq's parent then stops its siblings and exits; a
  supervisor restarts the group, as Kubernetes restarts the pod);
- restarts Redis (append-only file on: the queue comes back from the AOF);
- empties Redis (``FLUSHALL``: only the reconciler can recover what was queued);
- restarts Postgres (the producer retries its inserts and changes, as the booking service
  would);
- takes the SMTP server down for ``--smtp-down`` seconds.

A reconciler thread runs ``reconcile`` every few seconds, as the chart's CronJob does. Dead
letters, if any, are replayed after the disruptions (the runbook's procedure).

The producer notes every request it made as (booking, type, revision, ``scheduled_for``); the
revision is the one ``send()`` recorded and put in the message (when Postgres was unreachable
the message carries none and the worker takes the revision current when it runs: such a request
is answered by an email at that revision or a later one). The SMTP server's messages are counted
by Message-ID, ``<booking-ID.TYPE.rREVISION@...>``. Per (booking, type): a request is lost when
it is the latest and no email at its revision or a later one arrived, or when it is an earlier
one that neither arrived nor was recorded ``superseded``; duplicates are copies beyond the first
of one Message-ID, each matched to the disruption that caused it; a superseded request whose
email arrived anyway, and a scheduled email that arrived before its ``scheduled_for``, are
failures. The run ends when every request's delivery row is ``sent`` or ``superseded`` and every
email that must arrive has, or at a deadline (which also covers the scheduled emails).

Usage: ``python -m bench.chaos [--bookings N] [--seed S] [--short] [--out DIR]``. A full run
writes ``bench/results/chaos.md`` and ``chaos.json``; ``--short`` is the small version that
``tests/e2e/chaos/test_chaos_short.py`` runs (results only with ``--out``). Exit status 0 means
nothing lost, nothing early, no superseded email sent, every duplicate explained and every dead
letter accounted for.
"""

from __future__ import annotations

import argparse
import email
import heapq
import itertools
import json
import os
import random
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email import policy
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
CHANGE = "UPDATE bookings SET party_size = party_size + 1 WHERE id = %s RETURNING revision"
DONE = ("sent", "superseded")
Key = tuple[str, str, int]
"""A Message-ID's (booking, email type, revision)."""
T = TypeVar("T")


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
    update_share: float = 0.15
    update_after: tuple[float, float] = (0.5, 3.0)
    second_update_after: tuple[float, float] = (1.0, 5.0)
    scheduled_share: float = 0.05
    schedule_lead: tuple[float, float] = (120.0, 180.0)
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
            second_update_after=(2.0, 12.0),  # the queue is seconds long: some go out first
            schedule_lead=(20.0, 25.0),
            short=True,
        )
        return replace(base, **overrides)


@dataclass(frozen=True)
class EmailRequest:
    """One ``send_booking_email.send`` call of the producer.

    ``revision`` is the booking revision the request is about: the one ``send()`` recorded and
    put in the message, or (``recorded`` False: Postgres was unreachable, the message carries
    none) the revision the producer's own write returned, a lower bound of the one the worker
    takes. ``at`` is the run time of the call."""

    booking_id: str
    type: str
    revision: int
    recorded: bool
    scheduled_for: datetime | None
    at: float

    @property
    def key(self) -> Key:
        return (self.booking_id, self.type, self.revision)


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
        self._init_tallies()
        self.events = plan(config, self.rng)
        self.pod_restarts = 0
        self.worker_log = self.work / "worker.log"
        self.group = self._new_group()
        stack.callback(self._stop_group)
        self.clock = Clock()

    # -- plumbing ---------------------------------------------------------------------------

    def _init_tallies(self) -> None:
        """What the producer, the reconciler and the replays note (subclasses call it too)."""
        self.requests: list[EmailRequest] = []
        self.bookings_produced = 0
        self.producer_stats: Counter[str] = Counter()
        self.reconciler_stats: Counter[str] = Counter()
        self.replayed: list[dict[str, Any]] = []

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
        """Create each booking and call ``send_booking_email.send`` for its status, like the
        booking service; then, for a share of the confirmed bookings, make real changes and ask
        for ``updated`` emails (two changes a few seconds apart, or one change and an email
        scheduled ahead), at their due times between the next bookings."""
        config = self.config
        # Its own generator, drawn the same way for every booking: the same mix on every run.
        mix = random.Random(f"chaos-mix-{config.seed}")
        rate = config.bookings / config.produce_seconds
        self._pconn = self._connect()
        # (run time, seq, booking, step, seconds: to the second change, or the schedule's lead)
        follow_ups: list[tuple[float, int, str, str, float]] = []
        seq = itertools.count()
        # The shares are spread evenly over the confirmed bookings (exact, not drawn).
        confirmed = changed_twice = scheduled = 0
        i = 0
        while i < config.bookings or follow_ups:
            next_booking = i / rate if i < config.bookings else float("inf")
            if follow_ups and follow_ups[0][0] <= next_booking:
                at, _, booking_id, step, seconds = heapq.heappop(follow_ups)
                if not self.clock.sleep_until(at, self.stop):
                    return
                if self._follow_up(booking_id, step, seconds) and step == "first change":
                    at = self.clock.now() + seconds
                    heapq.heappush(follow_ups, (at, next(seq), booking_id, "second change", 0.0))
                continue
            if not self.clock.sleep_until(next_booking, self.stop):
                return
            i += 1
            status = mix.choice(STATUS_MIX)
            after, gap = mix.uniform(*config.update_after), mix.uniform(*config.second_update_after)
            lead = mix.uniform(*config.schedule_lead)
            created = self._with_postgres(
                "booking insert retried (Postgres down)", partial(self._insert, status=status)
            )
            if created is None:
                self.producer_stats["booking not created"] += 1
                continue
            booking_id = str(created)
            self.bookings_produced += 1
            self._request(booking_id, EXPECTED_TYPE[status], 1)
            if status != "confirmed":
                continue
            confirmed += 1
            at = self.clock.now() + after
            if int(confirmed * config.update_share) > changed_twice:
                changed_twice += 1
                heapq.heappush(follow_ups, (at, next(seq), booking_id, "first change", gap))
            elif int(confirmed * config.scheduled_share + 0.5) > scheduled:
                scheduled += 1
                heapq.heappush(follow_ups, (at, next(seq), booking_id, "scheduled change", lead))
        self.producing_done.set()
        with suppress(Exception):
            self._pconn.close()

    def _follow_up(self, booking_id: str, step: str, lead: float) -> bool:
        """Change the booking and ask for its ``updated`` email (``scheduled change``: ``lead``
        seconds ahead); False if the change could not be made."""
        revision = self._with_postgres(
            "booking change retried (Postgres down)", partial(self._change, booking_id)
        )
        if revision is None:
            self.producer_stats["booking not changed"] += 1
            return False
        self.producer_stats["booking changes"] += 1
        due = datetime.now(UTC) + timedelta(seconds=lead) if step == "scheduled change" else None
        self._request(booking_id, "updated", revision, due)
        return True

    def _insert(self, conn: psycopg.Connection[dict[str, Any]], *, status: str) -> uuid.UUID:
        return insert_booking(conn, self.venue, status=status)

    @staticmethod
    def _change(booking_id: str, conn: psycopg.Connection[dict[str, Any]]) -> int:
        """A real change of a guest-visible column: the trigger bumps the revision."""
        row = conn.execute(CHANGE, (booking_id,)).fetchone()
        assert row is not None, f"booking {booking_id} not found"
        return int(row["revision"])

    def _with_postgres(
        self, retried: str, write: Callable[[psycopg.Connection[dict[str, Any]]], T]
    ) -> T | None:
        """``write`` on the producer's connection, retried (reconnecting) for about a minute
        while Postgres is unreachable, as the booking service would retry the request."""
        for _ in range(120):
            try:
                return write(self._pconn)
            except psycopg.OperationalError:
                self.producer_stats[retried] += 1
                with suppress(Exception):
                    self._pconn.close()
                time.sleep(0.5)
                with suppress(psycopg.OperationalError):
                    self._pconn = self._connect()
        return None

    def _request(
        self, booking_id: str, email_type: str, revision: int, scheduled_for: datetime | None = None
    ) -> None:
        """``send_booking_email.send``, retried while it raises EmailNotAccepted; notes the
        request with the revision its message carries."""
        from service.actors.emails import EmailNotAccepted, send_booking_email

        at = self.clock.now()
        extra = {} if scheduled_for is None else {"scheduled_for": scheduled_for}
        carried = None
        for _ in range(120):
            try:
                message = send_booking_email.send(booking_id, email_type, **extra)
                self.producer_stats["send() accepted"] += 1
                carried = (
                    message.kwargs.get("revision") if isinstance(message.kwargs, dict) else None
                )
                break
            except EmailNotAccepted:
                self.producer_stats["send() raised EmailNotAccepted (retried)"] += 1
                time.sleep(0.5)
        else:
            self.producer_stats["send() never accepted"] += 1
        self.requests.append(
            EmailRequest(
                booking_id=booking_id,
                type=email_type,
                revision=int(carried) if carried is not None else revision,
                recorded=carried is not None,
                scheduled_for=scheduled_for,
                at=at,
            )
        )

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

    def delivery_rows(self) -> dict[Key, str]:
        """The state of every delivery row, by (booking, type, revision)."""
        rows = self.conn.execute(
            "SELECT booking_id, email_type, revision, state FROM email_deliveries"
        ).fetchall()
        return {
            (str(r["booking_id"]), r["email_type"], int(r["revision"])): r["state"] for r in rows
        }

    def account(self, received: Received | None = None) -> Accounting:
        """Each request against the delivery rows and the SMTP server's messages."""
        return account(
            self.requests,
            received_ids(self.sink) if received is None else received,
            self.delivery_rows(),
        )

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
        """Wait until every request's delivery row is ``sent`` or ``superseded`` and every email
        that must arrive is at the SMTP server; seconds it took. The deadline runs from the
        drain's start, or from the latest ``scheduled_for`` if that is later."""
        started = self.clock.now()
        due = [
            self.clock.wall_to_run(r.scheduled_for.timestamp())
            for r in self.requests
            if r.scheduled_for is not None
        ]
        end = max([started, *due]) + self.config.drain_timeout
        while self.clock.now() < end:
            with suppress(psycopg.Error):
                if self.conn.closed:
                    self.conn = self._connect()
                self.replay_dead_letters()
                rows = self.delivery_rows()
                index = RowIndex(rows)
                done = all(index.state(r) in DONE for r in self.requests)
                if done and not account(self.requests, received_ids(self.sink), rows).lost:
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
    """The SMTP server's messages by Message-ID: copies, and when each copy was stored (wall
    clock, the file's mtime); ``foreign`` counts messages with no booking Message-ID."""

    ids: Counter[Key]
    times: dict[Key, list[float]]
    foreign: int

    def first(self, key: Key) -> float:
        return min(self.times[key])


def parse_message_id(mid: str) -> Key | None:
    """``<booking-ID.TYPE.rREVISION@domain>`` as (booking, type, revision); None otherwise."""
    local = mid.strip().strip("<>").split("@", 1)[0]
    if not local.startswith("booking-"):
        return None
    parts = local.removeprefix("booking-").split(".")
    if len(parts) != 3 or not parts[2].startswith("r") or not parts[2][1:].isdigit():
        return None
    return (parts[0], parts[1], int(parts[2][1:]))


def received_ids(sink: SmtpSink) -> Received:
    """Count the SMTP server's messages by (booking, type, revision), from their deterministic
    Message-ID."""
    ids: Counter[Key] = Counter()
    times: dict[Key, list[float]] = {}
    foreign = 0
    for path in sorted(sink.store.glob("*.eml")):
        with path.open("rb") as fh:
            head = fh.read(8192)
        msg = email.message_from_bytes(head, policy=policy.compat32)
        key = parse_message_id(str(msg.get("Message-ID", "")))
        if key is None:
            foreign += 1
            continue
        ids[key] += 1
        times.setdefault(key, []).append(path.stat().st_mtime)
    return Received(ids, times, foreign)


class RowIndex:
    """The delivery rows, to find the row of a request."""

    def __init__(self, rows: dict[Key, str]) -> None:
        self.rows = rows
        self.revisions: dict[tuple[str, str], list[int]] = defaultdict(list)
        for booking, kind, revision in sorted(rows):
            self.revisions[(booking, kind)].append(revision)

    def row_of(self, request: EmailRequest) -> Key | None:
        """The request's own row; for a request whose message carried no revision, the first
        row at its revision or a later one (the worker took the revision current when it ran)."""
        if request.recorded:
            return request.key if request.key in self.rows else None
        pair = (request.booking_id, request.type)
        later = [v for v in self.revisions.get(pair, ()) if v >= request.revision]
        return (*pair, later[0]) if later else None

    def state(self, request: EmailRequest) -> str:
        row = self.row_of(request)
        return "missing" if row is None else self.rows[row]


@dataclass(frozen=True)
class Outcome:
    """What became of one request. ``answer``: the Message-ID that arrived for it (its own, or
    for the latest request of its booking and type, or one whose message carried no revision, a
    later revision's); ``verdict``: ``received``, ``superseded`` (coalesced into a later
    request, nothing sent) or ``lost``; ``sent_superseded``: recorded superseded, yet its own
    email arrived."""

    request: EmailRequest
    state: str
    answer: Key | None
    verdict: str
    sent_superseded: bool
    latest: bool


@dataclass
class Accounting:
    outcomes: list[Outcome]
    unexpected: list[Key]
    """Message-IDs at the SMTP server that answer no request."""

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict == "lost"]

    def answered(self) -> dict[Key, list[Outcome]]:
        out: dict[Key, list[Outcome]] = defaultdict(list)
        for o in self.outcomes:
            if o.answer is not None:
                out[o.answer].append(o)
        return out


def account(requests: list[EmailRequest], received: Received, rows: dict[Key, str]) -> Accounting:
    """Per (booking, type): the latest request is lost unless an email at its revision or a
    later one arrived; an earlier one is lost unless its email arrived or its row was recorded
    ``superseded``. A request whose message carried no revision is answered by the first email
    at its revision or a later one."""
    index = RowIndex(rows)
    got: dict[tuple[str, str], list[int]] = defaultdict(list)
    for booking, kind, revision in sorted(received.ids):
        got[(booking, kind)].append(revision)
    groups: dict[tuple[str, str], list[EmailRequest]] = defaultdict(list)
    for r in requests:
        groups[(r.booking_id, r.type)].append(r)
    outcomes = []
    for pair, group in groups.items():
        latest = max(r.revision for r in group)
        for r in group:
            row = index.row_of(r)
            state = "missing" if row is None else rows[row]
            later = [v for v in got.get(pair, ()) if v >= r.revision]
            answer: Key | None = None
            if r.key in received.ids:
                answer, verdict = r.key, "received"
            elif state == "superseded" and r.revision < latest:
                verdict = "superseded"
            elif later and (r.revision == latest or not r.recorded):
                answer, verdict = (*pair, later[0]), "received"
            else:
                verdict = "lost"
            outcomes.append(
                Outcome(
                    request=r,
                    state=state,
                    answer=answer,
                    verdict=verdict,
                    sent_superseded=state == "superseded" and row in received.ids,
                    latest=r.revision == latest,
                )
            )
    answers = {o.answer for o in outcomes}
    unexpected = sorted(k for k in received.ids if k not in answers)
    return Accounting(outcomes, unexpected)


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
                f"produced {run.bookings_produced} bookings, {len(run.requests)} email "
                f"requests; all disruptions done at "
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
    rows = run.delivery_rows()
    acc = account(run.requests, received, rows)
    outcomes = acc.outcomes
    answered = acc.answered()
    duplicates: list[dict[str, Any]] = []
    for key, n in sorted(received.ids.items()):
        if n > 1:
            first = clock.wall_to_run(received.first(key))
            duplicates.append(
                {
                    "booking_id": key[0],
                    "type": key[1],
                    "revision": key[2],
                    "copies": n,
                    "first_copy_at": round(first, 2),
                    "cause": explain_duplicate(first, run.events),
                }
            )
    state_counts = Counter(o.state for o in outcomes)
    dead_letters = dead_letter_report(run, rows, received)
    accounted = all(
        (d["final_state"] == "sent" and d["received"] >= 1) or d["final_state"] == "superseded"
        for d in dead_letters
    )
    lost_detail = [
        {
            "booking_id": o.request.booking_id,
            "type": o.request.type,
            "revision": o.request.revision,
            "recorded": o.request.recorded,
            "latest": o.latest,
            "scheduled_for": None
            if o.request.scheduled_for is None
            else o.request.scheduled_for.isoformat(),
            "state": o.state,
        }
        for o in acc.lost
    ]
    sent_superseded = [
        {
            "booking_id": o.request.booking_id,
            "type": o.request.type,
            "revision": o.request.revision,
            "first_copy_at": round(clock.wall_to_run(received.first(o.request.key)), 2)
            if o.request.key in received.ids
            else None,
        }
        for o in outcomes
        if o.sent_superseded
    ]
    scheduled = [o for o in outcomes if o.request.scheduled_for is not None]
    margins: list[float] = []
    early: list[dict[str, Any]] = []
    for o in scheduled:
        if o.answer is None:
            continue
        assert o.request.scheduled_for is not None
        margin = received.first(o.answer) - o.request.scheduled_for.timestamp()
        margins.append(margin)
        if margin < 0:
            early.append(
                {
                    "booking_id": o.request.booking_id,
                    "revision": o.request.revision,
                    "scheduled_for": o.request.scheduled_for.isoformat(),
                    "seconds_early": round(-margin, 3),
                }
            )
    updates = [
        o for o in outcomes if o.request.type == "updated" and o.request.scheduled_for is None
    ]
    first_updates = Counter(o.verdict for o in updates if not o.latest)
    unscheduled = {
        key for key, got in answered.items() if any(o.request.scheduled_for is None for o in got)
    }
    unscheduled_at = max((clock.wall_to_run(received.first(k)) for k in unscheduled), default=None)
    total_dups = sum(d["copies"] - 1 for d in duplicates)
    result = {
        "ok": False,
        "command": "python -m bench.chaos"
        + (" --short" if config.short else "")
        + (
            ""
            if config.bookings == (200 if config.short else 2000)
            else f" --bookings {config.bookings}"
        )
        + ("" if config.seed == 1 else f" --seed {config.seed}"),
        "config": asdict(config),
        "bookings_produced": run.bookings_produced,
        "expected": len(outcomes),
        "status_emails": sum(o.request.type != "updated" for o in outcomes),
        "updates": len(updates),
        "updated_bookings": len({o.request.booking_id for o in updates}),
        "first_updates": {
            "sent before the second change": first_updates.get("received", 0),
            "superseded by the second change": first_updates.get("superseded", 0),
            "lost": first_updates.get("lost", 0),
        },
        "scheduled": len(scheduled),
        "early": len(early),
        "early_detail": early,
        "min_schedule_margin_s": round(min(margins), 3) if margins else None,
        "max_schedule_margin_s": round(max(margins), 3) if margins else None,
        "schedule_margins_s": sorted(round(m, 2) for m in margins),
        "superseded": sum(o.state == "superseded" for o in outcomes),
        "superseded_but_received": len(sent_superseded),
        "superseded_but_received_detail": sent_superseded,
        "unrecorded_requests": sum(not o.request.recorded for o in outcomes),
        "coalesced": sum(len(got) - 1 for got in answered.values()),
        "received_unique": len(received.ids),
        "received_total": sum(received.ids.values()),
        "lost": len(lost_detail),
        "lost_detail": lost_detail,
        "duplicates": total_dups,
        "duplicate_detail": duplicates,
        "unexpected_emails": len(acc.unexpected) + received.foreign,
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
        "unscheduled_delivered_at": None if unscheduled_at is None else round(unscheduled_at, 1),
        "queue_left_over": quiet,
        "wall_seconds": round(clock.now(), 1),
        "throughput_emails_per_s": round(len(unscheduled) / unscheduled_at, 1)
        if unscheduled_at
        else None,
    }
    result["ok"] = passed(result)
    return result


def passed(result: dict[str, Any]) -> bool:
    """Nothing lost, nothing sent early, no superseded email sent, every duplicate explained,
    every dead letter accounted for, and the drain finished."""
    return (
        not result["lost"]
        and not result["early"]
        and not result["superseded_but_received"]
        and all(d["cause"] != "unexplained" for d in result["duplicate_detail"])
        and result["dead_letters_accounted"]
        and result["all_delivered_at"] is not None
    )


def dead_letter_report(run: Run, rows: dict[Key, str], received: Received) -> list[dict[str, Any]]:
    """Each dead letter with the final state of the request it was about (a message without a
    revision: the latest row of its booking and type) and the copies that arrived."""
    dead_rows = run.conn.execute(
        "SELECT message_id, message, reason, error, failed_at, replayed_at FROM dead_letters"
        " ORDER BY failed_at"
    ).fetchall()
    index = RowIndex(rows)
    out = []
    for row in dead_rows:
        kwargs = row["message"].get("kwargs") or {}
        pair = (str(kwargs.get("booking_id")), str(kwargs.get("type")))
        revision = kwargs.get("revision")
        if revision is None:
            revisions = index.revisions.get(pair, [])
            revision = revisions[-1] if revisions else None
        key = None if revision is None else (*pair, int(revision))
        out.append(
            {
                "message_id": row["message_id"],
                "reason": row["reason"],
                "error": row["error"],
                "booking_id": pair[0],
                "type": pair[1],
                "revision": revision,
                "replayed": row["replayed_at"] is not None,
                "final_state": rows.get(key, "missing") if key else "missing",
                "received": received.ids.get(key, 0) if key else 0,
            }
        )
    return out


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
        (
            "bookings / email requests",
            f"{result['bookings_produced']} / {result['expected']}: {result['status_emails']} "
            f"status, {result['updates']} `updated` after two changes on "
            f"{result['updated_bookings']} bookings, {result['scheduled']} `updated` scheduled "
            f"{c['schedule_lead'][0]:g}-{c['schedule_lead'][1]:g} s ahead",
        ),
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
        (
            "superseded (coalesced into the later revision, not sent) / of them received anyway",
            f"{result['superseded']} / **{result['superseded_but_received']}**",
        ),
        ("first `updated` of a booking changed twice", fmt(result["first_updates"])),
        (
            "**scheduled emails sent early** / earliest arrival after `scheduled_for`",
            f"**{result['early']}** / {fmt_seconds(result['min_schedule_margin_s'])}"
            f" (latest {fmt_seconds(result['max_schedule_margin_s'])})",
        ),
        ("delivery rows of the requests", fmt(result["delivery_states"])),
        (
            "requests sent without a revision (Postgres down) / answered by a shared email",
            f"{result['unrecorded_requests']} / {result['coalesced']}",
        ),
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
            "last disruption ended / all unscheduled delivered / all delivered",
            f"t={result['last_disruption_ended_at']}s / t={result['unscheduled_delivered_at']}s"
            f" / t={result['all_delivered_at']}s",
        ),
        (
            "throughput incl. disruptions (unscheduled emails)",
            f"{result['throughput_emails_per_s']} emails/s",
        ),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f} s"


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
        f"Mix: every booking's status email; {c['update_share']:.0%} of the confirmed bookings "
        f"changed twice (party size + 1, the second change "
        f"{c['second_update_after'][0]:g}-{c['second_update_after'][1]:g} s after the first), "
        "each change followed by an `updated` email; "
        f"{c['scheduled_share']:.0%} changed once with an `updated` email scheduled "
        f"{c['schedule_lead'][0]:g}-{c['schedule_lead'][1]:g} s ahead. Each request is counted "
        "at its revision (Message-ID `<booking-ID.TYPE.rREVISION@...>`).",
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
            "| booking | type | revision | copies | first copy at t (s) | cause |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {d['booking_id']} | {d['type']} | {d['revision']} | {d['copies']} | "
            f"{d['first_copy_at']} | {d['cause']} |"
            for d in result["duplicate_detail"]
        ]
    else:
        out.append("None.")
    if result["superseded_but_received_detail"]:
        out += ["", "## Superseded, yet received", ""]
        out += [
            f"- {d['booking_id']} {d['type']} r{d['revision']}: first copy at t={d['first_copy_at']} s"
            for d in result["superseded_but_received_detail"]
        ]
    if result["early_detail"]:
        out += ["", "## Sent before their scheduled time", ""]
        out += [
            f"- {d['booking_id']} r{d['revision']}: scheduled for {d['scheduled_for']}, "
            f"{d['seconds_early']} s early"
            for d in result["early_detail"]
        ]
    out += ["", "## Dead letters", ""]
    if result["dead_letters"]:
        out += [
            "| booking | type | revision | reason | error | replayed | final state |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {d['booking_id']} | {d['type']} | {d['revision']} | {d['reason']} | {d['error']} | "
            f"{d['replayed']} | {d['final_state']} |"
            for d in result["dead_letters"]
        ]
    else:
        out.append("None.")
    if result["lost_detail"]:
        out += ["", "## Lost", ""]
        out += [
            f"- {d['booking_id']} {d['type']} r{d['revision']}"
            + (" (latest)" if d["latest"] else "")
            + ("" if d["recorded"] else " (sent without a revision)")
            + f": delivery row {d['state']}"
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
