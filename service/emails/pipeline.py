"""Deliver one booking email exactly once: the service behind the actor and the immediate-send
fallback. It loads, asks the pure decisions in ``service.emails.rules``, and writes.

The (booking, type) row in ``email_deliveries`` is locked for the whole send, so two workers
holding redeliveries of one message cannot both send it, and a row already ``sent`` or
``skipped`` turns any later redelivery or replay into a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from service.db import Database, DatabaseError
from service.emails import deliveries
from service.emails.models import EmailPayload
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
    """Another worker holds this email's row right now (it is sending a redelivery)."""


@dataclass(frozen=True)
class Mailroom:
    """What delivering an email needs, built by the composition root."""

    db: Database
    send: Callable[[RenderedEmail], None]
    sender: str
    sent_record_deadline_seconds: float
    clock: Callable[[], datetime]


def deliver(room: Mailroom, payload: EmailPayload, attempt: Attempt) -> Action:
    """Send ``payload``'s email if the booking still calls for it and it was not sent before;
    returns what was done (SEND means sent). Raises DeliveryFailed when the attempt failed.

    Every attempt leaves the delivery row saying what happened (sent, skipped, retrying, or dead
    with the final error), so nothing depends on the broker.
    """
    now = room.clock()
    mid = message_id(payload.booking_id, payload.type, room.sender)
    failure: DeliveryFailed | None = None
    handed_over = False
    try:
        with room.db.transaction() as conn:
            booking = deliveries.load_booking(conn, payload.booking_id)
            row_state = None
            if booking is not None:
                try:
                    row_state = deliveries.lock_delivery(conn, payload.booking_id, payload.type)
                except psycopg.errors.LockNotAvailable:
                    raise DeliveryInProgress("another worker is sending this email now") from None
            verdict = before_send(payload.type, booking.status if booking else None, row_state)
            if verdict.action is Action.DUPLICATE:
                return Action.DUPLICATE
            if verdict.action is Action.SKIP:
                deliveries.mark(
                    conn,
                    payload.booking_id,
                    payload.type,
                    "skipped",
                    attempted=False,
                    skip_reason=verdict.reason,
                )
                return Action.SKIP
            if booking is None:
                deliveries.record_outside_send(
                    conn,
                    payload.booking_id,
                    payload.type,
                    after_failure(permanent=False, final=attempt.final),
                    "booking not found",
                    None,
                )
                failure = RetryableDeliveryFailure(verdict.reason or "booking not found")
            else:
                try:
                    room.send(render(booking, payload.type, room.sender, now))
                    handed_over = True
                except UnrenderableBooking as error:
                    failure = PermanentDeliveryFailure(str(error))
                except SmtpError as error:
                    kind = PermanentDeliveryFailure if error.permanent else RetryableDeliveryFailure
                    failure = kind(str(error))
                deliveries.mark(
                    conn,
                    payload.booking_id,
                    payload.type,
                    "sent"
                    if failure is None
                    else after_failure(permanent=failure.permanent, final=attempt.final),
                    attempted=True,
                    message_id=mid if failure is None else None,
                    error=None if failure is None else str(failure),
                )
    except DatabaseError:
        if not handed_over:
            raise
        _record_sent_through_outage(room, payload, mid)
    if failure is not None:
        raise failure
    return Action.SEND


def _record_sent_through_outage(room: Mailroom, payload: EmailPayload, mid: str) -> None:
    """The SMTP server took the email but Postgres went away before our commit: keep trying to
    record it as sent, so that the retry that would follow does not send it a second time."""

    def record() -> None:
        with room.db.transaction() as conn:
            deliveries.record_sent(conn, payload.booking_id, payload.type, mid)

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
