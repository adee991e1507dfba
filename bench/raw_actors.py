"""Baseline actors on a stock Dramatiq broker built from ``BROKER_URL`` (``dramatiq bench.raw_actors``).

Stock settings throughout: Dramatiq's default middleware, default Redis heartbeat timeout and
maintenance chance, no service code. ``noop`` does nothing; ``slow`` sleeps
``BENCH_SLOW_SECONDS`` and then leaves a file named after its message in ``BENCH_DONE_DIR``,
so that a benchmark can tell which messages were processed (at least once).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

RAW_QUEUE = "bench-raw"
SLOW_QUEUE = "bench-slow"


def _build() -> dramatiq.Broker:
    url = os.environ["BROKER_URL"]
    if url.startswith("amqp"):
        broker: dramatiq.Broker = RabbitmqBroker(url=url)
    else:
        broker = RedisBroker(url=url)  # type: ignore[no-untyped-call]
    broker.add_middleware(CurrentMessage())
    return broker


raw_broker = _build()
dramatiq.set_broker(raw_broker)


@dramatiq.actor(broker=raw_broker, queue_name=RAW_QUEUE, max_retries=0)
def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: the cost of Dramatiq itself."""


@dramatiq.actor(broker=raw_broker, queue_name=SLOW_QUEUE, max_retries=0)
def slow(index: int) -> None:
    """Stays busy for a while, then marks its message done."""
    time.sleep(float(os.environ.get("BENCH_SLOW_SECONDS", "0.3")))
    done = os.environ.get("BENCH_DONE_DIR")
    message = CurrentMessage.get_current_message()
    if done and message is not None:
        (Path(done) / message.message_id).touch()
