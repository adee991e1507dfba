"""The Redis consumer after a lost connection, on a real Redis restarted under an in-process
worker: what the worker dropped from memory comes back, what it still holds is left alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from prometheus_client import REGISTRY

from harness.servers import RedisServer
from service.broker import MaintainedRedisBroker, redis_client
from tests.support.emails import eventually

METRIC = "booking_redis_requeued_after_reconnect_total"


def requeued(queue: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"queue": queue}) or 0.0


@pytest.fixture
def blip_redis() -> Iterator[RedisServer]:
    server = RedisServer.start_new()
    yield server
    server.destroy()


def test_reconnect_requeues_dropped_delayed_messages_and_leaves_held_ones(
    blip_redis: RedisServer,
) -> None:
    broker = MaintainedRedisBroker(client=redis_client(blip_redis.url), middleware=[])
    release = threading.Event()
    calls: dict[str, list[float]] = {"slow": [], "queued": [], "later": []}

    @dramatiq.actor(broker=broker, queue_name="blip", actor_name="slow")
    def slow() -> None:
        calls["slow"].append(time.time())
        release.wait(60)

    @dramatiq.actor(broker=broker, queue_name="blip", actor_name="queued")
    def queued() -> None:
        calls["queued"].append(time.time())

    @dramatiq.actor(broker=broker, queue_name="blip", actor_name="later")
    def later() -> None:
        calls["later"].append(time.time())

    client = redis.Redis.from_url(blip_redis.url)
    before = requeued("blip.DQ"), requeued("blip")
    # Two threads prefetch 4: with 3 messages out, the consumer keeps fetching and so meets the
    # connection error (with 4 out it would not touch Redis).
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        slow.send()
        slow.send()
        eventually(lambda: len(calls["slow"]) == 2)  # both worker threads are busy
        queued.send()  # fetched into the work queue behind them
        due = time.time() + 4
        later.send_with_options(delay=4000)
        acks = f"dramatiq:__acks__.{broker.broker_id}"
        eventually(lambda: client.scard(f"{acks}.blip") == 3 and client.scard(f"{acks}.blip.DQ"))

        blip_redis.stop()
        time.sleep(3)  # every consumer meets the connection error; the delay queue is dropped
        blip_redis.start()
        eventually(lambda: requeued("blip.DQ") > before[0], timeout=15)
        time.sleep(4)  # the main queue's consumer has reconnected too (restart delay 3 s)
        release.set()
        eventually(lambda: calls["later"] and calls["queued"], timeout=15)
        time.sleep(2)  # a requeued copy of a held message would run now
        worker.join()
    finally:
        release.set()
        worker.stop(timeout=10_000)

    assert [len(calls[name]) for name in ("slow", "queued", "later")] == [2, 1, 1]
    assert calls["later"][0] >= due - 0.01  # its eta held through the requeue
    assert requeued("blip.DQ") - before[0] == 1
    assert requeued("blip") == before[1]  # the held messages were left alone
    assert client.hlen("dramatiq:blip.msgs") == client.hlen("dramatiq:blip.DQ.msgs") == 0
    assert all(client.scard(key) == 0 for key in client.keys("dramatiq:__acks__.*"))
