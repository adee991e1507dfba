"""AMQP connection parameters for the broker and direct connections (probes, collectors, DLQ).

``BROKER_URL`` may list several RabbitMQ nodes (``amqp://u:p@host1:5672,host2:5672/vhost``):
pika tries them in order, so every connection lands on the first live node.
"""

from __future__ import annotations

from typing import Any

import pika

from service.config import amqp_node_urls


def node_parameters(url: str) -> list[pika.URLParameters]:
    """One ``pika.URLParameters`` per node listed in ``url``, in order."""
    return [pika.URLParameters(node) for node in amqp_node_urls(url)]


def connect(url: str, timeout: float, attempts: int = 1) -> Any:
    """A blocking RabbitMQ connection to the first live node of ``url``, every wait bounded by
    ``timeout`` seconds (``attempts`` rounds over the nodes)."""
    nodes = node_parameters(url)
    for params in nodes:  # pika makes ``attempts`` rounds over the whole list
        params.connection_attempts = attempts
        params.retry_delay = 0.5
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.blocked_connection_timeout = timeout
    return pika.BlockingConnection(nodes)
