"""The one place that builds the Dramatiq broker and its middleware from BROKER_URL.

Importing this module sets the global broker (actors bind to it when they are declared); it
opens no connection until the first message is sent or consumed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
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

from service.config import Settings, get_settings
from service.logs import configure, get_logger
from service.metrics import REENQUEUE_FAILURES

log = get_logger(__name__)

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    dramatiq.errors.BrokerConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)
try:
    import pika.exceptions

    BROKER_ERRORS += (pika.exceptions.AMQPError,)
except ImportError:  # pragma: no cover
    pass


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
    """Wraps the broker for Retries so that re-enqueueing a retry survives a broker blip."""

    def __init__(self, broker: dramatiq.Broker, deadline_seconds: float) -> None:
        self._broker = broker
        self._deadline = deadline_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> Any:
        deadline = time.monotonic() + self._deadline
        pause = 0.2
        while True:
            try:
                return self._broker.enqueue(message, delay=delay)
            except BROKER_ERRORS as error:
                if time.monotonic() + pause > deadline:
                    REENQUEUE_FAILURES.inc()
                    log.error(
                        "could not re-enqueue a retry; the delivery record keeps it for the reconciler",
                        message_id=message.message_id,
                        error=type(error).__name__,
                    )
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)


class DurableRetries(Retries):
    """Dramatiq's Retries, except that a failed re-enqueue is retried instead of silently
    dropping the message (stock Dramatiq then acks it: the retry is lost)."""

    def __init__(self, *, reenqueue_deadline_seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reenqueue_deadline_seconds = reenqueue_deadline_seconds

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


class WorkerLogging(Middleware):
    """Each worker process logs JSON like the CLI does (Dramatiq set up its own format first)."""

    def __init__(self, settings: Settings) -> None:
        self.level, self.format = settings.log_level, settings.log_format

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        configure(self.level, self.format)


def build_middleware(settings: Settings) -> list[Middleware]:
    from service.deadletters import DeadLetterRecorder
    from service.flags.middleware import FlagsMiddleware
    from service.observability.middleware import DramatiqMetrics, WorkerHeartbeat

    middleware: list[Middleware] = [
        WorkerLogging(settings),
        DramatiqMetrics(),
        WorkerHeartbeat(),
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        # after_* hooks run in reverse order: listed before Retries, the recorder sees its verdict.
        DeadLetterRecorder(),
        DurableRetries(
            max_retries=settings.email_max_retries,
            min_backoff=settings.email_min_backoff_ms,
            max_backoff=settings.email_max_backoff_ms,
            reenqueue_deadline_seconds=settings.reenqueue_deadline_seconds,
        ),
        CurrentMessage(),
        FlagsMiddleware(),
    ]
    if settings.broker_kind == "redis":
        middleware.append(RedisMaintenance(settings.redis_maintenance_interval_seconds))
    return middleware


def build_broker(settings: Settings | None = None) -> dramatiq.Broker:
    settings = settings or get_settings()
    url = settings.broker_url.get_secret_value()
    middleware = build_middleware(settings)
    if settings.broker_kind == "rabbitmq":
        return RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
        retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), 2),
    )
    return MaintainedRedisBroker(
        client=client,
        middleware=middleware,
        heartbeat_timeout=settings.redis_heartbeat_timeout_ms,
        dead_message_ttl=settings.redis_dead_message_ttl_ms,
    )


def setup() -> dramatiq.Broker:
    """Build the broker from the environment and make it Dramatiq's global broker."""
    broker = build_broker()
    dramatiq.set_broker(broker)
    return broker


broker = setup()
