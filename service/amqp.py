"""Direct AMQP connections for probes, collectors and operator tools (not the broker itself)."""

from __future__ import annotations

from typing import Any

import pika


def connect(url: str, timeout: float, attempts: int = 1) -> Any:
    """A blocking RabbitMQ connection whose every wait is bounded by ``timeout`` seconds."""
    params = pika.URLParameters(url)
    params.connection_attempts = attempts
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    return pika.BlockingConnection(params)
