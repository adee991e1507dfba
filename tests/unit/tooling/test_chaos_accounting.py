"""The chaos run's counting: requests by revision against delivery rows and Message-IDs."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from bench.chaos import EmailRequest, Key, Received, account, parse_message_id

B = "7d9c0f5e-0000-4000-8000-000000000001"


def req(
    kind: str, revision: int, *, recorded: bool = True, scheduled: datetime | None = None
) -> EmailRequest:
    return EmailRequest(B, kind, revision, recorded, scheduled, at=0.0)


def got(*keys: Key) -> Received:
    ids = Counter(keys)
    return Received(ids, {k: [1000.0] * n for k, n in ids.items()}, foreign=0)


def verdicts(requests: list[EmailRequest], received: Received, rows: dict[Key, str]) -> list[str]:
    return [o.verdict for o in account(requests, received, rows).outcomes]


def test_parse_message_id() -> None:
    assert parse_message_id(f"<booking-{B}.updated.r3@chaos.example>") == (B, "updated", 3)
    assert parse_message_id("<booking-x.updated@chaos.example>") is None
    assert parse_message_id("<something@else>") is None


def test_first_update_sent_or_superseded_both_count_as_delivered() -> None:
    requests = [req("updated", 2), req("updated", 3)]
    sent = {(B, "updated", 2): "sent", (B, "updated", 3): "sent"}
    received = got((B, "updated", 2), (B, "updated", 3))
    assert verdicts(requests, received, sent) == ["received", "received"]
    superseded = {(B, "updated", 2): "superseded", (B, "updated", 3): "sent"}
    acc = account(requests, got((B, "updated", 3)), superseded)
    assert [o.verdict for o in acc.outcomes] == ["superseded", "received"]
    assert not acc.lost and not acc.unexpected


def test_an_earlier_request_neither_sent_nor_superseded_is_lost() -> None:
    rows = {(B, "updated", 2): "retrying", (B, "updated", 3): "sent"}
    assert verdicts([req("updated", 2), req("updated", 3)], got((B, "updated", 3)), rows) == [
        "lost",
        "received",
    ]


def test_the_latest_request_needs_an_email_at_its_revision_or_later() -> None:
    rows = {(B, "updated", 3): "superseded"}
    assert verdicts([req("updated", 3)], got(), rows) == ["lost"]
    assert verdicts([req("updated", 3)], got((B, "updated", 4)), rows) == ["received"]


def test_a_request_without_a_revision_is_answered_by_the_revision_the_worker_took() -> None:
    rows = {(B, "confirmed", 2): "sent"}
    acc = account([req("confirmed", 1, recorded=False)], got((B, "confirmed", 2)), rows)
    (outcome,) = acc.outcomes
    assert outcome.verdict == "received" and outcome.state == "sent"
    assert outcome.answer == (B, "confirmed", 2)
    assert not acc.unexpected


def test_a_superseded_request_that_arrived_anyway_is_flagged() -> None:
    rows = {(B, "updated", 2): "superseded", (B, "updated", 3): "sent"}
    acc = account(
        [req("updated", 2), req("updated", 3)], got((B, "updated", 2), (B, "updated", 3)), rows
    )
    assert [o.sent_superseded for o in acc.outcomes] == [True, False]


def test_emails_no_request_asked_for_are_unexpected() -> None:
    rows = {(B, "confirmed", 1): "sent"}
    acc = account([req("confirmed", 1)], got((B, "confirmed", 1), (B, "cancelled", 1)), rows)
    assert acc.unexpected == [(B, "cancelled", 1)]
    assert req("updated", 2, scheduled=datetime.now(UTC)).key == (B, "updated", 2)
