"""The same delivery path on RabbitMQ: publisher confirms, worker processes, a kill -9."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from harness.servers import RabbitServer, RabbitUnavailable, SmtpSink, port_open, wait_for
from harness.workers import ROOT, WorkerGroup
from tests.support.emails import Db, eventually, received_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitServer]:
    """A private node; failing to start one fails the tests (no broker is borrowed)."""
    server = RabbitServer.start_new()
    yield server
    server.stop()


def cluster_name(url: str) -> str:
    conn = pika.BlockingConnection(pika.URLParameters(url + "?connection_attempts=1"))
    try:
        name = (conn._impl.server_properties or {}).get("cluster_name", b"")
    finally:
        conn.close()
    return name.decode() if isinstance(name, bytes) else str(name)


def test_the_node_is_private_and_leaves_nothing_behind() -> None:
    system_broker_up = port_open(5672)
    server = RabbitServer.start_new()
    try:
        assert 5672 not in (server.port, server.dist_port, server.epmd_port)
        assert cluster_name(server.url) == server.cluster_name
        assert server.proc is not None and server.epmd is not None
        pids = [server.proc.pid, server.epmd.pid]
    finally:
        server.stop()
    assert not port_open(server.port) and not port_open(server.epmd_port)
    assert not server.root.exists()

    def group_gone(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for pid in pids:
        wait_for(lambda pid=pid: group_gone(pid), 10, f"process group {pid} to end")
    assert port_open(5672) is system_broker_up, "the machine's own broker was touched"


def test_a_node_that_cannot_start_fails_loudly_instead_of_borrowing_one() -> None:
    bindir = Path(tempfile.mkdtemp(prefix="booking-fake-rabbit-"))
    bindir.chmod(0o755)  # the node runs as the rabbitmq user when the tests run as root
    broken = bindir / "rabbitmq-server"
    broken.write_text("#!/bin/sh\necho 'boot failed: no disk' >&2\nexit 1\n")
    broken.chmod(0o755)
    started = time.monotonic()
    try:
        with pytest.raises(RabbitUnavailable) as failure:
            RabbitServer.start_new(timeout=30, binary=str(broken))
    finally:
        shutil.rmtree(bindir)
    message = str(failure.value)
    assert "could not start a private RabbitMQ node" in message
    assert "never used instead" in message
    assert "boot failed: no disk" in message
    assert time.monotonic() - started < 20, "a node that exited is noticed at once"


def test_delivery_and_kill_9_on_rabbitmq(
    rabbit: RabbitServer, db: Db, service_env: dict[str, str], tmp_path: Path
) -> None:
    sink = SmtpSink.start_new(delay=0.3)
    env = {**os.environ, "BROKER_URL": rabbit.url, "SMTP_URL": sink.url, "LOG_LEVEL": "WARNING"}
    bookings = [db.booking(status="pending") for _ in range(20)]
    code = (
        "import sys; from service.actors.emails import send_booking_email\n"
        "for b in sys.argv[1:]: send_booking_email.send(b, 'request_received')\n"
        "send_booking_email.broker.close()\n"
    )
    produced = subprocess.run(
        [sys.executable, "-c", code, *map(str, bookings)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert produced.returncode == 0, produced.stderr
    group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log").start()
    try:
        eventually(lambda: len(sink.messages()) >= 3, timeout=60)
        killed_at = time.monotonic()
        group.kill_child()
        group.wait_exit(60)
        group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log").start()
        eventually(lambda: len(sink.messages()) >= len(bookings), timeout=90)
        print(
            f"\nall {len(bookings)} delivered {time.monotonic() - killed_at:.1f}s after kill -9 on RabbitMQ"
        )
        time.sleep(1.0)
        counts: list[Any] = [len(received_for(sink, b)) for b in bookings]
        assert counts == [1] * len(bookings), counts
    finally:
        group.stop()
        sink.destroy()
