"""Fixtures for the flag tests: a clean flag environment, and one real Unleash per session."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from harness.servers import PostgresServer
from harness.unleash import UnleashServer
from service.config import load_settings
from service.flags import Flags

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


class FlagsMade:
    """Every ``Flags`` a test builds (or hands over), stopped and waited for when it ends."""

    def __init__(self) -> None:
        self._made: list[Flags] = []

    def __call__(self, env: Mapping[str, str], **changes: str) -> Flags:
        """The flags of a process whose environment is ``env`` changed by ``changes``."""
        return self.track(Flags(load_settings({**env, **changes})))

    def track(self, made: Flags) -> Flags:
        self._made.append(made)
        return made

    def stop_all(self, timeout: float) -> list[str]:
        """Stop every client; the names of their threads still alive after ``timeout``."""
        deadline = time.monotonic() + timeout
        for made in self._made:
            made.stop()
        alive: list[str] = []
        for made in self._made:
            alive += made.holder.join_stopped(max(0.0, deadline - time.monotonic()))
        return alive


@pytest.fixture
def no_thread_outlives_the_test() -> Iterator[FlagsMade]:
    """Every thread a flag test starts has ended when it finishes.

    A thread that goes on (an Unleash client's start-up or polling) logs into whatever stream
    the next test captures, or into a closed one ("I/O operation on closed file").
    """
    before = set(threading.enumerate())
    made = FlagsMade()
    yield made
    deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
    alive = made.stop_all(THREAD_JOIN_TIMEOUT)
    started = [t for t in threading.enumerate() if t not in before]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sorted({*alive, *(t.name for t in started if t.is_alive())})
    assert not left, f"threads still running {THREAD_JOIN_TIMEOUT:.0f} s after the test: {left}"


@pytest.fixture
def make_flags(no_thread_outlives_the_test: FlagsMade) -> FlagsMade:
    """Build a process's ``Flags`` from an environment dict; stopped when the test ends."""
    return no_thread_outlives_the_test


@pytest.fixture
def flag_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Settings for flag tests: no Unleash, a private cache dir (also in the environment, for
    the processes a test starts)."""
    env = {**BASE_ENV, "FLAG_CACHE_DIR": str(tmp_path / "flag-cache")}
    for key in FLAG_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


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
    return env
