"""What a real worker pod prints: every line JSON from the first one, and no message arguments.

Dramatiq's own worker logger prints whole messages ("Failed to process message
send_booking_email(..., guest_name='...')"); a foreign producer, a raw enqueue or a replay can put
guest data there, so no line may show a message's argument values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from harness.workers import WorkerGroup
from tests.support.emails import QUEUE, Db, eventually

pytestmark = pytest.mark.slow

GUEST = "Zebedee Quixotewright"
ADDRESS = "zebedee.q@guests.example"


def test_worker_lines_are_json_and_never_show_message_arguments(
    broker: dramatiq.Broker, db: Db, service_env: dict[str, str], tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"}  # Dramatiq logs calls at DEBUG
    raw = dramatiq.Message(
        queue_name=QUEUE,
        actor_name="send_booking_email",
        args=(),
        kwargs={
            "booking_id": "not-a-uuid",
            "type": "confirmed",
            "guest_name": GUEST,
            "to": ADDRESS,
        },
        options={},
    )
    group = WorkerGroup(env, processes=1, threads=2, log_path=log_path).start()
    try:
        broker.enqueue(raw)
        eventually(db.dead_letters, timeout=30)
        eventually(lambda: "Failed to process message" in log_path.read_text(), timeout=10)
    finally:
        group.stop()
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the worker printed nothing"
    parsed: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} of the worker log is not JSON: {line[:200]}")
    assert GUEST not in text and ADDRESS not in text
    failed = next(p for p in parsed if "Failed to process message" in str(p.get("event")))
    assert raw.message_id in failed["event"]
    assert "guest_name" in failed["event"], "argument names are kept, only values are hidden"
