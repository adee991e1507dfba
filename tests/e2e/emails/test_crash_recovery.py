"""End to end: real Dramatiq worker processes, ``kill -9`` mid-send, restart; repeated kills.

Each round enqueues a batch, starts a two-process pod, ``kill -9``-s one worker process while
emails are in their SMTP conversation, lets Dramatiq stop the pod and starts a new one (as
Kubernetes restarts it). Nothing may be lost. A duplicate is allowed only inside the documented
at-least-once window: the SMTP server accepted the message just before the kill, before the
worker marked it sent; the copy carries the same Message-ID. The rounds' duplicate count is
printed (``CRASH_ROUNDS`` sets how many; the README quotes a long run).
"""

from __future__ import annotations

import email
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.servers import SmtpSink
from harness.workers import WorkerGroup
from tests.support.emails import QUEUE, Db, eventually

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("CRASH_ROUNDS", "3"))
BATCH = 40
WINDOW_S = 0.5
"""How long before the kill the first copy of a duplicate may have reached the SMTP server: the
time between the server's 250 and the worker's mark, a few milliseconds, with a wide margin."""


@pytest.fixture
def slow_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink.start_new(delay=0.4)
    yield sink
    sink.destroy()


def dead_worker_acks(client: redis.Redis) -> dict[bytes, int]:
    keys = client.keys(f"dramatiq:__acks__.*.{QUEUE}")
    return {k: int(client.scard(k)) for k in keys if client.scard(k)}


def arrivals(sink: SmtpSink) -> dict[str, list[float]]:
    """Message-ID -> wall times its copies were stored by the SMTP server."""
    out: dict[str, list[float]] = {}
    for path in sink.store.glob("*.eml"):
        with path.open("rb") as fh:
            msg = email.message_from_bytes(fh.read(8192), policy=policy.compat32)
        out.setdefault(str(msg["Message-ID"]), []).append(path.stat().st_mtime)
    return out


@dataclass
class Round:
    killed_at: float
    redelivered_after: float
    delivered_after: float
    under_lease: int
    duplicates: dict[str, float]
    """Message-ID -> seconds its first copy reached the SMTP server before the kill."""


def kill_round(
    db: Db, sink: SmtpSink, env: dict[str, str], client: redis.Redis, log: Path
) -> Round:
    from service.actors.emails import send_booking_email

    bookings = [db.booking(status="confirmed") for _ in range(BATCH)]
    for b in bookings:
        send_booking_email.send(str(b), "confirmed")
    before = sink.count()
    group = WorkerGroup(env, processes=2, threads=4, log_path=log).start()
    try:
        eventually(lambda: sink.count() >= before + 5, timeout=30)
        assert sum(dead_worker_acks(client).values()) > 0, "workers should be busy at the kill"
        killed_wall, killed_at = time.time(), time.monotonic()
        group.kill_child()
        assert group.wait_exit(60) is not None  # Dramatiq stops the rest; the pod restarts
        orphaned = dead_worker_acks(client)
        assert orphaned, "the killed worker held unacked messages"
        leased = {
            r["booking_id"]: r["lease_until"]
            for r in db.conn.execute(
                "SELECT booking_id, lease_until FROM email_deliveries"
                " WHERE state = 'sending' AND booking_id = ANY(%s)",
                (bookings,),
            ).fetchall()
        }
        group = WorkerGroup(env, processes=2, threads=4, log_path=log).start()
        eventually(
            lambda: not dead_worker_acks(client).keys() & orphaned.keys(), timeout=60, interval=0.2
        )
        redelivered_after = time.monotonic() - killed_at
        ids = {f"<booking-{b}.confirmed.r1@example.test>" for b in bookings}
        eventually(lambda: ids <= arrivals(sink).keys(), timeout=90, interval=0.2)
        delivered_after = time.monotonic() - killed_at
        time.sleep(1.0)
    finally:
        group.stop()
    copies = {mid: times for mid, times in arrivals(sink).items() if mid in ids}
    assert copies.keys() == ids, f"lost: {sorted(ids - copies.keys())}"
    duplicates = {
        mid: round(killed_wall - min(times), 3) for mid, times in copies.items() if len(times) > 1
    }
    assert all(len(t) <= 2 for t in copies.values()), copies
    rows = db.conn.execute(
        "SELECT booking_id, state, attempts, sent_at FROM email_deliveries WHERE booking_id = ANY(%s)",
        (bookings,),
    ).fetchall()
    assert Counter(r["state"] for r in rows) == {"sent": BATCH}
    by_booking = {r["booking_id"]: r for r in rows}
    for booking_id, lease_until in leased.items():
        row = by_booking[booking_id]  # sent again by the redelivery, once the lease had ended
        assert row["attempts"] == 2 and row["sent_at"] >= lease_until
    return Round(
        killed_at=killed_wall,
        redelivered_after=round(redelivered_after, 1),
        delivered_after=round(delivered_after, 1),
        under_lease=len(leased),
        duplicates=duplicates,
    )


@pytest.mark.timeout(60 + 90 * ROUNDS)
def test_repeated_kill_9_mid_send_loses_nothing_and_duplicates_only_in_the_window(
    broker: Any, db: Db, slow_sink: SmtpSink, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**os.environ, "SMTP_URL": slow_sink.url, "LOG_LEVEL": "WARNING"}
    client = redis.Redis.from_url(os.environ["BROKER_URL"])
    rounds = [
        kill_round(db, slow_sink, env, client, tmp_path / "worker.log") for _ in range(ROUNDS)
    ]
    leased_total = sum(r.under_lease for r in rounds)
    dup_rounds = sum(1 for r in rounds if r.duplicates)
    dup_emails = sum(len(r.duplicates) for r in rounds)
    print(
        f"\n{ROUNDS} kill -9 rounds of {BATCH} emails: redelivery "
        f"{min(r.redelivered_after for r in rounds)}-{max(r.redelivered_after for r in rounds)} s"
        f" after the kill, all delivered {min(r.delivered_after for r in rounds)}-"
        f"{max(r.delivered_after for r in rounds)} s after it; {leased_total} emails under a"
        f" lease at the kills; duplicates: {dup_emails} email(s) in {dup_rounds} round(s), first"
        f" copies {sorted(t for r in rounds for t in r.duplicates.values())} s before the kill"
    )
    assert leased_total > 0, "emails were in their SMTP conversation, under a lease, at the kills"
    for r in rounds:
        assert r.redelivered_after < 30, r
        for mid, before_kill in r.duplicates.items():
            assert -0.05 <= before_kill <= WINDOW_S, (
                f"{mid}: a duplicate whose first copy arrived {before_kill} s before the kill"
                " is outside the at-least-once window"
            )
