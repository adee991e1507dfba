"""End to end: real Dramatiq worker processes, ``kill -9`` mid-send, restart, exactly one email each."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.servers import SmtpSink
from harness.workers import WorkerGroup
from tests.support.emails import QUEUE, Db, eventually, received_for

pytestmark = pytest.mark.slow


@pytest.fixture
def slow_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink.start_new(delay=0.4)
    yield sink
    sink.destroy()


def dead_worker_acks(client: redis.Redis) -> dict[bytes, int]:
    keys = client.keys(f"dramatiq:__acks__.*.{QUEUE}")
    return {k: int(client.scard(k)) for k in keys if client.scard(k)}


def test_kill_9_mid_send_then_restart_delivers_each_email_once(
    broker: Any, db: Db, slow_sink: SmtpSink, service_env: dict[str, str], tmp_path: Path
) -> None:
    from service.actors.emails import send_booking_email

    bookings = [db.booking(status="confirmed") for _ in range(40)]
    for b in bookings:
        send_booking_email.send(str(b), "confirmed")
    env = {**os.environ, "SMTP_URL": slow_sink.url, "LOG_LEVEL": "WARNING"}
    group = WorkerGroup(env, processes=2, threads=4, log_path=tmp_path / "worker.log").start()
    client = redis.Redis.from_url(os.environ["BROKER_URL"])
    try:
        eventually(lambda: len(slow_sink.messages()) >= 5, timeout=30)
        in_flight_before = sum(dead_worker_acks(client).values())
        assert in_flight_before > 0, "workers should be busy when one is killed"
        killed_at = time.monotonic()
        group.kill_child()
        assert (
            group.wait_exit(60) is not None
        )  # Dramatiq stops the rest; Kubernetes would restart the pod
        orphaned = dead_worker_acks(client)
        assert orphaned, "the killed worker held unacked messages"
        leased = {
            r["booking_id"]: r["lease_until"]
            for r in db.conn.execute(
                "SELECT booking_id, lease_until FROM email_deliveries WHERE state = 'sending'"
            ).fetchall()
        }
        assert leased, "emails were in their SMTP conversation, under a lease, at the kill"

        group = WorkerGroup(env, processes=2, threads=4, log_path=tmp_path / "worker.log").start()
        eventually(
            lambda: not dead_worker_acks(client).keys() & orphaned.keys(), timeout=60, interval=0.2
        )
        recovered_after = time.monotonic() - killed_at
        eventually(lambda: len(slow_sink.messages()) >= len(bookings), timeout=60)
        delivered_after = time.monotonic() - killed_at
        time.sleep(1.0)
    finally:
        group.stop()
    counts = [len(received_for(slow_sink, b)) for b in bookings]
    print(
        f"\nredelivery of the killed worker's {sum(orphaned.values())} message(s) {recovered_after:.1f}s"
        f" after kill -9; all delivered after {delivered_after:.1f}s"
        f" ({len(leased)} under a lease at the kill)"
    )
    assert counts == [1] * len(bookings), f"duplicates or losses: {counts}"
    assert recovered_after < 60
    rows = db.conn.execute("SELECT booking_id, state, attempts, sent_at FROM email_deliveries")
    by_booking = {r["booking_id"]: r for r in rows.fetchall()}
    assert {r["state"] for r in by_booking.values()} == {"sent"}
    for booking_id, lease_until in leased.items():
        row = by_booking[booking_id]  # sent again by the redelivery, once the lease had ended
        assert row["attempts"] == 2 and row["sent_at"] >= lease_until
