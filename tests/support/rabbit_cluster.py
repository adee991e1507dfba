"""A three-node RabbitMQ cluster (``harness.rabbit_cluster``), one per test module that asks."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest
from dramatiq.common import dq_name, xq_name

from harness.rabbit_cluster import RabbitCluster


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three nodes in network namespaces of their own; failing to start them fails the tests."""
    cluster = RabbitCluster.start_new()
    yield cluster
    cluster.destroy()


def purge(cluster: RabbitCluster, queue: str) -> None:
    """Empty ``queue`` and its delay and dead-letter queues, where they exist."""
    connection = pika.BlockingConnection([pika.URLParameters(u) for u in cluster.urls])
    try:
        for name in (queue, dq_name(queue), xq_name(queue)):
            channel = connection.channel()
            try:
                channel.queue_purge(name)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet
    finally:
        connection.close()
