"""A minimal Dramatiq app for the worker flag test: ``dramatiq -p 2 tests.flags.worker_app``.

Each message records the value of ``email-queue-enabled`` its worker process sees, with the
process id, as one JSON file in ``FLAG_PROBE_DIR``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from service import flags
from service.flags.middleware import FlagsMiddleware

QUEUE = "flag-probe"

broker = RedisBroker(url=os.environ["BROKER_URL"])
broker.add_middleware(FlagsMiddleware())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def record_flag(round_id: str) -> None:
    out = Path(os.environ["FLAG_PROBE_DIR"]) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    line = {
        "round": round_id,
        "pid": os.getpid(),
        "value": flags.email_queue_enabled(),
        "at": time.time(),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(line))
    tmp.rename(out)
