"""Real servers for integration and end-to-end tests: Postgres, Redis and an SMTP sink, each on a
free loopback port (started only when a test asks), the test's service environment and its App."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from harness.servers import PostgresServer, RedisServer, SmtpSink
from service.app import App
from service.db import migrate
from tests.support.current_app import running_app


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start_new()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start_new()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink.start_new()
    yield sink
    sink.destroy()


MIGRATED_TEMPLATE = "migrated_template"


@pytest.fixture(scope="session")
def migrated_template(pg_server: PostgresServer) -> str:
    """One database migrated once per run; each test gets a copy of it."""
    migrate(pg_server.create_database(MIGRATED_TEMPLATE))
    return MIGRATED_TEMPLATE


@pytest.fixture
def database_url(pg_server: PostgresServer, migrated_template: str) -> str:
    """A fresh, migrated database for one test (a copy of the migrated template)."""
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}", template=migrated_template)


@pytest.fixture
def service_env(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    redis_server: RedisServer,
    smtp_sink: SmtpSink,
) -> Iterator[dict[str, str]]:
    """Point the service's settings at this test's servers, with short retry backoffs (in the
    environment too, for the worker processes a test starts)."""
    redis.Redis.from_url(redis_server.url).flushall()
    smtp_sink.clear()
    env = {
        "DATABASE_URL": database_url,
        "BROKER_URL": redis_server.url,
        "SMTP_URL": smtp_sink.url,
        "EMAIL_FROM": "Bookings <bookings@example.test>",
        "EMAIL_MIN_BACKOFF_MS": "100",
        "EMAIL_MAX_BACKOFF_MS": "400",
        "FLAG_CACHE_DIR": os.path.join(str(smtp_sink.root), "flags"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


@pytest.fixture
def app(service_env: dict[str, str]) -> Iterator[App]:
    """The service's composition root for this test, with every actor bound to its broker."""
    with running_app(service_env) as application:
        yield application
