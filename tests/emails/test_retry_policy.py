"""Unit tests: the retry policy the broker is built with, and the nominal backoff schedule."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from service.config import Settings


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with every retry variable at its default (importing the broker module needs an env)."""
    from service.config import reset_settings

    for name in ("EMAIL_MAX_RETRIES", "EMAIL_MIN_BACKOFF_MS", "EMAIL_MAX_BACKOFF_MS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (
        ("DATABASE_URL", "postgresql://u@localhost/db"),
        ("BROKER_URL", "redis://localhost:1/0"),
        ("SMTP_URL", "smtp://localhost:25"),
        ("EMAIL_FROM", "a@example.test"),
    ):
        monkeypatch.setenv(name, value)
    reset_settings()
    yield Settings(
        database_url="postgresql://u@localhost/db",  # type: ignore[arg-type]
        broker_url="redis://localhost:6379/0",  # type: ignore[arg-type]
        smtp_url="smtp://localhost:25",  # type: ignore[arg-type]
        email_from="a@example.test",
    )
    reset_settings()


def test_broker_retries_five_attempts_with_backoff_from_60s(defaults: Settings) -> None:
    from service.broker import DurableRetries, build_middleware

    retries = [m for m in build_middleware(defaults) if isinstance(m, DurableRetries)]
    assert len(retries) == 1
    assert retries[0].max_retries == 4  # 5 attempts in total
    assert retries[0].min_backoff == 60_000
    assert retries[0].max_backoff == 3_600_000


def test_nominal_backoff_doubles_from_60s_and_is_capped(
    defaults: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.emails import pipeline

    monkeypatch.setattr(pipeline, "get_settings", lambda: defaults)
    delays = [pipeline.retry_delay(n) for n in range(1, 10)]
    assert delays[:4] == [timedelta(seconds=s) for s in (60, 120, 240, 480)]
    assert max(delays) == timedelta(hours=1)


@freeze_time("2026-11-24 10:00:00")
def test_next_attempt_time_follows_the_frozen_clock(
    defaults: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.emails import pipeline

    monkeypatch.setattr(pipeline, "get_settings", lambda: defaults)
    now = datetime.now(UTC)
    assert now + pipeline.retry_delay(2) == datetime(2026, 11, 24, 10, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "DATABASE_URL: is required"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL must start with"),
        ({"BROKER_URL": "kafka://x"}, "BROKER_URL must start with"),
        ({"SMTP_URL": "http://mail"}, "SMTP_URL must start with"),
        ({"EMAIL_MAX_RETRIES": "-1"}, "EMAIL_MAX_RETRIES"),
    ],
)
def test_bad_configuration_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    from service.config import ConfigError, load_settings

    base = {
        "DATABASE_URL": "postgresql://u@h/d",
        "BROKER_URL": "redis://h:1/0",
        "SMTP_URL": "smtp://h:25",
        "EMAIL_FROM": "a@example.test",
    }
    if not env:
        base.pop("DATABASE_URL")
    for key in ("DATABASE_URL", "BROKER_URL", "SMTP_URL", "EMAIL_FROM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert fragment in str(raised.value)
    assert "u@h" not in str(raised.value)  # the URL itself (it may hold a password) is not echoed


def test_json_logs_mask_guest_contact_and_secrets(caplog: pytest.LogCaptureFixture) -> None:
    from service.logs import JsonFormatter, get_logger

    log = get_logger("test.redaction")
    with caplog.at_level(logging.INFO, logger="test.redaction"):
        log.info(
            "sent to ada@guests.example",
            guest_email="ada@guests.example",
            guest_name="Ada",
            api_token="s3cret",
            error="550 <bob@guests.example> refused",
        )
    line = JsonFormatter().format(caplog.records[0])
    for leaked in ("ada@guests.example", "bob@guests.example", "s3cret", '"Ada"'):
        assert leaked not in line
    assert '"event": "sent to <email>"' in line
