"""Fixtures for the operator console: its environment, the web app over the test's App, a
signed-in HTTP client, and seeded bookings with sent, dead-lettered and pending emails."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from harness.factories import insert_booking, insert_venue
from service.app import App
from service.console.web import create_app
from tests.support.current_app import running_app

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


@pytest.fixture
def console_env(service_env: dict[str, str]) -> dict[str, str]:
    return {
        **service_env,
        "CONSOLE_AUTH": "token",
        "CONSOLE_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "CONSOLE_VIEWER_TOKEN": VIEWER_TOKEN,
        "CONSOLE_SESSION_SECRET": "session-secret-0123456789abcdef",
    }


@pytest.fixture
def console_app(console_env: dict[str, str]) -> Iterator[App]:
    with running_app(console_env) as application:
        yield application


def signed_in(client: TestClient, token: str) -> TestClient:
    page = client.get("/login")
    response = client.post(
        "/login", data={"token": token, "csrf_token": csrf_of(page.text)}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
def anonymous(console_app: App) -> Iterator[TestClient]:
    with TestClient(create_app(console_app), base_url="http://testserver") as client:
        yield client


@pytest.fixture
def operator(console_app: App) -> Iterator[TestClient]:
    with TestClient(create_app(console_app)) as client:
        yield signed_in(client, OPERATOR_TOKEN)


@pytest.fixture
def viewer(console_app: App) -> Iterator[TestClient]:
    with TestClient(create_app(console_app)) as client:
        yield signed_in(client, VIEWER_TOKEN)


@dataclass
class Seeded:
    venue: uuid.UUID
    sent: uuid.UUID
    dead: uuid.UUID
    pending: uuid.UUID
    dead_message_id: str
    dead_email: str


def seed_console_data(database_url: str) -> Seeded:
    """A sent email, a dead-lettered one (recorded as the recorder does) and one still due."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        venue = insert_venue(conn)
        sent = insert_booking(conn, venue, status="confirmed")
        dead = insert_booking(
            conn, venue, status="confirmed", guest_email="jane.doe@guests.example"
        )
        pending = insert_booking(conn, venue, status="pending")
        conn.execute(
            "INSERT INTO email_deliveries (booking_id, email_type, revision, state, attempts,"
            " message_id, sent_at) VALUES (%s, 'confirmed', 1, 'sent', 1, %s, now())",
            (sent, f"<booking-{sent}.confirmed@example.test>"),
        )
        conn.execute(
            "INSERT INTO email_deliveries (booking_id, email_type, revision, state, attempts,"
            " last_error) VALUES (%s, 'confirmed', 1, 'dead', 1, '550 mailbox unavailable')",
            (dead,),
        )
        message_id = str(uuid.uuid4())
        message: dict[str, Any] = {
            "queue_name": "pending-booking-emails",
            "actor_name": "send_booking_email",
            "args": [],
            "kwargs": {"booking_id": str(dead), "type": "confirmed"},
            "options": {"retries": 0},
            "message_id": message_id,
            "message_timestamp": 0,
        }
        conn.execute(
            "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, error,"
            " email_type) VALUES (%s, 'pending-booking-emails', 'send_booking_email', %s,"
            " 'permanent_failure', '550 mailbox unavailable', 'confirmed')",
            (message_id, psycopg.types.json.Jsonb(message)),
        )
    return Seeded(venue, sent, dead, pending, message_id, "jane.doe@guests.example")


@pytest.fixture
def seeded(console_app: App, console_env: dict[str, str]) -> Seeded:
    return seed_console_data(console_env["DATABASE_URL"])
