"""Test-only actors for health tests: ``dramatiq tests.e2e.observability.sleepy_actors:start``.

``start`` is this worker's composition root, like ``service.worker:start``: it builds the
worker's App and declares ``nap`` on the App's broker (with all the service's middleware).
"""

from __future__ import annotations

import time

import dramatiq

from service.app import App
from service.logs import configure

QUEUE = "health-probe"


def nap(seconds: float) -> None:
    """Sleeps in C (time.sleep), which Dramatiq's time limit cannot interrupt: a hung call."""
    time.sleep(seconds)


def start() -> None:
    app = App.for_worker()
    configure(app.settings.log_level, app.settings.log_format)
    dramatiq.actor(nap, queue_name=QUEUE, broker=app.broker, time_limit=10_000, max_retries=0)
    dramatiq.set_broker(app.broker)
