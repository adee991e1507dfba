"""The capacity shell: create holds, confirm them, and recover from policy drift.

The pure domain (policy, quoting, holds, drift) decides; this module loads its inputs, writes
its results in one transaction per step, and translates outcomes into metrics, logs and outbox
events. Locks are always taken in the same order: booking, then venue, then hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from pydantic import ValidationError

from service.capacity import repository as repo
from service.capacity.drift import (
    PolicyDiff,
    SnapshotDiff,
    change_lines,
    diff_policies,
    diff_snapshot,
    summarize,
)
from service.capacity.errors import (
    HOLD_BOOKING_MISMATCH,
    HOLD_EXPIRED,
    HOLD_METADATA_INCOMPLETE,
    HOLD_NOT_FOUND,
    NO_AVAILABILITY,
    POLICY_CHANGED,
    POLICY_REQUOTE_FAILED,
    POLICY_RETRY_FAILED,
    CapacityError,
)
from service.capacity.holds import (
    HoldMetadata,
    build_hold_metadata,
    format_path,
    require_valid_hold_metadata,
)
from service.capacity.policy import adjacency_hash, edges_among
from service.capacity.quoting import quote
from service.db import Database
from service.logs import get_logger
from service.metrics import (
    CONFIRM_INCOMPLETE_METADATA,
    CONFIRMATIONS,
    HOLDS_REJECTED,
    POLICY_DRIFT,
)
from service.outbox import write_event
from service.outbox.notifications import POLICY_DRIFT_ESCALATED, PolicyDriftEscalation

log = get_logger(__name__)

MAX_REQUOTE_CYCLES = 2
OCCUPANCY_LOOKAROUND = timedelta(hours=24)

BOOKING_NOT_FOUND = "BOOKING_NOT_FOUND"
BOOKING_NOT_PENDING = "BOOKING_NOT_PENDING"
POLICY_NOT_FOUND = "POLICY_NOT_FOUND"

Outcome = Literal["confirmed", "recovered", "escalated"]
Notifier = Callable[[uuid.UUID], None]
RequoteHook = Callable[[int, "Hold"], None]


@dataclass(frozen=True)
class Capacity:
    """What the capacity shell needs, built by the composition root."""

    db: Database
    notify_confirmed: Notifier
    """Hands the ``confirmed`` email to the pipeline once a confirmation committed."""
    requote_enabled: Callable[[object | None], bool]
    """The ``policy-requote-enabled`` flag, per venue."""
    hold_ttl_seconds: int = 600
    quote_max_tables: int = 3
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


@dataclass(frozen=True)
class Hold:
    """A hold as the caller sees it."""

    id: uuid.UUID
    booking_id: uuid.UUID
    venue_id: uuid.UUID
    table_ids: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    expires_at: datetime
    policy_version: str

    @classmethod
    def from_record(cls, record: repo.HoldRecord, version: str) -> Hold:
        return cls(
            id=record.id,
            booking_id=record.booking_id,
            venue_id=record.venue_id,
            table_ids=record.table_ids,
            starts_at=record.starts_at,
            ends_at=record.ends_at,
            expires_at=record.expires_at,
            policy_version=version,
        )


@dataclass(frozen=True)
class Confirmation:
    """A confirmed booking; ``already_confirmed`` when this call found the work done."""

    booking_id: uuid.UUID
    hold_id: uuid.UUID
    table_ids: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    already_confirmed: bool = False


@dataclass(frozen=True)
class ConfirmationResult:
    """What ``confirm_with_policy_retry`` did: ``cycles`` counts the re-quotes it ran."""

    outcome: Outcome
    booking_id: uuid.UUID
    hold_id: uuid.UUID
    cycles: int = 0
    confirmation: Confirmation | None = None
    error: CapacityError | None = None
    event_id: uuid.UUID | None = None


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


# -- holds ---------------------------------------------------------------------------------


def _current_policy(conn: repo.Connection, venue_id: uuid.UUID) -> repo.PolicyRevision:
    revision = repo.current_policy(conn, venue_id)
    if revision is None:
        raise CapacityError(
            POLICY_NOT_FOUND, "the venue has no capacity policy", {"venueId": str(venue_id)}
        )
    return revision


def _place_hold(
    cap: Capacity,
    conn: repo.Connection,
    booking: repo.BookingRecord,
    revision: repo.PolicyRevision,
    now: datetime,
    ttl: timedelta,
) -> Hold:
    """Quote against live occupancy and insert a hold with validated, complete metadata."""
    occupied = repo.occupancy(
        conn,
        booking.venue_id,
        booking.starts_at - OCCUPANCY_LOOKAROUND,
        booking.starts_at + OCCUPANCY_LOOKAROUND,
        now,
        exclude_booking=booking.id,
    )
    offer = quote(
        revision.policy,
        booking.party_size,
        booking.starts_at,
        occupied,
        now,
        max_tables=cap.quote_max_tables,
    )
    metadata = build_hold_metadata(revision.policy, offer)
    require_valid_hold_metadata(metadata, revision.policy)
    record = repo.insert_hold(
        conn,
        booking_id=booking.id,
        venue_id=booking.venue_id,
        table_ids=offer.table_ids,
        starts_at=offer.starts_at,
        ends_at=offer.ends_at,
        expires_at=now + ttl,
        metadata=metadata,
        policy_revision_id=revision.id,
        now=now,
    )
    return Hold.from_record(record, offer.policy_version)


def _pending_booking(conn: repo.Connection, booking_id: uuid.UUID) -> repo.BookingRecord:
    booking = repo.lock_booking(conn, booking_id)
    if booking is None:
        raise CapacityError(BOOKING_NOT_FOUND, "no such booking", {"bookingId": str(booking_id)})
    if booking.status != "pending":
        raise CapacityError(
            BOOKING_NOT_PENDING,
            f"the booking is {booking.status}",
            {"bookingId": str(booking_id), "status": booking.status},
        )
    return booking


def create_hold(
    cap: Capacity,
    booking_id: uuid.UUID | str,
    *,
    now: datetime | None = None,
    ttl_seconds: int | None = None,
) -> Hold:
    """Hold the best free tables for a pending booking under the venue's current policy.

    Replaces any active hold the booking already had. Raises ``CapacityError`` with
    ``NO_AVAILABILITY`` (nothing fits), ``BOOKING_NOT_FOUND`` or ``BOOKING_NOT_PENDING``.
    """
    booking_id = _as_uuid(booking_id)
    now = now or cap.clock()
    ttl = timedelta(seconds=ttl_seconds or cap.hold_ttl_seconds)
    try:
        with cap.db.transaction() as conn:
            booking = _pending_booking(conn, booking_id)
            repo.lock_venue(conn, booking.venue_id)
            revision = _current_policy(conn, booking.venue_id)
            hold = _place_hold(cap, conn, booking, revision, now, ttl)
            for previous in repo.release_active_holds(
                conn, booking_id, reason="superseded", now=now, keep=hold.id
            ):
                log.info("hold superseded", hold_id=str(previous), booking_id=str(booking_id))
    except CapacityError as error:
        HOLDS_REJECTED.labels(error.code).inc()
        raise
    log.info(
        "hold created",
        hold_id=str(hold.id),
        booking_id=str(booking_id),
        venue_id=str(hold.venue_id),
        tables=list(hold.table_ids),
    )
    return hold


# -- confirmation --------------------------------------------------------------------------


def _metadata_error(problems: list[dict[str, str]]) -> CapacityError:
    listed = "; ".join(f"{p['path'] or '(root)'}: {p['message']}" for p in problems)
    return CapacityError(
        HOLD_METADATA_INCOMPLETE,
        f"hold metadata has {len(problems)} problem(s): {listed}",
        {"problems": problems},
    )


def _parse_metadata(raw: Any) -> HoldMetadata:
    """Shape-only validation, for holds whose own policy revision is not on record."""
    if not isinstance(raw, Mapping):
        raise _metadata_error(
            [{"path": "", "message": f"metadata must be an object, got {type(raw).__name__}"}]
        )
    try:
        return HoldMetadata.model_validate(raw)
    except ValidationError as error:
        raise _metadata_error(
            [
                {"path": format_path(tuple(e["loc"])), "message": e["msg"]}
                for e in error.errors(include_url=False)
            ]
        ) from None


def _checked_metadata(
    conn: repo.Connection, hold: repo.HoldRecord, current: repo.PolicyRevision
) -> tuple[HoldMetadata, repo.PolicyRevision | None]:
    """Validate the hold's metadata against the policy it was made under.

    Returns the metadata and that policy's revision (None when it is not on record). A hold made
    under an older policy is checked against that policy, so that a table removed since then
    reads as drift (POLICY_CHANGED), not as broken metadata.
    """
    raw = hold.metadata
    claimed = raw.get("policyVersion") if isinstance(raw, Mapping) else None
    if claimed == current.version:
        held_under: repo.PolicyRevision | None = current
    elif isinstance(claimed, str):
        held_under = repo.policy_by_version(conn, hold.venue_id, claimed)
    else:
        held_under = None
    if held_under is not None:
        metadata = require_valid_hold_metadata(raw, held_under.policy)
    else:
        metadata = _parse_metadata(raw)
    if sorted(metadata.table_ids) != sorted(hold.table_ids):
        raise _metadata_error(
            [
                {
                    "path": "selection.tableIds",
                    "message": f"tables {sorted(metadata.table_ids)} differ from the hold's "
                    f"tables {sorted(hold.table_ids)}",
                }
            ]
        )
    return metadata, held_under


def _drift_error(
    hold: repo.HoldRecord,
    metadata: HoldMetadata,
    held_under: repo.PolicyRevision | None,
    current: repo.PolicyRevision,
) -> CapacityError:
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


def _already_confirmed(
    conn: repo.Connection, booking: repo.BookingRecord, hold: repo.HoldRecord
) -> repo.HoldRecord | None:
    """The consumed hold that ``hold`` led to (itself, or its replacements after re-quotes)."""
    if booking.status != "confirmed":
        return None
    current: repo.HoldRecord | None = hold
    for _ in range(MAX_REQUOTE_CYCLES + 1):
        if current is None:
            return None
        if current.status == "consumed":
            return current
        if current.replaced_by is None:
            return None
        current = repo.get_hold(conn, current.replaced_by)
    return None


def _confirm_in(
    conn: repo.Connection, booking_id: uuid.UUID, hold_id: uuid.UUID, now: datetime
) -> Confirmation:
    booking = repo.lock_booking(conn, booking_id)
    if booking is None:
        raise CapacityError(BOOKING_NOT_FOUND, "no such booking", {"bookingId": str(booking_id)})
    # Concurrent inserts checked by one exclusion constraint can deadlock each other, and a
    # policy change must not commit between the version check and the assignment.
    repo.lock_venue(conn, booking.venue_id)
    hold = repo.lock_hold(conn, hold_id)
    ids = {"holdId": str(hold_id), "bookingId": str(booking_id)}
    if hold is None:
        raise CapacityError(HOLD_NOT_FOUND, details=ids)
    if hold.booking_id != booking_id:
        raise CapacityError(
            HOLD_BOOKING_MISMATCH, details={**ids, "holdBookingId": str(hold.booking_id)}
        )
    done = _already_confirmed(conn, booking, hold)
    if done is not None:
        return Confirmation(
            booking_id,
            done.id,
            done.table_ids,
            done.starts_at,
            done.ends_at,
            already_confirmed=True,
        )
    if hold.status != "active" or hold.expires_at <= now:
        raise CapacityError(
            HOLD_EXPIRED,
            details={
                **ids,
                "status": hold.status,
                "expiresAt": hold.expires_at.isoformat(),
                "releaseReason": hold.release_reason,
            },
        )
    if booking.status != "pending":
        raise CapacityError(
            BOOKING_NOT_PENDING,
            f"the booking is {booking.status}",
            {**ids, "status": booking.status},
        )
    current = _current_policy(conn, hold.venue_id)
    metadata, held_under = _checked_metadata(conn, hold, current)
    if metadata.policy_version != current.version:
        raise _drift_error(hold, metadata, held_under, current)
    try:
        repo.assign_tables(conn, hold)
    except psycopg.errors.ExclusionViolation:
        raise CapacityError(
            NO_AVAILABILITY,
            "a table of the hold is already assigned to an overlapping booking",
            {**ids, "reason": "tables_taken", "tableIds": list(hold.table_ids)},
        ) from None
    repo.confirm_booking(conn, booking_id, now)
    repo.consume_hold(conn, hold.id, now)
    return Confirmation(booking_id, hold.id, hold.table_ids, hold.starts_at, hold.ends_at)


def confirm_hold_assignment(
    cap: Capacity,
    booking_id: uuid.UUID | str,
    hold_id: uuid.UUID | str,
    *,
    now: datetime | None = None,
) -> Confirmation:
    """Assign the hold's tables, confirm the booking and consume the hold, in one transaction;
    then send the ``confirmed`` email.

    Raises ``CapacityError``: HOLD_NOT_FOUND, HOLD_BOOKING_MISMATCH, HOLD_EXPIRED,
    HOLD_METADATA_INCOMPLETE (``details["problems"]``), POLICY_CHANGED (expected and actual
    versions, the diff and its summary), NO_AVAILABILITY (a table was taken meanwhile),
    BOOKING_NOT_FOUND or BOOKING_NOT_PENDING. Calling it again for a booking that this hold
    (or its re-quoted replacement) already confirmed returns ``already_confirmed``.
    """
    booking_id, hold_id = _as_uuid(booking_id), _as_uuid(hold_id)
    try:
        with cap.db.transaction() as conn:
            confirmation = _confirm_in(conn, booking_id, hold_id, now or cap.clock())
    except CapacityError as error:
        if error.code == HOLD_METADATA_INCOMPLETE:
            CONFIRM_INCOMPLETE_METADATA.inc()
        if error.code != POLICY_CHANGED:
            HOLDS_REJECTED.labels(error.code).inc()
        raise
    if not confirmation.already_confirmed:
        log.info(
            "booking confirmed",
            booking_id=str(booking_id),
            hold_id=str(confirmation.hold_id),
            tables=list(confirmation.table_ids),
        )
        _notify(cap, booking_id)
    return confirmation


def _notify(cap: Capacity, booking_id: uuid.UUID) -> None:
    """A failure to hand over the ``confirmed`` email is logged, never raised: the confirmation
    has committed, and the email reconciler re-sends missing emails."""
    try:
        cap.notify_confirmed(booking_id)
    except Exception as error:
        log.error(
            "confirmed email not handed to the pipeline",
            booking_id=str(booking_id),
            error=type(error).__name__,
        )


# -- drift recovery ------------------------------------------------------------------------


def _requote(cap: Capacity, booking_id: uuid.UUID, old_hold_id: uuid.UUID) -> Hold:
    """Under the latest policy, hold new tables and release the old hold, in one transaction."""
    now = cap.clock()
    with cap.db.transaction() as conn:
        booking = _pending_booking(conn, booking_id)
        repo.lock_venue(conn, booking.venue_id)
        repo.lock_hold(conn, old_hold_id)
        revision = _current_policy(conn, booking.venue_id)
        ttl = timedelta(seconds=cap.hold_ttl_seconds)
        hold = _place_hold(cap, conn, booking, revision, now, ttl)
        repo.release_hold(conn, old_hold_id, reason="policy_drift", now=now, replaced_by=hold.id)
    return hold


def _escalate(
    cap: Capacity,
    booking_id: uuid.UUID,
    original_hold_id: uuid.UUID,
    hold_id: uuid.UUID,
    code: str,
    drift: CapacityError,
    cycles: int,
    cause: CapacityError | None = None,
) -> ConfirmationResult:
    """Flag the booking, release its hold and write the admin notification, in one transaction."""
    now = cap.clock()
    details = drift.details
    with cap.db.transaction() as conn:
        booking = repo.lock_booking(conn, booking_id)
        if booking is None:
            raise CapacityError(
                BOOKING_NOT_FOUND, "no such booking", {"bookingId": str(booking_id)}
            )
        venue = repo.venue(conn, booking.venue_id)
        repo.flag_needs_attention(conn, booking_id, now)
        repo.release_hold(conn, hold_id, reason="policy_drift_escalated", now=now)
        payload = PolicyDriftEscalation(
            venue_id=str(venue.id),
            venue_name=venue.name,
            venue_timezone=venue.timezone,
            booking_id=str(booking_id),
            party_size=booking.party_size,
            starts_at=booking.starts_at,
            reason=code,  # type: ignore[arg-type]
            cycles=cycles,
            hold_id=str(hold_id),
            expected_version=details.get("expectedVersion"),
            actual_version=str(details.get("actualVersion")),
            adjacency_hash_before=details.get("adjacencyHashBefore"),
            adjacency_hash_after=details.get("adjacencyHashAfter"),
            changes=list(details.get("changes", [])),
            summary=str(details.get("summary", "")),
            diff=dict(details.get("diff", {})),
            escalated_at=now,
        )
        event_id = write_event(
            conn,
            POLICY_DRIFT_ESCALATED,
            payload.model_dump(mode="json"),
            dedupe_key=f"{POLICY_DRIFT_ESCALATED}:{booking_id}:{original_hold_id}",
            venue_id=venue.id,
        )
    error_details: dict[str, Any] = {**details, "cycles": cycles, "bookingId": str(booking_id)}
    if cause is not None:
        error_details["cause"] = cause.as_dict()
    error = CapacityError(code, details=error_details)
    CONFIRMATIONS.labels("escalated").inc()
    POLICY_DRIFT.labels("escalated").inc()
    log.warning(
        "policy drift escalated to the venue's admins",
        booking_id=str(booking_id),
        venue_id=str(venue.id),
        code=code,
        cycles=cycles,
        event_id=str(event_id) if event_id else None,
    )
    return ConfirmationResult(
        "escalated", booking_id, hold_id, cycles=cycles, error=error, event_id=event_id
    )


def confirm_with_policy_retry(
    cap: Capacity,
    booking_id: uuid.UUID | str,
    hold_id: uuid.UUID | str,
    *,
    after_requote: RequoteHook | None = None,
) -> ConfirmationResult:
    """Confirm, re-quoting and re-holding on POLICY_CHANGED at most twice, then escalating.

    With the ``policy-requote-enabled`` flag off, POLICY_CHANGED is raised unchanged. Other
    rejections are raised as ``CapacityError``. Escalation (POLICY_REQUOTE_FAILED when nothing
    fits the new policy, POLICY_RETRY_FAILED when the policy still changed after the second
    re-quote) is an outcome, returned with the error. ``after_requote(cycle, hold)`` runs after
    each re-quote commits, before the next confirmation attempt.
    """
    booking_id, original = _as_uuid(booking_id), _as_uuid(hold_id)
    current = original
    cycles = 0
    while True:
        try:
            confirmation = confirm_hold_assignment(cap, booking_id, current)
        except CapacityError as error:
            if error.code != POLICY_CHANGED:
                CONFIRMATIONS.labels("rejected").inc()
                raise
            drift = error
        else:
            if confirmation.already_confirmed:
                return ConfirmationResult(
                    "recovered" if confirmation.hold_id != original else "confirmed",
                    booking_id,
                    confirmation.hold_id,
                    confirmation=confirmation,
                )
            outcome: Outcome = "recovered" if cycles else "confirmed"
            CONFIRMATIONS.labels(outcome).inc()
            if cycles:
                POLICY_DRIFT.labels("recovered").inc()
                log.info("policy drift recovered", booking_id=str(booking_id), cycles=cycles)
            return ConfirmationResult(
                outcome, booking_id, current, cycles=cycles, confirmation=confirmation
            )

        venue_id = drift.details.get("venueId")
        log.warning(
            "policy drift at confirmation",
            booking_id=str(booking_id),
            hold_id=str(current),
            venue_id=venue_id,
            expected_version=drift.details.get("expectedVersion"),
            actual_version=drift.details.get("actualVersion"),
            changes=drift.details.get("changes"),
            cycle=cycles,
        )
        if cycles == 0:
            POLICY_DRIFT.labels("detected").inc()
        if not cap.requote_enabled(venue_id):
            CONFIRMATIONS.labels("rejected").inc()
            raise drift
        if cycles >= MAX_REQUOTE_CYCLES:
            return _escalate(cap, booking_id, original, current, POLICY_RETRY_FAILED, drift, cycles)
        cycles += 1
        try:
            hold = _requote(cap, booking_id, current)
        except CapacityError as error:
            if error.code != NO_AVAILABILITY:
                CONFIRMATIONS.labels("rejected").inc()
                raise
            return _escalate(
                cap,
                booking_id,
                original,
                current,
                POLICY_REQUOTE_FAILED,
                drift,
                cycles,
                cause=error,
            )
        log.info(
            "re-quoted after policy drift",
            booking_id=str(booking_id),
            old_hold_id=str(current),
            hold_id=str(hold.id),
            cycle=cycles,
        )
        current = hold.id
        if after_requote is not None:
            after_requote(cycles, hold)
