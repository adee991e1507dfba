"""Every SQL statement of the console, in one place (parameterised; short transactions).

Rows come back as dicts with every column of ``email_deliveries`` (``SELECT *``), so columns
added later (a revision, a lease) reach the templates without a change here.
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
        SELECT b.id, b.venue_id, v.name AS venue_name, b.status, b.guest_name, b.guest_email,
               b.party_size, b.starts_at, b.created_at, b.updated_at, b.status_changed_at
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


def delivery_states(conn: Conn, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``(booking_id, email_type) -> state`` for the pairs that have a row."""
    if not pairs:
        return {}
    rows = conn.execute(
        """
        SELECT d.booking_id::text AS booking_id, d.email_type, d.state
        FROM email_deliveries d
        JOIN unnest(%s::text[], %s::text[]) AS p(booking_id, email_type)
          ON d.booking_id::text = p.booking_id AND d.email_type = p.email_type
        """,
        ([p[0] for p in pairs], [p[1] for p in pairs]),
    ).fetchall()
    return {(r["booking_id"], r["email_type"]): r["state"] for r in rows}


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
