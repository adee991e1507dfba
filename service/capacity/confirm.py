"""The capacity shell: create holds, confirm them, and recover from policy drift.

Each step loads (and locks) its inputs in one place, asks :mod:`service.capacity.decisions`
what to do, and writes the result in one transaction; then it translates the outcome into
metrics, logs and outbox events. Settings, flags and the clock are read here only. Locks are
always taken in the same order: booking, then venue, then hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from service.capacity import repository as repo
from service.capacity.decisions import (
    MAX_REQUOTE_CYCLES,
    AlreadyConfirmed,
    ConfirmationInputs,
    Escalate,
    HoldInputs,
    Outcome,
    Reject,
    Surface,
    after_drift,
    after_failed_requote,
    booking_not_found,
    confirmed_outcome,
    decide_confirmation,
    decide_hold,
    escalation_error,
    hold_ttl,
    tables_taken,
)
from service.capacity.errors import HOLD_METADATA_INCOMPLETE, POLICY_CHANGED, CapacityError
from service.capacity.notifications import POLICY_DRIFT_ESCALATED, PolicyDriftEscalation
from service.capacity.records import Hold, PolicyRevision
from service.db import Database
from service.logs import get_logger
from service.metrics import (
    CONFIRM_INCOMPLETE_METADATA,
    CONFIRMATIONS,
    HOLDS_REJECTED,
    POLICY_DRIFT,
)
from service.outbox import write_event

__all__ = [
    "MAX_REQUOTE_CYCLES",
    "Confirmation",
    "ConfirmationResult",
    "Hold",
    "confirm_hold_assignment",
    "confirm_with_policy_retry",
    "create_hold",
    "load_confirmation",
]

log = get_logger(__name__)

OCCUPANCY_LOOKAROUND = timedelta(hours=24)

Notifier = Callable[[uuid.UUID], None]
RequoteHook = Callable[[int, Hold], None]


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


def _load_hold_inputs(
    conn: repo.Connection,
    booking_id: uuid.UUID,
    now: datetime,
    replacing: uuid.UUID | None = None,
) -> HoldInputs:
    """Lock the booking, its venue and the hold being replaced; read the policy and occupancy."""
    booking = repo.lock_booking(conn, booking_id)
    if booking is None:
        return HoldInputs(booking_id, None)
    repo.lock_venue(conn, booking.venue_id)
    if replacing is not None:
        repo.lock_hold(conn, replacing)
    occupied = repo.occupancy(
        conn,
        booking.venue_id,
        booking.starts_at - OCCUPANCY_LOOKAROUND,
        booking.starts_at + OCCUPANCY_LOOKAROUND,
        now,
        exclude_booking=booking.id,
    )
    return HoldInputs(booking_id, booking, repo.current_policy(conn, booking.venue_id), occupied)


def _place_hold(
    cap: Capacity,
    conn: repo.Connection,
    booking_id: uuid.UUID,
    now: datetime,
    ttl: timedelta,
    replacing: uuid.UUID | None = None,
) -> Hold:
    inputs = _load_hold_inputs(conn, booking_id, now, replacing)
    decision = decide_hold(inputs, now, ttl=ttl, max_tables=cap.quote_max_tables)
    if isinstance(decision, Reject):
        raise decision.error
    return repo.insert_hold(
        conn,
        booking_id=decision.booking.id,
        venue_id=decision.booking.venue_id,
        table_ids=decision.offer.table_ids,
        starts_at=decision.offer.starts_at,
        ends_at=decision.offer.ends_at,
        expires_at=decision.expires_at,
        metadata=decision.metadata,
        policy_revision_id=decision.revision.id,
        now=now,
    )


def create_hold(
    cap: Capacity,
    booking_id: uuid.UUID | str,
    *,
    now: datetime | None = None,
    ttl_seconds: int | None = None,
) -> Hold:
    """Hold the best free tables for a pending booking under the venue's current policy.

    The hold lives ``ttl_seconds`` (``None``: ``HOLD_TTL_SECONDS``; anything not positive is a
    ``ValueError``). Replaces any active hold the booking already had. Raises
    ``CapacityError`` with ``NO_AVAILABILITY`` (nothing fits), ``BOOKING_NOT_FOUND``,
    ``BOOKING_NOT_PENDING`` or ``POLICY_NOT_FOUND``.
    """
    ttl = hold_ttl(ttl_seconds, cap.hold_ttl_seconds)
    booking_id = _as_uuid(booking_id)
    now = now or cap.clock()
    try:
        with cap.db.transaction() as conn:
            hold = _place_hold(cap, conn, booking_id, now, ttl)
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


def load_confirmation(
    conn: repo.Connection, booking_id: uuid.UUID, hold_id: uuid.UUID
) -> ConfirmationInputs:
    """Lock the booking, its venue and the hold, and read what the decision needs: the holds
    that replaced this one, the venue's current policy and the one the hold claims."""
    booking = repo.lock_booking(conn, booking_id)
    if booking is None:
        return ConfirmationInputs(booking_id, hold_id, None, None)
    # Concurrent inserts checked by one exclusion constraint can deadlock each other, and a
    # policy change must not commit between the version check and the assignment.
    repo.lock_venue(conn, booking.venue_id)
    hold = repo.lock_hold(conn, hold_id)
    if hold is None:
        return ConfirmationInputs(booking_id, hold_id, booking, None)
    current = repo.current_policy(conn, hold.venue_id)
    claimed = hold.claimed_version
    held_under: PolicyRevision | None
    if current is not None and claimed == current.version:
        held_under = current
    elif claimed is not None:
        held_under = repo.policy_by_version(conn, hold.venue_id, claimed)
    else:
        held_under = None
    return ConfirmationInputs(
        booking_id,
        hold_id,
        booking,
        hold,
        replacements=repo.replacements(conn, hold, MAX_REQUOTE_CYCLES),
        current=current,
        held_under=held_under,
    )


def _confirm_in(
    conn: repo.Connection, booking_id: uuid.UUID, hold_id: uuid.UUID, now: datetime
) -> Confirmation:
    decision = decide_confirmation(load_confirmation(conn, booking_id, hold_id), now)
    if isinstance(decision, Reject):
        raise decision.error
    hold = decision.hold
    if isinstance(decision, AlreadyConfirmed):
        return Confirmation(
            booking_id,
            hold.id,
            hold.table_ids,
            hold.starts_at,
            hold.ends_at,
            already_confirmed=True,
        )
    try:
        repo.assign_tables(conn, hold)
    except psycopg.errors.ExclusionViolation:
        raise tables_taken(hold) from None
    repo.confirm_booking(conn, booking_id, now)
    repo.consume_hold(conn, hold.id, now)
    return Confirmation(booking_id, hold.id, hold.table_ids, hold.starts_at, hold.ends_at)


def _notify(cap: Capacity, booking_id: uuid.UUID) -> None:
    """Hand the ``confirmed`` email to the pipeline; a failure is logged, never raised (the
    confirmation has committed, and the email reconciler re-sends missing emails)."""
    try:
        cap.notify_confirmed(booking_id)
    except Exception as error:
        log.error(
            "confirmed email not handed to the pipeline",
            booking_id=str(booking_id),
            error=type(error).__name__,
        )


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
    HOLD_METADATA_INCOMPLETE (``details["problems"]``, every defect at once), POLICY_CHANGED
    (expected and actual versions, the diff and its summary), NO_AVAILABILITY (a table was
    taken meanwhile), BOOKING_NOT_FOUND, BOOKING_NOT_PENDING or POLICY_NOT_FOUND; the order of
    precedence is in :mod:`service.capacity.decisions`. Calling it again for a booking that
    this hold (or its re-quoted replacement) already confirmed returns ``already_confirmed``.
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


# -- drift recovery ------------------------------------------------------------------------


def _requote(cap: Capacity, booking_id: uuid.UUID, old_hold_id: uuid.UUID) -> Hold:
    """Under the latest policy, hold new tables and release the old hold, in one transaction."""
    ttl = hold_ttl(None, cap.hold_ttl_seconds)
    now = cap.clock()
    with cap.db.transaction() as conn:
        hold = _place_hold(cap, conn, booking_id, now, ttl, replacing=old_hold_id)
        repo.release_hold(conn, old_hold_id, reason="policy_drift", now=now, replaced_by=hold.id)
    return hold


def _escalate(
    cap: Capacity,
    booking_id: uuid.UUID,
    original_hold_id: uuid.UUID,
    hold_id: uuid.UUID,
    step: Escalate,
    drift: CapacityError,
    cause: CapacityError | None = None,
) -> ConfirmationResult:
    """Flag the booking, release its hold and write the admin notification, in one transaction."""
    now = cap.clock()
    details = drift.details
    with cap.db.transaction() as conn:
        booking = repo.lock_booking(conn, booking_id)
        if booking is None:
            raise booking_not_found(booking_id)
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
            reason=step.code,
            cycles=step.cycles,
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
    CONFIRMATIONS.labels("escalated").inc()
    POLICY_DRIFT.labels("escalated").inc()
    log.warning(
        "policy drift escalated to the venue's admins",
        booking_id=str(booking_id),
        venue_id=str(venue.id),
        code=step.code,
        cycles=step.cycles,
        event_id=str(event_id) if event_id else None,
    )
    return ConfirmationResult(
        "escalated",
        booking_id,
        hold_id,
        cycles=step.cycles,
        error=escalation_error(step, drift, booking_id, cause),
        event_id=event_id,
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
            outcome = confirmed_outcome(
                cycles=cycles,
                already_confirmed=confirmation.already_confirmed,
                hold_id=confirmation.hold_id,
                original_hold_id=original,
            )
            if confirmation.already_confirmed:
                return ConfirmationResult(
                    outcome, booking_id, confirmation.hold_id, confirmation=confirmation
                )
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
        step = after_drift(cycles, requote_enabled=cap.requote_enabled(venue_id))
        if isinstance(step, Surface):
            CONFIRMATIONS.labels("rejected").inc()
            raise drift
        if isinstance(step, Escalate):
            return _escalate(cap, booking_id, original, current, step, drift)
        try:
            hold = _requote(cap, booking_id, current)
        except CapacityError as error:
            escalation = after_failed_requote(error, step.cycle)
            if escalation is None:
                CONFIRMATIONS.labels("rejected").inc()
                raise
            return _escalate(cap, booking_id, original, current, escalation, drift, cause=error)
        cycles = step.cycle
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
