"""``make demo`` when Unleash cannot be installed: loud locally, a failure under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import unleash
from harness.servers import PostgresServer
from scripts import demo
from tests.tooling.conftest import REPO, env_without_analytics_settings


def test_under_ci_the_demo_fails_when_unleash_cannot_start(fake_npm: Path, tmp_path: Path) -> None:
    env = env_without_analytics_settings(
        CI="true",
        PATH=f"{fake_npm}{os.pathsep}{os.environ['PATH']}",
        UNLEASH_TEST_CACHE_DIR=str(tmp_path / "unleash-cache"),
    )
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--bookings", "2", "--processes", "1"],
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
