"""Record every dead-lettered message in Postgres, where it outlives the broker's 7-day copy."""

from __future__ import annotations

import json
import math
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from service.db import transaction
from service.logs import get_logger, redact_text
from service.metrics import DEAD_LETTERS_RECORDED, EMAILS

log = get_logger(__name__)

EMAIL_ACTOR = "send_booking_email"


def failure_reason(exception: BaseException | None) -> str:
    from service.emails.models import InvalidPayload
    from service.emails.pipeline import PermanentDeliveryFailure

    if isinstance(exception, InvalidPayload):
        return "invalid_payload"
    if isinstance(exception, PermanentDeliveryFailure):
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


def record_dead_letter(message: dramatiq.Message[Any], reason: str, error: str | None) -> None:
    kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
    email_type = kwargs.get("type") if message.actor_name == EMAIL_ACTOR else None
    with transaction() as conn:
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
                storable(email_type)[:32] if isinstance(email_type, str) else None,
            ),
        )


class DeadLetterRecorder(Middleware):
    """After Retries has decided a message is dead, write it to ``dead_letters``."""

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
        DEAD_LETTERS_RECORDED.labels(message.queue_name.removesuffix(".DQ"), reason).inc()
        if message.actor_name == EMAIL_ACTOR:
            kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
            EMAILS.labels(str(kwargs.get("type", "unknown"))[:32], "dead").inc()
        try:
            record_dead_letter(message, reason, error)
        except Exception as failure:  # the broker still holds the letter; never break the worker
            log.error(
                "could not record a dead letter in Postgres; the broker still holds it",
                message_id=storable(message.message_id),
                error=type(failure).__name__,
            )
