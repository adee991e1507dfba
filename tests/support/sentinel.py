"""A Redis Sentinel deployment (primary, two replicas, three Sentinels) per test module, and the
service environment pointing ``BROKER_URL`` at it (``redis+sentinel://``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.sentinel import SentinelDeployment
from harness.servers import SmtpSink


@pytest.fixture(scope="module")
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    deployment = SentinelDeployment.start_new()
    yield deployment
    deployment.destroy()


@pytest.fixture
def sentinel_env(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    sentinel_deployment: SentinelDeployment,
    smtp_sink: SmtpSink,
) -> Iterator[dict[str, str]]:
    """The test's service environment with the broker behind Sentinel (also in os.environ, for
    worker processes a test starts)."""
    sentinel_deployment.client().flushall()
    smtp_sink.clear()
    env = {
        "DATABASE_URL": database_url,
        "BROKER_URL": sentinel_deployment.url,
        "SMTP_URL": smtp_sink.url,
        "EMAIL_FROM": "Bookings <bookings@example.test>",
        "EMAIL_MIN_BACKOFF_MS": "100",
        "EMAIL_MAX_BACKOFF_MS": "400",
        "FLAG_CACHE_DIR": os.path.join(str(smtp_sink.root), "flags"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
