"""The long-running outbox relay serves metrics and passes the liveness probe the chart uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness.servers import free_port, wait_for
from harness.workers import ROOT

pytestmark = pytest.mark.slow


def test_relay_exposes_metrics_and_heartbeat(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "METRICS_PORT": str(port), "HEALTH_FILE": str(tmp_path / "health")}
    relay = subprocess.Popen(
        [sys.executable, "-m", "service", "outbox", "relay"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                return str(resp.read().decode())

        wait_for(
            lambda: "booking_relay_last_heartbeat_timestamp_seconds" in scrape(),
            30,
            "relay metrics",
        )
        assert "booking_outbox_pending" in scrape()
        probe = subprocess.run(
            [sys.executable, "-m", "service", "health", "--liveness"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    dead = subprocess.run(
        [sys.executable, "-m", "service", "health", "--liveness"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode != 0  # the relay is gone: the probe must say so
