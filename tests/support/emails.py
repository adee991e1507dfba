"""Fixtures for email pipeline tests: the real broker, an in-process worker and seeded rows."""

from __future__ import annotations

import email
import time
import uuid
from collections.abc import Callable, Iterator
from email import policy
from typing import Any

import dramatiq
import psycopg
import pytest

from harness.factories import insert_booking, insert_venue
from service.app import App

QUEUE = "pending-booking-emails"


def eventually(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    assert value, f"condition not met within {timeout}s (last value {value!r})"
    return value


@pytest.fixture
def broker(app: App) -> dramatiq.Broker:
    return app.broker


@pytest.fixture
def worker(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    w = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    w.start()
    yield w
    w.stop(timeout=10_000)


class Db:
    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row)
        self.venue = insert_venue(self.conn)

    def booking(self, **kw: Any) -> uuid.UUID:
        return insert_booking(self.conn, self.venue, **kw)

    def delivery(
        self, booking_id: uuid.UUID, email_type: str, revision: int | None = None
    ) -> dict[str, Any] | None:
        """The request row at ``revision``, or the latest request of that type."""
        return self.conn.execute(
            "SELECT * FROM email_deliveries WHERE booking_id = %s AND email_type = %s"
            " AND (%s::bigint IS NULL OR revision = %s::bigint) ORDER BY revision DESC LIMIT 1",
            (booking_id, email_type, revision, revision),
        ).fetchone()

    def deliveries(self, booking_id: uuid.UUID, email_type: str) -> list[dict[str, Any]]:
        """Every request row of that type, oldest revision first."""
        return self.conn.execute(
            "SELECT * FROM email_deliveries WHERE booking_id = %s AND email_type = %s"
            " ORDER BY revision",
            (booking_id, email_type),
        ).fetchall()

    def update_booking(self, booking_id: uuid.UUID, **changes: Any) -> int:
        """Change guest-visible columns as the booking service does; returns the new revision."""
        assignments = ", ".join(f"{column} = %({column})s" for column in changes)
        row = self.conn.execute(
            f"UPDATE bookings SET {assignments}, updated_at = now() WHERE id = %(id)s"
            " RETURNING revision",
            {**changes, "id": booking_id},
        ).fetchone()
        assert row is not None
        return int(row["revision"])

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.conn.execute("SELECT * FROM dead_letters ORDER BY failed_at").fetchall()


@pytest.fixture
def db(service_env: dict[str, str]) -> Iterator[Db]:
    d = Db(service_env["DATABASE_URL"])
    yield d
    d.conn.close()


def received(sink: Any) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(raw, policy=policy.default) for raw in sink.messages()]  # type: ignore[misc]


def received_for(sink: Any, booking_id: uuid.UUID) -> list[email.message.EmailMessage]:
    return [m for m in received(sink) if str(booking_id) in str(m["Message-ID"])]
