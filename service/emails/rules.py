"""Which email a booking's status calls for: pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EmailType(StrEnum):
    REQUEST_RECEIVED = "request_received"
    CONFIRMED = "confirmed"
    UPDATED = "updated"
    CANCELLED = "cancelled"


class BookingStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"


SENDABLE_WHILE: dict[EmailType, frozenset[BookingStatus]] = {
    EmailType.REQUEST_RECEIVED: frozenset({BookingStatus.PENDING}),
    EmailType.CONFIRMED: frozenset({BookingStatus.CONFIRMED}),
    EmailType.UPDATED: frozenset({BookingStatus.PENDING, BookingStatus.CONFIRMED}),
    EmailType.CANCELLED: frozenset({BookingStatus.CANCELLED}),
}

EXPECTED_FOR_STATUS: dict[BookingStatus, EmailType] = {
    BookingStatus.PENDING: EmailType.REQUEST_RECEIVED,
    BookingStatus.CONFIRMED: EmailType.CONFIRMED,
    BookingStatus.CANCELLED: EmailType.CANCELLED,
}


@dataclass(frozen=True)
class SendDecision:
    send: bool
    reason: str | None = None


def decide(email_type: EmailType, status: str) -> SendDecision:
    """Send only while the booking's current status still calls for this email."""
    allowed = SENDABLE_WHILE[email_type]
    if status in allowed:
        return SendDecision(send=True)
    wanted = " or ".join(sorted(allowed))
    return SendDecision(
        send=False, reason=f"booking is {status}; {email_type} is sent only while {wanted}"
    )
