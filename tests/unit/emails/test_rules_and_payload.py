"""Unit tests: which status calls for which email, and payload validation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from service.emails.models import EmailPayload, InvalidPayload
from service.emails.rules import EXPECTED_FOR_STATUS, BookingStatus, EmailType, decide

SEND_MATRIX = {
    (EmailType.REQUEST_RECEIVED, "pending"): True,
    (EmailType.REQUEST_RECEIVED, "confirmed"): False,
    (EmailType.REQUEST_RECEIVED, "cancelled"): False,
    (EmailType.CONFIRMED, "pending"): False,
    (EmailType.CONFIRMED, "confirmed"): True,
    (EmailType.CONFIRMED, "cancelled"): False,
    (EmailType.UPDATED, "pending"): True,
    (EmailType.UPDATED, "confirmed"): True,
    (EmailType.UPDATED, "cancelled"): False,
    (EmailType.CANCELLED, "pending"): False,
    (EmailType.CANCELLED, "confirmed"): False,
    (EmailType.CANCELLED, "cancelled"): True,
}


@pytest.mark.parametrize(("email_type", "status"), list(SEND_MATRIX))
def test_status_rules(email_type: EmailType, status: str) -> None:
    decision = decide(email_type, status)
    assert decision.send is SEND_MATRIX[(email_type, status)]
    if not decision.send:
        assert decision.reason and status in decision.reason and email_type.value in decision.reason


def test_every_status_expects_one_email() -> None:
    assert set(EXPECTED_FOR_STATUS) == set(BookingStatus)
    for status, email_type in EXPECTED_FOR_STATUS.items():
        assert decide(email_type, status.value).send


def test_valid_payload_positional_and_keyword() -> None:
    booking = uuid.uuid4()
    a = EmailPayload.from_call((str(booking), "confirmed"), None)
    b = EmailPayload.from_call((), {"booking_id": str(booking), "type": "confirmed"})
    assert a == b and a.booking_id == booking and a.type is EmailType.CONFIRMED
    assert a.as_kwargs() == {"booking_id": str(booking), "type": "confirmed"}


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("not-a-uuid", "confirmed"), None, "booking_id"),
        ((str(uuid.uuid4()), "birthday"), None, "type"),
        ((str(uuid.uuid4()), "confirmed", "2026-12-01T19:00:00"), None, "timezone offset"),
        ((str(uuid.uuid4()), "confirmed", "tomorrow"), None, "scheduled_for"),
        (
            (),
            {"booking_id": str(uuid.uuid4()), "type": "confirmed", "guest_email": "x@y.z"},
            "guest_email",
        ),
        ((str(uuid.uuid4()), "confirmed", None, "extra"), None, "at most 3"),
        ((), {}, "booking_id"),
    ],
)
def test_invalid_payloads_are_rejected_clearly(
    args: tuple[object, ...], kwargs: dict[str, object] | None, fragment: str
) -> None:
    with pytest.raises(InvalidPayload) as raised:
        EmailPayload.from_call(args, kwargs)
    assert fragment in str(raised.value)


def test_invalid_payload_lists_every_problem() -> None:
    with pytest.raises(InvalidPayload) as raised:
        EmailPayload.from_call(("nope", "nope"), None)
    assert "booking_id" in str(raised.value) and "type" in str(raised.value)


@freeze_time("2026-11-24 12:00:00")
def test_scheduled_for_becomes_a_delay_only_when_in_the_future() -> None:
    now = datetime.now(UTC)
    booking = str(uuid.uuid4())
    future = EmailPayload.from_call(
        (booking, "confirmed", (now + timedelta(minutes=5)).isoformat()), None
    )
    past = EmailPayload.from_call(
        (booking, "confirmed", (now - timedelta(minutes=5)).isoformat()), None
    )
    assert future.delay_ms(now) == 300_000
    assert past.delay_ms(now) is None
    assert EmailPayload.from_call((booking, "confirmed"), None).delay_ms(now) is None


def test_revision_is_optional_keyword_only_and_kept_in_the_message() -> None:
    booking = uuid.uuid4()
    v1 = EmailPayload.from_call((str(booking), "updated"), None)
    assert v1.revision is None and "revision" not in v1.as_kwargs()
    v2 = EmailPayload.from_call((str(booking), "updated"), {"revision": 3})
    assert v2.as_kwargs() == {"booking_id": str(booking), "type": "updated", "revision": 3}
    assert EmailPayload.from_call((), v2.as_kwargs()) == v2 == v1.at_revision(3)
    with pytest.raises(InvalidPayload, match="revision"):
        EmailPayload.from_call((str(booking), "updated"), {"revision": -1})
