"""Dead-letter tooling on real Redis, Postgres and SMTP: list, show, replay, purge, filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from harness.servers import RabbitServer, SmtpSink
from harness.workers import ROOT, WorkerGroup
from service.dlq.operations import parse_duration
from tests.support.emails import QUEUE, Db, eventually, received_for


def dlq(*args: str) -> Any:
    from service.cli import app

    result = CliRunner().invoke(app, ["dlq", *args])
    assert result.exit_code == 0, result.output
    return result


def xq(client: redis.Redis) -> int:
    return int(client.zcard(f"dramatiq:{QUEUE}.XQ"))


@pytest.fixture
def rds(service_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(service_env["BROKER_URL"])
    yield client
    client.close()


def dead_letter_rejected(
    db: Db, rds: redis.Redis, count: int, email_type: str = "confirmed"
) -> list[uuid.UUID]:
    """``count`` bookings whose email the SMTP server refuses (550): dead-lettered at once."""
    from service.actors.emails import send_booking_email

    status = {"confirmed": "confirmed", "request_received": "pending"}[email_type]
    before = xq(rds)
    bookings = [
        db.booking(status=status, guest_email=f"g{i}+reject@guests.example") for i in range(count)
    ]
    for b in bookings:
        send_booking_email.send(str(b), email_type)
    eventually(lambda: xq(rds) == before + count)
    return bookings


def fix_addresses(db: Db, bookings: list[uuid.UUID]) -> None:
    for b in bookings:
        db.conn.execute(
            "UPDATE bookings SET guest_email = %s WHERE id = %s", (f"{b.hex[:8]}@guests.example", b)
        )


def open_rows(db: Db) -> list[dict[str, Any]]:
    return db.conn.execute(
        "SELECT * FROM dead_letters WHERE replayed_at IS NULL AND purged_at IS NULL"
    ).fetchall()


def test_parse_duration() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("3d") == timedelta(days=3)
    with pytest.raises(ValueError):
        parse_duration("3 days")


def test_replay_delivers_each_dead_letter_once_and_clears_both_copies(
    broker: Any, worker: Any, db: Db, rds: redis.Redis, smtp_sink: SmtpSink
) -> None:
    bookings = dead_letter_rejected(db, rds, 3)
    listed = dlq("list", "--json").output.splitlines()
    rows = [json.loads(line) for line in listed]
    assert len(rows) == 3 and all(r["in_db"] and r["in_broker"] for r in rows)
    assert {r["reason"] for r in rows} == {"permanent_failure"}
    assert "+reject" not in dlq("show", rows[0]["message_id"]).output  # guest address masked

    fix_addresses(db, bookings)
    out = dlq("replay", "--queue", QUEUE, "--type", "confirmed").output
    assert "replayed 3 dead letter(s), 0 failed" in out
    eventually(lambda: all(len(received_for(smtp_sink, b)) == 1 for b in bookings))
    broker.join(QUEUE, timeout=10_000)
    time.sleep(0.3)
    assert [len(received_for(smtp_sink, b)) for b in bookings] == [1, 1, 1]
    assert xq(rds) == 0
    assert open_rows(db) == []
    assert all(db.delivery(b, "confirmed")["state"] == "sent" for b in bookings)  # type: ignore[index]
    assert "0 dead letter(s)" in dlq("list").output


def test_replaying_an_email_that_was_already_sent_sends_nothing(
    broker: Any, worker: Any, db: Db, rds: redis.Redis, smtp_sink: SmtpSink
) -> None:
    bookings = dead_letter_rejected(db, rds, 1)
    fix_addresses(db, bookings)
    dlq("replay")
    eventually(lambda: len(received_for(smtp_sink, bookings[0])) == 1)
    broker.join(QUEUE, timeout=10_000)
    # The same dead letter shows up again (e.g. restored from a backup): replay it once more.
    db.conn.execute("UPDATE dead_letters SET replayed_at = NULL")
    assert "(send_booking_email, from db)" in dlq("replay", "--dry-run").output
    assert "replayed 1 dead letter(s)" in dlq("replay").output
    broker.join(QUEUE, timeout=10_000)
    time.sleep(0.5)
    assert len(received_for(smtp_sink, bookings[0])) == 1
    row = db.delivery(bookings[0], "confirmed")
    assert row is not None and row["state"] == "sent" and row["attempts"] == 2  # 1 failed, 1 sent


def test_replay_from_postgres_after_the_broker_copy_expired(
    broker: Any, worker: Any, db: Db, rds: redis.Redis, smtp_sink: SmtpSink
) -> None:
    bookings = dead_letter_rejected(db, rds, 2, email_type="request_received")
    rds.delete(f"dramatiq:{QUEUE}.XQ", f"dramatiq:{QUEUE}.XQ.msgs")  # the 7-day TTL ran out
    rows = [json.loads(line) for line in dlq("list", "--json").output.splitlines()]
    assert [(r["in_db"], r["in_broker"]) for r in rows] == [(True, False), (True, False)]
    fix_addresses(db, bookings)
    dlq("replay", "--type", "request_received")
    eventually(lambda: all(len(received_for(smtp_sink, b)) == 1 for b in bookings))
    assert open_rows(db) == []


def test_broker_copy_without_a_record_is_listed_and_replayable(
    broker: Any, worker: Any, db: Db, rds: redis.Redis, smtp_sink: SmtpSink
) -> None:
    bookings = dead_letter_rejected(db, rds, 1)
    db.conn.execute("DELETE FROM dead_letters")  # Postgres was down when it died
    rows = [json.loads(line) for line in dlq("list", "--json").output.splitlines()]
    assert [(r["reason"], r["in_db"], r["in_broker"]) for r in rows] == [
        ("unrecorded", False, True)
    ]
    fix_addresses(db, bookings)
    dlq("replay", rows[0]["message_id"])
    eventually(lambda: len(received_for(smtp_sink, bookings[0])) == 1)
    assert xq(rds) == 0
    (row,) = db.dead_letters()
    assert row["reason"] == "unrecorded" and row["replayed_at"] is not None


def test_purge_dry_run_changes_nothing_then_purge_keeps_the_record(
    broker: Any, worker: Any, db: Db, rds: redis.Redis
) -> None:
    from service.actors.emails import send_booking_email

    for _ in range(2):
        broker.enqueue(
            send_booking_email.message_with_options(kwargs={"booking_id": "x", "type": "birthday"})
        )
    eventually(lambda: xq(rds) == 2)
    dead_letter_rejected(db, rds, 1)
    out = dlq("purge", "--reason", "invalid_payload", "--dry-run").output
    assert "would purge 2 dead letter(s)" in out
    assert xq(rds) == 3 and len(open_rows(db)) == 3

    assert "purged 2 dead letter(s)" in dlq("purge", "--reason", "invalid_payload", "--yes").output
    assert xq(rds) == 1
    remaining = open_rows(db)
    assert [r["reason"] for r in remaining] == ["permanent_failure"]
    purged = db.conn.execute(
        "SELECT count(*) AS n FROM dead_letters WHERE purged_at IS NOT NULL"
    ).fetchone()
    assert purged is not None and purged["n"] == 2


def test_age_and_type_filters(broker: Any, worker: Any, db: Db, rds: redis.Redis) -> None:
    dead_letter_rejected(db, rds, 1, email_type="confirmed")
    dead_letter_rejected(db, rds, 1, email_type="request_received")
    db.conn.execute(
        "UPDATE dead_letters SET failed_at = now() - interval '3 days' WHERE email_type = 'confirmed'"
    )

    def ids(*args: str) -> list[str]:
        return [
            json.loads(line)["email_type"]
            for line in dlq("list", "--json", *args).output.splitlines()
        ]

    assert ids("--older-than", "2d") == ["confirmed"]
    assert ids("--newer-than", "1h") == ["request_received"]
    assert ids("--type", "request_received") == ["request_received"]
    assert ids("--queue", "capacity-confirmations") == []
    assert sorted(ids()) == ["confirmed", "request_received"]


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_dlq_on_rabbitmq(
    db: Db, service_env: dict[str, str], smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    import pika

    rabbit = RabbitServer.start_new()
    env = {**os.environ, "BROKER_URL": rabbit.url, "LOG_LEVEL": "WARNING"}
    bookings = [
        db.booking(status="confirmed", guest_email=f"r{i}+reject@guests.example") for i in range(3)
    ]
    keep = db.booking(status="confirmed", guest_email="keep+reject@guests.example")

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def xq_count() -> int:
        conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        try:
            return int(
                conn.channel().queue_declare(f"{QUEUE}.XQ", passive=True).method.message_count
            )
        finally:
            conn.close()

    code = (
        "import sys; from service.actors.emails import send_booking_email\n"
        "for b in sys.argv[1:]: send_booking_email.send(b, 'confirmed')\n"
        "send_booking_email.broker.close()\n"
    )
    produced = subprocess.run(
        [sys.executable, "-c", code, *map(str, [*bookings, keep])],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert produced.returncode == 0, produced.stderr
    group = WorkerGroup(env, processes=1, threads=2, log_path=tmp_path / "worker.log").start()
    try:
        eventually(
            lambda: len(db.dead_letters()) == 4 and xq_count() == 4, timeout=60, interval=0.5
        )
        fix_addresses(db, bookings)
        keep_id = next(
            r["message_id"]
            for r in db.dead_letters()
            if r["message"]["kwargs"]["booking_id"] == str(keep)
        )
        assert "would purge 1 dead letter(s)" in run("dlq", "purge", keep_id, "--dry-run")
        assert xq_count() == 4  # browsing returned every message to the queue
        ids = [r["message_id"] for r in db.dead_letters() if r["message_id"] != keep_id]
        assert "replayed 3 dead letter(s), 0 failed" in run("dlq", "replay", *ids)
        eventually(lambda: all(len(received_for(smtp_sink, b)) == 1 for b in bookings), timeout=60)
        assert xq_count() == 1  # only the one not selected is left
        assert "purged 1 dead letter(s)" in run("dlq", "purge", keep_id, "--yes")
        assert xq_count() == 0
        time.sleep(1.0)
        assert [len(received_for(smtp_sink, b)) for b in bookings] == [1, 1, 1]
    finally:
        group.stop()
        rabbit.stop()
