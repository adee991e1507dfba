"""The capacity feature's admin notifications: each event type's payload model and its formatter
(pure functions), registered with the outbox at the composition root."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field

from service.outbox.notifications import Notification

POLICY_DRIFT_ESCALATED = "capacity.policy_drift_escalated"
HOLD_RELEASED_IRREPARABLE = "hold.released_irreparable"

IrreparableReason = Literal["policy_missing", "tables_missing", "selection_invalid"]


class PolicyDriftEscalation(BaseModel):
    """Payload of ``capacity.policy_drift_escalated``. Booking context only: no guest details."""

    model_config = ConfigDict(extra="forbid")

    venue_id: str
    venue_name: str
    venue_timezone: str
    booking_id: str
    party_size: int = Field(ge=1)
    starts_at: datetime
    reason: Literal["POLICY_REQUOTE_FAILED", "POLICY_RETRY_FAILED"]
    cycles: int = Field(ge=0)
    hold_id: str | None
    expected_version: str | None
    actual_version: str
    adjacency_hash_before: str | None
    adjacency_hash_after: str | None
    changes: list[str]
    summary: str = ""
    diff: dict[str, Any]
    escalated_at: datetime


_REASONS = {
    "POLICY_REQUOTE_FAILED": "no table or table combination fits the party under the new policy",
    "POLICY_RETRY_FAILED": "the policy changed again during each of the {cycles} re-quote attempts",
}


def _local(moment: datetime, timezone: str) -> str:
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = moment.astimezone(zone)
    return f"{local:%a %d %b %Y %H:%M} ({timezone})"


def _short(version: str | None) -> str:
    return version[:12] if version else "unknown"


def format_policy_drift_escalation(raw: dict[str, Any]) -> Notification:
    """Subject, text and structured diff of a drift escalation, for the venue's admins."""
    event = PolicyDriftEscalation.model_validate(raw)
    when = _local(event.starts_at, event.venue_timezone)
    subject = (
        f"Action needed: booking for {event.party_size} on {when} at {event.venue_name} "
        "has no tables after a policy change"
    )
    adjacency = (
        "unchanged"
        if event.adjacency_hash_before == event.adjacency_hash_after
        else f"{_short(event.adjacency_hash_before)} -> {_short(event.adjacency_hash_after)}"
    )
    changes = [f"  - {line}" for line in event.changes] or ["  (no itemised change available)"]
    lines = [
        f"A booking at {event.venue_name} could not be confirmed automatically.",
        "",
        f"Why: the venue's capacity policy changed between hold and confirmation, and "
        f"{_REASONS[event.reason].format(cycles=event.cycles)} ({event.reason}).",
        "",
        f"Booking:    {event.booking_id}",
        f"Party size: {event.party_size}",
        f"Time:       {when}",
        "State:      still pending, flagged as needing attention",
        "",
        f"Policy version: {_short(event.expected_version)} -> {_short(event.actual_version)}",
        f"Adjacency hash of the held tables: {adjacency}",
        "What changed:",
        *changes,
        "",
        "Please assign tables by hand or follow up with the guest from the booking screen.",
    ]
    data = {
        "reason": event.reason,
        "cycles": event.cycles,
        "venue": {"id": event.venue_id, "name": event.venue_name},
        "booking": {
            "id": event.booking_id,
            "party_size": event.party_size,
            "starts_at": event.starts_at.isoformat(),
        },
        "policy": {
            "expected_version": event.expected_version,
            "actual_version": event.actual_version,
            "adjacency_hash_before": event.adjacency_hash_before,
            "adjacency_hash_after": event.adjacency_hash_after,
            "changes": event.changes,
            "summary": event.summary,
            "diff": event.diff,
        },
    }
    return Notification(subject=subject, text="\n".join(lines) + "\n", data=data)


class IrreparableHoldRelease(BaseModel):
    """Payload of ``hold.released_irreparable``: venue and booking context, no guest details."""

    model_config = ConfigDict(extra="forbid")

    venue_id: str
    venue_name: str
    venue_timezone: str
    hold_id: str
    booking_id: str
    party_size: int = Field(ge=1)
    starts_at: datetime
    table_ids: list[str]
    reason: IrreparableReason
    missing_table_ids: list[str] = Field(default_factory=list)
    problems: list[dict[str, str]]
    released_at: datetime


_WHY = {
    "policy_missing": "the venue has no capacity policy to rebuild the hold's record from",
    "tables_missing": "its tables are no longer in the venue's floor plan",
    "selection_invalid": "its table selection cannot form a valid hold",
}


def format_irreparable_hold_release(raw: dict[str, Any]) -> Notification:
    """Subject, text and data telling a venue's admins that a hold was released."""
    event = IrreparableHoldRelease.model_validate(raw)
    when = _local(event.starts_at, event.venue_timezone)
    missing = (
        [f"Tables no longer in the floor plan: {', '.join(event.missing_table_ids)}"]
        if event.missing_table_ids
        else []
    )
    problems = [f"  - {p.get('path') or '(root)'}: {p.get('message', '')}" for p in event.problems]
    lines = [
        f"A table hold at {event.venue_name} was released because its record was incomplete "
        f"and could not be repaired: {_WHY[event.reason]} ({event.reason}).",
        "",
        f"Booking:    {event.booking_id}",
        f"Party size: {event.party_size}",
        f"Time:       {when}",
        f"Tables:     {', '.join(event.table_ids)}",
        f"Hold:       {event.hold_id}",
        *missing,
        "",
        "Problems found in the hold's record:",
        *(problems or ["  (none recorded)"]),
        "",
        "The booking keeps its status but no longer holds tables: please assign tables by hand "
        "or follow up with the guest from the booking screen.",
    ]
    data = {
        "reason": event.reason,
        "venue": {"id": event.venue_id, "name": event.venue_name},
        "booking": {
            "id": event.booking_id,
            "party_size": event.party_size,
            "starts_at": event.starts_at.isoformat(),
        },
        "hold": {
            "id": event.hold_id,
            "table_ids": event.table_ids,
            "missing_table_ids": event.missing_table_ids,
            "problems": event.problems,
        },
        "released_at": event.released_at.isoformat(),
    }
    subject = f"Table hold released at {event.venue_name}: booking for {event.party_size} on {when}"
    return Notification(subject=subject, text="\n".join(lines) + "\n", data=data)
