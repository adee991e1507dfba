"""Holds, confirmation and drift recovery against real Postgres, with the outbox really delivered."""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from harness.factories import insert_booking, insert_venue
from harness.servers import SmtpSink
from service.capacity import repository as repo
from service.capacity.confirm import confirm_hold_assignment, confirm_with_policy_retry, create_hold
from service.capacity.errors import (
    BOOKING_NOT_PENDING,
    HOLD_BOOKING_MISMATCH,
    HOLD_EXPIRED,
    HOLD_METADATA_INCOMPLETE,
    HOLD_NOT_FOUND,
    NO_AVAILABILITY,
    POLICY_CHANGED,
    POLICY_REQUOTE_FAILED,
    POLICY_RETRY_FAILED,
    CapacityError,
)
from service.capacity.holds import build_hold_metadata
from service.capacity.policy import CapacityPolicy, TurnTime, policy_version
from service.capacity.quoting import quote
from service.capacity.records import Hold
from service.db import DatabaseConflict, DatabaseUnavailable
from tests.support.capacity import WebhookReceiver
from tests.support.current_app import capacity, current_app, transaction
from tests.support.policies import make_policy, revised, table

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "floor.manager@venue.example"
GUEST_NAME = "Grace Guestperson"
STARTS_AT = (datetime.now(UTC) + timedelta(days=3)).replace(
    hour=19, minute=0, second=0, microsecond=0
)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Venue:
    """A venue with a stored policy, and helpers to change it and add bookings."""

    def __init__(self, webhook_url: str | None = None) -> None:
        with transaction() as conn:
            self.id = insert_venue(
                conn, name="Le Drift", timezone="UTC", admin_emails=[ADMIN], webhook_url=webhook_url
            )
        self.policy = make_policy(
            [table("t1", capacity=2), table("t2", capacity=4), table("t3", capacity=4)],
            adjacency=[("t2", "t3")],
            venue_id=str(self.id),
        )
        self.save(self.policy)

    def save(self, policy: CapacityPolicy) -> None:
        self.policy = policy
        with transaction() as conn:
            repo.save_policy(conn, self.id, policy)

    def change(self, **fields: Any) -> None:
        self.save(revised(self.policy, **fields))

    def bump_turn_time(self) -> None:
        longest = max(t.minutes for t in self.policy.turn_times)
        self.change(
            turn_times=[*self.policy.turn_times[:-1], TurnTime(max_party=20, minutes=longest + 5)]
        )

    def booking(self, party_size: int = 2, starts_at: datetime = STARTS_AT) -> uuid.UUID:
        with transaction() as conn:
            return insert_booking(
                conn, self.id, party_size=party_size, starts_at=starts_at, guest_name=GUEST_NAME
            )


class Notified(list[uuid.UUID]):
    """A notifier that records, and checks the confirmation is committed when it is called."""

    def __call__(self, booking_id: uuid.UUID) -> None:
        with transaction() as conn:
            row = conn.execute(
                "SELECT status FROM bookings WHERE id = %s", (booking_id,)
            ).fetchone()
        assert row is not None and row["status"] == "confirmed", "notified before the commit"
        self.append(booking_id)


def booking_row(booking_id: uuid.UUID) -> dict[str, Any]:
    with transaction() as conn:
        row = conn.execute("SELECT * FROM bookings WHERE id = %s", (booking_id,)).fetchone()
    assert row is not None
    return row


def hold_row(hold_id: uuid.UUID) -> dict[str, Any]:
    with transaction() as conn:
        row = conn.execute("SELECT * FROM holds WHERE id = %s", (hold_id,)).fetchone()
    assert row is not None
    return row


def assignments(booking_id: uuid.UUID) -> list[str]:
    with transaction() as conn:
        return [r["table_id"] for r in repo.assigned_tables(conn, booking_id)]


def overlapping_assignments() -> int:
    with transaction() as conn:
        row = conn.execute(
            """
            SELECT count(*) AS n FROM table_assignments a JOIN table_assignments b
              ON a.id < b.id AND a.venue_id = b.venue_id AND a.table_id = b.table_id
             AND a.released_at IS NULL AND b.released_at IS NULL
             AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at
            """
        ).fetchone()
    assert row is not None and isinstance(row["n"], int)
    return row["n"]


@pytest.fixture
def venue(capacity_env: dict[str, str], webhook_receiver: WebhookReceiver) -> Venue:
    return Venue(webhook_receiver.url)


def test_confirms_the_first_time_and_emails_after_commit(venue: Venue) -> None:
    booking = venue.booking(party_size=2)
    hold = create_hold(capacity(), booking)
    assert hold.table_ids == ("t1",)
    assert hold_row(hold.id)["metadata"]["policyVersion"] == policy_version(venue.policy)
    before = metric("booking_confirmations_total", outcome="confirmed")
    notified = Notified()

    result = confirm_with_policy_retry(capacity(notified), booking, hold.id)

    assert (result.outcome, result.cycles, result.hold_id) == ("confirmed", 0, hold.id)
    row = booking_row(booking)
    assert row["status"] == "confirmed"
    assert row["status_changed_at"] > row["created_at"]
    assert hold_row(hold.id)["status"] == "consumed"
    assert assignments(booking) == ["t1"]
    assert notified == [booking]
    assert metric("booking_confirmations_total", outcome="confirmed") == before + 1


def test_the_confirmed_email_goes_through_the_pipeline(venue: Venue) -> None:
    from service.actors.emails import QUEUE, send_booking_email

    broker: Any = send_booking_email.broker
    client = getattr(broker, "client", None)
    if client is None:
        pytest.skip("the email actor is not bound to a Redis broker in this run")
    booking = venue.booking()

    confirm_hold_assignment(capacity(), booking, create_hold(capacity(), booking).id)

    queued = [m.decode() for m in client.hvals(f"dramatiq:{QUEUE}.msgs")]
    assert any(str(booking) in m and "confirmed" in m for m in queued)


def test_recovers_after_one_cycle(venue: Venue) -> None:
    booking = venue.booking(party_size=2)
    hold = create_hold(capacity(), booking)
    venue.change(tables=[t for t in venue.policy.tables if t.id != "t1"])
    detected = metric("booking_policy_drift_total", outcome="detected")
    recovered = metric("booking_policy_drift_total", outcome="recovered")

    result = confirm_with_policy_retry(capacity(Notified()), booking, hold.id)

    assert (result.outcome, result.cycles) == ("recovered", 1)
    assert result.hold_id != hold.id
    old = hold_row(hold.id)
    assert (old["status"], old["release_reason"], old["replaced_by"]) == (
        "released",
        "policy_drift",
        result.hold_id,
    )
    new = hold_row(result.hold_id)
    assert new["status"] == "consumed"
    assert new["metadata"]["policyVersion"] == policy_version(venue.policy)
    assert assignments(booking) == ["t2"]
    assert booking_row(booking)["status"] == "confirmed"
    assert metric("booking_policy_drift_total", outcome="detected") == detected + 1
    assert metric("booking_policy_drift_total", outcome="recovered") == recovered + 1


def test_recovers_after_two_cycles(venue: Venue) -> None:
    booking = venue.booking(party_size=4)
    hold = create_hold(capacity(), booking)
    venue.bump_turn_time()
    changes: list[int] = []

    def during_requote(cycle: int, new_hold: Hold) -> None:
        if cycle == 1:
            venue.change(buffer_minutes=venue.policy.buffer_minutes + 10)
            changes.append(cycle)

    result = confirm_with_policy_retry(
        capacity(Notified()), booking, hold.id, after_requote=during_requote
    )

    assert (result.outcome, result.cycles) == ("recovered", 2)
    assert changes == [1]
    with transaction() as conn:
        chain = conn.execute(
            "SELECT status FROM holds WHERE booking_id = %s ORDER BY created_at", (booking,)
        ).fetchall()
    assert [r["status"] for r in chain] == ["released", "released", "consumed"]
    assert booking_row(booking)["status"] == "confirmed"


def _delivered_notification(
    webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> tuple[dict[str, Any], email.message.EmailMessage]:
    result = subprocess.run(
        [sys.executable, "-m", "service", "outbox", "relay", "--once"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (request,) = webhook_receiver.wait_for(1)
    assert request.signature_ok, "the HMAC signature must verify"
    (raw,) = smtp_sink.messages()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    for content in (request.body.decode(), raw.decode()):
        assert GUEST_NAME not in content
        assert "guests.example" not in content, "no guest contact details"
    return request.document, message


def test_escalates_when_the_policy_keeps_changing(
    venue: Venue, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    booking = venue.booking(party_size=2)
    hold = create_hold(capacity(), booking)
    venue.bump_turn_time()
    escalated = metric("booking_confirmations_total", outcome="escalated")

    result = confirm_with_policy_retry(
        capacity(Notified()),
        booking,
        hold.id,
        after_requote=lambda cycle, _: venue.bump_turn_time(),
    )

    assert result.outcome == "escalated"
    assert result.cycles == 2
    assert result.error is not None and result.error.code == POLICY_RETRY_FAILED
    row = booking_row(booking)
    assert (row["status"], row["needs_attention"]) == ("pending", True)
    assert hold_row(result.hold_id)["status"] == "released"
    assert assignments(booking) == []
    assert metric("booking_confirmations_total", outcome="escalated") == escalated + 1

    document, message = _delivered_notification(webhook_receiver, smtp_sink)
    data = document["data"]
    assert data["reason"] == POLICY_RETRY_FAILED
    assert data["booking"] == {
        "id": str(booking),
        "party_size": 2,
        "starts_at": STARTS_AT.isoformat(),
    }
    assert data["policy"]["actual_version"] == policy_version(venue.policy)
    assert data["policy"]["expected_version"] != data["policy"]["actual_version"]
    assert data["policy"]["diff"], "the structured diff travels with the event"
    assert message["To"] == ADMIN
    assert "Le Drift" in message["Subject"]
    assert str(booking) in message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def test_escalates_when_no_table_fits_the_new_policy(
    venue: Venue, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    booking = venue.booking(party_size=4)
    hold = create_hold(capacity(), booking)
    venue.change(
        tables=[t.model_copy(update={"status": "out_of_service"}) for t in venue.policy.tables]
    )

    result = confirm_with_policy_retry(capacity(Notified()), booking, hold.id)

    assert (result.outcome, result.cycles) == ("escalated", 1)
    assert result.error is not None and result.error.code == POLICY_REQUOTE_FAILED
    assert result.error.details["cause"]["code"] == NO_AVAILABILITY
    assert booking_row(booking)["needs_attention"] is True
    assert hold_row(hold.id)["status"] == "released"

    document, message = _delivered_notification(webhook_receiver, smtp_sink)
    assert document["data"]["reason"] == POLICY_REQUOTE_FAILED
    assert "no table" in message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]

    with pytest.raises(CapacityError) as caught:
        confirm_with_policy_retry(capacity(Notified()), booking, hold.id)
    assert caught.value.code == HOLD_EXPIRED, "a redelivered request finds the hold released"


def test_flag_off_surfaces_policy_changed(venue: Venue) -> None:
    """The flag's environment default is off (no Unleash in this test)."""
    flag_off = replace(capacity(Notified()), requote_enabled=lambda _venue: False)
    booking = venue.booking()
    hold = create_hold(capacity(), booking)
    expected = policy_version(venue.policy)
    venue.bump_turn_time()

    with pytest.raises(CapacityError) as caught:
        confirm_with_policy_retry(flag_off, booking, hold.id)

    error = caught.value
    assert error.code == POLICY_CHANGED
    assert error.details["expectedVersion"] == expected
    assert error.details["actualVersion"] == policy_version(venue.policy)
    assert error.details["diff"]
    assert booking_row(booking)["status"] == "pending"
    assert hold_row(hold.id)["status"] == "active"


def _rejected(code: str) -> float:
    return metric("booking_holds_rejected_total", reason=code)


def test_each_rejection_code(venue: Venue) -> None:
    booking, other = venue.booking(), venue.booking(starts_at=STARTS_AT + timedelta(hours=5))
    hold, other_hold = create_hold(capacity(), booking), create_hold(capacity(), other)
    counts = {c: _rejected(c) for c in (HOLD_NOT_FOUND, HOLD_BOOKING_MISMATCH, HOLD_EXPIRED)}

    def code_of(booking_id: uuid.UUID, hold_id: uuid.UUID) -> CapacityError:
        with pytest.raises(CapacityError) as caught:
            confirm_with_policy_retry(capacity(Notified()), booking_id, hold_id)
        return caught.value

    missing = code_of(booking, uuid.uuid4())
    assert missing.code == HOLD_NOT_FOUND
    mismatch = code_of(booking, other_hold.id)
    assert mismatch.code == HOLD_BOOKING_MISMATCH
    assert mismatch.details["holdBookingId"] == str(other)
    with transaction() as conn:
        conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s", (hold.id,)
        )
    expired = code_of(booking, hold.id)
    assert expired.code == HOLD_EXPIRED
    for code, before in counts.items():
        assert _rejected(code) == before + 1, code

    with transaction() as conn:
        conn.execute(
            """UPDATE holds SET metadata = metadata #- '{selection,snapshot,zoneIds}'
                                                    #- '{selection,snapshot,adjacency,hash}'
               WHERE id = %s""",
            (other_hold.id,),
        )
    incomplete_before = metric("booking_confirmations_incomplete_metadata_total")
    incomplete = code_of(other, other_hold.id)
    assert incomplete.code == HOLD_METADATA_INCOMPLETE
    paths = sorted(p["path"] for p in incomplete.details["problems"])
    assert paths == ["selection.snapshot.adjacency.hash", "selection.snapshot.zoneIds"]
    assert metric("booking_confirmations_incomplete_metadata_total") == incomplete_before + 1
    assert booking_row(other)["status"] == "pending"

    with transaction() as conn:
        conn.execute("UPDATE bookings SET status = 'cancelled' WHERE id = %s", (booking,))
    assert code_of(booking, _force_hold(venue, booking, ("t2",))).code == BOOKING_NOT_PENDING


def _force_hold(venue: Venue, booking_id: uuid.UUID, tables: tuple[str, ...]) -> uuid.UUID:
    """Insert a hold on chosen tables, as a racing writer would, with complete metadata."""
    offer = quote(venue.policy, 2, STARTS_AT, [], datetime.now(UTC), max_tables=1)
    offer = type(offer)(
        table_ids=tables,
        zone_id=offer.zone_id,
        capacity=offer.capacity,
        waste=offer.waste,
        starts_at=offer.starts_at,
        ends_at=offer.ends_at,
        policy_version=offer.policy_version,
    )
    with transaction() as conn:
        revision = repo.current_policy(conn, venue.id)
        assert revision is not None
        record = repo.insert_hold(
            conn,
            booking_id=booking_id,
            venue_id=venue.id,
            table_ids=tables,
            starts_at=offer.starts_at,
            ends_at=offer.ends_at,
            expires_at=datetime.now(UTC) + timedelta(minutes=10),
            metadata=build_hold_metadata(venue.policy, offer),
            policy_revision_id=revision.id,
            now=datetime.now(UTC),
        )
    return record.id


@pytest.mark.parametrize("tables", [("t1",), ("t2", "t3")], ids=["one-table", "two-tables"])
def test_racing_confirmations_for_the_same_table_have_one_winner(
    venue: Venue, tables: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    contenders = [venue.booking() for _ in range(8)]
    holds = {b: _force_hold(venue, b, tables) for b in contenders}
    barrier = threading.Barrier(len(contenders))
    outcomes: dict[uuid.UUID, str] = {}

    def confirm(booking_id: uuid.UUID) -> None:
        barrier.wait()
        try:
            confirm_hold_assignment(capacity(lambda _: None), booking_id, holds[booking_id])
            outcomes[booking_id] = "confirmed"
        except CapacityError as error:
            outcomes[booking_id] = error.code

    caplog.set_level(logging.WARNING, logger="psycopg")
    threads = [threading.Thread(target=confirm, args=(b,)) for b in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert Counter(outcomes.values()) == {"confirmed": 1, NO_AVAILABILITY: 7}
    assert overlapping_assignments() == 0
    winner = next(b for b, o in outcomes.items() if o == "confirmed")
    for loser in set(contenders) - {winner}:
        assert booking_row(loser)["status"] == "pending"
        assert hold_row(holds[loser])["status"] == "active"
    assert assignments(winner) == sorted(tables)
    noise = [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]
    assert noise == [], "a lost race must leave the connection cleanly, without psycopg warnings"


def test_each_confirmation_that_loses_its_tables_fails_cleanly(
    venue: Venue, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost race is an ExclusionViolation on one of several inserts; psycopg must not be left
    with statements queued behind it (it used to warn "error ignored terminating Pipeline ...
    pipeline aborted" for most such losers)."""
    tables = [table(f"x{i}") for i in range(6)]
    venue.change(tables=tables, adjacency=list(itertools.pairwise(t.id for t in tables)))
    ids = tuple(t.id for t in tables)
    winner = venue.booking(party_size=20)
    confirm_hold_assignment(capacity(lambda _: None), winner, _force_hold(venue, winner, ids))
    caplog.set_level(logging.WARNING, logger="psycopg")

    for _ in range(10):
        loser = venue.booking(party_size=20)
        hold_id = _force_hold(venue, loser, ids)
        with pytest.raises(CapacityError) as caught:
            confirm_hold_assignment(capacity(lambda _: None), loser, hold_id)
        assert caught.value.details["reason"] == "tables_taken"
        assert booking_row(loser)["status"] == "pending"
        assert hold_row(hold_id)["status"] == "active"

    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []
    assert overlapping_assignments() == 0


def test_a_policy_revision_id_reused_after_a_restore_is_read_afresh(venue: Venue) -> None:
    with transaction() as conn:
        before = repo.current_policy(conn, venue.id)
        assert before is not None and [t.id for t in before.policy.tables] == ["t1", "t2", "t3"]
        # A restore from before this revision: the row is gone and its id is handed out again.
        conn.execute("DELETE FROM capacity_current_policies WHERE venue_id = %s", (venue.id,))
        conn.execute("DELETE FROM capacity_policy_revisions WHERE venue_id = %s", (venue.id,))
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('capacity_policy_revisions', 'id'), %s, false)",
            (before.id,),
        )
    venue.change(tables=[table("p1", capacity=6)], adjacency=[])
    with transaction() as conn:
        after = repo.current_policy(conn, venue.id)
    assert after is not None and after.id == before.id
    assert [t.id for t in after.policy.tables] == ["p1"]
    assert after.version == policy_version(after.policy) != before.version


def test_an_expired_hold_does_not_block_a_new_one(venue: Venue) -> None:
    venue.change(tables=[venue.policy.tables[0]], adjacency=[])
    first, second = venue.booking(), venue.booking()
    stale = create_hold(capacity(), first)
    with pytest.raises(CapacityError) as caught:
        create_hold(capacity(), second)
    assert caught.value.code == NO_AVAILABILITY

    with transaction() as conn:
        conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s", (stale.id,)
        )
    fresh = create_hold(capacity(), second)

    assert fresh.table_ids == stale.table_ids == ("t1",)
    assert hold_row(stale.id)["status"] == "active", "never swept, and still not blocking"
    confirm_hold_assignment(capacity(lambda _: None), second, fresh.id)
    assert assignments(second) == ["t1"]


def test_the_actor_is_idempotent_and_retries_only_outages(venue: Venue) -> None:
    from service.actors.capacity import InvalidConfirmPayload, run, should_retry

    booking = venue.booking()
    hold = create_hold(capacity(), booking)
    venue.bump_turn_time()

    app = current_app()
    first = run(app, str(booking), str(hold.id))
    again = run(app, str(booking), str(hold.id))

    assert (first["outcome"], first["cycles"]) == ("recovered", 1)
    assert again["outcome"] == "already_confirmed"
    assert len(assignments(booking)) == 1
    assert run(app, str(booking), str(uuid.uuid4()))["code"] == HOLD_NOT_FOUND
    with pytest.raises(InvalidConfirmPayload):
        run(app, "not-a-uuid", str(hold.id))
    assert should_retry(0, DatabaseUnavailable("down"))
    assert should_retry(0, DatabaseConflict("deadlock"))
    assert not should_retry(0, InvalidConfirmPayload("bad"))
    assert not should_retry(0, CapacityError(HOLD_EXPIRED))


def test_the_actor_runs_on_a_real_worker(venue: Venue) -> None:
    import dramatiq

    from service.actors.capacity import QUEUE, confirm_booking

    booking = venue.booking()
    hold = create_hold(capacity(), booking)
    broker = confirm_booking.broker
    worker = dramatiq.Worker(broker, queues={QUEUE}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        confirm_booking.send(str(booking), str(hold.id))
        broker.join(QUEUE, timeout=30_000)
    finally:
        worker.stop()
    assert booking_row(booking)["status"] == "confirmed"


def test_metadata_written_at_creation_is_complete(venue: Venue) -> None:
    booking = venue.booking(party_size=6)
    hold = create_hold(capacity(), booking)
    metadata = hold_row(hold.id)["metadata"]
    assert set(hold.table_ids) == {"t2", "t3"}
    assert metadata["selection"]["tableIds"] == ["t2", "t3"]
    assert metadata["selection"]["snapshot"]["adjacency"]["edges"] == [["t2", "t3"]]
    with transaction() as conn:
        conn.execute("UPDATE holds SET metadata = %s WHERE id = %s", (Jsonb({}), hold.id))
    with pytest.raises(CapacityError) as caught:
        confirm_hold_assignment(capacity(lambda _: None), booking, hold.id)
    assert caught.value.code == HOLD_METADATA_INCOMPLETE


@pytest.mark.parametrize("ttl_seconds", [0, -60])
def test_a_hold_needs_a_positive_ttl(venue: Venue, ttl_seconds: int) -> None:
    booking = venue.booking()

    with pytest.raises(ValueError, match="ttl_seconds must be a positive"):
        create_hold(capacity(), booking, ttl_seconds=ttl_seconds)

    with transaction() as conn:
        found = conn.execute(
            "SELECT count(*) AS n FROM holds WHERE booking_id = %s", (booking,)
        ).fetchone()
    assert found == {"n": 0}, "nothing is held with a rejected TTL"


def test_a_holds_ttl_is_the_one_asked_for_or_else_the_default(venue: Venue) -> None:
    now = datetime.now(UTC)
    short = create_hold(capacity(), venue.booking(), now=now, ttl_seconds=1)
    default = create_hold(
        capacity(), venue.booking(starts_at=STARTS_AT + timedelta(hours=5)), now=now
    )

    assert hold_row(short.id)["expires_at"] == now + timedelta(seconds=1)
    assert hold_row(default.id)["expires_at"] == now + timedelta(seconds=600)


def test_every_metadata_defect_is_reported_at_once_by_confirmation_and_audit(
    venue: Venue,
) -> None:
    from service.cli import app

    booking = venue.booking(party_size=2)
    hold = create_hold(capacity(), booking)
    assert hold.table_ids == ("t1",)
    with transaction() as conn:
        conn.execute(
            """UPDATE holds SET table_ids = '{t2}',
                                metadata = metadata #- '{selection,snapshot,zoneIds}'
               WHERE id = %s""",
            (hold.id,),
        )

    with pytest.raises(CapacityError) as caught:
        confirm_hold_assignment(capacity(Notified()), booking, hold.id)

    expected = ["selection.snapshot.zoneIds", "selection.tableIds"]
    assert caught.value.code == HOLD_METADATA_INCOMPLETE
    assert sorted(p["path"] for p in caught.value.details["problems"]) == expected
    audit = CliRunner().invoke(app, ["holds", "audit", "--json"])
    assert audit.exit_code == 1, audit.output
    report = json.loads(audit.output.strip().splitlines()[-1])
    assert sorted(report["problemsByPath"]) == expected
