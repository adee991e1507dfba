"""Settings validation: every malformed value stops the process at start, naming the variable
and the problem in one line, never echoing a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.workers import service_command
from service.config import PRODUCER, SERVICE, ConfigError, load_settings
from service.smtp import Mailer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-secret"
BASE = {
    "DATABASE_URL": f"postgresql://svc:{SECRET}@db.internal:5432/booking",
    "BROKER_URL": f"redis://:{SECRET}@redis.internal:6379/0",
    "SMTP_URL": f"smtp://mailer:{SECRET}@smtp.internal:587?starttls=true",
    "EMAIL_FROM": "Bookings <bookings@example.com>",
}


def _error(**changes: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings({**BASE, **changes}).require(*SERVICE)
    return str(raised.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"DATABASE_URL": f"postgresql://svc:{SECRET}@db:54x2/b"},
            "DATABASE_URL: has an invalid port",
        ),
        (
            {"DATABASE_URL": f"postgresql://svc:{SECRET}@db:70000/b"},
            "DATABASE_URL: has an invalid port",
        ),
        ({"BROKER_URL": f"redis://:{SECRET}@redis:notaport/0"}, "BROKER_URL: has an invalid port"),
        (
            {"BROKER_URL": f"redis://:{SECRET}@redis:6379/zero"},
            "BROKER_URL: the Redis database index must be a number",
        ),
        ({"SMTP_URL": f"smtp://u:{SECRET}@smtp:0"}, "SMTP_URL: has an invalid port"),
        (
            {"SMTP_URL": f"smtp://u:{SECRET}@smtp:25?starttls=maybe"},
            "SMTP_URL: starttls must be true or false",
        ),
        (
            {"SMTP_URL": f"http://u:{SECRET}@smtp:25"},
            "SMTP_URL: must start with one of smtp://, smtps://",
        ),
        ({"DATABASE_URL": f"postgresql://svc:{SECRET}@:5432/b"}, "DATABASE_URL: has no host"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ({"SMTP_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_CA_FILE: no such file"),
        ({"EMAIL_FROM": "bookings at example"}, "EMAIL_FROM: must be an email address"),
        (
            {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/prom"},
            "PROMETHEUS_MULTIPROC_DIR: no such directory",
        ),
        ({"METRICS_PORT": "ninety"}, "METRICS_PORT:"),
        ({"EMAIL_MAX_RETRIES": "-1"}, "EMAIL_MAX_RETRIES:"),
    ],
)
def test_each_malformed_value_is_named_without_its_secret(
    changes: dict[str, str], expected: str
) -> None:
    message = _error(**changes)
    assert expected in message
    assert "\n" not in message
    assert SECRET not in message


def test_every_missing_variable_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"BROKER_URL": BASE["BROKER_URL"]}).require(*SERVICE)
    assert str(raised.value) == (
        "invalid configuration: DATABASE_URL: is required; SMTP_URL: is required; "
        "EMAIL_FROM: is required"
    )


def test_a_producer_needs_the_broker_and_the_database_but_not_smtp() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL: is required"):
        load_settings({"BROKER_URL": BASE["BROKER_URL"]}).require(*PRODUCER)
    settings = load_settings(
        {"BROKER_URL": BASE["BROKER_URL"], "DATABASE_URL": BASE["DATABASE_URL"]}
    ).require(*PRODUCER)
    assert settings.broker_kind == "redis"
    with pytest.raises(ConfigError, match="SMTP_URL: is required"):
        settings.secret("smtp_url")


def test_the_email_lease_outlasts_the_longest_smtp_conversation() -> None:
    """The mailer gives up on a conversation at its deadline; the lease must end later, with room
    to render, so no second worker claims an email that is still being sent."""
    for timeout in ("0.5", "5", "10", "30"):
        settings = load_settings({**BASE, "SMTP_TIMEOUT_SECONDS": timeout})
        mailer = Mailer.from_settings(settings)
        assert mailer.deadline == settings.smtp_conversation_seconds
        assert mailer.deadline >= 2 * float(timeout)  # a reconnect fits in it
        assert settings.email_lease_seconds > mailer.deadline + 1
    defaults = load_settings(BASE)
    # kill -9 recovery: the lease ends before Redis requeues (15 s heartbeat + 5 s maintenance)
    assert defaults.email_lease_seconds <= defaults.redis_heartbeat_timeout_ms / 1000


def test_the_pool_size_is_independent_of_threads() -> None:
    assert load_settings(BASE).db_pool_max_size == 4
    with pytest.raises(ConfigError, match="DB_POOL_TIMEOUT_SECONDS"):
        load_settings({**BASE, "DB_POOL_TIMEOUT_SECONDS": "0"})


def test_settings_come_only_from_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    assert load_settings(BASE).log_level == "INFO"
    assert load_settings({**BASE, "log_level": "debug"}).log_level == "DEBUG"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "BROKER_URL",
            f"redis://:{SECRET}@redis:6379/zero",
            "BROKER_URL: the Redis database index",
        ),
        ("SMTP_URL", f"smtp://u:{SECRET}@smtp:99999", "SMTP_URL: has an invalid port"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: must be one of"),
        ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/prom", "PROMETHEUS_MULTIPROC_DIR: no such"),
    ],
)
def test_a_process_stops_at_start_with_one_line(variable: str, value: str, expected: str) -> None:
    env = {"PATH": os.environ["PATH"], **BASE, variable: value}
    done = service_command(env, "worker", "--processes", "1", "--threads", "1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid configuration: ")
    assert expected in lines[0] and SECRET not in done.stderr + done.stdout
