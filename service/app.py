"""The composition root: every process builds its ``App`` here when it starts.

An ``App`` holds the settings and the adapters built from them (database pool, SMTP mailer, flag
client, broker and its middleware, outbox handlers, clock). Nothing is built at import; each
component is built the first time the process asks for it, and ``for_worker`` / ``for_cli``
check the settings the role needs up front, so a misconfigured process stops at start.

A producer inside a host application uses ``App.for_producer``: a private broker (the host's
global Dramatiq broker is left alone) and the database (``BROKER_URL`` and ``DATABASE_URL``:
each request is recorded before it is enqueued); the SMTP settings are needed only when the
immediate-send fallback runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Generic, TypeVar, overload

import dramatiq

from service.broker import BROKER_ERRORS, build_broker, build_middleware
from service.capacity.audit import InvalidHoldsSource
from service.capacity.notifications import (
    HOLD_RELEASED_IRREPARABLE,
    POLICY_DRIFT_ESCALATED,
    format_irreparable_hold_release,
    format_policy_drift_escalation,
)
from service.config import PRODUCER, SERVICE, Settings, load_settings
from service.db import Database
from service.deadletters import DeadLetterRecorder, UndecodableRecorder
from service.emails.models import ACTOR_NAME, QUEUE, EmailPayload, utcnow
from service.emails.pipeline import Mailroom
from service.emails.requests import EMAIL_REQUESTED, EmailRequestHandler
from service.flags import Flags
from service.flags.middleware import FlagsMiddleware
from service.logs import configure
from service.observability.collectors import Source, build_sources
from service.observability.exposition import run_worker_exposition
from service.observability.middleware import DramatiqMetrics, WorkerHeartbeat
from service.outbox.delivery import AdminNotificationHandler, DeliveryError, Handler, Postbox
from service.smtp import Mailer

T = TypeVar("T")


class part(Generic[T]):
    """A part of the App built once, on first use, under the App's lock: worker threads that all
    ask for the database at their first message must not build a pool each."""

    def __init__(self, build: Callable[[App], T]) -> None:
        self.build = build
        self.name = build.__name__
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, app: None, owner: type[App]) -> part[T]: ...

    @overload
    def __get__(self, app: App, owner: type[App]) -> T: ...

    def __get__(self, app: App | None, owner: type[App]) -> part[T] | T:
        if app is None:
            return self
        with app._lock:
            if self.name not in app.__dict__:
                app.__dict__[self.name] = self.build(app)
            value: T = app.__dict__[self.name]
            return value


class App:
    """One process's settings and adapters. Cheap to create; builds each part on first use
    (then the instance attribute answers without the lock)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.RLock()

    @classmethod
    def for_worker(cls, environ: Mapping[str, str] | None = None) -> App:
        return cls(load_settings(environ).require(*SERVICE))

    @classmethod
    def for_cli(
        cls, environ: Mapping[str, str] | None = None, *, needs: tuple[str, ...] = SERVICE
    ) -> App:
        return cls(load_settings(environ).require(*needs))

    @classmethod
    def for_producer(cls, environ: Mapping[str, str] | None = None) -> App:
        return cls(load_settings(environ).require(*PRODUCER))

    @part
    def db(self) -> Database:
        return Database(
            self.settings.secret("database_url"),
            self.settings.db_pool_max_size,
            wait_timeout=self.settings.db_pool_timeout_seconds,
        )

    @part
    def mailer(self) -> Mailer:
        return Mailer.from_settings(self.settings)

    @part
    def mailroom(self) -> Mailroom:
        """What the email pipeline needs: the database, SMTP, the sender and the clock."""
        return Mailroom(
            db=self.db,
            send=self.mailer.send,
            sender=self.settings.sender,
            sent_record_deadline_seconds=self.settings.sent_record_deadline_seconds,
            lease_seconds=self.settings.email_lease_seconds,
            clock=self.clock,
        )

    @part
    def flags(self) -> Flags:
        return Flags(self.settings)

    @part
    def broker(self) -> dramatiq.Broker:
        """This process's broker; it becomes Dramatiq's global broker only in a worker."""
        settings = self.settings
        recorder = DeadLetterRecorder(lambda: self.db)
        middleware = build_middleware(
            settings,
            first=[DramatiqMetrics(settings, expose_worker_metrics), WorkerHeartbeat(settings)],
            before_retries=[recorder],
            after_retries=[FlagsMiddleware(self.flags)],
        )
        return build_broker(
            settings,
            middleware,
            on_undecodable=UndecodableRecorder(lambda: self.db),
            on_over_delivered=recorder.over_delivered,
        )

    @part
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
            EMAIL_REQUESTED: EmailRequestHandler(self.enqueue_email),
        }

    def enqueue_email(self, payload: EmailPayload) -> None:
        """Put a booking email on its queue (delayed until ``scheduled_for``), as the actor's
        producer would, without declaring the actor in this process."""
        message: dramatiq.Message[object] = dramatiq.Message(
            queue_name=QUEUE, actor_name=ACTOR_NAME, args=(), kwargs=payload.as_kwargs(), options={}
        )
        try:
            self.broker.enqueue(message, delay=payload.delay_ms(self.clock()))
        except BROKER_ERRORS as error:
            raise DeliveryError(f"broker unreachable: {type(error).__name__}") from error

    def scrape_sources(self, *, queues: bool) -> list[Source]:
        """What this pod's ``/metrics`` reads at scrape time; features register theirs here."""
        return build_sources(self.settings, queues=queues, features=[InvalidHoldsSource])

    def close(self, flags_wait: float = 2.0) -> None:
        """Release what this process opened (pool, SMTP connections, flag client; the client's
        threads get ``flags_wait`` seconds to end)."""
        if "flags" in self.__dict__:
            self.flags.stop(flags_wait)
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
