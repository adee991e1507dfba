"""A taken metrics port is handled the same way in every process: one JSON error line naming the
address, then the process carries on without ``/metrics``; METRICS_BIND_ADDRESS chooses where."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.servers import SmtpSink, free_port, wait_for
from harness.workers import WorkerGroup, start_service
from tests.support.emails import Db, eventually, received_for

pytestmark = pytest.mark.slow


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield int(holder.getsockname()[1])


def _unavailable_lines(text: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [line for line in lines if "metrics port unavailable" in str(line.get("event"))]


def test_the_relay_carries_on_without_metrics_when_its_port_is_taken(
    service_env: dict[str, str], taken_port: int, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "METRICS_PORT": str(taken_port),
        "METRICS_BIND_ADDRESS": "127.0.0.1",
        "HEALTH_FILE": str(tmp_path / "health"),
    }
    relay = start_service(env, "outbox", "relay")
    try:
        wait_for(lambda: list(tmp_path.glob("health.*.json")), 30, "the relay's heartbeat")
        assert relay.poll() is None, "the relay must keep running"
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    stderr = relay.stderr.read() if relay.stderr else ""
    (line,) = _unavailable_lines(stderr)
    assert line["port"] == taken_port and line["address"] == "127.0.0.1"
    assert "Traceback" not in stderr


def test_workers_deliver_when_the_metrics_port_is_taken(
    app: object,
    smtp_sink: SmtpSink,
    service_env: dict[str, str],
    taken_port: int,
    tmp_path: Path,
) -> None:
    from service.actors.emails import send_booking_email

    db = Db(service_env["DATABASE_URL"])
    log = tmp_path / "worker.log"
    env = {**os.environ, "METRICS_PORT": str(taken_port), "METRICS_BIND_ADDRESS": "127.0.0.1"}
    group = WorkerGroup(env, processes=1, threads=2, log_path=log).start()
    try:
        booking = db.booking(status="pending")
        send_booking_email.send(str(booking), "request_received")
        eventually(lambda: received_for(smtp_sink, booking), timeout=30)
        eventually(lambda: _unavailable_lines(log.read_text()), timeout=10)
        assert group.proc is not None and group.proc.poll() is None
    finally:
        group.stop()


def test_metrics_listen_on_the_configured_address(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "METRICS_PORT": str(port),
        "METRICS_BIND_ADDRESS": "127.0.0.2",
        "HEALTH_FILE": str(tmp_path / "health"),
    }
    relay = start_service(env, "outbox", "relay", stderr=subprocess.DEVNULL)
    try:

        def scrape(host: str) -> bool:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=1) as resp:
                return resp.status == 200

        wait_for(lambda: scrape("127.0.0.2"), 30, "metrics on 127.0.0.2")
        with pytest.raises(OSError):
            scrape("127.0.0.1")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)
