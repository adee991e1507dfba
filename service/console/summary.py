"""What the console says about a booking's emails: pure decisions over the rows it loaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.emails.rules import EXPECTED_FOR_STATUS, BookingStatus

OPEN_STATES = frozenset({"pending", "retrying", "sending"})


@dataclass(frozen=True)
class Due:
    due: bool
    reasons: tuple[str, ...]
    dead: tuple[str, ...] = ()
    """Emails given up on: they go out only if their dead letter is replayed."""


def still_due(status: str | None, rows: Sequence[Mapping[str, Any]]) -> Due:
    """Whether an email of this booking is still to be sent: an open delivery row, or the
    email its current status calls for without any row (the reconciler will send it). An
    email type counts as given up on when its latest revision's row is dead."""
    reasons = [
        f"{row['email_type']} (revision {row['revision']}) is {row['state']}"
        for row in rows
        if row["state"] in OPEN_STATES
    ]
    if status in {s.value for s in BookingStatus}:
        expected = EXPECTED_FOR_STATUS[BookingStatus(status)]
        if not any(row["email_type"] == expected.value for row in rows):
            reasons.append(f"{expected.value} (called for by status {status}) has no delivery row")
    latest: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        kept = latest.get(row["email_type"])
        if kept is None or row["revision"] > kept["revision"]:
            latest[row["email_type"]] = row
    dead = tuple(sorted(t for t, row in latest.items() if row["state"] == "dead"))
    return Due(bool(reasons), tuple(reasons), dead)


def replay_plan(
    *,
    found: bool,
    open_: bool,
    undecodable: bool,
    action: str,
    source: str,
    actor: str,
    delivery_state: str | None,
) -> tuple[bool, str]:
    """(actionable, what will happen) for one selected dead letter: the preview's dry run."""
    if not found:
        return False, "no such dead letter: nothing will be done"
    if not open_:
        return False, "already replayed or purged: nothing will be done"
    if action == "purge":
        where = "delete the broker copy and " if source == "broker" else ""
        return True, f"{where}mark the Postgres record purged (the record stays)"
    if undecodable:
        return False, "refused: the body is not a Dramatiq message, it can only be purged"
    plan = f"send again through {actor} from the {'broker copy' if source == 'broker' else 'Postgres record'}"
    if delivery_state == "sent":
        plan += "; the email was already sent, so it is recorded as a duplicate and not sent again"
    elif delivery_state == "superseded":
        plan += "; a later change of the booking superseded this email, so it is not sent"
    elif delivery_state is not None:
        plan += (
            f"; the email (now {delivery_state}) is sent if the booking's status still calls for it"
        )
    return True, plan
