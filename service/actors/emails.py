"""The booking-email actor and the producer behaviour behind ``send_booking_email.send``.

The booking service calls ``send_booking_email.send(booking_id, type, scheduled_for=None)``
(optionally with ``venue_id=`` for a per-venue rollout of the queue flag), or
``send_booking_email.send_in(conn, booking_id, type, scheduled_for=None)`` inside its own
transaction. ``send`` records the request in Postgres (at the booking's current revision)
before anything else, so the reconciler can always recover it; then the
``email-queue-enabled`` flag chooses the queue or an immediate in-process send; an unreachable
broker also falls back to sending at once, and if that fails too the request row stays pending
for the reconciler. Importing this module builds nothing: see ``service.actors.binding``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage

from service.actors.binding import AppActor, DeferredActor
from service.app import App
from service.broker import BROKER_ERRORS
from service.config import ConfigError
from service.db import DatabaseError
from service.emails import deliveries
from service.emails.models import ACTOR_NAME, QUEUE, EmailPayload, InvalidPayload
from service.emails.pipeline import (
    DeliveryFailed,
    DeliveryInProgress,
    PermanentDeliveryFailure,
    RetryableDeliveryFailure,
    deliver,
)
from service.emails.requests import record_booking_email
from service.emails.rules import Action, Attempt
from service.logs import get_logger
from service.metrics import EMAIL_PRODUCER_DECISIONS, EMAIL_SEND_SECONDS, EMAILS

__all__ = ["ACTOR_NAME", "QUEUE", "EmailNotAccepted", "record_booking_email", "send_booking_email"]
log = get_logger(__name__)


class EmailNotAccepted(RuntimeError):
    """Neither the queue, nor an immediate send, nor Postgres could take the email: nothing
    was stored and the caller must retry. Also raised when the immediate send is needed but
    this process has no database or SMTP settings."""


class BookingEmailActor(AppActor):
    """An actor whose ``send`` validates the payload and honours the queue kill-switch."""

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        call = dict(kwargs or {})
        venue_id = call.pop("venue_id", None)
        payload = _recorded(self.app, EmailPayload.from_call(args, call))
        message = self.message_with_options(kwargs=payload.as_kwargs(), **options)
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        if self.app.flags.email_queue_enabled(venue_id):
            try:
                enqueued = self.broker.enqueue(
                    message,
                    delay=delay if delay is not None else payload.delay_ms(self.app.clock()),
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
        send_now(self.app, payload, decision)
        return message


def _recorded(app: App, payload: EmailPayload) -> EmailPayload:
    """Record the request (pending, at the booking's current revision unless the payload names
    one) and return the payload with its revision. Postgres unreachable: the email is kept
    (enqueued without a revision; the worker records it when it runs) rather than failing the
    caller."""
    try:
        with app.db.autocommit() as conn:
            revision = deliveries.record_request(
                conn, payload.booking_id, payload.type, payload.revision, payload.scheduled_for
            )
    except DatabaseError as error:
        log.warning(
            "database unreachable; email sent on without a request record",
            booking_id=str(payload.booking_id),
            email_type=payload.type.value,
            error=str(error),
        )
        EMAIL_PRODUCER_DECISIONS.labels("unrecorded").inc()
        return payload
    return payload.at_revision(revision)


def send_now(app: App, payload: EmailPayload, decision: str) -> None:
    """The in-process path: deliver now, or leave a pending row that the reconciler will send."""
    now = app.clock()
    fields = {"booking_id": str(payload.booking_id), "email_type": payload.type.value}
    try:
        room = app.mailroom
    except ConfigError as error:
        log.error("immediate send is not configured in this process", error=str(error), **fields)
        raise EmailNotAccepted(
            f"the email could not be queued and this process cannot send it: {error}"
        ) from None
    if payload.delay_ms(now) is not None:
        _record_pending(
            app, payload, "scheduled for later while the queue is bypassed", payload.scheduled_for
        )
        EMAIL_PRODUCER_DECISIONS.labels("recorded_pending").inc()
        log.info("scheduled email recorded for the reconciler", **fields)
        return
    EMAIL_PRODUCER_DECISIONS.labels(decision).inc()
    try:
        with EMAIL_SEND_SECONDS.labels(payload.type.value).time():
            action = deliver(room, payload, Attempt(number=1, final=False))
    except (RetryableDeliveryFailure, DatabaseError) as error:
        _record_pending(app, payload, str(error), now)
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
        payload.type.value, "sent_immediate" if action is Action.SEND else action.value
    ).inc()


def _record_pending(app: App, payload: EmailPayload, error: str, due: datetime | None) -> None:
    try:
        with app.db.transaction() as conn:
            revision = deliveries.record_request(
                conn, payload.booking_id, payload.type, payload.revision, payload.scheduled_for
            )
            deliveries.record_outside_send(
                conn, payload.booking_id, payload.type, revision, "pending", error, due
            )
    except DatabaseError as db_error:
        log.error("email could not be queued, sent or recorded", booking_id=str(payload.booking_id))
        raise EmailNotAccepted(
            "broker, SMTP and database all unavailable; retry the request"
        ) from db_error


def _message_kwargs(message: dramatiq.Message[Any]) -> dict[str, Any]:
    return message.kwargs if isinstance(message.kwargs, dict) else {}


def _email_type_label(message: dict[str, Any]) -> str | None:
    kwargs = message.get("kwargs")
    value = kwargs.get("type") if isinstance(kwargs, dict) else None
    return value if isinstance(value, str) else None


def _count_dead(message: dramatiq.Message[Any]) -> None:
    EMAILS.labels(str(_message_kwargs(message).get("type", "unknown"))[:32], "dead").inc()


def _on_retry(app: App, message: dramatiq.Message[Any], delay_ms: int) -> None:
    """Write the retry time Dramatiq chose onto the request row."""
    payload = EmailPayload.from_call(message.args, _message_kwargs(message))
    with app.db.transaction() as conn:
        deliveries.schedule_retry(
            conn, payload.booking_id, payload.type, payload.revision, delay_ms
        )


IN_PROGRESS_RECHECK_SECONDS = 5.0
"""How often a message whose email another worker is sending looks again, at most."""


def _recheck_later(app: App, payload: EmailPayload, error: DeliveryInProgress) -> None:
    """Another worker holds the lease: look again when it ends (or sooner, for a send that
    finishes early), as a new message, so that waiting spends none of the retry budget."""
    message = CurrentMessage.get_current_message()
    left = error.retry_in_seconds if error.retry_in_seconds is not None else 1.0
    delay_ms = int(min(left + 0.5, IN_PROGRESS_RECHECK_SECONDS) * 1000)
    itself = app.broker.get_actor(ACTOR_NAME)
    options = dict(message.options) if message is not None else {}
    again = itself.message_with_options(
        kwargs=payload.as_kwargs(),
        **{k: v for k, v in options.items() if k == "retries"},
    )
    app.broker.enqueue(again, delay=delay_ms)
    EMAILS.labels(payload.type.value, Action.IN_PROGRESS.value).inc()


def deliver_booking_email(app: App, *args: Any, **kwargs: Any) -> None:
    """Worker side: validate, then deliver; transient failures raise so that Dramatiq retries.

    Takes ``(booking_id, type, scheduled_for=None, revision=None)``; the catch-all signature
    makes any other shape an InvalidPayload (dead-lettered at once) rather than a TypeError
    (retried). A redelivery that finds another worker's live lease is retried when that lease
    ends, not after the usual backoff.
    """
    payload = EmailPayload.from_call(args, kwargs)
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message else 0
    delay = payload.delay_ms(app.clock())
    if delay is not None and delay > 1000:
        itself = app.broker.get_actor(ACTOR_NAME)
        app.broker.enqueue(itself.message_with_options(kwargs=payload.as_kwargs()), delay=delay)
        return
    attempt = Attempt(number=retries + 1, final=retries >= app.settings.email_max_retries)
    try:
        with EMAIL_SEND_SECONDS.labels(payload.type.value).time():
            action = deliver(app.mailroom, payload, attempt)
    except DeliveryInProgress as error:
        _recheck_later(app, payload, error)
        return
    except DeliveryFailed as error:
        will_retry = not error.permanent and not attempt.final
        EMAILS.labels(payload.type.value, "retried" if will_retry else "failed").inc()
        log.warning(
            "email attempt failed",
            booking_id=str(payload.booking_id),
            email_type=payload.type.value,
            attempt=attempt.number,
            final=not will_retry,
            error=str(error),
        )
        if error.permanent:
            raise
        raise dramatiq.Retry(str(error)) from error  # retried with backoff, without a stack trace
    EMAILS.labels(payload.type.value, action.value).inc()
    log.debug(
        "email " + action.value,
        booking_id=str(payload.booking_id),
        email_type=payload.type.value,
        attempt=attempt.number,
    )


def _options(app: App) -> dict[str, Any]:
    return {
        "throws": (InvalidPayload, PermanentDeliveryFailure),
        "time_limit": app.settings.email_time_limit_ms,
        "dead_letter_kind": _email_type_label,
        "on_dead_letter": _count_dead,
        "on_retry": partial(_on_retry, app),
    }


class BookingEmailDeclaration(DeferredActor):
    """The declaration, plus the transactional form, which needs no broker."""

    def send_in(
        self,
        conn: psycopg.Connection[Any],
        booking_id: UUID | str,
        email_type: str,
        scheduled_for: datetime | str | None = None,
    ) -> int:
        """Record the email in ``conn``'s transaction (request row and outbox event); the outbox
        relay enqueues it after the commit, and a rollback leaves nothing. Returns the booking
        revision it is about."""
        return record_booking_email(conn, booking_id, email_type, scheduled_for)


send_booking_email = BookingEmailDeclaration(
    deliver_booking_email,
    actor_name=ACTOR_NAME,
    queue_name=QUEUE,
    actor_class=BookingEmailActor,
    options=_options,
)
