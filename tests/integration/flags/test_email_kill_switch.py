"""The email kill-switch end to end: Unleash decides what ``send_booking_email.send`` does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from harness.factories import insert_booking, insert_venue
from harness.servers import RedisServer, SmtpSink, wait_for
from harness.unleash import UnleashServer
from service.app import App
from tests.support.current_app import running_app
from tests.support.flags import FlagsMade

pytestmark = [pytest.mark.unleash, pytest.mark.usefixtures("no_thread_outlives_the_test")]

EMAIL = "email-queue-enabled"
QUEUE_KEYS = ("dramatiq:pending-booking-emails", "dramatiq:pending-booking-emails.DQ.msgs")


@pytest.fixture
def kill_switch_app(
    service_env: dict[str, str], unleash_server: UnleashServer, make_flags: FlagsMade
) -> Iterator[App]:
    """The service's App for this test's servers and the real Unleash, actors bound."""
    unleash_server.ensure_running()
    env = {
        **service_env,
        "UNLEASH_URL": unleash_server.url,
        "UNLEASH_API_TOKEN": unleash_server.client_token,
        "UNLEASH_REFRESH_INTERVAL_SECONDS": "1",
    }
    try:
        with running_app(env) as app:
            make_flags.track(app.flags)
            yield app
    finally:
        unleash_server.ensure_toggle(EMAIL, True)


def queued(conn: redis.Redis) -> int:
    return int(conn.llen(QUEUE_KEYS[0])) + int(conn.hlen(QUEUE_KEYS[1]))


def test_kill_switch_moves_send_between_queue_and_immediate_delivery(
    kill_switch_app: App,
    service_env: dict[str, str],
    unleash_server: UnleashServer,
    redis_server: RedisServer,
    smtp_sink: SmtpSink,
) -> None:
    from service.actors.emails import send_booking_email

    flags = kill_switch_app.flags
    conn = redis.Redis.from_url(redis_server.url)
    db: psycopg.Connection[Any] = psycopg.connect(service_env["DATABASE_URL"], autocommit=True)
    venue = insert_venue(db)

    def send() -> str:
        booking = insert_booking(db, venue, status="pending")
        send_booking_email.send(str(booking), "request_received")
        return str(booking)

    def delivered(booking: str) -> int:
        return sum(booking in raw.decode(errors="replace") for raw in smtp_sink.messages())

    try:
        unleash_server.ensure_toggle(EMAIL, True)
        wait_for(flags.email_queue_enabled, 10, "kill-switch on")
        booking = send()
        assert queued(conn) == 1 and delivered(booking) == 0, "flag on: queued, not sent"

        unleash_server.set_enabled(EMAIL, False)
        wait_for(lambda: not flags.email_queue_enabled(), 10, "kill-switch off")
        booking = send()
        assert delivered(booking) == 1, "flag off: delivered during send()"
        assert queued(conn) == 1, "flag off: nothing more queued"

        unleash_server.set_enabled(EMAIL, True)
        wait_for(flags.email_queue_enabled, 10, "kill-switch back on")
        booking = send()
        assert queued(conn) == 2 and delivered(booking) == 0
    finally:
        db.close()
