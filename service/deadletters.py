"""Record every dead-lettered message in Postgres, where it outlives the broker's 7-day copy.

The recorder knows no feature: an actor that wants more than the generic record declares it
with two actor options, ``dead_letter_kind`` (a label stored with the letter, e.g. the email
type) and ``on_dead_letter`` (called once per letter, e.g. to count it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from service.db import Database
from service.logs import get_logger, redact_text
from service.metrics import DEAD_LETTERS_RECORDED
from service.resilience import InvalidMessage, PermanentError

log = get_logger(__name__)

KindOf = Callable[[dict[str, Any]], str | None]
"""Actor option ``dead_letter_kind``: a label for a dead message, given as ``asdict()``."""
OnDeadLetter = Callable[[dramatiq.Message[Any]], None]


OVER_DELIVERED = "delivery_limit"
"""Reason of a message a quorum queue handed out RABBITMQ_DELIVERY_LIMIT times without an ack."""


def failure_reason(exception: BaseException | None) -> str:
    if isinstance(exception, InvalidMessage):
        return "invalid_payload"
    if isinstance(exception, PermanentError):
        return "permanent_failure"
    return "retries_exhausted"


def storable(value: Any) -> Any:
    """``value`` with what Postgres text and jsonb refuse replaced: NUL characters, lone
    surrogates, non-finite numbers. Garbage must still be recorded, just not verbatim."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def record_dead_letter(
    db: Database,
    message: dramatiq.Message[Any],
    reason: str,
    error: str | None,
    kind: str | None = None,
) -> None:
    with db.transaction() as conn:
        conn.execute(
            """
            INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, error, email_type)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (message_id) DO UPDATE
               SET reason = EXCLUDED.reason, error = EXCLUDED.error, failed_at = now(),
                   message = EXCLUDED.message, replayed_at = NULL, purged_at = NULL
            """,
            (
                storable(message.message_id),
                storable(message.queue_name.removesuffix(".DQ")),
                storable(message.actor_name),
                json.dumps(storable(message.asdict()), default=str, allow_nan=False),
                reason,
                storable(error),
                storable(kind)[:32] if isinstance(kind, str) else None,
            ),
        )


UNDECODABLE = "undecodable"
"""Key marking the stored form of a message that was not a Dramatiq message."""


def undecodable_id(body: bytes) -> str:
    """The dead-letter id of an undecodable body (its real id is inside it): a digest, so the
    Postgres record and the broker copy match."""
    return f"{UNDECODABLE}-{hashlib.sha256(body).hexdigest()[:32]}"


def undecodable_form(queue_name: str, body: bytes) -> dict[str, Any]:
    """What is known of an undecodable message: its queue, the actor if the body names one, and
    the body itself (as text when it is UTF-8, else base64)."""
    form: dict[str, Any] = {
        UNDECODABLE: True,
        "message_id": undecodable_id(body),
        "queue_name": queue_name.removesuffix(".DQ"),
        "actor_name": "unknown",
    }
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        form["body_base64"] = base64.b64encode(body).decode("ascii")
        return form
    form["body"] = text
    try:
        fields = json.loads(text)
    except ValueError:
        return form
    if isinstance(fields, dict) and isinstance(fields.get("actor_name"), str):
        form["actor_name"] = fields["actor_name"][:200]
    return form


def record_undecodable(db: Database, queue_name: str, body: bytes, error: BaseException) -> None:
    """Record a fetched body that is not a Dramatiq message, reason ``invalid_payload``."""
    form = storable(undecodable_form(queue_name, body))
    with db.transaction() as conn:
        conn.execute(
            """
            INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, error)
            VALUES (%s, %s, %s, %s, 'invalid_payload', %s)
            ON CONFLICT (message_id) DO UPDATE
               SET reason = EXCLUDED.reason, error = EXCLUDED.error, failed_at = now(),
                   message = EXCLUDED.message, replayed_at = NULL, purged_at = NULL
            """,
            (
                form["message_id"],
                form["queue_name"],
                form["actor_name"],
                json.dumps(form, allow_nan=False),
                storable(redact_text(f"{type(error).__name__}: {error}")[:2000]),
            ),
        )


class UndecodableRecorder:
    """The broker's ``on_undecodable``: record the dead body in ``dead_letters``."""

    def __init__(self, database: Callable[[], Database]) -> None:
        self.database = database

    def __call__(self, queue_name: str, body: bytes, error: BaseException) -> None:
        queue = queue_name.removesuffix(".DQ")
        try:
            record_undecodable(self.database(), queue, body, error)
            DEAD_LETTERS_RECORDED.labels(queue, "invalid_payload").inc()
        except Exception as failure:  # the broker still holds the letter; never break the worker
            log.error(
                "could not record a dead letter in Postgres; the broker still holds it",
                message_id=undecodable_id(body),
                error=type(failure).__name__,
            )


def _option(broker: dramatiq.Broker, message: Any, name: str) -> Any:
    try:
        return broker.get_actor(message.actor_name).options.get(name)
    except dramatiq.errors.ActorNotFound:
        return None


class DeadLetterRecorder(Middleware):
    """After Retries has decided a message is dead, write it to ``dead_letters``."""

    def __init__(self, database: Callable[[], Database]) -> None:
        self.database = database

    @property
    def actor_options(self) -> set[str]:
        return {"dead_letter_kind", "on_dead_letter"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or not message.failed:
            return
        if isinstance(exception, dramatiq.Retry) and exception.__cause__ is not None:
            exception = exception.__cause__
        reason = failure_reason(exception)
        error = redact_text(f"{type(exception).__name__}: {exception}")[:2000]
        self.record(broker, message, reason, error)

    def over_delivered(self, broker: dramatiq.Broker, message: Any, count: int) -> None:
        """The broker's ``on_over_delivered``: a quorum queue handed ``message`` out ``count``
        times without an ack (its workers died with it each time); record it, reason
        ``delivery_limit``."""
        self.record(
            broker,
            message,
            OVER_DELIVERED,
            f"delivered {count} times without an ack (RABBITMQ_DELIVERY_LIMIT)",
        )

    def record(self, broker: dramatiq.Broker, message: Any, reason: str, error: str) -> None:
        kind_of: KindOf | None = _option(broker, message, "dead_letter_kind")
        on_dead: OnDeadLetter | None = _option(broker, message, "on_dead_letter")
        if on_dead is not None:
            try:
                on_dead(message)
            except Exception as failure:
                log.warning("on_dead_letter hook failed", error=type(failure).__name__)
        try:
            kind = kind_of(message.asdict()) if kind_of is not None else None
            record_dead_letter(self.database(), message, reason, error, kind)
            DEAD_LETTERS_RECORDED.labels(message.queue_name.removesuffix(".DQ"), reason).inc()
        except Exception as failure:  # the broker still holds the letter; never break the worker
            log.error(
                "could not record a dead letter in Postgres; the broker still holds it",
                message_id=storable(message.message_id),
                error=type(failure).__name__,
            )
