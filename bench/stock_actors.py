"""The stock-Dramatiq baseline actors, declared on a broker the caller builds; no service code.

Stock settings throughout: Dramatiq's default middleware, default Redis heartbeat timeout and
maintenance chance. ``noop`` does nothing; ``slow`` sleeps ``BENCH_SLOW_SECONDS`` and then
leaves a file named after its message in ``BENCH_DONE_DIR``, so that a benchmark can tell which
messages were processed (at least once). A benchmark sends through ``declare(stock_broker(url))``
in its own process; the workers run ``python -m dramatiq bench.raw_actors``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

RAW_QUEUE = "bench-raw"
SLOW_QUEUE = "bench-slow"


class StockActors(NamedTuple):
    broker: dramatiq.Broker
    noop: dramatiq.Actor[..., None]
    slow: dramatiq.Actor[[int], None]


def stock_broker(url: str) -> dramatiq.Broker:
    """A stock Redis or RabbitMQ broker for ``url``, with ``CurrentMessage`` for ``slow``."""
    if url.startswith("amqp"):
        broker: dramatiq.Broker = RabbitmqBroker(url=url)
    else:
        broker = RedisBroker(url=url)
    broker.add_middleware(CurrentMessage())
    return broker


def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: the cost of Dramatiq itself."""


def slow(index: int) -> None:
    """Stays busy for a while, then marks its message done."""
    time.sleep(float(os.environ.get("BENCH_SLOW_SECONDS", "0.3")))
    done = os.environ.get("BENCH_DONE_DIR")
    message = CurrentMessage.get_current_message()
    if done and message is not None:
        (Path(done) / message.message_id).touch()


def declare(broker: dramatiq.Broker) -> StockActors:
    """Declare ``noop`` and ``slow`` on ``broker`` (once per broker)."""
    return StockActors(
        broker,
        dramatiq.actor(broker=broker, queue_name=RAW_QUEUE, max_retries=0)(noop),
        dramatiq.actor(broker=broker, queue_name=SLOW_QUEUE, max_retries=0)(slow),
    )
