"""The same delivery path on RabbitMQ: publisher confirms, worker processes, a kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.emails.conftest import Db, eventually, received_for
from tests.harness.servers import RabbitServer, SmtpSink
from tests.harness.workers import ROOT, WorkerGroup

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitServer]:
    server = RabbitServer.start_new()
    if not server.owned:
        print(
            "using the RabbitMQ server already running on 127.0.0.1:5672 (no private node could start)"
        )
    yield server
    server.stop()


def test_delivery_and_kill_9_on_rabbitmq(
    rabbit: RabbitServer, db: Db, service_env: dict[str, str], tmp_path: Path
) -> None:
    sink = SmtpSink.start_new(delay=0.3)
    env = {**os.environ, "BROKER_URL": rabbit.url, "SMTP_URL": sink.url, "LOG_LEVEL": "WARNING"}
    bookings = [db.booking(status="pending") for _ in range(20)]
    code = (
        "import sys; from service.actors.emails import send_booking_email\n"
        "for b in sys.argv[1:]: send_booking_email.send(b, 'request_received')\n"
        "send_booking_email.broker.close()\n"
    )
    produced = subprocess.run(
        [sys.executable, "-c", code, *map(str, bookings)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert produced.returncode == 0, produced.stderr
    group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log").start()
    try:
        eventually(lambda: len(sink.messages()) >= 3, timeout=60)
        killed_at = time.monotonic()
        group.kill_child()
        group.wait_exit(60)
        group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log").start()
        eventually(lambda: len(sink.messages()) >= len(bookings), timeout=90)
        print(
            f"\nall {len(bookings)} delivered {time.monotonic() - killed_at:.1f}s after kill -9 on RabbitMQ"
        )
        time.sleep(1.0)
        counts: list[Any] = [len(received_for(sink, b)) for b in bookings]
        assert counts == [1] * len(bookings), counts
    finally:
        group.stop()
        sink.destroy()
