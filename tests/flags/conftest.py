"""Fixtures for the flag tests: a clean flag environment, and one real Unleash per session."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.servers import PostgresServer
from harness.unleash import UnleashServer
from service import flags
from service.config import reset_settings
from service.flags import client as flag_client

BASE_ENV = {
    "DATABASE_URL": "postgresql://flags@127.0.0.1:1/unused",
    "BROKER_URL": "redis://127.0.0.1:1/0",
    "SMTP_URL": "smtp://127.0.0.1:1",
    "EMAIL_FROM": "Bookings <bookings@example.test>",
}
FLAG_VARS = (
    "UNLEASH_URL",
    "UNLEASH_API_TOKEN",
    "UNLEASH_REFRESH_INTERVAL_SECONDS",
    "UNLEASH_REQUEST_TIMEOUT_SECONDS",
    "FEATURE_EMAIL_QUEUE_ENABLED",
    "FEATURE_POLICY_REQUOTE_ENABLED",
)


THREAD_JOIN_TIMEOUT = 15.0


@pytest.fixture(autouse=True)
def no_thread_outlives_the_test() -> Iterator[None]:
    """Every thread a flag test starts has ended when it finishes.

    A thread that goes on (an Unleash client's start-up or polling) logs into whatever stream
    the next test captures, or into a closed one ("I/O operation on closed file").
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
    flags.shutdown()
    alive = flag_client.join_stopped(THREAD_JOIN_TIMEOUT)
    started = [t for t in threading.enumerate() if t not in before]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sorted({*alive, *(t.name for t in started if t.is_alive())})
    assert not left, f"threads still running {THREAD_JOIN_TIMEOUT:.0f} s after the test: {left}"


@pytest.fixture
def flag_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Settings for flag tests: no Unleash, a private cache dir; the client is reset around."""
    flags.shutdown()
    env = {**BASE_ENV, "FLAG_CACHE_DIR": str(tmp_path / "flag-cache")}
    for key in FLAG_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    yield env
    flags.shutdown()
    reset_settings()


@pytest.fixture(scope="session")
def unleash_server(pg_server: PostgresServer) -> Iterator[UnleashServer]:
    """One real Unleash for the session; failing to install or start it fails the tests."""
    try:
        server = UnleashServer.start_new(pg_server)
    except Exception as error:
        pytest.fail(f"could not install or start the Unleash test server: {error}", pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def unleash_env(
    flag_env: dict[str, str], unleash_server: UnleashServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """``flag_env`` pointed at the real Unleash, polling every second."""
    unleash_server.ensure_running()
    env = {
        **flag_env,
        "UNLEASH_URL": unleash_server.url,
        "UNLEASH_API_TOKEN": unleash_server.client_token,
        "UNLEASH_REFRESH_INTERVAL_SECONDS": "1",
        "UNLEASH_REQUEST_TIMEOUT_SECONDS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return env
