"""SQL for booking reads and email delivery records (the idempotency keys live here)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from psycopg.rows import class_row

from service.db import Conn
from service.emails.models import BookingView
from service.emails.rules import EmailType

_BOOKING = """
SELECT b.id AS booking_id, b.status, b.guest_name, b.guest_email, b.party_size, b.starts_at, b.locale, b.notes,
       v.name AS venue_name, v.timezone AS venue_timezone
  FROM bookings b JOIN venues v ON v.id = b.venue_id
 WHERE b.id = %s
"""


def load_booking(conn: Conn, booking_id: UUID) -> BookingView | None:
    with conn.cursor(row_factory=class_row(BookingView)) as cur:
        return cur.execute(_BOOKING, (booking_id,)).fetchone()


def lock_delivery(conn: Conn, booking_id: UUID, email_type: EmailType) -> str:
    """Create the (booking, type) row if needed, lock it and return its state; raises
    LockNotAvailable when another worker holds it (sending this very email right now)."""
    conn.execute(
        "INSERT INTO email_deliveries (booking_id, email_type, state) VALUES (%s, %s, 'pending')"
        " ON CONFLICT DO NOTHING",
        (booking_id, email_type.value),
    )
    row = conn.execute(
        "SELECT state FROM email_deliveries WHERE booking_id = %s AND email_type = %s"
        " FOR UPDATE NOWAIT",
        (booking_id, email_type.value),
    ).fetchone()
    assert row is not None
    return str(row["state"])


def mark(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    state: str,
    *,
    attempted: bool,
    error: str | None = None,
    skip_reason: str | None = None,
    message_id: str | None = None,
    next_attempt_at: datetime | None = None,
) -> None:
    conn.execute(
        """
        UPDATE email_deliveries
           SET state = %(state)s,
               attempts = attempts + %(inc)s,
               last_error = COALESCE(%(error)s, last_error),
               skip_reason = %(skip)s,
               message_id = COALESCE(%(mid)s, message_id),
               next_attempt_at = %(next)s,
               sent_at = CASE WHEN %(state)s = 'sent' THEN now() ELSE sent_at END,
               updated_at = now()
         WHERE booking_id = %(bid)s AND email_type = %(type)s
        """,
        {
            "state": state,
            "inc": 1 if attempted else 0,
            "error": error,
            "skip": skip_reason,
            "mid": message_id,
            "next": next_attempt_at,
            "bid": booking_id,
            "type": email_type.value,
        },
    )


def record_outside_send(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    state: str,
    error: str,
    next_attempt_at: datetime | None,
) -> None:
    """Record a delivery that never reached the send step (not retried yet, or dead)."""
    conn.execute(
        """
        INSERT INTO email_deliveries (booking_id, email_type, state, attempts, last_error, next_attempt_at)
        VALUES (%s, %s, %s, 1, %s, %s)
        ON CONFLICT (booking_id, email_type) DO UPDATE
           SET state = CASE WHEN email_deliveries.state IN ('sent', 'skipped')
                            THEN email_deliveries.state ELSE EXCLUDED.state END,
               attempts = email_deliveries.attempts + 1,
               last_error = EXCLUDED.last_error,
               next_attempt_at = EXCLUDED.next_attempt_at,
               updated_at = now()
        """,
        (booking_id, email_type.value, state, error, next_attempt_at),
    )


def record_sent(conn: Conn, booking_id: UUID, email_type: EmailType, message_id: str) -> None:
    """Record a send the SMTP server accepted (the row may not exist if its insert rolled back)."""
    conn.execute(
        """
        INSERT INTO email_deliveries (booking_id, email_type, state, attempts, message_id, sent_at)
        VALUES (%s, %s, 'sent', 1, %s, now())
        ON CONFLICT (booking_id, email_type) DO UPDATE
           SET state = 'sent', attempts = email_deliveries.attempts + 1,
               message_id = EXCLUDED.message_id, sent_at = now(), next_attempt_at = NULL,
               updated_at = now()
        """,
        (booking_id, email_type.value, message_id),
    )


def schedule_retry(conn: Conn, booking_id: UUID, email_type: EmailType, delay_ms: int) -> None:
    """Record when the retry Dramatiq just scheduled is due (the reconciler's grace runs from it)."""
    conn.execute(
        "UPDATE email_deliveries SET next_attempt_at = now() + %s * interval '1 millisecond'"
        " WHERE booking_id = %s AND email_type = %s AND state = 'retrying'",
        (delay_ms, booking_id, email_type.value),
    )
