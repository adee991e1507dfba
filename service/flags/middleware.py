"""Dramatiq middleware giving every worker process its own Unleash client."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from service.flags import Flags


class FlagsMiddleware(Middleware):
    """Starts the flag client after each worker process boots (after the fork) and stops it.

    A client created before the fork would keep its polling threads in the parent only, so
    children would evaluate a frozen state forever. Starting never blocks the boot: the client
    syncs with Unleash in a background thread and answers from the cache or the environment
    defaults until then. Every flag is evaluated at boot and once per refresh interval, so each
    process exports the values it would use even if its actors never ask (an email-only worker).
    """

    def __init__(self, flags: Flags, shutdown_wait: float = 1.0) -> None:
        self.flags = flags
        self.shutdown_wait = shutdown_wait
        self._stop = threading.Event()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self.flags.start()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.flags.start()
        self._stop.clear()
        threading.Thread(target=self._report, name="flag-report", daemon=True).start()

    def _report(self) -> None:
        interval = self.flags.settings.unleash_refresh_interval_seconds
        while True:
            self.flags.report_all()
            if self._stop.wait(interval):
                return

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.flags.stop(self.shutdown_wait)
