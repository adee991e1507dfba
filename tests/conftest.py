"""Session-wide real servers: Postgres, Redis and an SMTP sink, each on a free loopback port."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.harness.servers import PostgresServer, RedisServer, SmtpSink


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A terminated run (SIGTERM, e.g. a CI timeout) still tears its servers down."""
    signal.signal(signal.SIGTERM, _interrupt)


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


@pytest.fixture
def database_url(pg_server: PostgresServer) -> str:
    """A fresh, migrated database for one test."""
    from service.db import migrate

    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    migrate(url)
    return url


@pytest.fixture
def service_env(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    redis_server: RedisServer,
    smtp_sink: SmtpSink,
) -> Iterator[dict[str, str]]:
    """Point the service's settings at this test's servers, with short retry backoffs."""
    import redis

    from service import db
    from service.config import reset_settings

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
    reset_settings()
    db.close_pool()
    yield env
    db.close_pool()
    reset_settings()
