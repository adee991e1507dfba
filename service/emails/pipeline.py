"""Deliver one booking email exactly once: the service function behind the actor and the
immediate-send fallback.

The (booking, type) row in ``email_deliveries`` is locked for the whole send, so two workers
holding redeliveries of one message cannot both send it, and a row already ``sent`` or
``skipped`` turns any later redelivery or replay into a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import psycopg

from service.config import get_settings
from service.db import DatabaseUnavailable, transaction
from service.emails import deliveries
from service.emails.models import EmailPayload, utcnow
from service.emails.render import UnrenderableBooking, message_id, render
from service.emails.rules import decide
from service.emails.transport import SmtpError, send_message


class Outcome(StrEnum):
    SENT = "sent"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"


class DeliveryFailed(Exception):
    """This attempt failed; ``permanent`` failures are never retried."""

    permanent = False


class RetryableDeliveryFailure(DeliveryFailed):
    permanent = False


class PermanentDeliveryFailure(DeliveryFailed):
    permanent = True


class DeliveryInProgress(RetryableDeliveryFailure):
    """Another worker holds this email's row right now (it is sending a redelivery)."""


@dataclass(frozen=True)
class Attempt:
    """Which attempt this is: ``number`` counts from 1; ``final`` means no retry follows."""

    number: int
    final: bool


def retry_delay(attempt_number: int) -> timedelta:
    """Nominal wait before the next attempt (Dramatiq's exponential backoff, without jitter)."""
    s = get_settings()
    ms = min(s.email_min_backoff_ms * 2 ** max(attempt_number - 1, 0), s.email_max_backoff_ms)
    return timedelta(milliseconds=ms)


def deliver(payload: EmailPayload, attempt: Attempt, now: datetime | None = None) -> Outcome:
    """Send ``payload``'s email if the booking still calls for it and it was not sent before.

    Every attempt leaves the delivery row saying what happened (sent, skipped, retrying with
    its next attempt time, or dead with the final error), so nothing depends on the broker.
    """
    now = now or utcnow()
    settings = get_settings()
    mid = message_id(payload.booking_id, payload.type, settings.email_from)
    failure: DeliveryFailed | None = None
    handed_over = False
    next_try = None if attempt.final else now + retry_delay(attempt.number)
    try:
        with transaction() as conn:
            booking = deliveries.load_booking(conn, payload.booking_id)
            if booking is None:
                state = "dead" if attempt.final else "retrying"
                deliveries.record_outside_send(
                    conn, payload.booking_id, payload.type, state, "booking not found", next_try
                )
                failure = RetryableDeliveryFailure(
                    "booking not found (not visible yet, or deleted)"
                )
            else:
                try:
                    row = deliveries.lock_delivery(conn, payload.booking_id, payload.type)
                except psycopg.errors.LockNotAvailable:
                    raise DeliveryInProgress("another worker is sending this email now") from None
                if row["state"] in ("sent", "skipped"):
                    return Outcome.DUPLICATE
                decision = decide(payload.type, booking.status)
                if not decision.send:
                    deliveries.mark(
                        conn,
                        payload.booking_id,
                        payload.type,
                        "skipped",
                        attempted=False,
                        skip_reason=decision.reason,
                    )
                    return Outcome.SKIPPED
                try:
                    send_message(render(booking, payload.type, settings.email_from, now))
                    handed_over = True
                except UnrenderableBooking as error:
                    failure = PermanentDeliveryFailure(str(error))
                except SmtpError as error:
                    kind = PermanentDeliveryFailure if error.permanent else RetryableDeliveryFailure
                    failure = kind(str(error))
                if failure is None:
                    deliveries.mark(
                        conn,
                        payload.booking_id,
                        payload.type,
                        "sent",
                        attempted=True,
                        message_id=mid,
                    )
                else:
                    dead = failure.permanent or attempt.final
                    deliveries.mark(
                        conn,
                        payload.booking_id,
                        payload.type,
                        "dead" if dead else "retrying",
                        attempted=True,
                        error=str(failure),
                        next_attempt_at=None if dead else next_try,
                    )
    except DatabaseUnavailable:
        if not handed_over:
            raise
        _record_sent_through_outage(payload, mid, settings.sent_record_deadline_seconds)
    if failure is not None:
        raise failure
    return Outcome.SENT


def _record_sent_through_outage(payload: EmailPayload, mid: str, deadline_seconds: float) -> None:
    """The SMTP server took the email but Postgres went away before our commit: keep trying to
    record it as sent, so that the retry that would follow does not send it a second time."""
    deadline = time.monotonic() + deadline_seconds
    pause = 0.5
    while True:
        try:
            with transaction() as conn:
                deliveries.record_sent(conn, payload.booking_id, payload.type, mid)
            return
        except DatabaseUnavailable:
            if time.monotonic() + pause > deadline:
                raise RetryableDeliveryFailure(
                    "email handed to SMTP but the database stayed unavailable; a retry may resend it"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
