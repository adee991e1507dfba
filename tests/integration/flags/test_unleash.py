"""The flag facade against a real Unleash server (and a hanging one)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.servers import RedisServer, free_port, wait_for
from harness.unleash import UnleashServer
from service.flags import Flags, Source
from service.flags import client as flag_client
from service.flags.middleware import FlagsMiddleware
from tests.support.flags import FlagsMade

pytestmark = [pytest.mark.unleash, pytest.mark.usefixtures("no_thread_outlives_the_test")]

REPO = Path(__file__).resolve().parents[3]
EMAIL = "email-queue-enabled"
REQUOTE = "policy-requote-enabled"


def time_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    wait_for(predicate, timeout, what, interval=0.01)
    return time.monotonic() - started


def ready_client(flags: Flags) -> flag_client.FlagClient:
    client = flags.holder.get()
    assert client is not None
    assert client.wait_ready(15), "the first fetch never completed"
    return client


def sources(flags: Flags) -> dict[str, Source]:
    rows, _ = flags.status()
    return {row.flag.name: row.source for row in rows}


def test_flipping_the_kill_switch_reaches_the_facade_within_the_refresh_interval(
    unleash_server: UnleashServer, unleash_env: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(unleash_env, FEATURE_EMAIL_QUEUE_ENABLED="false")
    unleash_server.ensure_toggle(EMAIL, True)
    ready_client(flags)
    wait_for(flags.email_queue_enabled, 10, "the toggle's on state (env default is off)")
    assert sources(flags)[EMAIL] == Source.UNLEASH

    unleash_server.set_enabled(EMAIL, False)
    off = time_until(lambda: not flags.email_queue_enabled(), 10, "flag off")
    unleash_server.set_enabled(EMAIL, True)
    on = time_until(flags.email_queue_enabled, 10, "flag on")
    print(f"\nflip-to-effect with a 1 s refresh interval: off {off:.2f} s, on {on:.2f} s")
    assert off < 4 and on < 4


def test_per_venue_rollout_through_a_context_constraint(
    unleash_server: UnleashServer, unleash_env: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(unleash_env)
    unleash_server.create_context_field("venueId")
    only_venue_a = {
        "name": "flexibleRollout",
        "parameters": {"rollout": "100", "stickiness": "venueId", "groupId": REQUOTE},
        "constraints": [{"contextName": "venueId", "operator": "IN", "values": ["venue-a"]}],
    }
    unleash_server.ensure_toggle(REQUOTE, True, strategy=only_venue_a)
    try:
        ready_client(flags)
        wait_for(lambda: not flags.policy_requote_enabled("venue-b"), 10, "venue-b off")
        assert flags.policy_requote_enabled("venue-a") is True
        assert flags.policy_requote_enabled() is False
    finally:
        unleash_server.ensure_toggle(REQUOTE, True)


def test_outage_keeps_last_values_also_for_a_new_process(
    unleash_server: UnleashServer, unleash_env: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(unleash_env)
    unleash_server.ensure_toggle(EMAIL, False)
    unleash_server.ensure_toggle(REQUOTE, False)
    ready_client(flags)
    wait_for(
        lambda: not flags.email_queue_enabled() and not flags.policy_requote_enabled(),
        10,
        "both flags off (env defaults are on)",
    )
    unleash_server.stop()
    try:
        time.sleep(2.5)
        assert flags.email_queue_enabled() is False
        assert flags.policy_requote_enabled() is False

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        probe = (
            "import time\n"
            "from service.app import App\n"
            "flags = App.for_producer().flags\n"
            "t = time.perf_counter()\n"
            "v = flags.email_queue_enabled()\n"
            "took = time.perf_counter() - t\n"
            "print('RESULT', v, flags.policy_requote_enabled(), round(took, 4))\n"
            "flags.stop()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True
        )
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert result, done.stdout[-2000:] + done.stderr[-2000:]
        _, email, requote, took = result[-1].split()
        print(f"\nnew process during the outage: first call {float(took) * 1000:.1f} ms")
        assert (email, requote) == ("False", "False"), done.stderr[-2000:]

        cli = subprocess.run(
            [sys.executable, "-m", "service", "flags", "--json", "--wait", "5"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr[-2000:]
        report = {row["name"]: row for row in json.loads(cli.stdout)["flags"]}
        assert report[EMAIL]["enabled"] is False and report[EMAIL]["source"] == "cache"
        assert report[REQUOTE]["enabled"] is False and report[REQUOTE]["source"] == "cache"
    finally:
        unleash_server.start()
        unleash_server.ensure_toggle(REQUOTE, True)


class HangingServer:
    """Accepts TCP connections on loopback and never answers them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hanging_unleash(flag_env: dict[str, str], make_flags: FlagsMade) -> Iterator[dict[str, str]]:
    """``flag_env`` pointed at a server that accepts connections and never answers."""
    server = HangingServer()
    yield {
        **flag_env,
        "UNLEASH_URL": server.url,
        "UNLEASH_API_TOKEN": "default:development.unused",
        "UNLEASH_REQUEST_TIMEOUT_SECONDS": "2",
    }
    make_flags.stop_all(0.0)
    server.close()


def test_a_hanging_unleash_never_slows_the_facade(
    hanging_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(hanging_unleash, FEATURE_EMAIL_QUEUE_ENABLED="false")
    started = time.perf_counter()
    first = flags.email_queue_enabled()
    first_latency = time.perf_counter() - started

    latencies = []
    for i in range(5000):
        started = time.perf_counter()
        value = flags.email_queue_enabled(f"venue-{i % 50}")
        latencies.append(time.perf_counter() - started)
        assert value is False
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99)]

    client = flags.holder.get()
    assert client is not None and not client.state().initialized, "the SDK is still hanging"
    started = time.perf_counter()
    flags.stop()
    shutdown_latency = time.perf_counter() - started
    print(
        f"\nhanging Unleash: first call {first_latency * 1000:.1f} ms, "
        f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us over {len(latencies)} calls, "
        f"shutdown {shutdown_latency * 1000:.1f} ms"
    )
    assert first is False, "the environment default while Unleash never answered"
    assert first_latency < 0.05
    assert p99 < 0.01
    assert shutdown_latency < 0.05


def test_worker_boot_does_not_wait_on_a_hanging_unleash(
    hanging_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    middleware = FlagsMiddleware(make_flags(hanging_unleash))
    started = time.perf_counter()
    middleware.after_process_boot(None)  # type: ignore[arg-type]
    middleware.after_worker_boot(None, None)  # type: ignore[arg-type]
    boot = time.perf_counter() - started
    started = time.perf_counter()
    middleware.before_worker_shutdown(None, None)  # type: ignore[arg-type]
    middleware.after_worker_shutdown(None, None)  # type: ignore[arg-type]
    stop = time.perf_counter() - started
    print(f"\nhanging Unleash: middleware boot {boot * 1000:.1f} ms, shutdown {stop * 1000:.1f} ms")
    assert boot < 0.05
    assert stop < middleware.shutdown_wait + 0.1


def test_every_worker_process_sees_a_flip(
    unleash_server: UnleashServer,
    unleash_env: dict[str, str],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    import dramatiq
    import redis as redis_lib
    from dramatiq.brokers.redis import RedisBroker

    queue = "flag-probe"
    unleash_server.ensure_toggle(EMAIL, True)
    conn = redis_lib.Redis.from_url(redis_server.url)
    for key in conn.scan_iter(f"dramatiq:{queue}*"):
        conn.delete(key)
    producer = RedisBroker(url=redis_server.url)
    producer.declare_queue(queue)

    def send(round_id: str) -> None:
        producer.enqueue(
            dramatiq.Message(
                queue_name=queue, actor_name="record_flag", args=(round_id,), kwargs={}, options={}
            )
        )

    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    env = {
        **os.environ,
        "BROKER_URL": redis_server.url,
        "FLAG_PROBE_DIR": str(probe_dir),
        "PYTHONPATH": str(REPO),
    }
    workers = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "tests.integration.flags.worker_app:start",
            "-p",
            "2",
            "-t",
            "1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def after_flip(expected: bool, flipped: float) -> dict[int, tuple[float, float]]:
            """Send messages until both processes report ``expected``.

            Returns, per process, (last evaluation still showing the old value, first showing
            the new one), in seconds after the flip: the flip took effect in between.
            """
            seen: dict[int, list[tuple[float, bool]]] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for _ in range(10):
                    send(uuid.uuid4().hex)
                time.sleep(0.25)
                for path in probe_dir.glob("*.json"):
                    line = json.loads(path.read_text())
                    path.unlink()
                    if line["at"] >= flipped:
                        seen.setdefault(line["pid"], []).append(
                            (line["at"] - flipped, line["value"])
                        )
                fresh = {pid: [t for t, v in obs if v is expected] for pid, obs in seen.items()}
                if sum(1 for times in fresh.values() if times) >= 2:
                    return {
                        pid: (
                            max((t for t, v in obs if v is not expected), default=0.0),
                            min(fresh[pid]),
                        )
                        for pid, obs in seen.items()
                    }
            raise AssertionError(f"processes {sorted(seen)} did not all report {expected}")

        boot = after_flip(True, time.time())
        assert len(boot) == 2

        flipped = time.time()
        unleash_server.set_enabled(EMAIL, False)
        off = after_flip(False, flipped)
        assert set(off) == set(boot), "the same two worker processes"

        flipped = time.time()
        unleash_server.set_enabled(EMAIL, True)
        on = after_flip(True, flipped)
        assert set(on) == set(boot)
        print("\nworker processes: the flip took effect between (last old value, first new value)")
        for pid in sorted(off):
            print(
                f"  pid {pid}: off in ({off[pid][0]:.2f} s, {off[pid][1]:.2f} s], "
                f"on in ({on[pid][0]:.2f} s, {on[pid][1]:.2f} s]"
            )
        for pid in off:
            assert off[pid][0] < 3 and on[pid][0] < 3, "a process kept the old value too long"
    finally:
        producer.close()
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait(10)
