"""The console on RabbitMQ: queue depths from the collectors' AMQP logic, dead letters read
from ``<queue>.XQ`` and purged there (a private node; failing to start it fails the test)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import dramatiq
import pika
import pytest
from starlette.testclient import TestClient

from harness.servers import RabbitServer
from service.console.web import create_app
from tests.support.console import OPERATOR_TOKEN, csrf_of, signed_in
from tests.support.current_app import running_app

pytestmark = pytest.mark.rabbitmq
QUEUE = "pending-booking-emails"


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitServer]:
    server = RabbitServer.start_new()
    yield server
    server.stop()


def test_queues_and_dead_letters_on_rabbitmq(
    rabbit: RabbitServer, console_env: dict[str, str]
) -> None:
    env = {**console_env, "BROKER_URL": rabbit.url}
    with running_app(env) as application, TestClient(create_app(application)) as client:
        signed_in(client, OPERATOR_TOKEN)
        application.broker.enqueue(
            dramatiq.Message(
                queue_name=QUEUE,
                actor_name="send_booking_email",
                args=(),
                kwargs={"booking_id": str(uuid.uuid4()), "type": "confirmed"},
                options={},
            )
        )
        dead_id = str(uuid.uuid4())
        body = {
            "message_id": dead_id,
            "queue_name": QUEUE,
            "actor_name": "send_booking_email",
            "args": [],
            "kwargs": {"booking_id": str(uuid.uuid4()), "type": "confirmed"},
            "options": {},
            "message_timestamp": 0,
        }
        connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        try:
            connection.channel().basic_publish("", f"{QUEUE}.XQ", json.dumps(body).encode())
        finally:
            connection.close()

        page = client.get("/queues")
        assert page.status_code == 200
        row = page.text.split(f"<td>{QUEUE}</td>")[1].split("</tr>")[0]
        cells = [c.split("</td>")[0] for c in row.split("<td>")[1:]]
        assert cells[0] == "1" and cells[3] == "1"  # one ready, one dead
        listing = client.get("/dead-letters")
        assert dead_id in listing.text and "broker" in listing.text
        preview = client.post(
            "/dead-letters/preview",
            data={"action": "purge", "ids": [dead_id], "csrf_token": csrf_of(listing.text)},
        )
        assert "delete the broker copy" in preview.text
        done = client.post(
            "/dead-letters/purge", data={"ids": [dead_id], "csrf_token": csrf_of(preview.text)}
        )
        assert "1 done" in done.text
        after = client.get("/queues").text.split(f"<td>{QUEUE}</td>")[1].split("</tr>")[0]
        assert [c.split("</td>")[0] for c in after.split("<td>")[1:]][3] == "0"
