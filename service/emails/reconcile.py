"""Find booking emails that should exist but never completed, and send them again.

Works from the request rows first: ``pending`` rows past their due time (``scheduled_for``, else
when requested) plus the grace, ``retrying`` rows past their next attempt plus the grace,
``sending`` rows whose lease ran out a grace ago (their worker died). Each is re-enqueued with
its revision and ``scheduled_for``, so nothing is sent before its time. Then, as a safety net for
producers that never recorded a request, bookings whose status calls for an email that has no
row of that type at all. Covers what no broker can: messages lost with Redis's data, a producer
that could reach neither broker nor SMTP, a retry whose re-enqueue failed. Safe to run from several places at
once: rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a missing row is inserted by exactly
one runner, which alone sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from service.config import Settings
from service.db import Conn, Database
from service.emails.models import EmailPayload
from service.emails.rules import EXPECTED_FOR_STATUS, EmailType
from service.metrics import RECONCILER_REQUEUED

_CLAIM_STUCK = """
UPDATE email_deliveries d
   SET next_attempt_at = now() + %(grace)s,
       state = CASE WHEN d.state = 'sending' THEN 'retrying' ELSE d.state END,
       last_error = CASE WHEN d.state = 'sending'
                         THEN 'lease ran out: re-enqueued by reconcile' ELSE d.last_error END,
       updated_at = now()
  FROM (SELECT booking_id, email_type, revision FROM email_deliveries
         WHERE (state = 'pending'
                AND COALESCE(next_attempt_at, scheduled_for, requested_at, created_at)
                    <= now() - %(grace)s)
            OR (state = 'retrying' AND COALESCE(next_attempt_at, updated_at) < now() - %(grace)s)
            OR (state = 'sending' AND lease_until < now() - %(grace)s)
         ORDER BY updated_at
         LIMIT %(limit)s
         FOR UPDATE SKIP LOCKED) due
 WHERE d.booking_id = due.booking_id AND d.email_type = due.email_type
   AND d.revision = due.revision
RETURNING d.booking_id, d.email_type, d.revision, d.scheduled_for
"""

# The safety net for producers that never recorded their request: a status that calls for an
# email, and no row of that type at any revision.
_CLAIM_MISSING = """
INSERT INTO email_deliveries (booking_id, email_type, revision, state, next_attempt_at, last_error)
SELECT b.id, m.email_type, b.revision, 'pending', now() + %(grace)s,
       'no delivery record: re-enqueued by reconcile'
  FROM bookings b
  JOIN unnest(%(statuses)s::text[], %(types)s::text[]) AS m(status, email_type) ON m.status = b.status
 WHERE b.status_changed_at < now() - %(grace)s
   AND b.status_changed_at > now() - %(lookback)s
   AND NOT EXISTS (SELECT 1 FROM email_deliveries d
                    WHERE d.booking_id = b.id AND d.email_type = m.email_type)
 ORDER BY b.status_changed_at
 LIMIT %(limit)s
ON CONFLICT DO NOTHING
RETURNING booking_id, email_type, revision, scheduled_for
"""


@dataclass
class ReconcileReport:
    """The claimed requests, as the payloads to enqueue (with revision and ``scheduled_for``)."""

    missing: list[EmailPayload] = field(default_factory=list)
    stuck: list[EmailPayload] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.stuck)


def _params(settings: Settings, limit: int, grace: timedelta | None) -> dict[str, object]:
    return {
        "grace": grace
        if grace is not None
        else timedelta(seconds=settings.reconcile_grace_seconds),
        "lookback": timedelta(hours=settings.reconcile_lookback_hours),
        "limit": limit,
        "statuses": [s.value for s in EXPECTED_FOR_STATUS],
        "types": [t.value for t in EXPECTED_FOR_STATUS.values()],
    }


def _claim(conn: Conn, params: dict[str, object]) -> ReconcileReport:
    report = ReconcileReport()
    for row in conn.execute(_CLAIM_STUCK, params).fetchall():
        report.stuck.append(_payload(row))
    for row in conn.execute(_CLAIM_MISSING, params).fetchall():
        report.missing.append(_payload(row))
    return report


def _payload(row: dict[str, Any]) -> EmailPayload:
    return EmailPayload(
        booking_id=row["booking_id"],
        type=EmailType(row["email_type"]),
        revision=row["revision"],
        scheduled_for=row["scheduled_for"],
    )


def claim(
    db: Database, settings: Settings, limit: int = 1000, grace: timedelta | None = None
) -> ReconcileReport:
    """Claim the emails to send again; each claim pushes its row's next attempt one grace ahead."""
    with db.transaction() as conn:
        return _claim(conn, _params(settings, limit, grace))


def preview(
    db: Database, settings: Settings, limit: int = 1000, grace: timedelta | None = None
) -> ReconcileReport:
    """What ``claim`` would take, computed in a transaction that is rolled back."""
    with db.connection() as conn:
        report = _claim(conn, _params(settings, limit, grace))
        conn.rollback()
    return report


def reconcile(
    db: Database,
    settings: Settings,
    enqueue: Callable[[EmailPayload], None],
    limit: int = 1000,
    grace: timedelta | None = None,
) -> ReconcileReport:
    """Claim, then hand each email to ``enqueue`` (``send_booking_email.send``: the flag picks
    the queue or an immediate send)."""
    report = claim(db, settings, limit, grace)
    for reason, items in (("missing", report.missing), ("stuck", report.stuck)):
        for payload in items:
            enqueue(payload)
            RECONCILER_REQUEUED.labels(payload.type.value, reason).inc()
    return report
