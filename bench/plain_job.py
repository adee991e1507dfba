"""The plain-job baseline: what a plain Dramatiq application would write for the work of
``send_booking_email``, without its guarantees: stock Dramatiq (default middleware, stock Redis broker), one actor that
selects the booking (the service's join), inserts a claim row in its own table, builds the
email the straightforward way (``bench.plain_email``: ``email.mime`` + icalendar), sends it
over one persistent SMTP connection per thread, and marks the row sent. Autocommit throughout;
a psycopg pool of at most one connection per thread. No service code is imported.

The workers run ``python -m dramatiq bench.plain_actors``; a benchmark sends through
``declare(broker)`` on a stock broker of its own.

Settings come from the environment: ``BROKER_URL``, ``DATABASE_URL``, ``SMTP_URL``
(``smtp://host:port``), ``EMAIL_FROM`` and ``BENCH_PLAIN_POOL_SIZE`` (the worker's threads).
"""

from __future__ import annotations

import os
import smtplib
import threading
from datetime import UTC, datetime
from urllib.parse import urlsplit

import dramatiq
from psycopg.rows import namedtuple_row
from psycopg_pool import ConnectionPool

from bench import plain_email

PLAIN_QUEUE = "bench-plain"
CLAIMS_DDL = """
CREATE TABLE IF NOT EXISTS bench_plain_claims (
    booking_id uuid NOT NULL,
    email_type text NOT NULL,
    state text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    PRIMARY KEY (booking_id, email_type)
)
"""
BOOKING = """
SELECT b.id AS booking_id, b.status, b.guest_name, b.guest_email, b.party_size, b.starts_at,
       b.locale, b.notes, v.name AS venue_name, v.timezone AS venue_timezone
  FROM bookings b JOIN venues v ON v.id = b.venue_id
 WHERE b.id = %s
"""

_lock = threading.Lock()
_pool: ConnectionPool | None = None
_local = threading.local()


def pool() -> ConnectionPool:
    """Built on first use, in the worker process (after Dramatiq forked it)."""
    global _pool
    with _lock:
        if _pool is None:
            size = int(os.environ.get("BENCH_PLAIN_POOL_SIZE", "8"))
            _pool = ConnectionPool(
                os.environ["DATABASE_URL"],
                min_size=1,
                max_size=size,
                kwargs={"autocommit": True, "row_factory": namedtuple_row},
                open=True,
            )
        return _pool


def smtp() -> smtplib.SMTP:
    conn: smtplib.SMTP | None = getattr(_local, "smtp", None)
    if conn is None:
        url = urlsplit(os.environ["SMTP_URL"])
        conn = smtplib.SMTP(url.hostname or "127.0.0.1", url.port or 25, timeout=30)
        _local.smtp = conn
    return conn


def send_email(booking_id: str, email_type: str) -> None:
    with pool().connection() as conn:
        row = conn.execute(BOOKING, (booking_id,)).fetchone()
        if row is None:
            return
        claimed = conn.execute(
            "INSERT INTO bench_plain_claims (booking_id, email_type, state)"
            " VALUES (%s, %s, 'claimed') ON CONFLICT DO NOTHING RETURNING booking_id",
            (booking_id, email_type),
        ).fetchone()
        if claimed is None:
            return  # claimed before: a redelivery
        sender = os.environ["EMAIL_FROM"]
        message = plain_email.render(
            plain_email.Booking.from_row(row), email_type, sender, datetime.now(UTC)
        )
        try:
            smtp().send_message(message)
        except (smtplib.SMTPServerDisconnected, OSError):
            _local.smtp = None
            smtp().send_message(message)
        conn.execute(
            "UPDATE bench_plain_claims SET state = 'sent', sent_at = now()"
            " WHERE booking_id = %s AND email_type = %s",
            (booking_id, email_type),
        )


def declare(broker: dramatiq.Broker) -> dramatiq.Actor[[str, str], None]:
    return dramatiq.actor(broker=broker, queue_name=PLAIN_QUEUE, actor_name="plain_send_email")(
        send_email
    )
