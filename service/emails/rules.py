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


class Action(StrEnum):
    """What a delivery attempt does, decided before any SMTP traffic."""

    SEND = "sent"
    SKIP = "skipped"
    DUPLICATE = "duplicate"
    MISSING = "missing"


@dataclass(frozen=True)
class Attempt:
    """Which attempt this is: ``number`` counts from 1; ``final`` means no retry follows."""

    number: int
    final: bool


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str | None = None


DONE_STATES = frozenset({"sent", "skipped"})


def before_send(
    email_type: EmailType, booking_status: str | None, row_state: str | None
) -> Verdict:
    """Whether to send, given the booking's status (None: not found) and the delivery row's
    state (None: no row yet). A finished row wins over everything: redeliveries are no-ops."""
    if booking_status is None:
        return Verdict(Action.MISSING, "booking not found (not visible yet, or deleted)")
    if row_state in DONE_STATES:
        return Verdict(Action.DUPLICATE)
    decision = decide(email_type, booking_status)
    if not decision.send:
        return Verdict(Action.SKIP, decision.reason)
    return Verdict(Action.SEND)


def after_failure(*, permanent: bool, final: bool) -> str:
    """The delivery row's state after a failed attempt."""
    return "dead" if permanent or final else "retrying"
