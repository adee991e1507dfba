"""The broker's copies of dead letters: Redis ``<q>.XQ`` sets and RabbitMQ ``<q>.XQ`` queues."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pika.exceptions

from service.amqp import connect
from service.config import Settings
from service.deadletters import undecodable_form
from service.redis_urls import redis_client

NAMESPACE = "dramatiq"


@dataclass
class BrokerCopy:
    """One dead message as the broker holds it; ``ref`` locates it for removal."""

    queue: str
    message: dict[str, Any]
    dead_at: datetime | None
    ref: Any

    @property
    def message_id(self) -> str:
        return str(self.message.get("message_id"))


def _parsed(queue: str, body: bytes) -> dict[str, Any]:
    """The dead message's fields; for a body that is not a message, what is known of it (its
    id matches the Postgres record, see ``service.deadletters.undecodable_id``)."""
    try:
        message = json.loads(body)
    except ValueError:
        message = None
    if isinstance(message, dict) and "message_id" in message:
        return message
    return undecodable_form(queue, body)


class DeadQueues(Protocol):
    def copies(self, queue: str) -> dict[str, BrokerCopy]: ...

    def remove(self, copy: BrokerCopy) -> None: ...

    def close(self) -> None: ...


class RedisDeadQueues:
    """Dead letters in the zset ``dramatiq:<q>.XQ`` (score: time of death) and the hash
    ``dramatiq:<q>.XQ.msgs`` (Redis message id -> encoded message)."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url, connect_timeout=5, socket_timeout=10)

    def copies(self, queue: str) -> dict[str, BrokerCopy]:
        raw: Any = self.client.hgetall(f"{NAMESPACE}:{queue}.XQ.msgs")
        scores: Any = self.client.zrange(f"{NAMESPACE}:{queue}.XQ", 0, -1, withscores=True)
        dead_at = {key: score for key, score in scores}
        found: dict[str, BrokerCopy] = {}
        for redis_id, encoded in raw.items():
            message = _parsed(queue, encoded)
            score = dead_at.get(redis_id)
            when = datetime.fromtimestamp(score / 1000, UTC) if score is not None else None
            copy = BrokerCopy(queue, message, when, redis_id)
            found[copy.message_id] = copy
        return found

    def remove(self, copy: BrokerCopy) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(f"{NAMESPACE}:{copy.queue}.XQ", copy.ref)
        pipe.hdel(f"{NAMESPACE}:{copy.queue}.XQ.msgs", copy.ref)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class RabbitDeadQueues:
    """Dead letters in the queue ``<q>.XQ``. AMQP cannot browse a queue, so reading takes every
    message with ``basic.get`` without acknowledging it; ``remove`` acknowledges (deletes) one,
    and ``close`` returns all the others to the queue. While a session is open the messages are
    invisible to other readers; nothing is lost if the process dies (the broker requeues them)."""

    def __init__(self, url: str) -> None:
        self.connection = connect(url, timeout=10, attempts=2)
        self.channel = self.connection.channel()

    def copies(self, queue: str) -> dict[str, BrokerCopy]:
        name = f"{queue}.XQ"
        try:
            count = self.channel.queue_declare(name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return {}
        found: dict[str, BrokerCopy] = {}
        for _ in range(count):
            method, properties, body = self.channel.basic_get(name, auto_ack=False)
            if method is None:
                break
            message = _parsed(queue, body)
            stamp = getattr(properties, "timestamp", None)
            when = datetime.fromtimestamp(stamp, UTC) if stamp else None
            copy = BrokerCopy(queue, message, when, method.delivery_tag)
            found[copy.message_id] = copy
        return found

    def remove(self, copy: BrokerCopy) -> None:
        self.channel.basic_ack(copy.ref)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def open_dead_queues(settings: Settings) -> DeadQueues:
    url = settings.secret("broker_url")
    if settings.broker_kind == "rabbitmq":
        return RabbitDeadQueues(url)
    return RedisDeadQueues(url)
