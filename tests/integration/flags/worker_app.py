"""A minimal Dramatiq app for the worker flag test: ``dramatiq -p 2 tests.integration.flags.worker_app:start``.

Each message records the value of ``email-queue-enabled`` its worker process sees, with the
process id, as one JSON file in ``FLAG_PROBE_DIR``. Like ``service.worker:start``, ``start``
builds the process's App and declares the actor on a broker carrying the App's flag middleware
(a plain Redis broker: only the flags are under test).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from functools import partial
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from service.app import App
from service.config import load_settings
from service.flags.middleware import FlagsMiddleware

QUEUE = "flag-probe"


def record_flag(app: App, round_id: str) -> None:
    out = Path(os.environ["FLAG_PROBE_DIR"]) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    line = {
        "round": round_id,
        "pid": os.getpid(),
        "value": app.flags.email_queue_enabled(),
        "at": time.time(),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(line))
    tmp.rename(out)


def start() -> None:
    app = App(load_settings())
    broker = RedisBroker(url=app.settings.secret("broker_url"))
    broker.add_middleware(FlagsMiddleware(app.flags))
    dramatiq.set_broker(broker)
    dramatiq.actor(
        partial(record_flag, app),
        actor_name="record_flag",
        queue_name=QUEUE,
        broker=broker,
        max_retries=0,
    )
