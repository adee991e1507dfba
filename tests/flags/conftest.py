"""Fixtures for the flag tests: a clean flag environment, and one real Unleash per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service import flags
from service.config import reset_settings
from tests.harness.servers import PostgresServer
from tests.harness.unleash import UnleashServer

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
