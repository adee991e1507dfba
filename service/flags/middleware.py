"""Dramatiq middleware giving every worker process its own Unleash client."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from service import flags


class FlagsMiddleware(Middleware):
    """Starts the flag client after each worker process boots (after the fork) and stops it.

    A client created before the fork would keep its polling threads in the parent only, so
    children would evaluate a frozen state forever. Starting never blocks the boot: the client
    syncs with Unleash in a background thread and answers from the cache or the environment
    defaults until then.
    """

    def __init__(self, shutdown_wait: float = 1.0) -> None:
        self.shutdown_wait = shutdown_wait

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        flags.start()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        flags.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        flags.shutdown(self.shutdown_wait)
