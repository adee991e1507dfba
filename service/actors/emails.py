"""The booking-email actor and the producer behaviour behind ``send_booking_email.send``.

The booking service calls ``send_booking_email.send(booking_id, type, scheduled_for=None)`` and
nothing else. Behind that call the ``email-queue-enabled`` flag chooses the queue or an
immediate in-process send; an unreachable broker also falls back to sending at once, and if
that fails too the delivery row stays pending for the reconciler.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from service import flags
from service.broker import BROKER_ERRORS, broker
from service.config import get_settings
from service.db import DatabaseUnavailable, transaction
from service.emails import deliveries
from service.emails.models import EmailPayload, InvalidPayload, utcnow
from service.emails.pipeline import (
    Attempt,
    DeliveryFailed,
    Outcome,
    PermanentDeliveryFailure,
    RetryableDeliveryFailure,
    deliver,
)
from service.logs import get_logger
from service.metrics import EMAIL_PRODUCER_DECISIONS, EMAIL_SEND_SECONDS, EMAILS

QUEUE = "pending-booking-emails"
log = get_logger(__name__)


class EmailNotAccepted(RuntimeError):
    """Neither the queue, nor an immediate send, nor Postgres could take the email."""


class BookingEmailActor(dramatiq.Actor[Any, Any]):
    """An actor whose ``send`` validates the payload and honours the queue kill-switch."""

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        payload = EmailPayload.from_call(args, kwargs)
        message = self.message_with_options(kwargs=payload.as_kwargs(), **options)
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        if flags.email_queue_enabled():
            try:
                enqueued = self.broker.enqueue(
                    message, delay=delay if delay is not None else payload.delay_ms(utcnow())
                )
                EMAIL_PRODUCER_DECISIONS.labels("queued").inc()
                return enqueued
            except BROKER_ERRORS as error:
                log.warning(
                    "broker unreachable; sending the email immediately",
                    booking_id=str(payload.booking_id),
                    email_type=payload.type.value,
                    error=type(error).__name__,
                )
                decision = "immediate_broker_down"
        else:
            decision = "immediate_flag_off"
        send_now(payload, decision)
        return message


def send_now(payload: EmailPayload, decision: str) -> None:
    """The in-process path: deliver now, or leave a pending row that the reconciler will send."""
    now = utcnow()
    fields = {"booking_id": str(payload.booking_id), "email_type": payload.type.value}
    if payload.delay_ms(now) is not None:
        _record_pending(
            payload, "scheduled for later while the queue is bypassed", payload.scheduled_for
        )
        EMAIL_PRODUCER_DECISIONS.labels("recorded_pending").inc()
        log.info("scheduled email recorded for the reconciler", **fields)
        return
    EMAIL_PRODUCER_DECISIONS.labels(decision).inc()
    try:
        outcome = _timed(payload, Attempt(number=1, final=False))
    except (RetryableDeliveryFailure, DatabaseUnavailable) as error:
        _record_pending(payload, str(error), now)
        EMAIL_PRODUCER_DECISIONS.labels("recorded_pending").inc()
        log.warning(
            "immediate send failed; recorded as pending for the reconciler",
            error=str(error),
            **fields,
        )
        return
    except PermanentDeliveryFailure as error:
        log.error("immediate send failed permanently; recorded as dead", error=str(error), **fields)
        return
    EMAILS.labels(
        payload.type.value, "sent_immediate" if outcome is Outcome.SENT else outcome.value
    ).inc()


def _record_pending(payload: EmailPayload, error: str, due: Any) -> None:
    try:
        with transaction() as conn:
            deliveries.record_outside_send(
                conn, payload.booking_id, payload.type, "pending", error, due
            )
    except DatabaseUnavailable as db_error:
        log.error("email could not be queued, sent or recorded", booking_id=str(payload.booking_id))
        raise EmailNotAccepted(
            "broker, SMTP and database all unavailable; retry the request"
        ) from db_error


def _timed(payload: EmailPayload, attempt: Attempt) -> Outcome:
    with EMAIL_SEND_SECONDS.labels(payload.type.value).time():
        return deliver(payload, attempt)


@dramatiq.actor(
    actor_class=BookingEmailActor,
    actor_name="send_booking_email",
    queue_name=QUEUE,
    broker=broker,
    throws=(InvalidPayload, PermanentDeliveryFailure),
    time_limit=get_settings().email_time_limit_ms,
)
def send_booking_email(*args: Any, **kwargs: Any) -> None:
    """Worker side: validate, then deliver; transient failures raise so that Dramatiq retries.

    Takes ``(booking_id, type, scheduled_for=None)``; the catch-all signature makes any other
    shape an InvalidPayload (dead-lettered at once) rather than a TypeError (retried).
    """
    payload = EmailPayload.from_call(args, kwargs)
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message else 0
    delay = payload.delay_ms(utcnow())
    if delay is not None and delay > 1000:
        broker.enqueue(
            send_booking_email.message_with_options(kwargs=payload.as_kwargs()), delay=delay
        )
        return
    attempt = Attempt(number=retries + 1, final=retries >= get_settings().email_max_retries)
    try:
        outcome = _timed(payload, attempt)
    except DeliveryFailed as error:
        if not error.permanent and not attempt.final:
            EMAILS.labels(payload.type.value, "retried").inc()
        EMAILS.labels(payload.type.value, "failed").inc()
        log.warning(
            "email attempt failed",
            booking_id=str(payload.booking_id),
            email_type=payload.type.value,
            attempt=attempt.number,
            final=attempt.final or error.permanent,
            error=str(error),
        )
        if error.permanent:
            raise
        raise dramatiq.Retry(str(error)) from error  # retried with backoff, without a stack trace
    EMAILS.labels(payload.type.value, outcome.value).inc()
    log.debug(
        "email " + outcome.value,
        booking_id=str(payload.booking_id),
        email_type=payload.type.value,
        attempt=attempt.number,
    )
