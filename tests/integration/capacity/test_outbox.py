"""The outbox against real Postgres, a real HTTP receiver on loopback and the real SMTP sink."""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness.factories import insert_venue
from harness.servers import SmtpSink, wait_for
from service.capacity.notifications import POLICY_DRIFT_ESCALATED, PolicyDriftEscalation
from service.outbox import store, write_event
from service.outbox.relay import backoff_seconds
from tests.support.capacity import WebhookReceiver
from tests.support.current_app import relay, transaction

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "ops@venue.example"


def _venue(webhook_url: str | None, admins: list[str] | None = None) -> uuid.UUID:
    with transaction() as conn:
        return insert_venue(
            conn, name="Chez Outbox", admin_emails=admins or [ADMIN], webhook_url=webhook_url
        )


def _payload(venue_id: uuid.UUID, booking_id: uuid.UUID | None = None) -> dict[str, Any]:
    return PolicyDriftEscalation(
        venue_id=str(venue_id),
        venue_name="Chez Outbox",
        venue_timezone="Europe/Paris",
        booking_id=str(booking_id or uuid.uuid4()),
        party_size=4,
        starts_at=datetime(2030, 5, 17, 18, 30, tzinfo=UTC),
        reason="POLICY_RETRY_FAILED",
        cycles=2,
        hold_id=str(uuid.uuid4()),
        expected_version="a" * 64,
        actual_version="b" * 64,
        adjacency_hash_before="c" * 64,
        adjacency_hash_after="d" * 64,
        changes=["table t3 removed", "turn time for parties up to 4: 90 -> 120 minutes"],
        diff={"tables": {"removed": ["t3"]}},
        escalated_at=datetime.now(UTC),
    ).model_dump(mode="json")


def _write(venue_id: uuid.UUID, key: str | None = None) -> uuid.UUID:
    with transaction() as conn:
        event_id = write_event(
            conn,
            POLICY_DRIFT_ESCALATED,
            _payload(venue_id),
            dedupe_key=key or f"test:{uuid.uuid4()}",
            venue_id=venue_id,
        )
    assert event_id is not None
    return event_id


def _row(event_id: uuid.UUID) -> dict[str, Any]:
    with transaction() as conn:
        row = conn.execute("SELECT * FROM outbox_events WHERE id = %s", (event_id,)).fetchone()
    assert row is not None
    return row


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "outbox", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _emails(sink: SmtpSink) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(raw, policy=email.policy.default) for raw in sink.messages()]


def test_event_is_delivered_by_email_and_signed_webhook(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    venue_id = _venue(webhook_receiver.url)
    event_id = _write(venue_id, key="drift:booking-1:hold-1")

    result = _cli("relay", "--once")
    assert result.returncode == 0, result.stderr
    assert "delivered 1" in result.stdout

    (request,) = webhook_receiver.wait_for(1)
    assert request.signature_ok
    assert request.headers["idempotency-key"] == "drift:booking-1:hold-1"
    assert request.headers["x-booking-event-id"] == str(event_id)
    assert request.headers["x-booking-event-type"] == POLICY_DRIFT_ESCALATED
    document = request.document
    assert document["id"] == str(event_id)
    assert document["data"]["policy"]["diff"] == {"tables": {"removed": ["t3"]}}
    assert document["data"]["booking"]["party_size"] == 4
    assert "Chez Outbox" in document["subject"]

    (message,) = _emails(smtp_sink)
    assert message["To"] == ADMIN
    assert message["Message-ID"].startswith("<outbox.")
    assert message["X-Booking-Event-Id"] == str(event_id)
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    text = body.get_content()
    assert "table t3 removed" in text
    assert "POLICY_RETRY_FAILED" in text
    attachments = list(message.iter_attachments())
    assert json.loads(attachments[0].get_content())["policy"]["actual_version"] == "b" * 64

    row = _row(event_id)
    assert row["status"] == "delivered"
    assert sorted(row["delivered_targets"]) == [f"email:{ADMIN}", "webhook"]
    assert row["attempts"] == 1


def test_the_message_id_is_the_same_on_every_attempt(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    venue_id = _venue(None)
    first = _write(venue_id, key="same-key")
    relay().run_once()
    with transaction() as conn:
        conn.execute(
            "UPDATE outbox_events SET status = 'pending', delivered_at = NULL, "
            "delivered_targets = '{}' WHERE id = %s",
            (first,),
        )
    relay().run_once()
    messages = _emails(smtp_sink)
    assert len(messages) == 2
    assert messages[0]["Message-ID"] == messages[1]["Message-ID"]


def test_events_commit_and_roll_back_with_the_callers_transaction(
    capacity_env: dict[str, str],
) -> None:
    venue_id = _venue(None)

    with pytest.raises(RuntimeError), transaction() as conn:
        write_event(
            conn,
            POLICY_DRIFT_ESCALATED,
            _payload(venue_id),
            dedupe_key="rolled-back",
            venue_id=venue_id,
        )
        raise RuntimeError("the state change failed")

    first = _write(venue_id, key="once")
    with transaction() as conn:
        duplicate = write_event(
            conn, POLICY_DRIFT_ESCALATED, _payload(venue_id), dedupe_key="once", venue_id=venue_id
        )
        keys = [r["dedupe_key"] for r in conn.execute("SELECT dedupe_key FROM outbox_events")]
    assert duplicate is None
    assert keys == ["once"]
    assert _row(first)["status"] == "pending"


def test_unknown_event_type_goes_dead_not_done(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    venue_id = _venue(webhook_receiver.url)
    event_id = uuid.uuid4()
    with transaction() as conn:
        conn.execute(
            "INSERT INTO outbox_events (id, event_type, dedupe_key, venue_id, payload) "
            "VALUES (%s, 'hold.mystery', 'mystery-1', %s, '{}')",
            (event_id, venue_id),
        )

    result = relay().run_once()

    assert result.dead == 1
    row = _row(event_id)
    assert row["status"] == "dead"
    assert "unknown event type" in row["last_error"]
    assert webhook_receiver.requests == []
    assert smtp_sink.messages() == []


def test_failing_receiver_is_retried_with_backoff_then_dead(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    webhook_receiver.default_status = 503
    venue_id = _venue(webhook_receiver.url)
    event_id = _write(venue_id)
    stop = threading.Event()
    runner = threading.Thread(target=relay().run_forever, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: _row(event_id)["status"] == "dead", 20, "the event to go dead")
    finally:
        stop.set()
        runner.join(10)

    times = [r.at for r in webhook_receiver.requests]
    assert len(times) == 3, "OUTBOX_MAX_ATTEMPTS=3 attempts, no more"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= backoff_seconds(1, 0.3) - 0.05
    assert gaps[1] >= backoff_seconds(2, 0.3) - 0.05
    assert gaps[1] > gaps[0]
    row = _row(event_id)
    assert row["attempts"] == 3
    assert "HTTP 503" in row["last_error"]
    assert row["delivered_targets"] == [f"email:{ADMIN}"]
    assert len(smtp_sink.messages()) == 1, "the email target succeeded once and is not repeated"


def test_a_client_error_is_permanent(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.default_status = 410
    event_id = _write(_venue(webhook_receiver.url))
    relay().run_once()
    row = _row(event_id)
    assert (row["status"], row["attempts"]) == ("dead", 1)


def test_only_the_failed_target_is_retried(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    venue_id = _venue(webhook_receiver.url, admins=["ops+flaky1@venue.example"])
    event_id = _write(venue_id)

    first = relay(min_backoff_seconds=0.01).run_once()
    assert (first.retried, first.delivered) == (1, 0)
    assert _row(event_id)["delivered_targets"] == ["webhook"]
    time.sleep(0.05)
    second = relay(min_backoff_seconds=0.01).run_once()

    assert second.delivered == 1
    assert len(webhook_receiver.requests) == 1
    assert len(smtp_sink.messages()) == 1
    assert _row(event_id)["attempts"] == 2


def test_two_relays_never_deliver_an_event_twice(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    """Whatever share each relay gets (on a busy machine one may drain everything before the
    other starts), every event is delivered once, by one claim, and none is lost."""
    webhook_receiver.delay = 0.02
    venue_id = _venue(webhook_receiver.url)
    events = {_write(venue_id) for _ in range(30)}

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "service", "outbox", "relay", "--once", "--batch-size", "3"],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs

    delivered_by = [int(out.split("delivered ")[1].split(",")[0]) for out, _ in outputs]
    assert sum(delivered_by) == 30, f"deliveries reported per relay: {delivered_by}"
    ids = [r.headers["x-booking-event-id"] for r in webhook_receiver.requests]
    assert sorted(ids) == sorted(str(e) for e in events), "each webhook exactly once"
    message_ids = [m["Message-ID"] for m in _emails(smtp_sink)]
    assert len(message_ids) == len(set(message_ids)) == 30, "each email exactly once"
    with transaction() as conn:
        rows = conn.execute("SELECT id, status, attempts FROM outbox_events").fetchall()
    assert {r["id"] for r in rows} == events
    assert {(r["status"], r["attempts"]) for r in rows} == {("delivered", 1)}, (
        "every event claimed once (a claim counts an attempt) and delivered"
    )


def test_concurrent_claims_never_overlap(capacity_env: dict[str, str]) -> None:
    venue_id = _venue(None)
    events = {_write(venue_id) for _ in range(12)}

    with transaction() as first:
        mine = store.claim_due(first, limit=5, lease_seconds=60, token=uuid.uuid4())
        with transaction() as second:
            theirs = store.claim_due(second, limit=50, lease_seconds=60, token=uuid.uuid4())

    assert (len(mine), len(theirs)) == (5, 7), "the second claim skips the rows the first holds"
    assert {e.id for e in mine} | {e.id for e in theirs} == events
    with transaction() as conn:
        again = store.claim_due(conn, limit=50, lease_seconds=60, token=uuid.uuid4())
    assert again == [], "claimed events stay leased"


def test_a_crashed_relays_claim_is_retried_after_its_lease(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver
) -> None:
    event_id = _write(_venue(webhook_receiver.url))
    with transaction() as conn:
        claimed = store.claim_due(conn, limit=10, lease_seconds=1.0, token=uuid.uuid4())
    assert [e.id for e in claimed] == [event_id]

    assert relay().run_once().claimed == 0, "the lease still holds"
    time.sleep(1.1)
    result = relay().run_once()

    assert result.delivered == 1
    assert len(webhook_receiver.requests) == 1
    assert _row(event_id)["attempts"] == 2


def test_cli_stats_list_and_requeue(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.default_status = 400
    venue_id = _venue(webhook_receiver.url)
    dead = _write(venue_id)
    relay().run_once()
    pending = _write(venue_id)
    with transaction() as conn:
        conn.execute(
            "UPDATE outbox_events SET created_at = now() - interval '90 seconds' WHERE id = %s",
            (pending,),
        )

    stats = json.loads(_cli("stats", "--json").stdout)
    assert (stats["pending"], stats["dead"], stats["delivered"]) == (1, 1, 0)
    assert stats["oldest_pending_age_seconds"] >= 90

    listed = _cli("list", "--status", "dead", "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [str(dead)]

    webhook_receiver.default_status = 200
    assert _cli("requeue", str(dead)).returncode == 0
    relay().run_once()
    assert _row(dead)["status"] == "delivered"
    assert _row(dead)["next_attempt_at"] <= datetime.now(UTC) + timedelta(seconds=1)


def test_the_long_running_relay_delivers_and_stops_on_sigterm(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver
) -> None:
    venue_id = _venue(webhook_receiver.url)
    relay = subprocess.Popen(
        [sys.executable, "-m", "service", "outbox", "relay"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = _write(venue_id)
        webhook_receiver.wait_for(1)
        second = _write(venue_id)
        webhook_receiver.wait_for(2)
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=30)
    assert relay.returncode == 0, stderr
    assert _row(first)["status"] == _row(second)["status"] == "delivered"
