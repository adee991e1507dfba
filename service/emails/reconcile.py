"""Find booking emails that should exist but never completed, and send them again.

Covers what no broker can: messages lost with Redis's data, a producer that could reach
neither broker nor SMTP, a retry whose re-enqueue failed. Safe to run from several places at
once: rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a missing row is inserted by exactly
one runner, which alone sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from service.config import Settings
from service.db import Conn, Database
from service.emails.models import EmailPayload
from service.emails.rules import EXPECTED_FOR_STATUS, EmailType
from service.metrics import RECONCILER_REQUEUED

_CLAIM_STUCK = """
UPDATE email_deliveries d
   SET next_attempt_at = now() + %(grace)s, updated_at = now()
  FROM (SELECT booking_id, email_type FROM email_deliveries
         WHERE (state = 'pending' AND COALESCE(next_attempt_at, updated_at) <= now())
            OR (state = 'retrying' AND COALESCE(next_attempt_at, updated_at) < now() - %(grace)s)
         ORDER BY updated_at
         LIMIT %(limit)s
         FOR UPDATE SKIP LOCKED) due
 WHERE d.booking_id = due.booking_id AND d.email_type = due.email_type
RETURNING d.booking_id, d.email_type, d.state
"""

_CLAIM_MISSING = """
INSERT INTO email_deliveries (booking_id, email_type, state, next_attempt_at, last_error)
SELECT b.id, m.email_type, 'pending', now() + %(grace)s, 'no delivery record: re-enqueued by reconcile'
  FROM bookings b
  JOIN unnest(%(statuses)s::text[], %(types)s::text[]) AS m(status, email_type) ON m.status = b.status
 WHERE b.status_changed_at < now() - %(grace)s
   AND b.status_changed_at > now() - %(lookback)s
   AND NOT EXISTS (SELECT 1 FROM email_deliveries d
                    WHERE d.booking_id = b.id AND d.email_type = m.email_type)
 ORDER BY b.status_changed_at
 LIMIT %(limit)s
ON CONFLICT DO NOTHING
RETURNING booking_id, email_type
"""


@dataclass
class ReconcileReport:
    missing: list[tuple[UUID, EmailType]] = field(default_factory=list)
    stuck: list[tuple[UUID, EmailType]] = field(default_factory=list)

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
        report.stuck.append((row["booking_id"], EmailType(row["email_type"])))
    for row in conn.execute(_CLAIM_MISSING, params).fetchall():
        report.missing.append((row["booking_id"], EmailType(row["email_type"])))
    return report


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
        for booking_id, email_type in items:
            enqueue(EmailPayload(booking_id=booking_id, type=email_type))
            RECONCILER_REQUEUED.labels(email_type.value, reason).inc()
    return report
