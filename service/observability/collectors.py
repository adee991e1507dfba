"""Scrape-time collectors: values read from the broker, Postgres and heartbeat records per scrape.

Each source runs in its own thread with a deadline; one that fails or is too slow is left out of
that scrape and shows as ``booking_collector_up{collector=...} 0`` and an increment of
``booking_collector_errors_total``, so a slow backend never hangs the scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pika.exceptions
import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.amqp import connect
from service.config import Settings
from service.logs import get_logger
from service.metrics import (
    COLLECTOR_DURATION,
    COLLECTOR_ERRORS_HELP,
    COLLECTOR_ERRORS_NAME,
    COLLECTOR_UP,
    OUTBOX_OLDEST_AGE,
    OUTBOX_PENDING,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    heartbeat_gauge,
)
from service.observability.heartbeat import read_records, record_is_current
from service.redis_urls import redis_client

log = get_logger(__name__)
T = TypeVar("T")

BACKEND_TIMEOUT_SECONDS = 2.0
SCRAPE_DEADLINE_SECONDS = 4.0
STATES = ("ready", "in_flight", "delayed", "dead")
NAMESPACE = "dramatiq"


class Source(Protocol):
    name: str

    def collect(self) -> list[Metric]: ...


def current_records(health_file: Path) -> list[dict[str, Any]]:
    return [data for _, data in read_records(health_file) if record_is_current(data)]


def worker_queues(records: Iterable[dict[str, Any]]) -> list[str]:
    """The queues declared by this pod's worker processes (every queue of the application)."""
    return sorted(
        {str(q) for r in records if r.get("role") == "worker" for q in r.get("queues", [])}
    )


def waiting_since_ms(message: dict[str, Any]) -> float:
    """When a message became ready: its enqueue time, or its due time if it was delayed."""
    options = message.get("options") or {}
    return float(max(message.get("message_timestamp") or 0, options.get("eta") or 0))


def _depth_families(depths: dict[str, dict[str, int]], ages: dict[str, float]) -> list[Metric]:
    depth = QUEUE_DEPTH.family()
    oldest = QUEUE_OLDEST_AGE.family()
    for queue, by_state in sorted(depths.items()):
        for state in STATES:
            if state in by_state:
                depth.add_metric([queue, state], by_state[state])
        oldest.add_metric([queue], ages.get(queue, 0.0))
    return [depth, oldest]


class RedisQueues:
    """Queue depths from Dramatiq's Redis keys (see docs/metrics.md for the key layout)."""

    name = "queues"

    def __init__(self, url: str, queues: Callable[[], Sequence[str]]) -> None:
        self.client = redis_client(
            url,
            connect_timeout=BACKEND_TIMEOUT_SECONDS,
            socket_timeout=BACKEND_TIMEOUT_SECONDS,
        )
        self.queues = queues

    def collect(self) -> list[Metric]:
        queues = list(self.queues())
        if not queues:
            return []
        members: Any = self.client.zrange(f"{NAMESPACE}:__heartbeats__", 0, -1)
        workers = [w.decode() for w in members]
        pipe = self.client.pipeline(transaction=False)
        for q in queues:
            pipe.llen(f"{NAMESPACE}:{q}")
            pipe.hlen(f"{NAMESPACE}:{q}.DQ.msgs")
            pipe.zcard(f"{NAMESPACE}:{q}.XQ")
            pipe.lindex(f"{NAMESPACE}:{q}", 0)
            for w in workers:
                pipe.scard(f"{NAMESPACE}:__acks__.{w}.{q}")
        results = iter(pipe.execute())
        depths: dict[str, dict[str, int]] = {}
        heads: dict[str, bytes] = {}
        for q in queues:
            ready, delayed, dead, head = next(results), next(results), next(results), next(results)
            in_flight = sum(int(next(results)) for _ in workers)
            depths[q] = {"ready": ready, "in_flight": in_flight, "delayed": delayed, "dead": dead}
            if head is not None:
                heads[q] = head
        ages: dict[str, float] = {}
        if heads:
            pipe = self.client.pipeline(transaction=False)
            for q, head in heads.items():
                pipe.hget(f"{NAMESPACE}:{q}.msgs", head)
            now_ms = time.time() * 1000
            for q, raw in zip(heads, pipe.execute(), strict=True):
                if raw:
                    ages[q] = max(0.0, (now_ms - waiting_since_ms(json.loads(raw))) / 1000)
        return _depth_families(depths, ages)


class RabbitQueues:
    """Queue depths over AMQP, without the management plugin.

    ``ready``, ``delayed`` and ``dead`` come from passive declares of ``<q>``, ``<q>.DQ`` and
    ``<q>.XQ`` (AMQP counts only messages not delivered to a consumer). AMQP exposes no unacked
    count, so ``in_flight`` is what this pod's worker processes are running, and ``delayed`` adds
    the delayed messages they hold in memory: on RabbitMQ those two are per pod (sum them). The
    oldest age peeks at the head message (basic.get, then reject with requeue).
    """

    name = "queues"

    def __init__(self, url: str, health_file: Path, queues: Callable[[], Sequence[str]]) -> None:
        self.url = url
        self.health_file = health_file
        self.queues = queues

    def _connect(self) -> Any:
        return connect(self.url, timeout=BACKEND_TIMEOUT_SECONDS)

    def collect(self) -> list[Metric]:
        queues = list(self.queues())
        if not queues:
            return []
        records = current_records(self.health_file)
        depths: dict[str, dict[str, int]] = {}
        ages: dict[str, float] = {}
        connection = self._connect()
        try:
            channel = connection.channel()
            for q in queues:
                counts = {}
                for state, name in (("ready", q), ("delayed", f"{q}.DQ"), ("dead", f"{q}.XQ")):
                    try:
                        counts[state] = channel.queue_declare(
                            name, passive=True
                        ).method.message_count
                    except pika.exceptions.ChannelClosedByBroker:
                        counts[state] = 0
                        channel = connection.channel()
                counts["in_flight"] = sum(
                    1 for r in records for t in r.get("tasks", []) if t.get("queue") == q
                )
                counts["delayed"] += sum(
                    int((r.get("delayed_held") or {}).get(q, 0)) for r in records
                )
                depths[q] = counts
                if counts["ready"]:
                    ages[q] = self._head_age(channel, q)
        finally:
            connection.close()
        return _depth_families(depths, ages)

    @staticmethod
    def _head_age(channel: Any, queue: str) -> float:
        method, _, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return 0.0
        channel.basic_reject(method.delivery_tag, requeue=True)
        return max(0.0, (time.time() * 1000 - waiting_since_ms(json.loads(body))) / 1000)


class Database:
    """One lazily opened autocommit connection with short connect and statement timeouts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[Any], T]) -> T:
        """``work(connection)`` under this object's lock; a failure drops the connection."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=int(BACKEND_TIMEOUT_SECONDS),
                        options=f"-c statement_timeout={int(BACKEND_TIMEOUT_SECONDS * 1000)}",
                    )
                return work(self._conn)
            except Exception:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.run(lambda conn: list(conn.execute(sql, params).fetchall()))


class Outbox:
    name = "outbox"

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> list[Metric]:
        ((pending, oldest),) = self.db.query(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)"
            " FROM outbox_events WHERE status = %s",
            ("pending",),
        )
        return [
            OUTBOX_PENDING.family(pending),
            OUTBOX_OLDEST_AGE.family(float(oldest)),
        ]


class Heartbeats:
    name = "heartbeats"

    def __init__(self, health_file: Path) -> None:
        self.health_file = health_file

    def collect(self) -> list[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for record in current_records(self.health_file):
            role = str(record.get("role", "worker"))
            family = families.get(role)
            if family is None:
                family = families[role] = heartbeat_gauge(role).family()
            family.add_metric([str(record["pid"])], float(record.get("time", 0)))
        return list(families.values())


class ScrapeCollector(Collector):
    """Runs every source concurrently per scrape, within ``deadline`` seconds in total."""

    def __init__(self, sources: Sequence[Source], deadline: float = SCRAPE_DEADLINE_SECONDS):
        self.sources = list(sources)
        self.deadline = deadline
        self.errors = {s.name: 0 for s in self.sources}
        self._busy = {s.name: threading.Lock() for s in self.sources}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, 2 * len(self.sources)), thread_name_prefix="collector"
        )

    def _run(self, source: Source) -> tuple[list[Metric], float]:
        lock = self._busy[source.name]
        if not lock.acquire(blocking=False):
            raise TimeoutError("the previous collection is still running")
        try:
            started = time.monotonic()
            return source.collect(), time.monotonic() - started
        finally:
            lock.release()

    def collect(self) -> Iterator[Metric]:
        up = COLLECTOR_UP.family()
        errors = CounterMetricFamily(
            COLLECTOR_ERRORS_NAME, COLLECTOR_ERRORS_HELP, labels=["collector"]
        )
        duration = COLLECTOR_DURATION.family()
        futures = {s.name: self._pool.submit(self._run, s) for s in self.sources}
        wait(futures.values(), timeout=self.deadline)
        for name, future in futures.items():
            ok = False
            if future.done():
                try:
                    metrics, took = future.result()
                    yield from metrics
                    duration.add_metric([name], took)
                    ok = True
                except Exception as error:
                    log.warning(
                        "scrape-time collection failed", collector=name, error=type(error).__name__
                    )
            else:
                log.warning("scrape-time collection timed out", collector=name)
            if not ok:
                self.errors[name] += 1
            up.add_metric([name], 1 if ok else 0)
            errors.add_metric([name], self.errors[name])
        yield from (up, errors, duration)


def build_sources(
    settings: Settings,
    *,
    queues: bool,
    features: Sequence[Callable[[Database], Source]] = (),
) -> list[Source]:
    """The scrape-time sources of a pod: queue depths (worker pods), the outbox, heartbeats, and
    the ones features register (each made from the collectors' database connection)."""
    health_file = settings.health_file
    db = Database(settings.secret("database_url"))
    sources: list[Source] = [Outbox(db), *(make(db) for make in features), Heartbeats(health_file)]
    if queues:
        url = settings.secret("broker_url")

        def declared() -> list[str]:
            return worker_queues(current_records(health_file))

        if settings.broker_kind == "rabbitmq":
            sources.insert(0, RabbitQueues(url, health_file, declared))
        else:
            sources.insert(0, RedisQueues(url, declared))
    return sources
