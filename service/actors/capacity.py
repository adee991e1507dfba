"""The confirmation actor: ``confirm_booking.send(booking_id, hold_id)``.

Business rejections and escalations are outcomes, logged and counted, never retried; only a
database outage or a lock conflict (deadlock, serialisation failure) is retried.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from service.actors.binding import DeferredActor
from service.actors.emails import send_booking_email
from service.app import App
from service.capacity.confirm import Capacity, confirm_with_policy_retry
from service.capacity.errors import CapacityError
from service.logs import get_logger
from service.resilience import InvalidMessage, TransientError

QUEUE = "capacity-confirmations"
MAX_RETRIES = 8
log = get_logger(__name__)

RETRYABLE: tuple[type[BaseException], ...] = (TransientError,)
"""Database outages and lock conflicts (deadlock, serialisation failure, lock timeout)."""


class ConfirmPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    booking_id: uuid.UUID
    hold_id: uuid.UUID


class InvalidConfirmPayload(InvalidMessage):
    """The message can never be processed; it goes to the dead letters without retries."""


def capacity_service(app: App) -> Capacity:
    """The capacity shell's dependencies: the confirmed email goes through ``send_booking_email``."""

    def notify(booking_id: uuid.UUID) -> None:
        send_booking_email.bind(app).send(str(booking_id), "confirmed")

    return Capacity(
        db=app.db,
        notify_confirmed=notify,
        requote_enabled=app.flags.policy_requote_enabled,
        hold_ttl_seconds=app.settings.hold_ttl_seconds,
        quote_max_tables=app.settings.quote_max_tables,
        clock=app.clock,
    )


def should_retry(retries: int, exception: BaseException) -> bool:
    return retries < MAX_RETRIES and isinstance(exception, RETRYABLE)


def run(app: App, booking_id: Any, hold_id: Any) -> dict[str, Any]:
    """Validate the payload and confirm; the returned dict describes the outcome."""
    try:
        payload = ConfirmPayload(booking_id=booking_id, hold_id=hold_id)
    except ValidationError as error:
        fields = [".".join(str(p) for p in e["loc"]) for e in error.errors()]
        log.error("invalid confirm_booking payload", fields=fields)
        raise InvalidConfirmPayload(f"invalid payload fields: {fields}") from None
    ids = {"booking_id": str(payload.booking_id), "hold_id": str(payload.hold_id)}
    try:
        result = confirm_with_policy_retry(
            capacity_service(app), payload.booking_id, payload.hold_id
        )
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


def _confirm(app: App, booking_id: str, hold_id: str) -> None:
    """Confirm a booking's hold, recovering from policy drift (see confirm_with_policy_retry)."""
    run(app, booking_id, hold_id)


def _options(app: App) -> dict[str, Any]:
    return {"retry_when": should_retry, "min_backoff": 1_000, "max_backoff": 60_000}


confirm_booking = DeferredActor(
    _confirm, actor_name="confirm_booking", queue_name=QUEUE, options=_options
)
