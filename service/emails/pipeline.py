"""Deliver one booking email request once: the service behind the actor and the immediate-send
fallback. It loads, asks the pure decisions in ``service.emails.rules``, and writes.

Claim, send, mark: one short statement loads the booking and claims the request row
(booking, type, revision) with a lease; the SMTP conversation then runs with no database
connection checked out; one short statement records the outcome while the lease is still ours.
A redelivery that finds a live lease backs off (``DeliveryInProgress``); one that finds the
lease ran out (the worker died) claims the row again. The mailer's deadline is shorter than the
lease, so a live worker never shares an email with another.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from service.db import Database, DatabaseError
from service.emails import deliveries
from service.emails.models import BookingView, EmailPayload
from service.emails.render import RenderedEmail, UnrenderableBooking, message_id, render
from service.emails.rules import Action, Attempt, after_failure, before_send
from service.resilience import PermanentError, ServiceError, TransientError, keep_trying
from service.smtp import SmtpError


class DeliveryFailed(ServiceError):
    """This attempt failed; ``permanent`` failures are never retried."""


class RetryableDeliveryFailure(DeliveryFailed, TransientError):
    pass


class PermanentDeliveryFailure(DeliveryFailed, PermanentError):
    pass


class DeliveryInProgress(RetryableDeliveryFailure):
    """Another worker holds this email's lease right now (it is sending a redelivery);
    ``retry_in_seconds`` is when that lease ends."""

    def __init__(self, message: str, retry_in_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_in_seconds = retry_in_seconds


@dataclass(frozen=True)
class Mailroom:
    """What delivering an email needs, built by the composition root. ``lease_seconds`` must
    exceed the mailer's deadline for one conversation plus the time to render."""

    db: Database
    send: Callable[[RenderedEmail], None]
    sender: str
    sent_record_deadline_seconds: float
    clock: Callable[[], datetime]
    lease_seconds: float = 15.0


@dataclass(frozen=True)
class _Claimed:
    booking: BookingView
    revision: int
    token: uuid.UUID


def deliver(room: Mailroom, payload: EmailPayload, attempt: Attempt) -> Action:
    """Send ``payload``'s email if the booking still calls for it, it was not sent before and no
    later request of its type supersedes it; returns what was done (SEND means sent). Raises
    DeliveryFailed when the attempt failed (DeliveryInProgress: another worker holds it).

    Every attempt leaves the request row saying what happened (sent, skipped, superseded,
    retrying, or dead with the final error), so nothing depends on the broker.
    """
    now = room.clock()
    claimed = _claim(room, payload, attempt)
    if isinstance(claimed, Action):
        return claimed
    b, revision, token = claimed.booking, claimed.revision, claimed.token
    mid = message_id(payload.booking_id, payload.type, room.sender, revision)
    failure: DeliveryFailed | None = None
    try:  # no database connection is checked out here
        room.send(render(b, payload.type, room.sender, now, revision=revision))
    except UnrenderableBooking as error:
        failure = PermanentDeliveryFailure(str(error))
    except SmtpError as error:
        kind = PermanentDeliveryFailure if error.permanent else RetryableDeliveryFailure
        failure = kind(str(error))
    state = (
        "sent"
        if failure is None
        else after_failure(permanent=failure.permanent, final=attempt.final)
    )
    try:
        with room.db.autocommit() as conn:
            deliveries.finish(
                conn,
                payload.booking_id,
                payload.type,
                revision,
                token,
                state,
                message_id=mid if failure is None else None,
                error=None if failure is None else str(failure),
            )
    except DatabaseError:
        if failure is not None:
            raise failure from None  # the lease runs out and the retry claims the row again
        _record_sent_through_outage(room, payload, revision, token, mid)
    if failure is not None:
        raise failure
    return Action.SEND


def _claim(room: Mailroom, payload: EmailPayload, attempt: Attempt) -> _Claimed | Action:
    """Claim the request row and decide; every outcome but SEND is recorded here."""
    token = uuid.uuid4()
    key = (payload.booking_id, payload.type)
    with room.db.autocommit() as conn:  # each statement commits on its own: one round trip
        found = deliveries.claim(
            conn,
            *key,
            payload.revision,
            payload.scheduled_for,
            token=token,
            lease_seconds=room.lease_seconds,
        )
        revision = found.request.revision
        verdict = before_send(found.booking_state, found.request, found.later_revision)
        if payload.revision == 0 and revision > 0 and found.request.claimed:
            deliveries.close_unseen(conn, *key, revision)
        if verdict.action is Action.DUPLICATE:
            return Action.DUPLICATE
        if verdict.action is Action.IN_PROGRESS:
            raise DeliveryInProgress(
                "another worker is sending this email now", found.lease_left_seconds
            )
        if verdict.action in (Action.SKIP, Action.SUPERSEDED):
            deliveries.finish(
                conn,
                *key,
                revision,
                token,
                verdict.action.value,
                attempted=False,
                skip_reason=verdict.reason,
                superseded_by=verdict.superseded_by,
            )
            return verdict.action
        if found.booking is None:
            deliveries.finish(
                conn,
                *key,
                revision,
                token,
                after_failure(permanent=False, final=attempt.final),
                error="booking not found",
            )
            failure = RetryableDeliveryFailure(verdict.reason or "booking not found")
        else:
            return _Claimed(found.booking, revision, token)
    raise failure


def _record_sent_through_outage(
    room: Mailroom, payload: EmailPayload, revision: int, token: uuid.UUID, mid: str
) -> None:
    """The SMTP server took the email but Postgres went away before our mark: keep trying to
    record it as sent, so that the retry that would follow does not send it a second time."""

    def record() -> None:
        with room.db.transaction() as conn:
            deliveries.finish(
                conn, payload.booking_id, payload.type, revision, token, "sent", message_id=mid
            )

    try:
        keep_trying(
            record,
            retry_on=(DatabaseError,),
            deadline_seconds=room.sent_record_deadline_seconds,
            first_pause=0.5,
        )
    except DatabaseError:
        raise RetryableDeliveryFailure(
            "email handed to SMTP but the database stayed unavailable; a retry may resend it"
        ) from None
