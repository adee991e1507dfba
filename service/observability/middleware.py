"""Dramatiq middleware: Dramatiq's own Prometheus metrics and the worker heartbeat.

Both act only in processes started by the Dramatiq CLI (``after_process_boot``); a producer or an
in-process ``dramatiq.Worker`` in tests gets neither metrics files nor heartbeat records.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, TimeLimit
from dramatiq.middleware import prometheus as _dramatiq_prometheus

from service.config import Settings
from service.logs import get_logger
from service.observability.heartbeat import Heartbeat, interval_for

log = get_logger(__name__)


class DramatiqMetrics(_dramatiq_prometheus.Prometheus):
    """Dramatiq's Prometheus middleware, writing into our multiprocess directory.

    Its exposition process is replaced by ours (``forks``): one port per pod serving Dramatiq's
    metrics, ours and the scrape-time collectors. Its hooks are inert until the worker process
    booted, so producers and in-process test workers are unaffected.
    """

    def __init__(self, settings: Settings, exposition: Callable[[], int]) -> None:
        super().__init__()
        self.settings = settings
        self.exposition = exposition
        self.booted = False

    @property
    def forks(self) -> list[Any]:
        return [self.exposition]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        directory = self.settings.prometheus_multiproc_dir
        if directory is None:
            log.warning(
                "PROMETHEUS_MULTIPROC_DIR is not set: this worker process's metrics are not exported"
            )
            return
        _dramatiq_prometheus.DB_PATH = str(directory)
        super().after_process_boot(broker)
        self.booted = True

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self.booted:
            super().after_worker_shutdown(broker, worker)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.booted:
            super().after_nack(broker, message)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        if self.booted:
            super().after_enqueue(broker, message, delay)

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.booted:
            super().before_delay_message(broker, message)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.booted:
            super().before_process_message(broker, message)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if self.booted:
            super().after_process_message(broker, message, result=result, exception=exception)

    after_skip_message = after_process_message


def _time_limit_seconds(broker: dramatiq.Broker, message: Any) -> float | None:
    default = next((m.time_limit for m in broker.middleware if isinstance(m, TimeLimit)), None)
    if default is None:
        return None
    limit = message.options.get("time_limit")
    if limit is None:
        try:
            limit = broker.get_actor(message.actor_name).options.get("time_limit", default)
        except dramatiq.errors.ActorNotFound:
            limit = default
    return float(limit) / 1000


class WorkerHeartbeat(Middleware):
    """Each worker process writes a heartbeat record (see ``service.observability.heartbeat``).

    The record lists the messages running in each thread with their time limits, whether every
    worker and consumer thread is still alive, and the delayed messages this process holds in
    memory (RabbitMQ only reports the ones still in the broker).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.booted = False
        self.heartbeat: Heartbeat | None = None
        self._worker: Any = None
        self._delayed: dict[str, str] = {}
        self._lock = threading.Lock()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self.booted = True

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if not self.booted:
            return
        settings = self.settings
        self._worker = worker
        queues = sorted(q for q in broker.get_declared_queues() if not q.endswith((".DQ", ".XQ")))
        self.heartbeat = Heartbeat(
            health_file=settings.health_file,
            role="worker",
            interval=interval_for(settings.health_max_age_seconds),
            queues=queues,
            probe=self._probe,
        ).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _probe(self) -> dict[str, Any]:
        worker = self._worker
        threads = list(getattr(worker, "workers", []) or [])
        consumers = list((getattr(worker, "consumers", {}) or {}).values())
        with self._lock:
            held: dict[str, int] = {}
            for queue in self._delayed.values():
                held[queue] = held.get(queue, 0) + 1
        return {
            "threads": [sum(t.is_alive() for t in threads), len(threads)],
            "consumers": [sum(c.is_alive() for c in consumers), len(consumers)],
            "delayed_held": held,
        }

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.start_task(
                threading.get_ident(),
                message.actor_name,
                _time_limit_seconds(broker, message),
                queue=message.queue_name,
            )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if self.heartbeat is not None:
            self.heartbeat.end_task(threading.get_ident())

    after_skip_message = after_process_message

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.booted:
            with self._lock:
                self._delayed[message.message_id] = message.queue_name.removesuffix(".DQ")

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.booted:
            with self._lock:
                self._delayed.pop(message.message_id, None)

    after_nack = after_ack
