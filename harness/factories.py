"""Rows the tests and the demo seed: venues and bookings as the booking service writes them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg


def insert_venue(
    conn: psycopg.Connection[Any],
    *,
    name: str = "Chez Test",
    timezone: str = "Europe/Paris",
    admin_emails: list[str] | None = None,
    webhook_url: str | None = None,
) -> uuid.UUID:
    venue_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO venues (id, name, timezone, admin_emails, webhook_url) VALUES (%s, %s, %s, %s, %s)",
        (venue_id, name, timezone, admin_emails or ["admin@venue.example"], webhook_url),
    )
    return venue_id


def insert_booking(
    conn: psycopg.Connection[Any],
    venue_id: uuid.UUID,
    *,
    status: str = "pending",
    guest_email: str | None = None,
    guest_name: str = "Ada Guest",
    party_size: int = 2,
    starts_at: datetime | None = None,
    status_changed_at: datetime | None = None,
    notes: str | None = None,
) -> uuid.UUID:
    booking_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO bookings (id, venue_id, status, guest_name, guest_email, party_size, starts_at,
                                 notes, status_changed_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s, now()))""",
        (
            booking_id,
            venue_id,
            status,
            guest_name,
            guest_email or f"guest-{booking_id.hex[:8]}@guests.example",
            party_size,
            starts_at or datetime.now(UTC) + timedelta(days=3),
            notes,
            status_changed_at,
        ),
    )
    return booking_id
