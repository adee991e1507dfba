"""Unit tests use no server: asking for one fails the test instead of starting it."""

from __future__ import annotations

import pytest


def _no_server(name: str) -> None:
    pytest.fail(f"a unit test asked for {name}; put it under tests/integration", pytrace=False)


@pytest.fixture
def pg_server() -> None:
    _no_server("Postgres")


@pytest.fixture
def redis_server() -> None:
    _no_server("Redis")


@pytest.fixture
def smtp_sink() -> None:
    _no_server("an SMTP server")


@pytest.fixture
def unleash_server() -> None:
    _no_server("Unleash")
