"""SQL of the outbox: writing events, claiming due ones under a lease, recording outcomes."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

Connection = psycopg.Connection[dict[str, Any]]


@dataclass(frozen=True)
class OutboxEvent:
    """One claimed event. ``attempts`` counts this attempt; ``claim_token`` proves the lease.

    ``delivered_targets`` names the targets served by earlier attempts (``email:<address>``,
    ``webhook``; ``email`` in events from before per-recipient tracking meant every admin);
    ``dead_targets`` maps each target given up on to the reason.
    """

    id: uuid.UUID
    event_type: str
    dedupe_key: str
    venue_id: uuid.UUID | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    delivered_targets: frozenset[str]
    claim_token: uuid.UUID | None = None
    dead_targets: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Postgres returns the text[] column as a list (rows are mapped with class_row).
        object.__setattr__(self, "delivered_targets", frozenset(self.delivered_targets))


def write_event(
    conn: Connection,
    event_type: str,
    payload: Mapping[str, Any],
    *,
    dedupe_key: str,
    venue_id: uuid.UUID | None = None,
) -> uuid.UUID | None:
    """Insert an event in the caller's transaction; returns its id, or None for a duplicate key.

    The relay sends an event whose type has no registered handler to ``dead`` (never ``done``).
    """
    row = conn.execute(
        """
        INSERT INTO outbox_events (id, event_type, dedupe_key, venue_id, payload)
        VALUES (%(id)s, %(type)s, %(key)s, %(venue)s, %(payload)s)
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id
        """,
        {
            "id": uuid.uuid4(),
            "type": event_type,
            "key": dedupe_key,
            "venue": venue_id,
            "payload": Jsonb(dict(payload)),
        },
    ).fetchone()
    return None if row is None else row["id"]


def claim_due(
    conn: Connection, *, limit: int, lease_seconds: float, token: uuid.UUID
) -> list[OutboxEvent]:
    """Claim up to ``limit`` due events: lock them (skipping rows another relay holds), count the
    attempt and set a lease, all in one statement. A relay that dies keeps its claim only until
    the lease ends; the event is then due again."""
    cursor = conn.cursor(row_factory=class_row(OutboxEvent))
    rows = cursor.execute(
        """
        WITH due AS (
            SELECT id FROM outbox_events
            WHERE status = 'pending'
              AND next_attempt_at <= now()
              AND (locked_until IS NULL OR locked_until <= now())
            ORDER BY next_attempt_at, id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE outbox_events AS e
        SET attempts = e.attempts + 1,
            locked_until = now() + make_interval(secs => %(lease)s),
            claim_token = %(token)s,
            updated_at = now()
        FROM due
        WHERE e.id = due.id
        RETURNING e.id, e.event_type, e.dedupe_key, e.venue_id, e.payload, e.attempts,
                  e.created_at, e.delivered_targets, e.claim_token, e.dead_targets
        """,
        {"limit": limit, "lease": lease_seconds, "token": token},
    ).fetchall()
    return sorted(rows, key=lambda e: e.created_at)


def mark_delivered(conn: Connection, event: OutboxEvent, targets: Iterable[str]) -> bool:
    """Record a delivery; False when the lease was lost to another relay meanwhile."""
    return _finish(
        conn,
        event,
        "status = 'delivered', delivered_at = now(), last_error = NULL",
        {"targets": sorted(targets), "dead": {}},
    )


def mark_retry(
    conn: Connection,
    event: OutboxEvent,
    targets: Iterable[str],
    error: str,
    delay: float,
    dead_targets: Mapping[str, str] | None = None,
) -> bool:
    """Schedule another attempt ``delay`` seconds from now, keeping the targets already served
    and those given up on (``dead_targets``: target -> reason), which the retry skips."""
    return _finish(
        conn,
        event,
        "next_attempt_at = now() + make_interval(secs => %(delay)s), last_error = %(error)s",
        {
            "targets": sorted(targets),
            "error": error[:2000],
            "delay": delay,
            "dead": dict(dead_targets or {}),
        },
    )


def mark_dead(
    conn: Connection,
    event: OutboxEvent,
    targets: Iterable[str],
    error: str,
    dead_targets: Mapping[str, str] | None = None,
) -> bool:
    """Give up on an event: it stays for inspection and ``outbox requeue``."""
    return _finish(
        conn,
        event,
        "status = 'dead', dead_at = now(), last_error = %(error)s",
        {"targets": sorted(targets), "error": error[:2000], "dead": dict(dead_targets or {})},
    )


def _finish(conn: Connection, event: OutboxEvent, assignments: str, params: dict[str, Any]) -> bool:
    params = {**params, "dead": Jsonb({k: v[:500] for k, v in params["dead"].items()})}
    row = conn.execute(
        f"""
        UPDATE outbox_events
        SET {assignments},
            delivered_targets = %(targets)s,
            dead_targets = %(dead)s,
            locked_until = NULL,
            claim_token = NULL,
            updated_at = now()
        WHERE id = %(id)s AND claim_token = %(token)s AND status = 'pending'
        RETURNING id
        """,
        {**params, "id": event.id, "token": event.claim_token},
    ).fetchone()
    return row is not None


def requeue(conn: Connection, event_id: uuid.UUID) -> bool:
    """Make a dead event due again with a fresh attempt budget; the targets given up on are
    tried again, those already served are not."""
    row = conn.execute(
        """
        UPDATE outbox_events
        SET status = 'pending', attempts = 0, dead_at = NULL, next_attempt_at = now(),
            dead_targets = '{}'::jsonb, locked_until = NULL, claim_token = NULL,
            updated_at = now()
        WHERE id = %(id)s AND status = 'dead'
        RETURNING id
        """,
        {"id": event_id},
    ).fetchone()
    return row is not None


def list_events(conn: Connection, *, status: str | None, limit: int) -> list[dict[str, Any]]:
    """Newest events first, optionally of one status; payloads left out."""
    return conn.execute(
        """
        SELECT id, event_type, dedupe_key, status, attempts, next_attempt_at, locked_until,
               last_error, delivered_targets, dead_targets, created_at, delivered_at, dead_at
        FROM outbox_events
        WHERE %(status)s::text IS NULL OR status = %(status)s
        ORDER BY created_at DESC
        LIMIT %(limit)s
        """,
        {"status": status, "limit": limit},
    ).fetchall()


def stats(conn: Connection) -> dict[str, Any]:
    """Counts by status, claimed-now count, due count and the oldest pending event's age."""
    row = conn.execute(
        """
        SELECT
            count(*) FILTER (WHERE status = 'pending') AS pending,
            count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()
                             AND (locked_until IS NULL OR locked_until <= now())) AS due,
            count(*) FILTER (WHERE status = 'pending' AND locked_until > now()) AS claimed,
            count(*) FILTER (WHERE status = 'delivered') AS delivered,
            count(*) FILTER (WHERE status = 'dead') AS dead,
            extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))
                AS oldest_pending_age_seconds
        FROM outbox_events
        """
    ).fetchone()
    assert row is not None
    age = row["oldest_pending_age_seconds"]
    return {**row, "oldest_pending_age_seconds": None if age is None else float(age)}
