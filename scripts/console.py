"""``make console`` (``python -m scripts.console``): the operator console on throwaway servers.

Starts Postgres, Redis and an SMTP sink on free loopback ports (the demo's pieces, from
``harness``), migrates, seeds bookings whose emails were sent, dead-lettered (a refused guest
address, then corrected, ready to replay) and still pending, runs one worker process and the
console, prints the URL and the sign-in tokens, and waits for Ctrl-C; then stops everything.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import psycopg

from harness.app import bound_app
from harness.console import ConsoleServer
from harness.factories import insert_booking, insert_venue
from harness.servers import PostgresServer, RedisServer, SmtpSink
from harness.workers import WorkerGroup
from service.actors import send_booking_email
from service.db import migrate
from service.emails.rules import EXPECTED_FOR_STATUS, BookingStatus
from service.logs import configure


def say(text: str) -> None:
    print(f"[console] {text}", flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"[console] gave up waiting for {what}")
        time.sleep(0.2)


def seed(database_url: str, count: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Bookings and the email each calls for: most will be sent, every fifth goes to a refused
    address (a dead letter)."""
    sent: list[tuple[str, str]] = []
    failing: list[tuple[str, str]] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        venue = insert_venue(conn, name="Demo Bistro")
        for i in range(count):
            status = ("confirmed", "pending", "cancelled")[i % 3]
            refused = i % 5 == 4
            address = f"guest{i}+reject@guests.example" if refused else f"guest{i}@guests.example"
            booking = insert_booking(
                conn,
                venue,
                status=status,
                guest_email=address,
                starts_at=datetime.now(UTC) + timedelta(days=1 + i % 10),
            )
            email_type = EXPECTED_FOR_STATUS[BookingStatus(status)].value
            (failing if refused else sent).append((str(booking), email_type))
        # Still due: bookings whose email nobody has sent yet (the reconciler's work).
        for _ in range(2):
            insert_booking(conn, venue, status="confirmed")
    return sent, failing


def run(port: int, bookings: int) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ExitStack() as stack:
        say("starting throwaway Postgres, Redis and an SMTP sink ...")
        pg = PostgresServer.start_new()
        stack.callback(pg.destroy)
        rd = RedisServer.start_new(appendonly=True)
        stack.callback(rd.destroy)
        sink = SmtpSink.start_new()
        stack.callback(sink.destroy)
        database_url = pg.create_database("booking_console")
        configure("ERROR", "console")
        say(f"migrated: {', '.join(migrate(database_url))}")
        operator, viewer = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "BROKER_URL": rd.url,
            "SMTP_URL": sink.url,
            "EMAIL_FROM": "Demo Bistro <bookings@demo.example>",
            "LOG_LEVEL": "WARNING",
            "FLAG_CACHE_DIR": tempfile.mkdtemp(prefix="booking-flags-"),
            "CONSOLE_AUTH": "token",
            "CONSOLE_OPERATOR_TOKEN": operator,
            "CONSOLE_VIEWER_TOKEN": viewer,
        }
        sent, failing = seed(database_url, bookings)
        workers = WorkerGroup(env, processes=1, threads=4).start()
        stack.callback(workers.stop)
        with bound_app(env):
            for booking, email_type in sent + failing:
                send_booking_email.send(booking, email_type)
        say(f"seeded {len(sent) + len(failing) + 2} bookings; sending their emails ...")
        wait_until(lambda: _dead_letters(database_url) >= len(failing), 60, "the dead letters")
        with psycopg.connect(database_url, autocommit=True) as conn:
            # The guests' addresses are corrected: replaying their dead letters now delivers.
            conn.execute(
                "UPDATE bookings SET guest_email = replace(guest_email, '+reject', '')"
                " WHERE guest_email LIKE '%%+reject@%%'"
            )
        console = ConsoleServer(env, port=port).start()
        stack.callback(console.stop)
        say(f"{len(failing)} dead letters to replay (their addresses are fixed now)")
        print(
            "\n"
            f"  Console:        {console.url}\n"
            f"  Operator token: {operator}\n"
            f"  Viewer token:   {viewer}\n"
            f"  A booking with a dead letter: {console.url}/bookings/{failing[0][0]}\n"
            f"  Emails received by the SMTP sink so far: {sink.count()}\n\n"
            "  Ctrl-C stops the console and every server.\n",
            flush=True,
        )
        try:
            while not stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass
        say("stopping ...")
    say("stopped everything")
    return 0


def _dead_letters(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="console port (default 8080)")
    parser.add_argument("--bookings", type=int, default=30, help="bookings to seed")
    args = parser.parse_args()
    raise SystemExit(run(args.port, args.bookings))


if __name__ == "__main__":
    main()
