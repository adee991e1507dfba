"""The service on a three-node RabbitMQ cluster with quorum queues (``RABBITMQ_QUEUE_TYPE``).

One cluster for the module (``tests/support/rabbit_cluster.py``), real Postgres and SMTP; the
worker in the kill -9 test is a real ``python -m service worker`` process group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pytest
from dramatiq.common import dq_name, xq_name

from harness.rabbit_cluster import RabbitCluster
from harness.servers import SmtpSink
from harness.workers import WorkerGroup
from service.actors.emails import send_booking_email
from service.amqp import connect
from service.broker import delivery_count
from service.metrics import EMAIL_PRODUCER_DECISIONS
from tests.support.current_app import running_app
from tests.support.emails import QUEUE, Db, eventually, received_for
from tests.support.rabbit_cluster import purge

pytestmark = pytest.mark.rabbitmq

LIMIT = 3


@pytest.fixture
def cluster_env(
    rabbit_cluster: RabbitCluster, service_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    rabbit_cluster.wait_running()
    purge(rabbit_cluster, QUEUE)
    yield {
        **service_env,
        "BROKER_URL": rabbit_cluster.broker_url(),
        "RABBITMQ_QUEUE_TYPE": "quorum",
        # fixed for the module: a declared queue's arguments never change (see docs/scaling.md)
        "RABBITMQ_DELIVERY_LIMIT": str(LIMIT),
    }


def decisions() -> dict[str, float]:
    return {
        sample.labels["decision"]: sample.value
        for metric in EMAIL_PRODUCER_DECISIONS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def message_count(url: str, queue: str) -> int:
    connection = connect(url, timeout=5)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_queues_delay_queues_and_dead_letters_are_quorum_queues(
    rabbit_cluster: RabbitCluster, cluster_env: dict[str, str], db: Db
) -> None:
    before = decisions()
    with running_app(cluster_env):
        booking = db.booking(status="pending")
        send_booking_email.send(str(booking), "request_received")
        send_booking_email.send(
            str(booking), "request_received", "2099-01-01T00:00:00+00:00"
        )  # delayed: it waits on the delay queue
    assert grew(before, decisions()) == {"queued": 2}  # confirmed by a majority, not sent at once

    queues = rabbit_cluster.queues()
    for name in (QUEUE, dq_name(QUEUE), xq_name(QUEUE)):
        assert queues[name]["type"] == "quorum", queues[name]
        assert len(queues[name]["members"]) == 3, queues[name]
    arguments = {a[0]: a[2] for a in queues[QUEUE]["arguments"]}
    assert arguments["x-delivery-limit"] == LIMIT + 1  # the consumer dead-letters at LIMIT
    assert arguments["x-dead-letter-routing-key"] == xq_name(QUEUE)
    assert "x-max-priority" not in arguments

    # what the probes, collectors and DLQ tool see through a passive declare
    assert message_count(cluster_env["BROKER_URL"], QUEUE) == 1
    assert message_count(cluster_env["BROKER_URL"], dq_name(QUEUE)) == 1


def test_a_message_past_the_delivery_limit_lands_in_our_dead_letters(
    rabbit_cluster: RabbitCluster, cluster_env: dict[str, str], db: Db, smtp_sink: SmtpSink
) -> None:
    """A message whose workers keep dying with it (each time RabbitMQ gets it back unacked)."""
    with running_app(cluster_env) as app:
        doomed = db.booking(status="pending")
        message = send_booking_email.send(str(doomed), "request_received")
        for i in range(LIMIT):  # consumers that take the message and die without an ack
            connection = pika.BlockingConnection(pika.URLParameters(rabbit_cluster.urls[0]))
            channel = connection.channel()
            method, properties, _ = next(channel.consume(QUEUE, inactivity_timeout=10))
            assert method is not None, f"delivery {i + 1}"
            assert delivery_count(properties) == i
            connection.close()
        fine = db.booking(status="pending")
        send_booking_email.send(str(fine), "request_received")

        worker = dramatiq.Worker(app.broker, worker_threads=2, worker_timeout=100)
        worker.start()
        try:
            eventually(lambda: received_for(smtp_sink, fine), timeout=30)
            dead = eventually(db.dead_letters, timeout=30)
        finally:
            worker.stop(timeout=10_000)
    assert [(d["message_id"], d["reason"], d["queue_name"]) for d in dead] == [
        (message.message_id, "delivery_limit", QUEUE)
    ]
    assert f"delivered {LIMIT} times without an ack" in dead[0]["error"]
    assert dead[0]["email_type"] == "request_received"
    assert received_for(smtp_sink, doomed) == []
    assert message_count(cluster_env["BROKER_URL"], xq_name(QUEUE)) == 1
    assert message_count(cluster_env["BROKER_URL"], QUEUE) == 0


def test_the_service_uses_a_live_node_when_the_first_listed_one_is_down(
    rabbit_cluster: RabbitCluster, cluster_env: dict[str, str], db: Db, smtp_sink: SmtpSink
) -> None:
    rabbit_cluster.kill_9(0)
    try:
        before = decisions()
        with running_app(cluster_env) as app:
            connect(cluster_env["BROKER_URL"], timeout=3).close()  # what probes and tools use
            bookings = [db.booking(status="pending") for _ in range(5)]
            for booking in bookings:
                send_booking_email.send(str(booking), "request_received")
            assert grew(before, decisions()) == {"queued": 5}
            worker = dramatiq.Worker(app.broker, worker_threads=2, worker_timeout=100)
            worker.start()
            try:
                for booking in bookings:
                    eventually(lambda b=booking: received_for(smtp_sink, b), timeout=30)  # type: ignore[misc]
            finally:
                worker.stop(timeout=10_000)
    finally:
        rabbit_cluster.restart(0)
    assert [len(received_for(smtp_sink, b)) for b in bookings] == [1] * 5


def connected_nodes(cluster: RabbitCluster) -> dict[str, int]:
    """Client connections per node name (from the server address each connection reached)."""
    out = cluster.ctl("list_connections", "host", "--quiet", "--no-table-headers")
    by_ip = {n.client_ip: n.nodename for n in cluster.nodes}
    counts: dict[str, int] = {}
    for line in out.split():
        node = by_ip.get(line.strip(), "?")
        counts[node] = counts.get(node, 0) + 1
    return counts


def test_producer_and_worker_survive_kill_9_of_the_node_they_are_connected_to(
    rabbit_cluster: RabbitCluster, cluster_env: dict[str, str], db: Db, tmp_path: Path
) -> None:
    sink = SmtpSink.start_new(delay=0.2)
    env = {**os.environ, **cluster_env, "SMTP_URL": sink.url, "LOG_LEVEL": "WARNING"}
    group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log")
    try:
        with running_app({**cluster_env, "SMTP_URL": sink.url}):
            first = [db.booking(status="pending") for _ in range(30)]
            for booking in first:
                send_booking_email.send(str(booking), "request_received")
            group.start()
            eventually(lambda: len(sink.messages()) >= 5, timeout=60)
            victim = rabbit_cluster.nodes[0]
            assert connected_nodes(rabbit_cluster).get(victim.nodename, 0) >= 3, (
                "producer and workers connect to the first listed node"
            )
            before = decisions()
            killed_at = time.monotonic()
            rabbit_cluster.kill_9(0)
            second = [db.booking(status="pending") for _ in range(30)]
            for booking in second:
                send_booking_email.send(str(booking), "request_received")
            produced: dict[str, Any] = grew(before, decisions())
            everyone = first + second
            eventually(
                lambda: all(received_for(sink, b) for b in everyone), timeout=120, interval=0.5
            )
            took = time.monotonic() - killed_at
            assert group.proc is not None and group.proc.poll() is None, "the workers carried on"
            assert victim.nodename not in connected_nodes(rabbit_cluster)
        time.sleep(1.0)
        print(f"\nall 60 delivered {took:.1f}s after kill -9 of the node; producer: {produced}")
        assert produced == {"queued": 30}
        assert [len(received_for(sink, b)) for b in everyone] == [1] * 60
    finally:
        group.stop()
        sink.destroy()
        rabbit_cluster.restart(0)
