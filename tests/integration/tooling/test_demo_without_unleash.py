"""``make demo`` when Unleash cannot be installed: loud locally, a failure under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.rows import dict_row

from harness import unleash
from harness.factories import insert_venue
from harness.servers import PostgresServer, SmtpSink
from scripts import demo
from tests.support.tooling import REPO, env_without_analytics_settings


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "scripts.demo", "--bookings", "4", "--processes", "1"],
        ["-m", "service", "demo", "--bookings", "4", "--processes", "1"],
    ],
    ids=["make-demo", "service-demo"],
)
def test_under_ci_the_demo_fails_when_unleash_cannot_start(
    command: list[str], fake_npm: Path, tmp_path: Path
) -> None:
    env = env_without_analytics_settings(
        CI="true",
        PATH=f"{fake_npm}{os.pathsep}{os.environ['PATH']}",
        UNLEASH_TEST_CACHE_DIR=str(tmp_path / "unleash-cache"),
    )
    done = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "CI=true: the demo fails" in done.stderr
    assert "ECONNREFUSED (fake npm for a test)" in done.stderr
    assert "starting" in done.stdout and "worker processes" not in done.stdout


def test_outside_ci_the_demo_says_loudly_what_it_does_not_show(
    fake_npm: Path,
    tmp_path: Path,
    pg_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PATH", f"{fake_npm}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(unleash, "CACHE_ROOT", tmp_path / "unleash-cache")
    server, why_not = demo.start_unleash(pg_server)
    assert server is None and why_not is not None
    assert why_not.startswith("UnleashInstallError: `") and "npm install" in why_not
    err = capsys.readouterr().err
    assert "the demo goes on WITHOUT it" in err
    assert "ECONNREFUSED (fake npm for a test)" in err
    assert err.count("!" * 78) == 2


def test_without_unleash_the_switch_sends_at_once_and_leaves_the_environment_alone(
    fake_npm: Path,
    tmp_path: Path,
    pg_server: PostgresServer,
    smtp_sink: SmtpSink,
    service_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fallback turns FEATURE_EMAIL_QUEUE_ENABLED off in an App of its own: neither
    os.environ nor the demo's settings are changed."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PATH", f"{fake_npm}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(unleash, "CACHE_ROOT", tmp_path / "unleash-cache")
    environ_before, settings_before = dict(os.environ), dict(service_env)
    skipped: list[str] = []
    with psycopg.connect(
        service_env["DATABASE_URL"], autocommit=True, row_factory=dict_row
    ) as conn:
        venue = insert_venue(conn)
        shown = demo.flag_kill_switch(pg_server, smtp_sink, conn, venue, service_env, skipped)
    assert [kind for _, kind in shown] == ["confirmed"]
    assert smtp_sink.count() == 1
    queued = redis.Redis.from_url(service_env["BROKER_URL"]).llen("dramatiq:pending-booking-emails")
    assert queued == 0
    assert len(skipped) == 1 and skipped[0].startswith("Unleash flag flip")
    assert dict(os.environ) == environ_before
    assert service_env == settings_before
