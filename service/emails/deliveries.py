"""SQL for booking reads and email delivery records (the idempotency keys live here).

One row per request: (booking, email type, revision). A worker claims a row with a lease in one
statement, talks to SMTP with no connection checked out, and records the outcome in another
statement that holds only while the lease is its own (``lease_token``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from service.db import Conn
from service.emails.models import BookingView
from service.emails.rules import LATER_REQUEST_STATES, BookingState, EmailType, Request

_BOOKING_COLUMNS = (
    "b.id AS booking_id, b.status, b.revision, b.guest_name, b.guest_email, b.party_size,"
    " b.starts_at, b.locale, b.notes, v.name AS venue_name, v.timezone AS venue_timezone"
)
_BOOKING_FIELDS = (
    "booking_id",
    "status",
    "guest_name",
    "guest_email",
    "party_size",
    "starts_at",
    "locale",
    "notes",
    "venue_name",
    "venue_timezone",
    "revision",
)

# The revision a request is about: the one given, else (None, or 0: "not visible when
# recorded") the booking's current revision, else 0 while the booking is not visible.
_REVISION = (
    "CASE WHEN COALESCE(%(rev)s::bigint, 0) = 0"
    " THEN COALESCE((SELECT revision FROM bookings WHERE id = %(bid)s), 0)"
    " ELSE %(rev)s::bigint END"
)

_RECORD = f"""
WITH r AS (SELECT {_REVISION} AS revision),
ins AS (
    INSERT INTO email_deliveries (booking_id, email_type, revision, state, scheduled_for)
    SELECT %(bid)s, %(type)s, r.revision, 'pending', %(sched)s FROM r
    ON CONFLICT DO NOTHING
)
SELECT revision FROM r
"""

_CLAIM = f"""
WITH b AS (
    SELECT {_BOOKING_COLUMNS}
      FROM bookings b JOIN venues v ON v.id = b.venue_id
     WHERE b.id = %(bid)s
), r AS (SELECT {_REVISION} AS revision),
claimed AS (
    INSERT INTO email_deliveries AS d (booking_id, email_type, revision, state, attempts,
                                       lease_until, lease_token, scheduled_for)
    SELECT %(bid)s, %(type)s, r.revision, 'sending', 1,
           now() + make_interval(secs => %(lease)s), %(token)s, %(sched)s FROM r
    ON CONFLICT (booking_id, email_type, revision) DO UPDATE
       SET state = 'sending', attempts = d.attempts + 1, lease_until = EXCLUDED.lease_until,
           lease_token = EXCLUDED.lease_token, updated_at = now()
     WHERE d.state IN ('pending', 'retrying', 'dead')
        OR (d.state = 'sending' AND d.lease_until <= now())
    RETURNING d.revision
)
SELECT r.revision AS request_revision,
       EXISTS (SELECT 1 FROM claimed) AS claimed,
       cur.state AS row_state,
       COALESCE(cur.lease_until > now(), false) AS lease_alive,
       extract(epoch FROM cur.lease_until - clock_timestamp())::float AS lease_left,
       (SELECT max(o.revision) FROM email_deliveries o
         WHERE o.booking_id = %(bid)s AND o.email_type = %(type)s AND o.revision > r.revision
           AND o.state = ANY(%(later)s)) AS later_revision,
       b.*
  FROM r
  LEFT JOIN b ON true
  LEFT JOIN email_deliveries cur
         ON cur.booking_id = %(bid)s AND cur.email_type = %(type)s AND cur.revision = r.revision
"""


@dataclass(frozen=True)
class Claim:
    """What one claim statement found: the booking (None: not visible), the request row as this
    attempt sees it, the highest later request of the same type, and when another worker's
    lease ends."""

    booking: BookingView | None
    request: Request
    later_revision: int | None
    lease_left_seconds: float | None

    @property
    def booking_state(self) -> BookingState | None:
        b = self.booking
        return None if b is None else BookingState(status=b.status, revision=b.revision)


def load_booking(conn: Conn, booking_id: UUID) -> BookingView | None:
    row = conn.execute(
        f"SELECT {_BOOKING_COLUMNS} FROM bookings b JOIN venues v ON v.id = b.venue_id"
        " WHERE b.id = %s",
        (booking_id,),
    ).fetchone()
    return None if row is None else BookingView(**{k: row[k] for k in _BOOKING_FIELDS})


def record_request(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    revision: int | None,
    scheduled_for: datetime | None,
) -> int:
    """Record a request as ``pending`` (nothing when it is recorded already); returns its
    revision: ``revision`` if given, else the booking's current one (0: not visible)."""
    row = conn.execute(
        _RECORD,
        {"bid": booking_id, "type": email_type.value, "rev": revision, "sched": scheduled_for},
    ).fetchone()
    assert row is not None
    return int(row["revision"])


def claim(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    revision: int | None,
    scheduled_for: datetime | None,
    *,
    token: uuid.UUID,
    lease_seconds: float,
) -> Claim:
    """Load the booking and take the request row's lease when the row is open, dead or its
    lease ran out (the row is created when it was never recorded); one statement."""
    row = conn.execute(
        _CLAIM,
        {
            "bid": booking_id,
            "type": email_type.value,
            "rev": revision,
            "sched": scheduled_for,
            "token": token,
            "lease": lease_seconds,
            "later": list(LATER_REQUEST_STATES),
        },
    ).fetchone()
    assert row is not None
    booking = (
        None if row["booking_id"] is None else BookingView(**{k: row[k] for k in _BOOKING_FIELDS})
    )
    request = Request(
        type=email_type,
        revision=int(row["request_revision"]),
        state="sending" if row["claimed"] else row["row_state"],
        claimed=bool(row["claimed"]),
        lease_alive=bool(row["lease_alive"]),
    )
    return Claim(
        booking=booking,
        request=request,
        later_revision=row["later_revision"],
        lease_left_seconds=None if row["lease_left"] is None else max(row["lease_left"], 0.0),
    )


def finish(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    revision: int,
    token: uuid.UUID,
    state: str,
    *,
    attempted: bool = True,
    error: str | None = None,
    skip_reason: str | None = None,
    message_id: str | None = None,
    superseded_by: int | None = None,
) -> bool:
    """Record an attempt's outcome and release its lease; False when the lease is no longer
    ours (another worker claimed the row after it ran out). ``attempted=False`` takes back the
    attempt the claim counted (a skip or supersede never reached SMTP). A ``sent`` outcome is
    recorded even without the lease: the SMTP server took the email, that is what happened."""
    row = conn.execute(
        """
        UPDATE email_deliveries
           SET state = %(state)s,
               attempts = GREATEST(attempts - %(uncount)s, 0),
               last_error = COALESCE(%(error)s, last_error),
               skip_reason = %(skip)s,
               message_id = COALESCE(%(mid)s, message_id),
               superseded_by = %(by)s,
               next_attempt_at = NULL,
               sent_at = CASE WHEN %(state)s = 'sent' THEN now() ELSE sent_at END,
               lease_until = NULL,
               lease_token = NULL,
               updated_at = now()
         WHERE booking_id = %(bid)s AND email_type = %(type)s AND revision = %(rev)s
           AND (lease_token = %(token)s OR (%(state)s = 'sent' AND state <> 'sent'))
        RETURNING 1
        """,
        {
            "state": state,
            "uncount": 0 if attempted else 1,
            "error": error,
            "skip": skip_reason,
            "mid": message_id,
            "by": superseded_by,
            "bid": booking_id,
            "type": email_type.value,
            "rev": revision,
            "token": token,
        },
    ).fetchone()
    return row is not None


def close_unseen(conn: Conn, booking_id: UUID, email_type: EmailType, revision: int) -> None:
    """A request recorded while its booking was not visible (revision 0) is now the request at
    ``revision``: the revision-0 row is closed as superseded by it."""
    conn.execute(
        "UPDATE email_deliveries SET state = 'superseded', superseded_by = %s,"
        " lease_until = NULL, lease_token = NULL, updated_at = now()"
        " WHERE booking_id = %s AND email_type = %s AND revision = 0"
        "   AND state IN ('pending', 'retrying', 'sending', 'dead')",
        (revision, booking_id, email_type.value),
    )


def record_outside_send(
    conn: Conn,
    booking_id: UUID,
    email_type: EmailType,
    revision: int,
    state: str,
    error: str,
    next_attempt_at: datetime | None,
) -> None:
    """Leave a request that could not be sent now for the reconciler (a finished row, or one
    another worker holds, is left alone)."""
    conn.execute(
        """
        INSERT INTO email_deliveries AS d (booking_id, email_type, revision, state, last_error,
                                           next_attempt_at)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (booking_id, email_type, revision) DO UPDATE
           SET state = EXCLUDED.state,
               last_error = EXCLUDED.last_error,
               next_attempt_at = EXCLUDED.next_attempt_at,
               updated_at = now()
         WHERE d.state IN ('pending', 'retrying', 'dead')
            OR (d.state = 'sending' AND d.lease_until <= now())
        """,
        (booking_id, email_type.value, revision, state, error, next_attempt_at),
    )


def schedule_retry(
    conn: Conn, booking_id: UUID, email_type: EmailType, revision: int | None, delay_ms: int
) -> None:
    """Record when the retry Dramatiq just scheduled is due (the reconciler's grace runs from it).
    A message without a revision updates every retrying request of its type."""
    conn.execute(
        "UPDATE email_deliveries SET next_attempt_at = now() + %s * interval '1 millisecond'"
        " WHERE booking_id = %s AND email_type = %s AND state = 'retrying'"
        "   AND (%s::bigint IS NULL OR revision = %s::bigint)",
        (delay_ms, booking_id, email_type.value, revision, revision),
    )


def delivery_rows(conn: Conn, booking_id: UUID) -> list[dict[str, Any]]:
    """Every request row of a booking, oldest revision first (for operators and tests)."""
    return conn.execute(
        "SELECT * FROM email_deliveries WHERE booking_id = %s ORDER BY email_type, revision",
        (booking_id,),
    ).fetchall()
