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
    BookingStatus,
    EmailType,
    after_failure,
    before_send,
)

STATUSES: list[str | None] = [None, *[s.value for s in BookingStatus]]
ROW_STATES: list[str | None] = [None, "pending", "retrying", "sent", "skipped", "dead"]


def test_every_combination_of_type_status_and_row_state() -> None:
    for email_type, status, row in itertools.product(EmailType, STATUSES, ROW_STATES):
        verdict = before_send(email_type, status, row)
        if status is None:
            expected = Action.MISSING
        elif row in DONE_STATES:
            expected = Action.DUPLICATE
        elif status in SENDABLE_WHILE[email_type]:
            expected = Action.SEND
        else:
            expected = Action.SKIP
        assert verdict.action is expected, (email_type, status, row)
        assert (verdict.reason is not None) == (expected in (Action.MISSING, Action.SKIP))


def test_a_skip_says_why_in_words() -> None:
    verdict = before_send(EmailType.CONFIRMED, "cancelled", None)
    assert verdict.reason == "booking is cancelled; confirmed is sent only while confirmed"


@given(permanent=st.booleans(), final=st.booleans())
def test_a_failed_attempt_is_dead_when_permanent_or_last(permanent: bool, final: bool) -> None:
    assert after_failure(permanent=permanent, final=final) == (
        "dead" if permanent or final else "retrying"
    )


@given(
    email_type=st.sampled_from(list(EmailType)),
    status=st.sampled_from(STATUSES),
    row=st.sampled_from(["sent", "skipped"]),
)
def test_a_finished_delivery_makes_any_redelivery_a_no_op_while_the_booking_exists(
    email_type: EmailType, status: str | None, row: str
) -> None:
    action = before_send(email_type, status, row).action
    assert action is (Action.MISSING if status is None else Action.DUPLICATE)
