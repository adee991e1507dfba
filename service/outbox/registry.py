"""Event type -> handler. Adding an event type is one entry here (plus its formatter)."""

from __future__ import annotations

from collections.abc import Mapping

from service.capacity.backfill import HOLD_RELEASED_IRREPARABLE, format_irreparable_hold_release
from service.outbox.delivery import AdminNotificationHandler, Handler
from service.outbox.notifications import (
    POLICY_DRIFT_ESCALATED,
    format_policy_drift_escalation,
)

HANDLERS: Mapping[str, Handler] = {
    POLICY_DRIFT_ESCALATED: AdminNotificationHandler(format_policy_drift_escalation),
    HOLD_RELEASED_IRREPARABLE: AdminNotificationHandler(format_irreparable_hold_release),
}


def registered_types() -> frozenset[str]:
    return frozenset(HANDLERS)
