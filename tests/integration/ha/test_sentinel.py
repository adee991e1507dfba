"""``BROKER_URL=redis+sentinel://...`` against a real Sentinel deployment: the producer and a
running worker follow the primary across a failover without a restart; with every Sentinel down
``.send()`` takes the documented broker-down path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from prometheus_client import REGISTRY

from harness.sentinel import SentinelDeployment
from harness.servers import SmtpSink
from service.app import App
from service.config import ConfigError, load_settings
from service.dlq.brokers import open_dead_queues
from service.observability.collectors import RedisQueues
from service.observability.health import readiness
from tests.support.current_app import running_app
from tests.support.emails import QUEUE, Db, eventually, received_for


def decisions(name: str) -> float:
    value = REGISTRY.get_sample_value("booking_email_producer_decisions_total", {"decision": name})
    return value or 0.0


@pytest.fixture
def ha_app(sentinel_env: dict[str, str]) -> Iterator[App]:
    with running_app(sentinel_env) as application:
        yield application


@pytest.fixture
def ha_worker(ha_app: App) -> Iterator[dramatiq.Worker]:
    w = dramatiq.Worker(ha_app.broker, worker_threads=2, worker_timeout=100)
    w.start()
    yield w
    w.stop(timeout=10_000)


@pytest.fixture
def ha_db(sentinel_env: dict[str, str]) -> Iterator[Db]:
    database = Db(sentinel_env["DATABASE_URL"])
    yield database
    database.conn.close()


def send(db: Db, count: int) -> list[Any]:
    from service.actors.emails import send_booking_email

    bookings = [db.booking(status="confirmed") for _ in range(count)]
    for booking in bookings:
        send_booking_email.send(str(booking), "confirmed")
    return bookings


def all_sent(db: Db, bookings: list[Any]) -> bool:
    return all((r := db.delivery(b, "confirmed")) and r["state"] == "sent" for b in bookings)


def test_a_bad_sentinel_url_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"BROKER_URL": "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380"})
    assert str(raised.value) == (
        "invalid configuration: BROKER_URL: a Sentinel URL must name the master after the hosts"
        " (redis+sentinel://host1:26379,host2:26379/<master-name>/<db>)"
    )


def test_producer_and_worker_follow_the_primary_after_a_failover(
    sentinel_deployment: SentinelDeployment,
    ha_app: App,
    ha_worker: dramatiq.Worker,
    ha_db: Db,
    smtp_sink: SmtpSink,
) -> None:
    before = send(ha_db, 5)
    eventually(lambda: all_sent(ha_db, before))
    old = sentinel_deployment.kill_primary()
    try:
        new = sentinel_deployment.wait_for_failover(old.port)
        assert new.port != old.port
        queued = decisions("queued")
        after = send(ha_db, 10)
        # enqueued on the new primary by the same producer, no fallback
        assert decisions("queued") == queued + 10
        # and delivered by the same worker, which reconnected by itself
        eventually(lambda: all_sent(ha_db, after), timeout=30)
        for booking in before + after:
            assert len(received_for(smtp_sink, booking)) == 1
        assert ha_app.broker.client.connection_pool.get_master_address() == (  # type: ignore[attr-defined]
            "127.0.0.1",
            new.port,
        )
    finally:
        old.start()  # back as a replica of the new primary (Sentinel converts it)
        sentinel_deployment.wait_replicated()


def test_every_redis_user_reaches_the_current_primary(
    sentinel_deployment: SentinelDeployment, ha_app: App, ha_db: Db
) -> None:
    send(ha_db, 3)  # no worker: they stay on the queue
    queues = RedisQueues(ha_app.settings.secret("broker_url"), lambda: [QUEUE])
    depth = {
        tuple(s.labels.values()): s.value
        for family in queues.collect()
        if family.name == "booking_queue_depth"
        for s in family.samples
    }
    assert depth[(QUEUE, "ready")] == 3
    dead = open_dead_queues(ha_app.settings)
    try:
        assert dead.copies(QUEUE) == {}
    finally:
        dead.close()
    verdict = readiness(ha_app.settings)
    assert verdict.ok, verdict.problems


def test_with_every_sentinel_down_send_falls_back_to_an_immediate_send(
    sentinel_deployment: SentinelDeployment,
    ha_app: App,
    ha_db: Db,
    smtp_sink: SmtpSink,
) -> None:
    for sentinel in sentinel_deployment.sentinel_nodes:
        sentinel.stop()
    try:
        immediate = decisions("immediate_broker_down")
        started = time.monotonic()
        (booking,) = send(ha_db, 1)
        assert time.monotonic() - started < 15  # bounded by the connect timeouts, not hanging
        assert decisions("immediate_broker_down") == immediate + 1
        row = ha_db.delivery(booking, "confirmed")
        assert row is not None and row["state"] == "sent"
        assert len(received_for(smtp_sink, booking)) == 1
        verdict = readiness(ha_app.settings)
        assert not verdict.ok and any("broker" in p for p in verdict.problems), verdict.problems
    finally:
        for sentinel in sentinel_deployment.sentinel_nodes:
            sentinel.start()
