"""The retry path is not cut short by the actor's time limit: the re-enqueue of a retry (which
rides out broker blips) and the actor's ``on_retry`` hook run after the limit is disarmed."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker

from service.broker import build_middleware
from service.config import load_settings
from tests.unit.test_actor_binding import ENV


def test_a_slow_retry_hook_outlives_the_time_limit_and_the_retry_runs() -> None:
    settings = load_settings(
        {
            **ENV,
            "BROKER_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
            "EMAIL_MIN_BACKOFF_MS": "10",
            "EMAIL_MAX_BACKOFF_MS": "10",
        }
    )
    broker = StubBroker(middleware=build_middleware(settings))
    attempts: list[int] = []
    hooked: list[int] = []
    done = threading.Event()

    def slow_hook(message: dramatiq.Message[Any], delay_ms: int) -> None:
        time.sleep(1.5)  # far past the 200 ms time limit
        hooked.append(delay_ms)

    @dramatiq.actor(broker=broker, time_limit=200, max_retries=1, on_retry=slow_hook)
    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        done.set()

    broker.emit_after("process_boot")  # starts TimeLimit's monitor, as in a worker process
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        flaky.send()
        assert done.wait(15), f"the retry never ran (attempts {len(attempts)}, hooks {hooked})"
        assert len(hooked) == 1 and 0 < hooked[0] <= 10, "the hook heard the delay Dramatiq chose"
        assert all(thread.is_alive() for thread in worker.workers)
    finally:
        worker.stop()
