"""The confirmation actor: ``confirm_booking.send(booking_id, hold_id)``.

Business rejections and escalations are outcomes, logged and counted, never retried; only a
database outage or a lock conflict (deadlock, serialisation failure) is retried.
"""

from __future__ import annotations

import uuid
from typing import Any

import dramatiq
import psycopg
from pydantic import BaseModel, ConfigDict, ValidationError

from service import broker as _broker  # noqa: F401  (sets the global broker first)
from service.capacity.confirm import confirm_with_policy_retry
from service.capacity.errors import CapacityError
from service.db import DatabaseUnavailable
from service.logs import get_logger

QUEUE = "capacity-confirmations"
MAX_RETRIES = 8
log = get_logger(__name__)

RETRYABLE: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.LockNotAvailable,
)


class ConfirmPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    booking_id: uuid.UUID
    hold_id: uuid.UUID


class InvalidConfirmPayload(ValueError):
    """The message can never be processed; it goes to the dead letters without retries."""


def should_retry(retries: int, exception: BaseException) -> bool:
    return retries < MAX_RETRIES and isinstance(exception, RETRYABLE)


def run(booking_id: Any, hold_id: Any) -> dict[str, Any]:
    """Validate the payload and confirm; the returned dict describes the outcome."""
    try:
        payload = ConfirmPayload(booking_id=booking_id, hold_id=hold_id)
    except ValidationError as error:
        fields = [".".join(str(p) for p in e["loc"]) for e in error.errors()]
        log.error("invalid confirm_booking payload", fields=fields)
        raise InvalidConfirmPayload(f"invalid payload fields: {fields}") from None
    ids = {"booking_id": str(payload.booking_id), "hold_id": str(payload.hold_id)}
    try:
        result = confirm_with_policy_retry(payload.booking_id, payload.hold_id)
    except CapacityError as error:
        log.info("confirmation rejected", code=error.code, **ids)
        return {"outcome": "rejected", "code": error.code, **ids}
    confirmation = result.confirmation
    if confirmation is not None and confirmation.already_confirmed:
        log.info("booking already confirmed; nothing to do", **ids)
        return {"outcome": "already_confirmed", **ids}
    summary: dict[str, Any] = {"outcome": result.outcome, "cycles": result.cycles, **ids}
    if result.error is not None:
        summary["code"] = result.error.code
    log.info("confirmation finished", **summary)
    return summary


@dramatiq.actor(
    actor_name="confirm_booking",
    queue_name=QUEUE,
    retry_when=should_retry,
    min_backoff=1_000,
    max_backoff=60_000,
)
def confirm_booking(booking_id: str, hold_id: str) -> None:
    """Confirm a booking's hold, recovering from policy drift (see confirm_with_policy_retry)."""
    run(booking_id, hold_id)
