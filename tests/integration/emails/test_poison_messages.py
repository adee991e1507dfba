"""A body on the queue that is not a Dramatiq message, on real Redis or RabbitMQ, Postgres, SMTP."""

from __future__ import annotations

import base64
import json
import uuid

import dramatiq
import pika
import pytest
import redis

from harness.servers import RabbitServer, SmtpSink
from service.actors.emails import send_booking_email
from service.app import App
from service.deadletters import undecodable_id
from service.dlq.operations import Filters, dead_letters, purge, replay
from tests.support.current_app import running_app
from tests.support.emails import QUEUE, Db, eventually, received_for

NOT_JSON = b"\xff\x00{not json"
NOT_A_MESSAGE = json.dumps({"actor_name": "send_booking_email", "guest": "x"}).encode()


def push_raw(client: redis.Redis, queue: str, body: bytes) -> None:
    """Enqueue ``body`` the way Dramatiq's dispatch script does."""
    redis_id = str(uuid.uuid4())
    client.hset(f"dramatiq:{queue}.msgs", redis_id, body)
    client.rpush(f"dramatiq:{queue}", redis_id)


def test_undecodable_messages_are_dead_lettered_and_do_not_block_the_queue(
    app: App, db: Db, smtp_sink: SmtpSink
) -> None:
    client = redis.Redis.from_url(app.settings.secret("broker_url"))
    push_raw(client, QUEUE, NOT_JSON)
    push_raw(client, QUEUE, NOT_A_MESSAGE)
    bookings = [db.booking(status="pending") for _ in range(5)]
    for booking in bookings:
        send_booking_email.send(str(booking), "request_received")

    worker = dramatiq.Worker(app.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        for booking in bookings:
            eventually(lambda b=booking: received_for(smtp_sink, b))  # type: ignore[misc]
        later = db.booking(status="pending")
        send_booking_email.send(str(later), "request_received")
        eventually(lambda: received_for(smtp_sink, later))
        app.broker.join(QUEUE, timeout=10_000)
    finally:
        worker.stop(timeout=10_000)

    records = {d["message_id"]: d for d in db.dead_letters()}
    assert set(records) == {undecodable_id(NOT_JSON), undecodable_id(NOT_A_MESSAGE)}
    binary, not_message = records[undecodable_id(NOT_JSON)], records[undecodable_id(NOT_A_MESSAGE)]
    assert {binary["reason"], not_message["reason"]} == {"invalid_payload"}
    assert {binary["queue_name"], not_message["queue_name"]} == {QUEUE}
    assert binary["actor_name"] == "unknown" and binary["error"].startswith("UnicodeDecodeError")
    assert "not json" not in binary["error"] + not_message["error"]
    assert base64.b64decode(binary["message"]["body_base64"]) == NOT_JSON
    assert not_message["actor_name"] == "send_booking_email"
    assert not_message["message"]["body"] == NOT_A_MESSAGE.decode()

    assert client.zcard(f"dramatiq:{QUEUE}.XQ") == 2
    assert client.hlen(f"dramatiq:{QUEUE}.msgs") == 0
    assert all(client.scard(key) == 0 for key in client.keys("dramatiq:__acks__.*"))

    with dead_letters(app.db, app.broker, app.settings, Filters()) as (letters, queues):
        assert {(letter.message_id, letter.location) for letter in letters} == {
            (undecodable_id(NOT_JSON), "db+broker"),
            (undecodable_id(NOT_A_MESSAGE), "db+broker"),
        }
        outcome = replay(app.db, app.broker, letters, queues)
        assert outcome.done == [] and all("only be purged" in why for _, why in outcome.failed)
        purged = purge(app.db, letters, queues)
    assert len(purged.done) == 2 and client.zcard(f"dramatiq:{QUEUE}.XQ") == 0


@pytest.mark.rabbitmq
def test_undecodable_messages_on_rabbitmq_are_recorded_and_do_not_block_the_queue(
    service_env: dict[str, str], db: Db, smtp_sink: SmtpSink
) -> None:
    rabbit = RabbitServer.start_new()
    try:
        with running_app({**service_env, "BROKER_URL": rabbit.url}) as app:
            app.broker.declare_queue(QUEUE, ensure=True)
            connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
            try:
                connection.channel().basic_publish("", QUEUE, NOT_JSON)
            finally:
                connection.close()
            bookings = [db.booking(status="pending") for _ in range(5)]
            for booking in bookings:
                send_booking_email.send(str(booking), "request_received")
            worker = dramatiq.Worker(app.broker, worker_threads=2, worker_timeout=100)
            worker.start()
            try:
                for booking in bookings:
                    eventually(lambda b=booking: received_for(smtp_sink, b))  # type: ignore[misc]
                later = db.booking(status="pending")
                send_booking_email.send(str(later), "request_received")
                eventually(lambda: received_for(smtp_sink, later))
                dead = eventually(db.dead_letters)
            finally:
                worker.stop(timeout=10_000)
            assert [(d["message_id"], d["reason"], d["queue_name"]) for d in dead] == [
                (undecodable_id(NOT_JSON), "invalid_payload", QUEUE)
            ]
            with dead_letters(app.db, app.broker, app.settings, Filters()) as (letters, _):
                assert [(letter.message_id, letter.location) for letter in letters] == [
                    (undecodable_id(NOT_JSON), "db+broker")
                ]
    finally:
        rabbit.stop()
