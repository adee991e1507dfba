"""The Dramatiq broker and its middleware, built from settings by the composition root.

Nothing here runs at import: ``build_broker`` makes a broker for the caller, who decides whether
it becomes Dramatiq's global broker (a worker process) or stays private (a producer inside a
host application that has a broker of its own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
import pika.exceptions
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis, dq_name
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
from service.metrics import REENQUEUE_FAILURES
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


class MaintainedRedisBroker(RedisBroker):
    """A Redis broker that can run queue maintenance on demand.

    Stock Dramatiq requeues a dead worker's unacked messages only when a random 0.1 % of
    commands happens to run maintenance on that queue: minutes after a crash. ``maintain``
    forces that pass (and refreshes this process's heartbeat).
    """

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


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
        retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


def build_broker(settings: Settings, middleware: list[Middleware]) -> dramatiq.Broker:
    """A broker for BROKER_URL with ``middleware``; opens no connection until first use."""
    url = settings.secret("broker_url")
    if settings.broker_kind == "rabbitmq":
        return RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
    return MaintainedRedisBroker(
        client=redis_client(url),
        middleware=middleware,
        heartbeat_timeout=settings.redis_heartbeat_timeout_ms,
        dead_message_ttl=settings.redis_dead_message_ttl_ms,
    )
