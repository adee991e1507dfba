"""Failures mapped once and handled by kind: a lock conflict pauses the relay like an outage, and
a notification subject can never break its email's headers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from service.config import load_settings
from service.db import Conn, DatabaseConflict, DatabaseUnavailable, map_error
from service.outbox.notifications import Notification
from service.outbox.relay import Relay
from tests.unit.test_actor_binding import ENV


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.DeadlockDetected("deadlock"), DatabaseConflict),
        (psycopg.errors.SerializationFailure("serialization"), DatabaseConflict),
        (psycopg.errors.LockNotAvailable("lock timeout"), DatabaseConflict),
        (psycopg.OperationalError("connection refused"), DatabaseUnavailable),
        (psycopg.errors.AdminShutdown("shutting down"), DatabaseUnavailable),
    ],
)
def test_database_errors_are_split_into_conflicts_and_outages(
    error: psycopg.Error, kind: type[Exception]
) -> None:
    assert type(map_error(error)) is kind


def test_an_integrity_error_is_not_transient() -> None:
    assert map_error(psycopg.errors.UniqueViolation("duplicate")) is None


class ConflictingDatabase:
    """Every transaction fails as a deadlock would; counts the tries."""

    def __init__(self, stop: threading.Event, tries_before_stop: int) -> None:
        self.tries = 0
        self.stop = stop
        self.limit = tries_before_stop

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        self.tries += 1
        if self.tries >= self.limit:
            self.stop.set()
        raise DatabaseConflict("database conflict: DeadlockDetected")
        yield  # pragma: no cover


def test_the_relay_pauses_on_a_lock_conflict_instead_of_ending() -> None:
    stop = threading.Event()
    db = ConflictingDatabase(stop, tries_before_stop=2)
    settings = load_settings({**ENV, "OUTBOX_POLL_INTERVAL_SECONDS": "0.01"})
    relay = Relay(db, settings, {})  # type: ignore[arg-type]
    relay.poll_interval = 0.01
    runner = threading.Thread(target=relay.run_forever, args=(stop,))
    runner.start()
    runner.join(20)
    assert not runner.is_alive()
    assert db.tries == 2, "the loop went on after the first conflict"


def test_a_subject_with_line_breaks_stays_one_header() -> None:
    notification = Notification("Drift at Le Bistro\r\nBcc: attacker@example.com", "text", {})
    assert notification.subject == "Drift at Le BistroBcc: attacker@example.com"
    assert "\n" not in notification.subject and "\r" not in notification.subject
