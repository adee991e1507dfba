"""The email pipeline's pure decisions, exhaustively: what an attempt does before any SMTP traffic,
and the delivery row's state after a failed attempt."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from service.emails.rules import (
    DONE_STATES,
    SENDABLE_WHILE,
    Action,
    BookingState,
    BookingStatus,
    EmailType,
    Request,
    after_failure,
    before_send,
)

STATUSES: list[str | None] = [None, *[s.value for s in BookingStatus]]
ROW_STATES = ["pending", "sending", "retrying", "sent", "skipped", "superseded", "dead"]


def booking(status: str | None, revision: int = 3) -> BookingState | None:
    return None if status is None else BookingState(status=status, revision=revision)


def test_every_combination_of_type_status_row_and_later_request() -> None:
    for email_type, status, row, claimed, later in itertools.product(
        EmailType, STATUSES, ROW_STATES, (True, False), (None, 1, 2, 3)
    ):
        request = Request(type=email_type, revision=2, state=row, claimed=claimed)
        verdict = before_send(booking(status), request, later)
        if not claimed:
            expected = Action.DUPLICATE if row in DONE_STATES else Action.IN_PROGRESS
        elif status is None:
            expected = Action.MISSING
        elif status not in SENDABLE_WHILE[email_type]:
            expected = Action.SKIP
        elif later is not None and later > 2:
            expected = Action.SUPERSEDED
        else:
            expected = Action.SEND
        assert verdict.action is expected, (email_type, status, row, claimed, later)
        assert (verdict.reason is not None) == (
            expected in (Action.MISSING, Action.SKIP, Action.SUPERSEDED, Action.IN_PROGRESS)
        )
        assert verdict.superseded_by == (later if expected is Action.SUPERSEDED else None)


def test_a_skip_says_why_in_words() -> None:
    request = Request(type=EmailType.CONFIRMED, revision=1, state="pending", claimed=True)
    verdict = before_send(booking("cancelled"), request, None)
    assert verdict.reason == "booking is cancelled; confirmed is sent only while confirmed"


@given(permanent=st.booleans(), final=st.booleans())
def test_a_failed_attempt_is_dead_when_permanent_or_last(permanent: bool, final: bool) -> None:
    assert after_failure(permanent=permanent, final=final) == (
        "dead" if permanent or final else "retrying"
    )


@given(
    email_type=st.sampled_from(list(EmailType)),
    status=st.sampled_from(STATUSES),
    row=st.sampled_from(sorted(DONE_STATES)),
    later=st.one_of(st.none(), st.integers(min_value=0, max_value=10)),
)
def test_a_finished_request_makes_any_redelivery_a_no_op(
    email_type: EmailType, status: str | None, row: str, later: int | None
) -> None:
    request = Request(type=email_type, revision=2, state=row, claimed=False)
    assert before_send(booking(status), request, later).action is Action.DUPLICATE


@given(
    email_type=st.sampled_from([EmailType.UPDATED]),
    status=st.sampled_from(["pending", "confirmed"]),
    revision=st.integers(min_value=0, max_value=50),
    booking_revision=st.integers(min_value=1, max_value=60),
)
def test_the_latest_request_is_always_sent_whatever_the_booking_revision(
    email_type: EmailType, status: str, revision: int, booking_revision: int
) -> None:
    """A later booking revision alone never supersedes a request: only a later request does."""
    request = Request(type=email_type, revision=revision, state="sending", claimed=True)
    state = BookingState(status=status, revision=booking_revision)
    assert before_send(state, request, None).action is Action.SEND
    assert before_send(state, request, revision).action is Action.SEND
    superseded = before_send(state, request, revision + 1)
    assert superseded.action is Action.SUPERSEDED and superseded.superseded_by == revision + 1


def test_a_live_lease_held_elsewhere_is_in_progress_not_a_duplicate() -> None:
    request = Request(
        type=EmailType.CONFIRMED, revision=1, state="sending", claimed=False, lease_alive=True
    )
    assert before_send(booking("confirmed"), request, None).action is Action.IN_PROGRESS
