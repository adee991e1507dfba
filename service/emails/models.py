"""The actor's payload and the booking data an email is rendered from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.emails.rules import EmailType
from service.resilience import InvalidMessage


class InvalidPayload(InvalidMessage):
    """The message can never be processed: not retried, dead-lettered with this error."""


QUEUE = "pending-booking-emails"
ACTOR_NAME = "send_booking_email"


class EmailPayload(BaseModel):
    """One email request. ``revision`` is the booking revision the request is about; a message
    without one (old producers, messages from before revisions) means the booking's current
    revision; 0 means the booking was not visible when the request was recorded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    booking_id: UUID
    type: EmailType
    scheduled_for: datetime | None = None
    revision: int | None = Field(default=None, ge=0)

    @field_validator("scheduled_for")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(
                "scheduled_for must carry a timezone offset (ISO-8601, e.g. ...+00:00)"
            )
        return value

    @classmethod
    def from_call(cls, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> EmailPayload:
        """Validate an actor call's arguments, raising InvalidPayload with every problem listed."""
        names = ("booking_id", "type", "scheduled_for")  # revision only by keyword
        if len(args) > len(names):
            raise InvalidPayload(f"send_booking_email takes at most 3 arguments, got {len(args)}")
        data: dict[str, Any] = dict(zip(names, args, strict=False))
        for key, value in (kwargs or {}).items():
            if key in data:
                raise InvalidPayload(f"{key} given twice")
            data[key] = value
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                for e in error.errors()
            )
            raise InvalidPayload(f"invalid booking email payload: {problems}") from None

    def as_kwargs(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"booking_id": str(self.booking_id), "type": self.type.value}
        if self.scheduled_for is not None:
            out["scheduled_for"] = self.scheduled_for.isoformat()
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    def at_revision(self, revision: int) -> EmailPayload:
        return self.model_copy(update={"revision": revision})

    def delay_ms(self, now: datetime) -> int | None:
        """Milliseconds until ``scheduled_for``; None when it is absent or already past."""
        if self.scheduled_for is None:
            return None
        delta = (self.scheduled_for - now).total_seconds()
        return int(delta * 1000) if delta > 0 else None


@dataclass(frozen=True)
class BookingView:
    booking_id: UUID
    status: str
    guest_name: str
    guest_email: str
    party_size: int
    starts_at: datetime
    locale: str
    notes: str | None
    venue_name: str
    venue_timezone: str
    revision: int = 1

    def local_start(self) -> datetime:
        return self.starts_at.astimezone(ZoneInfo(self.venue_timezone))


def utcnow() -> datetime:
    return datetime.now(UTC)
