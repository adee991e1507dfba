"""Test-only actors for health tests: ``dramatiq tests.observability.sleepy_actors``."""

from __future__ import annotations

import time

import dramatiq

from service.broker import broker

QUEUE = "health-probe"


@dramatiq.actor(queue_name=QUEUE, broker=broker, time_limit=10_000, max_retries=0)
def nap(seconds: float) -> None:
    """Sleeps in C (time.sleep), which Dramatiq's time limit cannot interrupt: a hung call."""
    time.sleep(seconds)
