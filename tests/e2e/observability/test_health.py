"""``python -m service health`` against real Dramatiq worker processes on real Redis/Postgres."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.servers import free_port
from harness.workers import WorkerGroup, service_command
from tests.support.emails import eventually

MODULE = "tests.e2e.observability.sleepy_actors:start"


@pytest.fixture
def env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    (tmp_path / "prom").mkdir()
    return {
        **os.environ,
        "HEALTH_FILE": str(tmp_path / "health" / "heartbeat"),
        "HEALTH_MAX_AGE_SECONDS": "5",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
    }


def health(env: dict[str, str], *flags: str) -> tuple[int, str]:
    done = service_command(env, "health", *flags)
    return done.returncode, (done.stdout + done.stderr).strip()


def passes(env: dict[str, str]) -> bool:
    return health(env, "--liveness")[0] == 0


def fails(env: dict[str, str]) -> str | None:
    code, out = health(env, "--liveness")
    return out if code != 0 else None


@pytest.fixture
def group(env: dict[str, str], tmp_path: Path) -> Iterator[WorkerGroup]:
    g = WorkerGroup(
        env, processes=2, threads=2, module=MODULE, log_path=tmp_path / "worker.log"
    ).start()
    try:
        yield g
    finally:
        for pid in g.children():
            os.kill(pid, signal.SIGCONT)
        g.stop(timeout=20)
        g.kill_all()


def send_naps(seconds: float, count: int, time_limit_ms: int | None = None) -> None:
    """Enqueue ``nap`` messages from a broker of our own (the global broker may carry stopped
    in-process workers from other tests, which would grab a newly declared queue)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    producer = RedisBroker(url=os.environ["BROKER_URL"], middleware=[])
    options: dict[str, Any] = {"time_limit": time_limit_ms} if time_limit_ms else {}
    try:
        for _ in range(count):
            producer.enqueue(
                dramatiq.Message(
                    queue_name="health-probe",
                    actor_name="nap",
                    args=(seconds,),
                    kwargs={},
                    options=options,
                )
            )
    finally:
        producer.close()


pytestmark = pytest.mark.slow


def test_no_worker_fails_then_an_idle_group_passes(env: dict[str, str], tmp_path: Path) -> None:
    code, out = health(env, "--liveness")
    assert code == 1 and out.startswith("fail: no live heartbeat")
    g = WorkerGroup(
        env, processes=2, threads=2, module=MODULE, log_path=tmp_path / "worker.log"
    ).start()
    try:
        eventually(lambda: passes(env), timeout=30, interval=0.5)
        code, out = health(env, "--liveness")
        assert code == 0 and out == "ok: 2 worker process(es) alive"
    finally:
        g.stop()
    assert fails(env)  # a stopped pod has no live heartbeat


def test_busy_workers_pass(env: dict[str, str], group: WorkerGroup) -> None:
    eventually(lambda: passes(env), timeout=30, interval=0.5)
    send_naps(3.0, 12)  # 4 threads fully busy for ~9 s, longer than HEALTH_MAX_AGE_SECONDS
    from service.observability.heartbeat import read_records

    def running() -> int:
        return sum(len(r.get("tasks", [])) for _, r in read_records(Path(env["HEALTH_FILE"])))

    eventually(lambda: running() == 4, timeout=10, interval=0.2)  # every thread is working
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        code, out = health(env, "--liveness")
        assert code == 0, out
        time.sleep(0.5)


def test_a_message_hung_past_its_time_limit_fails(env: dict[str, str], group: WorkerGroup) -> None:
    eventually(lambda: passes(env), timeout=30, interval=0.5)
    send_naps(60.0, 1, time_limit_ms=1000)
    # pickup + 1 s limit + HEALTH_MAX_AGE_SECONDS + a heartbeat period; slower on a loaded machine
    out = eventually(lambda: fails(env), timeout=45, interval=0.5)
    assert "nap running for" in out and "past its 1s limit" in out


def test_a_frozen_worker_process_fails(env: dict[str, str], group: WorkerGroup) -> None:
    eventually(lambda: passes(env), timeout=30, interval=0.5)
    victim = group.children()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        out = eventually(lambda: fails(env), timeout=20, interval=0.5)
    finally:
        os.kill(victim, signal.SIGCONT)
    assert "silent for" in out


def test_a_killed_worker_process_fails(env: dict[str, str], group: WorkerGroup) -> None:
    eventually(lambda: passes(env), timeout=30, interval=0.5)
    victim = group.kill_child()
    out = eventually(lambda: fails(env), timeout=10, interval=0.2)
    assert f"worker process {victim} exited" in out or "no live heartbeat" in out


def test_readiness_checks_the_broker_and_the_database(env: dict[str, str]) -> None:
    assert health(env, "--readiness") == (0, "ok: broker and database answer")
    down = {**env, "BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = time.monotonic()
    code, out = health(down, "--readiness")
    assert code == 1 and out.startswith("fail: broker unreachable")
    assert time.monotonic() - started < 10
