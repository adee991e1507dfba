"""Unit tests: the retry policy the broker is built with, the backoff schedule, settings errors."""

from __future__ import annotations

import logging

import pytest

from service.broker import DurableRetries, build_middleware
from service.config import SERVICE, ConfigError, load_settings
from service.resilience import backoff_ms

BASE = {
    "DATABASE_URL": "postgresql://u@h/d",
    "BROKER_URL": "redis://h:1/0",
    "SMTP_URL": "smtp://h:25",
    "EMAIL_FROM": "a@example.test",
}


def test_broker_retries_five_attempts_with_backoff_from_60s() -> None:
    retries = [m for m in build_middleware(load_settings(BASE)) if isinstance(m, DurableRetries)]
    assert len(retries) == 1
    assert retries[0].max_retries == 4  # 5 attempts in total
    assert retries[0].min_backoff == 60_000
    assert retries[0].max_backoff == 3_600_000


def test_backoff_doubles_from_the_minimum_and_is_capped() -> None:
    delays = [backoff_ms(n, 60_000, 3_600_000) for n in range(1, 10)]
    assert delays[:4] == [60_000, 120_000, 240_000, 480_000]
    assert max(delays) == 3_600_000


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "DATABASE_URL: is required"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL: must start with"),
        ({"BROKER_URL": "kafka://x"}, "BROKER_URL: must start with"),
        ({"SMTP_URL": "http://mail"}, "SMTP_URL: must start with"),
        ({"EMAIL_MAX_RETRIES": "-1"}, "EMAIL_MAX_RETRIES"),
    ],
)
def test_bad_configuration_names_the_variable(env: dict[str, str], fragment: str) -> None:
    base = dict(BASE)
    if not env:
        base.pop("DATABASE_URL")
    with pytest.raises(ConfigError) as raised:
        load_settings({**base, **env}).require(*SERVICE)
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
