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
    SUPERSEDED = "superseded"
    IN_PROGRESS = "in_progress"
    MISSING = "missing"


@dataclass(frozen=True)
class Attempt:
    """Which attempt this is: ``number`` counts from 1; ``final`` means no retry follows."""

    number: int
    final: bool


@dataclass(frozen=True)
class BookingState:
    """What the decision needs of the booking as it is now."""

    status: str
    revision: int


@dataclass(frozen=True)
class Request:
    """One email request (one delivery row) as this attempt found it.

    ``claimed``: this attempt holds the row's lease (it was open, dead, or its lease had run
    out). Otherwise ``state`` is the row's state and ``lease_alive`` whether another worker's
    lease on it still runs.
    """

    type: EmailType
    revision: int
    state: str | None
    claimed: bool
    lease_alive: bool = False


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str | None = None
    superseded_by: int | None = None


DONE_STATES = frozenset({"sent", "skipped", "superseded"})
OPEN_STATES = frozenset({"pending", "sending", "retrying"})
LATER_REQUEST_STATES = OPEN_STATES | {"sent"}
"""A later request of the same type in one of these states sends, or has sent, the latest state
of the booking; an earlier request is then superseded by it."""


def before_send(booking: BookingState | None, request: Request, later: int | None) -> Verdict:
    """Whether to send ``request``, given the booking (None: not found) and ``later``, the
    highest revision above the request's of another request of the same type in
    ``LATER_REQUEST_STATES`` (None: there is none).

    A finished row wins over everything: redeliveries and replays are no-ops. The latest change
    is always sent: a request is superseded only by a later recorded request, never by a later
    booking revision alone.
    """
    if not request.claimed:
        if request.state in DONE_STATES:
            return Verdict(Action.DUPLICATE)
        return Verdict(Action.IN_PROGRESS, "another worker holds this email's lease")
    if booking is None:
        return Verdict(Action.MISSING, "booking not found (not visible yet, or deleted)")
    decision = decide(request.type, booking.status)
    if not decision.send:
        return Verdict(Action.SKIP, decision.reason)
    if later is not None and later > request.revision:
        return Verdict(
            Action.SUPERSEDED,
            f"superseded by the request at revision {later}",
            superseded_by=later,
        )
    return Verdict(Action.SEND)


def after_failure(*, permanent: bool, final: bool) -> str:
    """The delivery row's state after a failed attempt."""
    return "dead" if permanent or final else "retrying"
