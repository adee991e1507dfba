"""The database pool is independent of the worker's threads: 64 concurrent SMTP conversations
share a pool of DB_POOL_MAX_SIZE connections, none held across a conversation."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness.servers import SmtpSink
from harness.workers import WorkerGroup
from tests.support.emails import Db, eventually

pytestmark = pytest.mark.slow

THREADS = 64
EMAILS = 320


def test_64_concurrent_conversations_never_use_more_than_the_pool(
    broker: Any, db: Db, service_env: dict[str, str], tmp_path: Path
) -> None:
    from service.actors.emails import send_booking_email
    from service.config import load_settings

    pool_size = load_settings({}).db_pool_max_size
    sink = SmtpSink.start_new(delay=0.1)
    bookings = [db.booking(status="confirmed") for _ in range(EMAILS)]
    for b in bookings:
        send_booking_email.send(str(b), "confirmed")
    env = {**os.environ, "SMTP_URL": sink.url, "LOG_LEVEL": "WARNING"}
    env.pop("DB_POOL_MAX_SIZE", None)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(service_env["DATABASE_URL"], autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state <> 'idle' AND pid <> pg_backend_pid()"
                ).fetchone()
                samples.append(int(row[0]) if row else 0)
                stop.wait(0.005)

    sampler = threading.Thread(target=sample)
    group = WorkerGroup(env, processes=1, threads=THREADS, log_path=tmp_path / "worker.log")
    try:
        group.start()
        sampler.start()
        eventually(lambda: sink.count() >= 5, timeout=30)
        busy = eventually(
            lambda: (
                (
                    n := db.conn.execute(
                        "SELECT count(*) AS n FROM email_deliveries WHERE state = 'sending'"
                    ).fetchone()["n"]
                )
                > pool_size
                and n
            )  # type: ignore[index]
        )
        eventually(lambda: sink.count() >= EMAILS, timeout=120, interval=0.2)
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join(10)
        group.stop()
        sink_count = sink.count()
        sink.destroy()
    states = db.conn.execute("SELECT state, count(*) AS n FROM email_deliveries GROUP BY state")
    assert {r["state"]: r["n"] for r in states.fetchall()} == {"sent": EMAILS}
    assert sink_count == EMAILS
    print(
        f"\n{busy} conversations at once seen; non-idle connections: max {max(samples)}"
        f" over {len(samples)} samples (pool {pool_size})"
    )
    assert max(samples) <= pool_size
