"""Every SQL statement of the console, in one place (parameterised; short transactions).

Delivery rows come back as dicts with every column of ``email_deliveries`` (``SELECT *``), so a
column added later reaches the templates without a change here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from service.db import Conn

Row = dict[str, Any]
OPEN_STATES = ("pending", "retrying", "sending")


def booking(conn: Conn, booking_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """
        SELECT b.id, b.venue_id, v.name AS venue_name, b.status, b.revision, b.guest_name,
               b.guest_email, b.party_size, b.starts_at, b.created_at, b.updated_at, b.status_changed_at
        FROM bookings b LEFT JOIN venues v ON v.id = b.venue_id
        WHERE b.id = %s
        """,
        (booking_id,),
    ).fetchone()


def bookings_by_email(conn: Conn, address: str, limit: int) -> list[Row]:
    """Bookings of one guest address, newest first (uses ``bookings_guest_email_idx``)."""
    return conn.execute(
        """
        SELECT id, status, guest_email, party_size, starts_at, created_at
        FROM bookings WHERE lower(guest_email) = lower(%s)
        ORDER BY created_at DESC LIMIT %s
        """,
        (address, limit),
    ).fetchall()


def deliveries(conn: Conn, booking_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        "SELECT * FROM email_deliveries WHERE booking_id = %s ORDER BY created_at, email_type",
        (booking_id,),
    ).fetchall()


def delivery_states(
    conn: Conn, requests: Sequence[tuple[uuid.UUID, str, int | None]]
) -> dict[tuple[uuid.UUID, str, int | None], str]:
    """``(booking_id, email_type, revision) -> state`` of the row each request would hit; a
    request without a revision (``None``) is for the booking's current revision, as the worker
    resolves it (primary-key lookups)."""
    if not requests:
        return {}
    rows = conn.execute(
        """
        SELECT p.booking_id, p.email_type, p.revision, d.state
        FROM unnest(%s::uuid[], %s::text[], %s::bigint[]) AS p(booking_id, email_type, revision)
        LEFT JOIN bookings b ON b.id = p.booking_id
        JOIN email_deliveries d
          ON d.booking_id = p.booking_id AND d.email_type = p.email_type
         AND d.revision = COALESCE(p.revision, b.revision)
        """,
        ([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests]),
    ).fetchall()
    return {(r["booking_id"], r["email_type"], r["revision"]): r["state"] for r in rows}


def booking_dead_letters(conn: Conn, booking_id: uuid.UUID) -> list[Row]:
    """Dead letters whose message was for this booking (uses ``dead_letters_booking_idx``)."""
    return conn.execute(
        """
        SELECT message_id, queue_name, actor_name, email_type, reason, error, failed_at,
               replayed_at, purged_at
        FROM dead_letters WHERE message -> 'kwargs' ->> 'booking_id' = %s
        ORDER BY failed_at DESC
        """,
        (str(booking_id),),
    ).fetchall()


def record_audit(
    conn: Conn,
    *,
    actor: str,
    role: str,
    action: str,
    items: Sequence[str],
    outcome: str,
    detail: str | None,
    client_addr: str | None,
) -> None:
    conn.execute(
        """
        INSERT INTO console_audit (actor, role, action, items, outcome, detail, client_addr)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        """,
        (actor, role, action, list(items), outcome, detail, client_addr),
    )


def audit_entries(conn: Conn, *, limit: int, offset: int) -> list[Row]:
    return conn.execute(
        """
        SELECT id, at, actor, role, action, items, outcome, detail, client_addr
        FROM console_audit ORDER BY at DESC, id DESC LIMIT %s OFFSET %s
        """,
        (limit, offset),
    ).fetchall()


def dead_letter_queues(conn: Conn) -> list[str]:
    rows = conn.execute("SELECT DISTINCT queue_name FROM dead_letters").fetchall()
    return [str(r["queue_name"]) for r in rows]
