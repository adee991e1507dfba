"""The composition root: every process builds its ``App`` here when it starts.

An ``App`` holds the settings and the adapters built from them (database pool, SMTP mailer, flag
client, broker and its middleware, outbox handlers, clock). Nothing is built at import; each
component is built the first time the process asks for it, and ``for_worker`` / ``for_cli``
check the settings the role needs up front, so a misconfigured process stops at start.

A producer inside a host application uses ``App.for_producer``: a private broker (the host's
global Dramatiq broker is left alone) that needs only ``BROKER_URL``; the database and SMTP
settings are needed only when the immediate-send fallback runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cached_property

import dramatiq

from service.broker import build_broker, build_middleware
from service.capacity.audit import InvalidHoldsSource
from service.capacity.notifications import (
    HOLD_RELEASED_IRREPARABLE,
    POLICY_DRIFT_ESCALATED,
    format_irreparable_hold_release,
    format_policy_drift_escalation,
)
from service.config import PRODUCER, SERVICE, Settings, load_settings
from service.db import Database
from service.deadletters import DeadLetterRecorder
from service.emails.models import utcnow
from service.emails.pipeline import Mailroom
from service.flags import Flags
from service.flags.middleware import FlagsMiddleware
from service.logs import configure
from service.observability.collectors import Source, build_sources
from service.observability.exposition import run_worker_exposition
from service.observability.middleware import DramatiqMetrics, WorkerHeartbeat
from service.outbox.delivery import AdminNotificationHandler, Handler, Postbox
from service.smtp import Mailer


class App:
    """One process's settings and adapters. Cheap to create; builds each part on first use."""

    def __init__(
        self, settings: Settings, *, clock: Callable[[], datetime] = utcnow, role: str = "cli"
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.role = role

    @classmethod
    def for_worker(cls, environ: Mapping[str, str] | None = None) -> App:
        return cls(load_settings(environ).require(*SERVICE), role="worker")

    @classmethod
    def for_cli(
        cls, environ: Mapping[str, str] | None = None, *, needs: tuple[str, ...] = SERVICE
    ) -> App:
        return cls(load_settings(environ).require(*needs), role="cli")

    @classmethod
    def for_producer(cls, environ: Mapping[str, str] | None = None) -> App:
        return cls(load_settings(environ).require(*PRODUCER), role="producer")

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.secret("database_url"), self.settings.db_pool_max_size)

    @cached_property
    def mailer(self) -> Mailer:
        return Mailer.from_settings(self.settings)

    @cached_property
    def mailroom(self) -> Mailroom:
        """What the email pipeline needs: the database, SMTP, the sender and the clock."""
        return Mailroom(
            db=self.db,
            send=self.mailer.send,
            sender=self.settings.sender,
            sent_record_deadline_seconds=self.settings.sent_record_deadline_seconds,
            clock=self.clock,
        )

    @cached_property
    def flags(self) -> Flags:
        return Flags(self.settings)

    @cached_property
    def broker(self) -> dramatiq.Broker:
        """This process's broker; it becomes Dramatiq's global broker only in a worker."""
        settings = self.settings
        middleware = build_middleware(
            settings,
            first=[DramatiqMetrics(settings, expose_worker_metrics), WorkerHeartbeat(settings)],
            before_retries=[DeadLetterRecorder(lambda: self.db)],
            after_retries=[FlagsMiddleware(self.flags)],
        )
        return build_broker(settings, middleware)

    @cached_property
    def outbox_handlers(self) -> Mapping[str, Handler]:
        """Event type -> handler; each feature's event types are registered here."""
        postbox = Postbox(self.db, self.mailer.send_to, self.settings)
        return {
            POLICY_DRIFT_ESCALATED: AdminNotificationHandler(
                format_policy_drift_escalation, postbox
            ),
            HOLD_RELEASED_IRREPARABLE: AdminNotificationHandler(
                format_irreparable_hold_release, postbox
            ),
        }

    def scrape_sources(self, *, queues: bool) -> list[Source]:
        """What this pod's ``/metrics`` reads at scrape time; features register theirs here."""
        return build_sources(self.settings, queues=queues, features=[InvalidHoldsSource])

    def close(self) -> None:
        """Release what this process opened (pool, SMTP connections, flag client)."""
        if "flags" in self.__dict__:
            self.flags.stop()
        if "mailer" in self.__dict__:
            self.mailer.close_all()
        if "db" in self.__dict__:
            self.db.close()
        if "broker" in self.__dict__:
            self.broker.close()


def expose_worker_metrics() -> int:
    """The fork that serves a worker pod's ``/metrics`` (Dramatiq's CLI starts it)."""
    app = App.for_worker()
    configure(app.settings.log_level, app.settings.log_format)
    return run_worker_exposition(app.settings, app.scrape_sources(queues=True))
