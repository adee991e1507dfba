"""The Dramatiq broker and its middleware, built from settings by the composition root.

Nothing here runs at import: ``build_broker`` makes a broker for the caller, who decides whether
it becomes Dramatiq's global broker (a worker process) or stays private (a producer inside a
host application that has a broker of its own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import dramatiq
import pika.exceptions
import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker, _RabbitmqConsumer
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis, dq_name, xq_name
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from service.config import Settings
from service.logs import get_logger
from service.metrics import REENQUEUE_FAILURES, REQUEUED_AFTER_RECONNECT
from service.redis_urls import redis_client
from service.resilience import keep_trying

log = get_logger(__name__)

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    dramatiq.errors.BrokerConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    pika.exceptions.AMQPError,
    OSError,
)

OnRetry = Callable[[dramatiq.Message[Any], int], None]
"""Actor option ``on_retry``: told the message and the delay Dramatiq chose for its retry."""

OnUndecodable = Callable[[str, bytes, BaseException], None]
"""Told the queue, the raw body and the decoder's error of a fetched message that is not a
Dramatiq message, after the broker has moved it to the queue's dead letters (``<q>.XQ``)."""


def _report_undecodable(
    on_undecodable: OnUndecodable | None, queue_name: str, body: bytes, error: DecodeError
) -> None:
    cause: BaseException = error
    while isinstance(cause, DecodeError) and isinstance(cause.error, BaseException):
        cause = cause.error  # the innermost error: the outer ones quote the body
    log.error(
        "dead-lettered a message that is not a Dramatiq message",
        queue=queue_name,
        size=len(body),
        error=type(cause).__name__,
    )
    if on_undecodable is None:
        return
    try:
        on_undecodable(queue_name, body, cause)
    except Exception as failure:  # the broker holds the letter; the consumer must carry on
        log.error("could not report an undecodable message", error=type(failure).__name__)


class _DeadLetteringRedisConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer lets a ``DecodeError`` escape ``__next__``: the consumer
    thread restarts with a new consumer, and the messages prefetched with the bad one stay in
    this worker's ack set until the worker dies. This one dead-letters the bad message and goes
    on with the next."""

    broker: MaintainedRedisBroker

    def __next__(self) -> MessageProxy | None:
        while True:
            try:
                return super().__next__()  # type: ignore[no-any-return]
            except DecodeError as error:
                body = error.data if isinstance(error.data, bytes) else str(error.data).encode()
                try:
                    self.broker.dead_letter_fetched(self.queue_name, body)
                except redis.exceptions.RedisError as failure:
                    log.error(
                        "could not move an undecodable message to the dead letters; it stays"
                        " unacked until this worker stops",
                        queue=self.queue_name,
                        error=type(failure).__name__,
                    )
                _report_undecodable(self.broker.on_undecodable, self.queue_name, body, error)


_REDIS_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _ReclaimingRedisConsumer(_DeadLetteringRedisConsumer):
    """Returns to their queue the messages this worker fetched and then lost from memory.

    When a consumer hits a connection error, Dramatiq's ``ConsumerThread`` throws away its
    in-memory delay queue and starts a new consumer (and one whose ``__next__`` failed on any
    other error loses the messages it had prefetched). Those messages stay in this worker's
    ack set in Redis, and Redis maintenance only requeues the ack sets of *dead* workers, so a
    live worker strands them until it restarts: upstream issue #527
    (https://github.com/Bogdanp/dramatiq/issues/527).

    So before its first fetch each new consumer requeues, with Dramatiq's own ``requeue``
    command, every id of this broker's ack set for its queue that the process does not hold
    in memory. Held means handed out by a consumer and not yet acked, nacked or requeued: a
    message in the work queue or being processed, whose ack will come from its worker thread;
    it is left alone, so it is not processed twice. A delay queue's consumer always starts
    with an empty in-memory delay queue, so nothing of a delay queue is held then. A requeued
    delayed message goes back to the delay queue with its ``eta`` and waits for it again.

    Redis errors of ``requeue`` and timeouts are raised as ``ConnectionClosed``, the
    connection loss Dramatiq's worker handles; raw, a failed ``requeue`` in the consumer
    thread's clean-up would end that thread.
    """

    broker: MaintainedRedisBroker

    def __init__(
        self, broker: MaintainedRedisBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._reclaimed = False
        if queue_name.endswith(".DQ"):
            broker.forget_held(queue_name)

    def __next__(self) -> MessageProxy | None:
        try:
            if not self._reclaimed:
                self.broker.requeue_stranded(self.queue_name)
                self._reclaimed = True
            proxy = super().__next__()
        except _REDIS_LOST as error:
            raise ConnectionClosed(error) from None
        if proxy is not None:
            self.broker.hold(self.queue_name, proxy.options["redis_message_id"])
        return proxy

    def ack(self, message: MessageProxy) -> None:
        super().ack(message)
        self.broker.release(self.queue_name, [message.options["redis_message_id"]])

    def nack(self, message: MessageProxy) -> None:
        super().nack(message)
        self.broker.release(self.queue_name, [message.options["redis_message_id"]])

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        messages = list(messages)
        try:
            super().requeue(messages)
        except _REDIS_LOST as error:
            raise ConnectionClosed(error) from None
        self.broker.release(self.queue_name, [m.options["redis_message_id"] for m in messages])


class MaintainedRedisBroker(RedisBroker):
    """A Redis broker that can run queue maintenance on demand.

    Stock Dramatiq requeues a dead worker's unacked messages only when a random 0.1 % of
    commands happens to run maintenance on that queue: minutes after a crash. ``maintain``
    forces that pass (and refreshes this process's heartbeat).

    A fetched message that is not a Dramatiq message goes to the queue's dead letters and is
    reported to ``on_undecodable`` instead of crashing the consumer. After a lost connection,
    the messages this worker fetched and no longer holds return to their queues (see
    ``_ReclaimingRedisConsumer``).
    """

    REQUEUE_BATCH = 500

    def __init__(self, *, on_undecodable: OnUndecodable | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_undecodable = on_undecodable
        self._held: dict[str, set[str]] = {}
        self._held_lock = threading.Lock()

    @property
    def consumer_class(self) -> type[Consumer]:
        return _ReclaimingRedisConsumer

    def _acks_key(self, queue_name: str) -> str:
        return f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"

    def hold(self, queue_name: str, redis_id: str) -> None:
        with self._held_lock:
            self._held.setdefault(queue_name, set()).add(redis_id)

    def release(self, queue_name: str, redis_ids: Iterable[str]) -> None:
        with self._held_lock:
            self._held.get(queue_name, set()).difference_update(redis_ids)

    def forget_held(self, queue_name: str) -> None:
        with self._held_lock:
            self._held.pop(queue_name, None)

    def requeue_stranded(self, queue_name: str) -> int:
        """Requeue the ids of this broker's ack set for ``queue_name`` that no consumer of this
        process holds; returns how many. Held ids are read first: ids are only added to the
        ack set and to the held set by the fetching consumer, which is the caller, and an
        acked id leaves the ack set before the held set, so none held is requeued."""
        with self._held_lock:
            held = set(self._held.get(queue_name, ()))
        members: set[bytes] = self.client.smembers(self._acks_key(queue_name))  # type: ignore[assignment]
        stranded = sorted(i.decode() for i in members if i.decode() not in held)
        for start in range(0, len(stranded), self.REQUEUE_BATCH):
            self.do_requeue(queue_name, *stranded[start : start + self.REQUEUE_BATCH])
        if stranded:
            REQUEUED_AFTER_RECONNECT.labels(queue_name).inc(len(stranded))
            log.warning(
                "requeued messages this worker had fetched and lost from memory",
                queue=queue_name,
                count=len(stranded),
            )
        return len(stranded)

    def dead_letter_fetched(self, queue_name: str, body: bytes) -> str | None:
        """Move the message with exactly ``body`` that this broker fetched from ``queue_name``
        to the dead letters, with Dramatiq's own ``nack``; returns its Redis id (None if it is
        no longer among this broker's unacked messages). Its id is inside the body, so it is
        found among the ids the fetch script put in this broker's ack set for the queue."""
        ids: list[bytes] = sorted(self.client.smembers(self._acks_key(queue_name)))  # type: ignore[arg-type]
        if not ids:
            return None
        bodies: list[bytes | None] = self.client.hmget(  # type: ignore[assignment]
            f"{self.namespace}:{queue_name}.msgs", ids
        )
        for redis_id, stored in zip(ids, bodies, strict=True):
            if stored == body:
                self.do_nack(queue_name, redis_id)
                return redis_id.decode()
        return None

    def maintain(self, queue_name: str) -> None:
        args = [
            "qsize",
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            1,
            self._max_unpack_size(),
        ]
        self.scripts["dispatch"](args=args, keys=[self.namespace])


class _Deliveries:
    """The consumer's ``(method, properties, body)`` iterator, minus the deliveries it must not
    process: a body that is not a Dramatiq message, and (quorum queues) a message RabbitMQ has
    already handed out ``delivery_limit`` times without an ack. Each is nacked to ``<q>.XQ`` and
    reported. (Stock Dramatiq nacks an undecodable body too, but logs it, and the body may carry
    guest data.) It runs on the consumer's thread, which owns the channel."""

    def __init__(
        self,
        deliveries: Iterator[Any],
        channel: Any,
        queue_name: str,
        broker: DeadLetteringRabbitmqBroker,
    ) -> None:
        self.deliveries = deliveries
        self.channel = channel
        self.queue_name = queue_name
        self.broker = broker

    def __iter__(self) -> _Deliveries:
        return self

    def __next__(self) -> Any:
        while True:
            delivery = next(self.deliveries)
            method, properties, body = delivery
            if method is None:
                return delivery
            try:
                message = dramatiq.Message.decode(body)
            except DecodeError as error:
                self.channel.basic_nack(method.delivery_tag, requeue=False)
                _report_undecodable(self.broker.on_undecodable, self.queue_name, body, error)
                continue
            count = delivery_count(properties)
            limit = self.broker.delivery_limit
            if limit is not None and count >= limit:
                self.channel.basic_nack(method.delivery_tag, requeue=False)
                _report_over_delivered(self.broker, message, count)
                continue
            return delivery


def delivery_count(properties: Any) -> int:
    """How many times a quorum queue handed this message out before without an ack."""
    headers = getattr(properties, "headers", None) or {}
    value = headers.get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def _report_over_delivered(
    broker: DeadLetteringRabbitmqBroker, message: dramatiq.Message[Any], count: int
) -> None:
    log.error(
        "dead-lettered a message delivered too often without an ack",
        queue=message.queue_name,
        message_id=message.message_id,
        deliveries=count,
        delivery_limit=broker.delivery_limit,
    )
    if broker.on_over_delivered is None:
        return
    try:
        broker.on_over_delivered(broker, message, count)
    except Exception as failure:  # the broker holds the letter; the consumer must carry on
        log.error("could not report an over-delivered message", error=type(failure).__name__)


class _DeadLetteringRabbitmqConsumer(_RabbitmqConsumer):
    broker: DeadLetteringRabbitmqBroker

    def __init__(self, broker: DeadLetteringRabbitmqBroker, queue_name: str, *args: Any) -> None:
        super().__init__(broker, queue_name, *args)
        self.iterator = _Deliveries(self.iterator, self.channel, queue_name, broker)


OnOverDelivered = Callable[[dramatiq.Broker, dramatiq.Message[Any], int], None]
"""Told the broker, the message and its delivery count when a quorum queue's message reached
the delivery limit, after the consumer moved it to the queue's dead letters (``<q>.XQ``)."""


class DeadLetteringRabbitmqBroker(RabbitmqBroker):
    """A RabbitMQ broker whose consumer dead-letters a delivery that is not a Dramatiq message
    to ``<q>.XQ`` and reports it to ``on_undecodable``.

    With ``queue_type="quorum"`` it declares every queue (``<q>``, ``<q>.DQ``, ``<q>.XQ``) as a
    replicated quorum queue. Such a queue counts how often it handed a message out without an
    ack (a worker killed mid-message, a node failover): at ``delivery_limit`` the consumer
    dead-letters the message itself and reports it to ``on_over_delivered`` (recorded in
    Postgres like any dead letter); the queue's own ``x-delivery-limit``, one higher, is the
    backstop that dead-letters to ``<q>.XQ`` should a worker die on that last delivery too.
    Stock Dramatiq declares classic-only arguments (``x-max-priority``), hence the override.
    """

    def __init__(
        self,
        *,
        on_undecodable: OnUndecodable | None = None,
        on_over_delivered: OnOverDelivered | None = None,
        queue_type: str = "classic",
        delivery_limit: int = 10,
        failover_seconds: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"unknown queue type {queue_type!r}")
        if queue_type == "quorum" and kwargs.get("max_priority"):
            raise ValueError("quorum queues have no x-max-priority")
        super().__init__(**kwargs)
        self.on_undecodable = on_undecodable
        self.on_over_delivered = on_over_delivered
        self.queue_type = queue_type
        self.delivery_limit: int | None = delivery_limit if queue_type == "quorum" else None
        self.failover_seconds = failover_seconds

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> Any:
        """Dramatiq's enqueue (six quick attempts, a new connection each: the next live node),
        tried again for ``failover_seconds``: while a quorum queue elects a new leader after
        its node died, publishes are refused for a few seconds."""
        return keep_trying(
            lambda: super(DeadLetteringRabbitmqBroker, self).enqueue(message, delay=delay),
            retry_on=(dramatiq.errors.BrokerConnectionError,),
            deadline_seconds=self.failover_seconds,
            first_pause=0.25,
            max_pause=1.0,
        )

    @property
    def consumer_class(self) -> type[Consumer]:
        return _DeadLetteringRabbitmqConsumer

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        if self.delivery_limit is not None:
            arguments.pop("x-max-priority", None)
            arguments.update(
                {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.delivery_limit + 1,
                    # dead letters reach <q>.XQ even if a leader fails during the move
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
            )
        return arguments

    def _declare_xq_queue(self, queue_name: str) -> Any:
        if self.delivery_limit is None:
            return super()._declare_xq_queue(queue_name)
        return self.channel.queue_declare(
            queue=xq_name(queue_name),
            durable=True,
            arguments={"x-queue-type": "quorum", "x-message-ttl": DEAD_MESSAGE_TTL},
        )


class RedisMaintenance(Middleware):
    """In each worker process, a thread that runs maintenance on every queue every few seconds.

    With ``heartbeat_timeout`` at 15 s, a ``kill -9``-ed worker's messages are back on their
    queue within about heartbeat timeout + interval instead of minutes.
    """

    def __init__(self, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self._stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        assert isinstance(broker, MaintainedRedisBroker)
        threading.Thread(
            target=self._run, args=(broker,), name="redis-maintenance", daemon=True
        ).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()

    def _run(self, broker: MaintainedRedisBroker) -> None:
        while not self._stop.wait(self.interval):
            for queue in sorted(broker.get_declared_queues()):
                for name in (queue, dq_name(queue)):
                    try:
                        broker.maintain(name)
                    except BROKER_ERRORS as error:
                        log.warning(
                            "redis maintenance failed", queue=name, error=type(error).__name__
                        )


class _PatientBroker:
    """Wraps the broker for Retries: re-enqueueing a retry survives a broker blip, and the
    actor's ``on_retry`` option hears the delay Dramatiq chose."""

    def __init__(self, broker: dramatiq.Broker, deadline_seconds: float) -> None:
        self._broker = broker
        self._deadline = deadline_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> Any:
        try:
            enqueued = keep_trying(
                lambda: self._broker.enqueue(message, delay=delay),
                retry_on=BROKER_ERRORS,
                deadline_seconds=self._deadline,
            )
        except BROKER_ERRORS as error:
            REENQUEUE_FAILURES.inc()
            log.error(
                "could not re-enqueue a retry; the delivery record keeps it for the reconciler",
                message_id=message.message_id,
                error=type(error).__name__,
            )
            return None
        on_retry: OnRetry | None = self._broker.get_actor(message.actor_name).options.get(
            "on_retry"
        )
        if on_retry is not None:
            try:
                on_retry(message, delay or 0)
            except Exception as error:
                log.warning(
                    "on_retry hook failed", message_id=message.message_id, error=repr(error)
                )
        return enqueued


class DurableRetries(Retries):
    """Dramatiq's Retries, except that a failed re-enqueue is retried instead of silently
    dropping the message (stock Dramatiq then acks it: the retry is lost)."""

    def __init__(self, *, reenqueue_deadline_seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reenqueue_deadline_seconds = reenqueue_deadline_seconds

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"on_retry"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        patient = _PatientBroker(broker, self.reenqueue_deadline_seconds)
        super().after_process_message(patient, message, result=result, exception=exception)


def build_middleware(
    settings: Settings,
    *,
    first: Sequence[Middleware] = (),
    before_retries: Sequence[Middleware] = (),
    after_retries: Sequence[Middleware] = (),
) -> list[Middleware]:
    """Dramatiq's standard middleware around our retries. ``after_*`` hooks run in reverse
    order, so middleware in ``before_retries`` sees the verdict of Retries, and TimeLimit, listed
    after Retries, disarms the actor's time limit before a retry is re-enqueued (a re-enqueue
    riding out a broker blip must not be interrupted half-way)."""
    middleware: list[Middleware] = [
        *first,
        AgeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        *before_retries,
        DurableRetries(
            max_retries=settings.email_max_retries,
            min_backoff=settings.email_min_backoff_ms,
            max_backoff=settings.email_max_backoff_ms,
            reenqueue_deadline_seconds=settings.reenqueue_deadline_seconds,
        ),
        TimeLimit(),
        CurrentMessage(),
        *after_retries,
    ]
    if settings.broker_kind == "redis":
        middleware.append(RedisMaintenance(settings.redis_maintenance_interval_seconds))
    return middleware


def build_broker(
    settings: Settings,
    middleware: list[Middleware],
    *,
    on_undecodable: OnUndecodable | None = None,
    on_over_delivered: OnOverDelivered | None = None,
) -> dramatiq.Broker:
    """A broker for BROKER_URL with ``middleware``; opens no connection until first use.
    A consumed message that cannot be decoded is dead-lettered and told to ``on_undecodable``;
    on quorum queues, one past the delivery limit to ``on_over_delivered``. With a
    ``redis+sentinel://`` URL the client follows the primary that Sentinel names."""
    url = settings.secret("broker_url")
    if settings.broker_kind == "rabbitmq":
        return DeadLetteringRabbitmqBroker(
            # pika tries the listed nodes in order, on every (re)connection
            url=settings.broker_urls,
            confirm_delivery=True,  # a quorum queue confirms once a majority has the message
            middleware=middleware,
            on_undecodable=on_undecodable,
            on_over_delivered=on_over_delivered,
            queue_type=settings.rabbitmq_queue_type,
            delivery_limit=settings.rabbitmq_delivery_limit,
            failover_seconds=settings.rabbitmq_failover_seconds,
        )
    return MaintainedRedisBroker(
        client=redis_client(url),
        middleware=middleware,
        on_undecodable=on_undecodable,
        heartbeat_timeout=settings.redis_heartbeat_timeout_ms,
        dead_message_ttl=settings.redis_dead_message_ttl_ms,
    )
