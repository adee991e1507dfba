"""The long-running outbox relay serves metrics and passes the liveness probe the chart uses."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import pytest

from harness.servers import free_port, wait_for
from harness.workers import service_command, start_service

pytestmark = pytest.mark.slow


def test_relay_exposes_metrics_and_heartbeat(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "METRICS_PORT": str(port), "HEALTH_FILE": str(tmp_path / "health")}
    relay = start_service(env, "outbox", "relay")
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
        probe = service_command(env, "health", "--liveness")
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    dead = service_command(env, "health", "--liveness")
    assert dead.returncode != 0  # the relay is gone: the probe must say so
