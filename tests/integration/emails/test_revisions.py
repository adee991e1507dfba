"""Revision-aware requests against real Postgres, Redis and SMTP: one email per real change, one
email per request however often it is delivered, the latest change always sent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.rows import dict_row
from yoyo import get_backend, read_migrations

from harness.factories import insert_booking, insert_venue
from harness.servers import PostgresServer, SmtpSink
from service.actors.emails import send_booking_email, send_now
from service.app import App
from service.db import MIGRATIONS_DIR, _yoyo_url, migrate
from service.dlq.operations import replay_message
from service.emails.models import EmailPayload
from service.emails.pipeline import DeliveryInProgress, RetryableDeliveryFailure, deliver
from service.emails.reconcile import reconcile
from service.emails.rules import Action, Attempt
from service.outbox.relay import Relay
from tests.support.emails import QUEUE, Db, eventually, received_for

ROOT = Path(__file__).resolve().parents[3]


def _ids(sink: SmtpSink, booking: uuid.UUID, email_type: str = "") -> list[str]:
    ids = (str(m["Message-ID"]).strip() for m in received_for(sink, booking))
    return sorted(i for i in ids if f".{email_type}" in i)


def _sent(db: Db, booking: uuid.UUID, email_type: str, revision: int) -> Any:
    return eventually(
        lambda: (r := db.delivery(booking, email_type, revision)) and r["state"] == "sent" and r
    )


def test_the_booking_revision_moves_with_each_guest_visible_change(db: Db) -> None:
    booking = db.booking(status="confirmed")
    assert db.update_booking(booking, party_size=4) == 2
    assert db.update_booking(booking, party_size=4) == 2  # no real change
    assert db.update_booking(booking, needs_attention=True) == 2  # not guest-visible
    assert db.update_booking(booking, notes="window seat") == 3
    assert db.update_booking(booking, revision=10) == 10  # a booking service's own version
    assert db.update_booking(booking, revision=4, party_size=5) == 11  # never backwards


def test_two_real_updates_send_two_updated_emails(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    booking = db.booking(status="confirmed", party_size=2)
    first = db.update_booking(booking, party_size=4)
    send_booking_email.send(str(booking), "updated")
    _sent(db, booking, "updated", first)
    second = db.update_booking(booking, party_size=6)
    send_booking_email.send(str(booking), "updated")
    _sent(db, booking, "updated", second)
    ids = _ids(smtp_sink, booking)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert [f".updated.r{first}@" in ids[0], f".updated.r{second}@" in ids[1]] == [True, True]
    assert [r["state"] for r in db.deliveries(booking, "updated")] == ["sent", "sent"]


def test_one_update_redelivered_replayed_reconciled_and_sent_at_once_is_one_email(
    app: App, broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    booking = db.booking(status="confirmed")
    revision = db.update_booking(booking, starts_at=datetime.now(UTC) + timedelta(days=5))
    message = send_booking_email.send(str(booking), "updated")
    assert message.kwargs["revision"] == revision
    _sent(db, booking, "updated", revision)
    db.update_booking(booking, notes="a later change nobody asked an email for")
    broker.enqueue(message)  # a redelivery of the very message
    replay_message(broker, message.asdict())  # a DLQ replay of it
    reconcile(
        app.db, app.settings, lambda p: send_booking_email.send(**p.as_kwargs()), grace=timedelta(0)
    )
    send_now(app, EmailPayload.from_call((), message.kwargs), "immediate_flag_off")
    broker.join(QUEUE, timeout=10_000)
    time.sleep(0.3)
    # (the reconciler also found the booking's `confirmed` email missing: a different email)
    assert _ids(smtp_sink, booking, "updated") == [
        f"<booking-{booking}.updated.r{revision}@example.test>"
    ]
    rows = db.deliveries(booking, "updated")
    assert [(r["revision"], r["state"], r["attempts"]) for r in rows] == [(revision, "sent", 1)]


def test_an_update_superseded_before_sending_sends_the_latest_state_once(
    app: App, broker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    import dramatiq

    booking = db.booking(status="confirmed", party_size=2)
    older = db.update_booking(booking, party_size=3)
    send_booking_email.send(str(booking), "updated")
    newer = db.update_booking(booking, party_size=7)
    send_booking_email.send(str(booking), "updated")
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    w.start()
    try:
        _sent(db, booking, "updated", newer)
        broker.join(QUEUE, timeout=10_000)
    finally:
        w.stop()
    (only,) = received_for(smtp_sink, booking)
    assert f".updated.r{newer}@" in str(only["Message-ID"])
    assert "7" in only.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    old = db.delivery(booking, "updated", older)
    assert old is not None and old["state"] == "superseded" and old["superseded_by"] == newer
    assert old["attempts"] == 0 and old["sent_at"] is None


def test_an_update_while_the_previous_update_email_is_in_flight_sends_both(
    service_env: dict[str, str], db: Db
) -> None:
    sink = SmtpSink.start_new(delay=1.0)
    app = App.for_worker({**service_env, "SMTP_URL": sink.url})
    room = app.mailroom
    try:
        booking = db.booking(status="confirmed", party_size=2)
        first = db.update_booking(booking, party_size=3)
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(
                first=deliver(
                    room,
                    EmailPayload(booking_id=booking, type="updated", revision=first),
                    Attempt(1, False),
                )
            )
        )
        thread.start()
        eventually(
            lambda: (r := db.delivery(booking, "updated", first)) and r["state"] == "sending"
        )
        second = db.update_booking(booking, party_size=9)
        payload = EmailPayload(booking_id=booking, type="updated", revision=second)
        assert deliver(room, payload, Attempt(1, False)) is Action.SEND
        thread.join(30)
        assert outcome["first"] is Action.SEND
        assert sorted(r["state"] for r in db.deliveries(booking, "updated")) == ["sent", "sent"]
        assert len(_ids(sink, booking)) == 2
    finally:
        app.close()
        sink.destroy()


def test_two_workers_racing_for_one_message_send_one_email(
    service_env: dict[str, str], db: Db
) -> None:
    sink = SmtpSink.start_new(delay=0.5)
    app = App.for_worker({**service_env, "SMTP_URL": sink.url})
    room = app.mailroom
    try:
        booking = db.booking(status="confirmed")
        payload = EmailPayload(booking_id=booking, type="confirmed")
        barrier = threading.Barrier(2)
        outcomes: list[object] = []

        def race() -> None:
            barrier.wait()
            try:
                outcomes.append(deliver(room, payload, Attempt(1, False)))
            except DeliveryInProgress as error:
                outcomes.append(error)

        threads = [threading.Thread(target=race) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert Action.SEND in outcomes
        (other,) = [o for o in outcomes if o is not Action.SEND]
        assert isinstance(other, DeliveryInProgress)
        # when the loser's statement saw the winner's row, it knows when the lease ends
        left = other.retry_in_seconds
        assert left is None or 0 < left <= app.settings.email_lease_seconds
        assert deliver(room, payload, Attempt(2, False)) is Action.DUPLICATE
        assert sink.count() == 1
    finally:
        app.close()
        sink.destroy()


def test_an_smtp_server_slower_than_the_timeout_fails_the_attempt_within_its_lease(
    service_env: dict[str, str], db: Db
) -> None:
    sink = SmtpSink.start_new(delay=4.0)
    app = App.for_worker({**service_env, "SMTP_URL": sink.url, "SMTP_TIMEOUT_SECONDS": "1"})
    room = app.mailroom
    try:
        booking = db.booking(status="confirmed")
        payload = EmailPayload(booking_id=booking, type="confirmed")
        failed: dict[str, Any] = {}

        def attempt() -> None:
            started = time.monotonic()
            try:
                deliver(room, payload, Attempt(1, False))
            except RetryableDeliveryFailure as error:
                failed.update(error=error, after=time.monotonic() - started)

        thread = threading.Thread(target=attempt)
        thread.start()
        eventually(lambda: (r := db.delivery(booking, "confirmed")) and r["state"] == "sending")
        with pytest.raises(DeliveryInProgress):  # no second worker claims it meanwhile
            deliver(room, payload, Attempt(1, False))
        thread.join(30)
        assert "SMTP" in str(failed["error"])
        assert failed["after"] < app.settings.email_lease_seconds
        row = db.delivery(booking, "confirmed")
        assert row is not None and row["state"] == "retrying" and row["lease_token"] is None
    finally:
        app.close()
        sink.destroy()


def test_a_scheduled_email_survives_reconcile_without_being_sent(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink, service_env: dict[str, str]
) -> None:
    booking = db.booking(status="confirmed")
    later = datetime.now(UTC) + timedelta(hours=1)
    send_booking_email.send(str(booking), "confirmed", later.isoformat())
    row = db.delivery(booking, "confirmed")
    assert row is not None and row["state"] == "pending" and row["scheduled_for"] == later
    done = subprocess.run(
        [sys.executable, "-m", "service", "reconcile", "--grace-seconds", "0"],
        env={**os.environ, **service_env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "re-enqueued 0 email(s)" in done.stdout
    time.sleep(0.5)
    assert received_for(smtp_sink, booking) == []
    assert db.delivery(booking, "confirmed")["state"] == "pending"  # type: ignore[index]


def test_an_updated_email_lost_with_redis_flushall_is_recovered_by_reconcile(
    app: App, broker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    import dramatiq

    booking = db.booking(status="confirmed")
    revision = db.update_booking(booking, party_size=5)
    send_booking_email.send(str(booking), "updated")
    redis.Redis.from_url(os.environ["BROKER_URL"]).flushall()
    time.sleep(1.1)
    report = reconcile(
        app.db,
        app.settings,
        lambda p: send_booking_email.send(**p.as_kwargs()),
        grace=timedelta(seconds=1),
    )
    assert [(p.booking_id, p.type.value, p.revision) for p in report.stuck] == [
        (booking, "updated", revision)
    ]
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    w.start()
    try:
        _sent(db, booking, "updated", revision)
    finally:
        w.stop()
    (only,) = _ids(smtp_sink, booking, "updated")
    assert f".updated.r{revision}@" in only


def test_a_message_without_revision_is_about_the_current_revision(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    booking = db.booking(status="confirmed")
    revision = db.update_booking(booking, party_size=3)
    v1 = send_booking_email.message_with_options(
        kwargs={"booking_id": str(booking), "type": "confirmed"}
    )
    broker.enqueue(v1)
    row = _sent(db, booking, "confirmed", revision)
    assert row["requested_at"] is not None
    broker.enqueue(v1)
    broker.join(QUEUE, timeout=10_000)
    assert len(received_for(smtp_sink, booking)) == 1


def test_a_request_recorded_before_its_booking_was_visible_is_resolved_by_the_worker(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    late = uuid.uuid4()
    message = send_booking_email.send(str(late), "request_received")
    assert message.kwargs["revision"] == 0
    eventually(lambda: (r := db.delivery(late, "request_received", 0)) and r["state"] == "retrying")
    db.conn.execute(
        "INSERT INTO bookings (id, venue_id, status, guest_name, guest_email, party_size, starts_at)"
        " VALUES (%s, %s, 'pending', 'Late Guest', 'late@guests.example', 2, now() + interval '1 day')",
        (late, db.venue),
    )
    _sent(db, late, "request_received", 1)
    unseen = db.delivery(late, "request_received", 0)
    assert unseen is not None and unseen["state"] == "superseded" and unseen["superseded_by"] == 1
    assert len(received_for(smtp_sink, late)) == 1


def test_send_in_commit_sends_and_rollback_leaves_nothing(
    app: App, broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink, service_env: dict[str, str]
) -> None:
    kept, dropped = db.booking(status="pending"), db.booking(status="pending")
    with psycopg.connect(service_env["DATABASE_URL"]) as conn:  # the booking service's connection
        with conn.transaction():
            conn.execute("UPDATE bookings SET status = 'confirmed' WHERE id = %s", (kept,))
            assert send_booking_email.send_in(conn, kept, "confirmed") == 2
        with conn.transaction(force_rollback=True):
            conn.execute("UPDATE bookings SET status = 'confirmed' WHERE id = %s", (dropped,))
            send_booking_email.send_in(conn, str(dropped), "confirmed")
    assert db.delivery(dropped, "confirmed") is None
    assert redis.Redis.from_url(os.environ["BROKER_URL"]).llen(f"dramatiq:{QUEUE}") == 0
    result = Relay(app.db, app.settings, app.outbox_handlers).run_once()
    assert result.claimed == 1 and result.delivered == 1
    _sent(db, kept, "confirmed", 2)
    broker.join(QUEUE, timeout=10_000)
    assert len(received_for(smtp_sink, kept)) == 1 and received_for(smtp_sink, dropped) == []
    events = db.conn.execute("SELECT payload FROM outbox_events").fetchall()
    assert [e["payload"] for e in events] == [
        {"booking_id": str(kept), "type": "confirmed", "revision": 2}
    ]


def test_the_migration_keeps_v1_rows_and_they_still_deduplicate(
    pg_server: PostgresServer, service_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    url = pg_server.create_database(f"v1_{uuid.uuid4().hex[:10]}")
    backend = get_backend(_yoyo_url(url))
    try:
        v1 = read_migrations(str(MIGRATIONS_DIR)).filter(lambda m: m.id < "0007")
        with backend.lock():
            backend.apply_migrations(backend.to_apply(v1))
    finally:
        backend.connection.close()
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        booking = insert_booking(conn, insert_venue(conn), status="confirmed")
        conn.execute(
            "INSERT INTO email_deliveries (booking_id, email_type, state, attempts, message_id,"
            " sent_at) VALUES (%s, 'confirmed', 'sent', 1, 'v1-id', now())",
            (booking,),
        )
        conn.execute(
            "INSERT INTO email_deliveries (booking_id, email_type, state) VALUES (%s, 'updated', 'pending')",
            (booking,),
        )
        assert migrate(url)[0] == "0007_email_revisions"
        rows = conn.execute(
            "SELECT email_type, revision, state, message_id FROM email_deliveries ORDER BY email_type"
        ).fetchall()
        assert [tuple(r.values()) for r in rows] == [
            ("confirmed", 1, "sent", "v1-id"),
            ("updated", 1, "pending", None),
        ]
    app = App.for_worker({**service_env, "DATABASE_URL": url})
    try:
        v1_message = EmailPayload(booking_id=booking, type="confirmed")  # no revision
        assert deliver(app.mailroom, v1_message, Attempt(1, False)) is Action.DUPLICATE
        assert received_for(smtp_sink, booking) == []
    finally:
        app.close()
