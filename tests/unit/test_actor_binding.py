"""Actors declared at import, bound when a process starts: on Dramatiq's StubBroker, no servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from service.actors import ACTORS, send_booking_email
from service.actors.binding import AppActor, DeferredActor
from service.app import App, part
from service.config import load_settings
from service.db import Conn, Database, DatabaseUnavailable
from service.emails.models import InvalidPayload

ENV = {
    "DATABASE_URL": "postgresql://u@127.0.0.1:1/unused",
    "BROKER_URL": "redis://127.0.0.1:1/0",
    "SMTP_URL": "smtp://127.0.0.1:1",
    "EMAIL_FROM": "Bookings <bookings@example.test>",
    "FEATURE_EMAIL_QUEUE_ENABLED": "true",
}


class Unreachable(Database):
    """No Postgres in unit tests: every transaction fails at once, as an unreachable server's."""

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        raise DatabaseUnavailable("database unavailable: unit test")
        yield  # pragma: no cover

    autocommit = transaction


class StubApp(App):
    """An App whose broker is Dramatiq's in-memory StubBroker with the service's middleware,
    and whose database is unreachable."""

    @part
    def broker(self) -> dramatiq.Broker:
        return StubBroker(middleware=App.broker.build(self).middleware)

    @part
    def db(self) -> Database:
        return Unreachable(self.settings.secret("database_url"), 1)


@pytest.fixture
def app() -> Iterator[App]:
    application = StubApp(load_settings(ENV))
    for actor in ACTORS:
        actor.bind(application)
    yield application
    for actor in ACTORS:
        actor.unbind()


def test_importing_binds_nothing() -> None:
    assert isinstance(send_booking_email, DeferredActor)
    assert dramatiq.broker.global_broker is None


def test_send_enqueues_a_validated_payload_on_the_bound_broker(app: App) -> None:
    booking = "0b0e4a4e-8c5b-4a8e-9d5d-2b3a0e5e6f70"
    message = send_booking_email.send(booking, "confirmed")
    # Postgres unreachable: the email goes on without a revision (the worker records it)
    assert message.kwargs == {"booking_id": booking, "type": "confirmed"}
    queued = app.broker.queues["pending-booking-emails"]  # type: ignore[attr-defined]
    assert queued.qsize() == 1
    assert send_booking_email.broker is app.broker
    assert isinstance(send_booking_email.actor, AppActor) and send_booking_email.actor.app is app


def test_a_bad_payload_is_refused_before_anything_is_enqueued(app: App) -> None:
    with pytest.raises(InvalidPayload) as raised:
        send_booking_email.send("not-a-uuid", "birthday")
    assert "booking_id" in str(raised.value) and "type" in str(raised.value)
    assert app.broker.queues["pending-booking-emails"].qsize() == 0  # type: ignore[attr-defined]


def test_actor_options_come_from_the_apps_settings(app: App) -> None:
    options: dict[str, Any] = send_booking_email.actor.options
    assert options["time_limit"] == app.settings.email_time_limit_ms
    assert options["dead_letter_kind"]({"kwargs": {"type": "updated"}}) == "updated"
    assert options["dead_letter_kind"]({"kwargs": "garbage"}) is None
