"""The email pipeline against real Postgres, Redis and an SMTP server, with an in-process worker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from harness.servers import RedisServer, SmtpSink, free_port
from service.actors.emails import send_booking_email
from service.app import App
from service.emails.models import EmailPayload
from service.emails.pipeline import deliver
from service.emails.reconcile import ReconcileReport, claim, reconcile
from service.emails.rules import Action, Attempt
from tests.support.emails import QUEUE, Db, eventually, received, received_for

ROOT = Path(__file__).resolve().parents[3]


def test_delivers_once_and_records_it(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="pending")
    send_booking_email.send(str(booking), "request_received")
    row = eventually(
        lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "sent" and r
    )
    assert row["attempts"] == 1 and row["message_id"].startswith(
        f"<booking-{booking}.request_received.r1@"
    )
    assert len(received_for(smtp_sink, booking)) == 1


def test_skips_when_status_no_longer_calls_for_the_email(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="cancelled")
    send_booking_email.send(str(booking), "confirmed")
    row = eventually(
        lambda: (r := db.delivery(booking, "confirmed")) and r["state"] == "skipped" and r
    )
    assert "cancelled" in row["skip_reason"] and row["attempts"] == 0
    time.sleep(0.3)
    assert received(smtp_sink) == []


def test_same_message_delivered_twice_and_replayed_sends_once(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="confirmed")
    message = send_booking_email.message(str(booking), "confirmed")
    broker.enqueue(message)
    broker.enqueue(message)  # a redelivery of the very same message
    eventually(lambda: (r := db.delivery(booking, "confirmed")) and r["state"] == "sent")
    broker.join(QUEUE, timeout=10_000)
    send_booking_email.send(str(booking), "confirmed")  # a later replay
    broker.join(QUEUE, timeout=10_000)
    time.sleep(0.3)
    assert len(received_for(smtp_sink, booking)) == 1
    assert db.delivery(booking, "confirmed")["attempts"] == 1  # type: ignore[index]


def test_transient_failures_are_retried_then_delivered(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="pending", guest_email="flaky+flaky2@guests.example")
    send_booking_email.send(str(booking), "request_received")
    row = eventually(
        lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "sent" and r
    )
    assert row["attempts"] == 3 and "451" in row["last_error"]
    assert len(received_for(smtp_sink, booking)) == 1
    assert db.dead_letters() == []


def test_permanent_failure_is_dead_lettered_at_once(broker: Any, worker: Any, db: Db) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="pending", guest_email="gone+reject@guests.example")
    send_booking_email.send(str(booking), "request_received")
    row = eventually(
        lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "dead" and r
    )
    assert row["attempts"] == 1 and "550" in row["last_error"]
    dead = eventually(db.dead_letters)
    assert [d["reason"] for d in dead] == ["permanent_failure"]
    assert (
        eventually(
            lambda: redis.Redis.from_url(os.environ["BROKER_URL"]).zcard(f"dramatiq:{QUEUE}.XQ")
        )
        == 1
    )


def test_five_failed_attempts_end_in_the_dlq_and_a_dead_row(
    broker: Any, worker: Any, db: Db
) -> None:
    from service.actors.emails import send_booking_email

    booking = db.booking(status="pending", guest_email="busy+tempfail@guests.example")
    send_booking_email.send(str(booking), "request_received")
    row = eventually(
        lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "dead" and r,
        timeout=30,
    )
    assert row["attempts"] == 5 and "451" in row["last_error"]
    dead = eventually(db.dead_letters)
    assert dead[0]["reason"] == "retries_exhausted" and dead[0]["email_type"] == "request_received"
    assert redis.Redis.from_url(os.environ["BROKER_URL"]).zcard(f"dramatiq:{QUEUE}.XQ") == 1


def test_malformed_payload_is_dead_lettered_without_retry(broker: Any, worker: Any, db: Db) -> None:
    from service.actors.emails import send_booking_email

    broker.enqueue(
        send_booking_email.message_with_options(kwargs={"booking_id": "42", "type": "birthday"})
    )
    dead = eventually(db.dead_letters)
    assert dead[0]["reason"] == "invalid_payload"
    assert "booking_id" in dead[0]["error"] and "type" in dead[0]["error"]
    assert dead[0]["message"]["options"].get("retries", 0) == 0


def test_missing_booking_is_retried_then_recorded_dead(broker: Any, worker: Any, db: Db) -> None:
    import uuid

    from service.actors.emails import send_booking_email

    ghost = uuid.uuid4()
    send_booking_email.send(str(ghost), "confirmed")
    row = eventually(
        lambda: (r := db.delivery(ghost, "confirmed")) and r["state"] == "dead" and r, timeout=30
    )
    assert row["attempts"] == 5 and row["last_error"] == "booking not found"


def test_booking_that_appears_late_is_delivered(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    import uuid

    from service.actors.emails import send_booking_email

    late = uuid.uuid4()
    send_booking_email.send(str(late), "request_received")
    eventually(lambda: (r := db.delivery(late, "request_received")) and r["state"] == "retrying")
    db.conn.execute(
        "INSERT INTO bookings (id, venue_id, status, guest_name, guest_email, party_size, starts_at)"
        " VALUES (%s, %s, 'pending', 'Late Guest', 'late@guests.example', 2, now() + interval '1 day')",
        (late, db.venue),
    )
    eventually(lambda: (r := db.delivery(late, "request_received")) and r["state"] == "sent")
    assert len(received_for(smtp_sink, late)) == 1


def test_scheduled_for_future_is_delayed_and_past_goes_now(
    broker: Any, worker: Any, db: Db, smtp_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    soon, past = db.booking(status="confirmed"), db.booking(status="confirmed")
    now = datetime.now(UTC)
    send_booking_email.send(str(soon), "confirmed", (now + timedelta(seconds=2)).isoformat())
    send_booking_email.send(str(past), "confirmed", (now - timedelta(hours=1)).isoformat())
    assert redis.Redis.from_url(os.environ["BROKER_URL"]).hlen(f"dramatiq:{QUEUE}.DQ.msgs") >= 1
    eventually(lambda: received_for(smtp_sink, past))
    assert received_for(smtp_sink, soon) == []
    eventually(lambda: received_for(smtp_sink, soon), timeout=15)
    sent_at = db.delivery(soon, "confirmed")["sent_at"]  # type: ignore[index]
    assert sent_at >= now + timedelta(seconds=2)


def _reconcile(app: App, grace: timedelta) -> ReconcileReport:
    def enqueue(payload: EmailPayload) -> None:
        send_booking_email.send(**payload.as_kwargs())

    return reconcile(app.db, app.settings, enqueue, grace=grace)


def _producer(
    env: dict[str, str], booking: Any, email_type: str
) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, time; from service.actors.emails import send_booking_email; t=time.perf_counter();"
        "send_booking_email.send(sys.argv[1], sys.argv[2]); print(time.perf_counter()-t)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(booking), email_type],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_broker_down_at_send_falls_back_to_immediate_send(
    db: Db, smtp_sink: SmtpSink, service_env: dict[str, str]
) -> None:
    booking = db.booking(status="pending")
    env = {**os.environ, "BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "LOG_FORMAT": "json"}
    result = _producer(env, booking, "request_received")
    assert result.returncode == 0, result.stderr
    assert len(received_for(smtp_sink, booking)) == 1
    assert db.delivery(booking, "request_received")["state"] == "sent"  # type: ignore[index]
    assert "broker unreachable" in result.stderr
    assert "guests.example" not in result.stderr  # no guest address in logs


def test_broker_and_smtp_down_records_pending_then_reconcile_sends(
    db: Db, smtp_sink: SmtpSink, app: App, broker: Any, worker: Any
) -> None:
    from datetime import timedelta

    booking = db.booking(status="pending")
    env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SMTP_URL": f"smtp://127.0.0.1:{free_port()}",
    }
    result = _producer(env, booking, "request_received")
    assert result.returncode == 0, result.stderr
    row = db.delivery(booking, "request_received")
    assert row is not None and row["state"] == "pending"
    report = _reconcile(app, grace=timedelta(0))
    assert [(p.booking_id, p.type.value, p.revision) for p in report.stuck] == [
        (booking, row["email_type"], 1)
    ]
    eventually(lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "sent")
    assert len(received_for(smtp_sink, booking)) == 1


def test_reconcile_recovers_everything_after_redis_loses_its_data(
    db: Db, smtp_sink: SmtpSink, app: App, broker: Any
) -> None:
    """Every request was recorded before ``.send()`` returned, so the reconciler re-enqueues the
    pending rows after the grace; bookings whose producer never recorded anything are found by
    the status inference (the safety net)."""
    import dramatiq

    earlier = datetime.now(UTC) - timedelta(minutes=10)
    bookings = [db.booking(status="confirmed", status_changed_at=earlier) for _ in range(20)]
    unrecorded = [db.booking(status="confirmed", status_changed_at=earlier) for _ in range(3)]
    from service.actors.emails import send_booking_email

    for b in bookings:
        send_booking_email.send(str(b), "confirmed")
    client = redis.Redis.from_url(os.environ["BROKER_URL"])
    assert client.llen(f"dramatiq:{QUEUE}") == 20
    client.flushall()  # Redis loses everything before any worker ran
    first = _reconcile(app, grace=timedelta(minutes=5))
    assert first.stuck == []  # the recorded requests are still within the grace
    assert sorted(p.booking_id for p in first.missing) == sorted(unrecorded)
    time.sleep(1.2)
    report = _reconcile(app, grace=timedelta(seconds=1))
    assert sorted(p.booking_id for p in report.stuck) == sorted(bookings)
    assert {p.revision for p in report.stuck} == {1} and report.missing == []
    second = _reconcile(app, grace=timedelta(seconds=1))
    assert second.total == 0  # claimed rows are not re-sent by the next run
    w = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    w.start()
    try:
        eventually(lambda: len(received(smtp_sink)) >= 23)
        time.sleep(0.3)
    finally:
        w.stop()
    assert sorted(len(received_for(smtp_sink, b)) for b in bookings + unrecorded) == [1] * 23


def test_concurrent_reconcilers_claim_each_email_once(db: Db, app: App) -> None:
    bookings = {
        db.booking(status="pending", status_changed_at=datetime.now(UTC) - timedelta(hours=1))
        for _ in range(30)
    }
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        results.append(claim(app.db, app.settings, grace=timedelta(minutes=5)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [p.booking_id for r in results for p in r.missing]
    assert sorted(claimed) == sorted(bookings)  # every email once, none twice


def test_retry_survives_a_redis_blip_during_reenqueue(service_env: dict[str, str]) -> None:
    """Upstream Dramatiq acks a retry whose re-enqueue failed; ours waits for Redis to return."""
    import dramatiq
    from dramatiq.broker import MessageProxy

    from service.broker import DurableRetries, MaintainedRedisBroker

    blip = RedisServer.start_new()
    try:
        client = redis.Redis(port=blip.port, socket_connect_timeout=1, socket_timeout=2)
        retries = DurableRetries(
            max_retries=4, min_backoff=100, max_backoff=200, reenqueue_deadline_seconds=20
        )
        local = MaintainedRedisBroker(client=client, middleware=[retries])

        @dramatiq.actor(broker=local, queue_name="blip", actor_name="blip_actor")
        def blip_actor() -> None: ...

        message = MessageProxy(blip_actor.message())
        blip.stop()
        restart = threading.Timer(1.5, blip.start)
        restart.start()
        retries.after_process_message(local, message, exception=RuntimeError("smtp 451"))
        restart.join(30)  # the restart's own readiness wait ends before the server is removed
        assert client.hlen("dramatiq:blip.DQ.msgs") == 1  # the retry is scheduled, not lost
    finally:
        blip.destroy()


def test_email_accepted_by_smtp_is_recorded_through_a_postgres_restart(
    service_env: dict[str, str], pg_server: Any
) -> None:
    """Postgres stops while the SMTP server is taking the email: the worker keeps trying to
    record the send, so the redelivery that follows finds it sent instead of sending it again."""
    import psycopg

    from harness.factories import insert_booking, insert_venue

    sink = SmtpSink.start_new(delay=1.5)
    app = App.for_worker({**service_env, "SMTP_URL": sink.url})
    room = app.mailroom
    try:
        with psycopg.connect(service_env["DATABASE_URL"], autocommit=True) as conn:
            booking = insert_booking(conn, insert_venue(conn), status="confirmed")
        payload = EmailPayload(booking_id=booking, type="confirmed")
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(first=deliver(room, payload, Attempt(1, False)))
        )
        thread.start()
        time.sleep(0.5)  # the worker is inside the SMTP conversation, under its lease
        pg_server.stop()
        time.sleep(2.5)  # SMTP accepts the email while Postgres is down
        pg_server.start()
        thread.join(60)
        assert outcome.get("first") is Action.SEND
        assert sink.count() == 1
        assert deliver(room, payload, Attempt(2, False)) is Action.DUPLICATE
        assert sink.count() == 1
        with psycopg.connect(service_env["DATABASE_URL"]) as conn:
            state = conn.execute(
                "SELECT state FROM email_deliveries WHERE booking_id = %s", (booking,)
            ).fetchone()
        assert state == ("sent",)
    finally:
        app.close()
        sink.destroy()
