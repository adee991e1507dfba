"""What hold creation, confirmation and drift recovery decide, as pure functions over values.

The shell (:mod:`service.capacity.confirm`) loads and locks the inputs in one place, calls a
decision here and writes what it says. Nothing here reads a clock, a setting, a flag or the
database: ``now``, the flag's value and the limits are arguments.

Confirmation checks, in this order (the first that applies decides):

1. no booking: ``BOOKING_NOT_FOUND``;
2. no hold: ``HOLD_NOT_FOUND``;
3. the hold belongs to another booking: ``HOLD_BOOKING_MISMATCH``;
4. the booking is confirmed by this hold or one that replaced it: already confirmed;
5. the hold is not active, or has expired: ``HOLD_EXPIRED``;
6. the booking is not pending: ``BOOKING_NOT_PENDING``;
7. the venue has no policy: ``POLICY_NOT_FOUND``;
8. the metadata has defects: ``HOLD_METADATA_INCOMPLETE`` listing all of them;
9. the metadata's policy version is not the current one: ``POLICY_CHANGED``;
10. otherwise: confirm.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from service.capacity.drift import (
    PolicyDiff,
    SnapshotDiff,
    change_lines,
    diff_policies,
    diff_snapshot,
    summarize,
)
from service.capacity.errors import (
    BOOKING_NOT_FOUND,
    BOOKING_NOT_PENDING,
    HOLD_BOOKING_MISMATCH,
    HOLD_EXPIRED,
    HOLD_NOT_FOUND,
    NO_AVAILABILITY,
    POLICY_CHANGED,
    POLICY_NOT_FOUND,
    POLICY_REQUOTE_FAILED,
    POLICY_RETRY_FAILED,
    CapacityError,
)
from service.capacity.holds import (
    HoldMetadata,
    build_hold_metadata,
    hold_metadata_problems,
    metadata_incomplete,
)
from service.capacity.policy import adjacency_hash, edges_among
from service.capacity.quoting import Occupancy, Quote, quote
from service.capacity.records import Booking, Hold, PolicyRevision

MAX_REQUOTE_CYCLES: Final = 2

Outcome = Literal["confirmed", "recovered", "escalated"]


@dataclass(frozen=True)
class Reject:
    """Change nothing; the caller gets ``error``."""

    error: CapacityError


# -- hold creation -------------------------------------------------------------------------------


def hold_ttl(ttl_seconds: int | None, default_seconds: int) -> timedelta:
    """How long a new hold lives: ``None`` means the default, anything else must be positive."""
    if ttl_seconds is None:
        return timedelta(seconds=default_seconds)
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise ValueError(
            f"ttl_seconds must be a positive whole number of seconds (or None for the default "
            f"of {default_seconds}), got {ttl_seconds!r}"
        )
    return timedelta(seconds=ttl_seconds)


@dataclass(frozen=True)
class HoldInputs:
    """What placing a hold for ``booking_id`` depends on: the booking (None when missing), the
    venue's current policy revision, and the tables occupied around the booking's time."""

    booking_id: uuid.UUID
    booking: Booking | None
    revision: PolicyRevision | None = None
    occupied: Sequence[Occupancy] = ()


@dataclass(frozen=True)
class PlaceHold:
    """Insert a hold on ``offer``'s tables with ``metadata``, living until ``expires_at``."""

    booking: Booking
    revision: PolicyRevision
    offer: Quote
    metadata: dict[str, Any]
    expires_at: datetime


def decide_hold(
    inputs: HoldInputs, now: datetime, *, ttl: timedelta, max_tables: int
) -> PlaceHold | Reject:
    """The best free tables for a pending booking, with complete metadata; or why not
    (``BOOKING_NOT_FOUND``, ``BOOKING_NOT_PENDING``, ``POLICY_NOT_FOUND``, ``NO_AVAILABILITY``)."""
    booking = inputs.booking
    if booking is None:
        return Reject(booking_not_found(inputs.booking_id))
    if booking.status != "pending":
        return Reject(booking_not_pending(booking, {"bookingId": str(booking.id)}))
    revision = inputs.revision
    if revision is None:
        return Reject(policy_not_found(booking.venue_id))
    try:
        offer = quote(
            revision.policy,
            booking.party_size,
            booking.starts_at,
            inputs.occupied,
            now,
            max_tables=max_tables,
        )
    except CapacityError as error:
        return Reject(error)
    metadata = build_hold_metadata(revision.policy, offer)
    problems = hold_metadata_problems(metadata, offer.table_ids, revision.policy)
    if problems:
        return Reject(metadata_incomplete(problems))
    return PlaceHold(booking, revision, offer, metadata, now + ttl)


# -- confirmation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfirmationInputs:
    """What confirming ``hold_id`` for ``booking_id`` depends on.

    ``replacements`` are the holds that replaced ``hold`` after re-quotes, in order;
    ``held_under`` is the revision whose version the hold's metadata claims (None when the
    metadata claims none or that revision is not on record).
    """

    booking_id: uuid.UUID
    hold_id: uuid.UUID
    booking: Booking | None
    hold: Hold | None
    replacements: Sequence[Hold] = ()
    current: PolicyRevision | None = None
    held_under: PolicyRevision | None = None


@dataclass(frozen=True)
class Confirm:
    """Assign the hold's tables, confirm the booking and consume the hold."""

    hold: Hold


@dataclass(frozen=True)
class AlreadyConfirmed:
    """Nothing to do: ``hold`` (the one asked for, or a replacement) confirmed the booking."""

    hold: Hold


ConfirmDecision = Confirm | AlreadyConfirmed | Reject


def decide_confirmation(inputs: ConfirmationInputs, now: datetime) -> ConfirmDecision:
    """The documented checks of the module docstring, in that order."""
    booking, hold = inputs.booking, inputs.hold
    ids = {"holdId": str(inputs.hold_id), "bookingId": str(inputs.booking_id)}
    if booking is None:
        return Reject(booking_not_found(inputs.booking_id))
    if hold is None:
        return Reject(CapacityError(HOLD_NOT_FOUND, details=ids))
    if hold.booking_id != inputs.booking_id:
        return Reject(
            CapacityError(
                HOLD_BOOKING_MISMATCH, details={**ids, "holdBookingId": str(hold.booking_id)}
            )
        )
    done = confirmed_by(booking, [hold, *inputs.replacements])
    if done is not None:
        return AlreadyConfirmed(done)
    if not hold.is_live(now):
        return Reject(
            CapacityError(
                HOLD_EXPIRED,
                details={
                    **ids,
                    "status": hold.status,
                    "expiresAt": hold.expires_at.isoformat(),
                    "releaseReason": hold.release_reason,
                },
            )
        )
    if booking.status != "pending":
        return Reject(booking_not_pending(booking, ids))
    current, held_under = inputs.current, inputs.held_under
    if current is None:
        return Reject(policy_not_found(hold.venue_id))
    problems = hold_metadata_problems(
        hold.metadata, hold.table_ids, None if held_under is None else held_under.policy
    )
    if problems:
        return Reject(metadata_incomplete(problems))
    metadata = HoldMetadata.model_validate(hold.metadata)
    if metadata.policy_version != current.version:
        return Reject(policy_changed(hold, metadata, held_under, current))
    return Confirm(hold)


def confirmed_by(booking: Booking, chain: Sequence[Hold]) -> Hold | None:
    """The consumed hold that confirmed ``booking``, following ``chain`` (a hold, then the holds
    that replaced it, in order) for at most ``MAX_REQUOTE_CYCLES`` replacements; None unless
    the booking is confirmed."""
    if booking.status != "confirmed":
        return None
    links = chain[: MAX_REQUOTE_CYCLES + 1]
    for index, hold in enumerate(links):
        if hold.status == "consumed":
            return hold
        following = links[index + 1] if index + 1 < len(links) else None
        if following is None or hold.replaced_by != following.id:
            return None
    return None


def policy_changed(
    hold: Hold,
    metadata: HoldMetadata,
    held_under: PolicyRevision | None,
    current: PolicyRevision,
) -> CapacityError:
    """``POLICY_CHANGED`` with both versions, the adjacency of the held tables before and after,
    and the diff: between the revisions when the hold's is on record, else from its snapshot."""
    diff: PolicyDiff | SnapshotDiff = (
        diff_policies(held_under.policy, current.policy)
        if held_under is not None
        else diff_snapshot(metadata, current.policy)
    )
    return CapacityError(
        POLICY_CHANGED,
        details={
            "holdId": str(hold.id),
            "venueId": str(hold.venue_id),
            "expectedVersion": metadata.policy_version,
            "actualVersion": current.version,
            "adjacencyHashBefore": metadata.selection.snapshot.adjacency.hash,
            "adjacencyHashAfter": adjacency_hash(
                edges_among(current.policy.adjacency, metadata.table_ids)
            ),
            "diff": diff.as_dict(),
            "changes": change_lines(diff),
            "summary": summarize(diff),
        },
    )


def tables_taken(hold: Hold) -> CapacityError:
    """The assignment of a confirmed hold lost the race for one of its tables."""
    return CapacityError(
        NO_AVAILABILITY,
        "a table of the hold is already assigned to an overlapping booking",
        {
            "holdId": str(hold.id),
            "bookingId": str(hold.booking_id),
            "reason": "tables_taken",
            "tableIds": list(hold.table_ids),
        },
    )


# -- drift recovery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requote:
    """Hold new tables under the latest policy, then confirm again; this is cycle ``cycle``."""

    cycle: int


@dataclass(frozen=True)
class Escalate:
    """Flag the booking for the venue's admins with ``code`` after ``cycles`` re-quotes."""

    code: Literal["POLICY_REQUOTE_FAILED", "POLICY_RETRY_FAILED"]
    cycles: int


@dataclass(frozen=True)
class Surface:
    """Re-quoting is switched off: the caller gets ``POLICY_CHANGED`` unchanged."""


DriftStep = Requote | Escalate | Surface


def after_drift(
    cycles: int, *, requote_enabled: bool, max_cycles: int = MAX_REQUOTE_CYCLES
) -> DriftStep:
    """What follows a ``POLICY_CHANGED`` met after ``cycles`` re-quotes."""
    if not requote_enabled:
        return Surface()
    if cycles >= max_cycles:
        return Escalate(POLICY_RETRY_FAILED, cycles)
    return Requote(cycles + 1)


def after_failed_requote(error: CapacityError, cycle: int) -> Escalate | None:
    """A re-quote that found no tables escalates; None means ``error`` goes to the caller."""
    if error.code == NO_AVAILABILITY:
        return Escalate(POLICY_REQUOTE_FAILED, cycle)
    return None


def confirmed_outcome(
    *, cycles: int, already_confirmed: bool, hold_id: uuid.UUID, original_hold_id: uuid.UUID
) -> Outcome:
    """``recovered`` when a re-quoted hold was confirmed (now or by an earlier call)."""
    if already_confirmed:
        return "recovered" if hold_id != original_hold_id else "confirmed"
    return "recovered" if cycles else "confirmed"


def escalation_error(
    step: Escalate,
    drift: CapacityError,
    booking_id: uuid.UUID,
    cause: CapacityError | None = None,
) -> CapacityError:
    """The escalation's error: the drift details, the cycles run, and what stopped a re-quote."""
    details: dict[str, Any] = {**drift.details, "cycles": step.cycles, "bookingId": str(booking_id)}
    if cause is not None:
        details["cause"] = cause.as_dict()
    return CapacityError(step.code, details=details)


# -- shared rejections ---------------------------------------------------------------------------


def booking_not_found(booking_id: uuid.UUID) -> CapacityError:
    return CapacityError(BOOKING_NOT_FOUND, "no such booking", {"bookingId": str(booking_id)})


def booking_not_pending(booking: Booking, ids: dict[str, str]) -> CapacityError:
    return CapacityError(
        BOOKING_NOT_PENDING, f"the booking is {booking.status}", {**ids, "status": booking.status}
    )


def policy_not_found(venue_id: uuid.UUID) -> CapacityError:
    return CapacityError(
        POLICY_NOT_FOUND, "the venue has no capacity policy", {"venueId": str(venue_id)}
    )
