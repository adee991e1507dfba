"""Helpers for the tests of the newcomer path: Makefile, installers, demo, lock file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_ANALYTICS = ("SCARF_ANALYTICS", "DO_NOT_TRACK")


@pytest.fixture
def fake_npm(tmp_path: Path) -> Path:
    """A directory holding an ``npm`` that records its environment and fails like a dead registry.

    Put it first on PATH; ``env.txt`` beside it then holds what npm saw.
    """
    bindir = tmp_path / "fake-npm-bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(
        '#!/bin/sh\nenv > "$(dirname "$0")/env.txt"\n'
        'echo "npm error code ECONNREFUSED (fake npm for a test)" >&2\nexit 1\n'
    )
    npm.chmod(0o755)
    return bindir


def env_without_analytics_settings(**extra: str) -> dict[str, str]:
    """This process's environment without the variables under test, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NO_ANALYTICS and k != "CI"}
    env.update(extra)
    return env


def recorded_env(bindir: Path) -> dict[str, str]:
    lines = (bindir / "env.txt").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)
