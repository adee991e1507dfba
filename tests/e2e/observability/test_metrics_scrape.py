"""Scrape a worker pod's single metrics port while real worker processes drain a backlog."""

from __future__ import annotations

import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import SmtpSink, free_port
from harness.workers import WorkerGroup
from tests.support.emails import QUEUE, Db, eventually

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            samples[(s.name, labels)] = samples.get((s.name, labels), 0.0) + s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def slow_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink.start_new(delay=0.1)
    yield sink
    sink.destroy()


@pytest.mark.slow
def test_scrape_shows_backlog_then_outcomes_across_worker_processes(
    broker: Any, db: Db, slow_sink: SmtpSink, service_env: dict[str, str], tmp_path: Path
) -> None:
    from service.actors.emails import send_booking_email

    total_ok, rejected, tempfail = 150, 3, 2
    ok = [db.booking(status="confirmed") for _ in range(total_ok)]
    bad = [
        db.booking(status="confirmed", guest_email=f"r{i}+reject@guests.example")
        for i in range(rejected)
    ]
    flaky = [
        db.booking(status="confirmed", guest_email=f"t{i}+tempfail@guests.example")
        for i in range(tempfail)
    ]
    for b in [*ok, *bad, *flaky]:
        send_booking_email.send(str(b), "confirmed")
    db.conn.execute(
        "INSERT INTO outbox_events (id, event_type, dedupe_key, payload, created_at)"
        " VALUES (%s, 'policy_drift.escalated', %s, '{}', now() - interval '90 seconds')",
        (uuid.uuid4(), uuid.uuid4().hex),
    )
    time.sleep(1.1)  # the oldest message is now at least a second old
    port = free_port()
    env = {
        **os.environ,
        "SMTP_URL": slow_sink.url,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "METRICS_PORT": str(port),
        "HEALTH_FILE": str(tmp_path / "health" / "heartbeat"),
        "HEALTH_MAX_AGE_SECONDS": "5",
        "LOG_LEVEL": "WARNING",
    }
    (tmp_path / "prom").mkdir()
    group = WorkerGroup(env, processes=2, threads=2, log_path=tmp_path / "worker.log").start()
    try:
        text_during, during = eventually(
            lambda: (
                (r := _try_scrape(port))
                and value(r[1], "booking_queue_depth", queue=QUEUE, state="in_flight")
                and r
            ),
            timeout=30,
            interval=0.2,
        )
        delivered = slow_sink.count()
        ready = value(during, "booking_queue_depth", queue=QUEUE, state="ready")
        in_flight = value(during, "booking_queue_depth", queue=QUEUE, state="in_flight")
        assert ready is not None and in_flight is not None
        enqueued = total_ok + rejected + tempfail
        assert ready > 0 and in_flight > 0
        assert enqueued - delivered - 10 <= ready + in_flight <= enqueued
        assert (value(during, "booking_queue_oldest_message_age_seconds", queue=QUEUE) or 0) >= 1.0
        assert value(during, "booking_outbox_pending") == 1
        assert (value(during, "booking_outbox_oldest_age_seconds") or 0) >= 90
        stamps = [
            float(line.rsplit(" ", 1)[1])
            for line in text_during.splitlines()
            if line.startswith("booking_worker_last_heartbeat_timestamp_seconds{")
        ]
        assert len(stamps) == 2 and all(abs(s - time.time()) < 10 for s in stamps)

        eventually(lambda: len(db.dead_letters()) == rejected + tempfail, timeout=60, interval=0.5)
        eventually(lambda: slow_sink.count() >= total_ok, timeout=60, interval=0.5)
        text, after = eventually(
            lambda: (
                (r := scrape(port))
                and value(r[1], "booking_queue_depth", queue=QUEUE, state="dead") == 5
                and r
            ),
            timeout=10,
        )
    finally:
        group.stop()

    def emails(outcome: str) -> float | None:
        return value(after, "booking_emails_total", type="confirmed", outcome=outcome)

    assert emails("sent") == total_ok
    assert emails("dead") == rejected + tempfail
    assert emails("retried") == tempfail * 4
    assert emails("failed") == rejected + tempfail, "attempts that are not retried"
    attempts = total_ok + rejected + tempfail * 5
    assert emails("sent") + emails("retried") + emails("failed") == attempts, "each attempt once"
    actor = {"queue_name": QUEUE, "actor_name": "send_booking_email"}
    assert value(after, "dramatiq_messages_total", **actor) == attempts
    assert value(after, "booking_email_send_seconds_count", type="confirmed") == attempts
    assert (
        value(after, "booking_dead_letters_recorded_total", queue=QUEUE, reason="permanent_failure")
        == rejected
    )
    for state, expected in (("ready", 0), ("in_flight", 0), ("delayed", 0), ("dead", 5)):
        assert value(after, "booking_queue_depth", queue=QUEUE, state=state) == expected, state
    assert value(after, "booking_queue_oldest_message_age_seconds", queue=QUEUE) == 0
    assert value(after, "booking_holds_invalid_active") == 0
    for collector in ("queues", "outbox", "holds", "heartbeats"):
        assert value(after, "booking_collector_up", collector=collector) == 1, collector
    print(
        "\n"
        + "\n".join(
            line
            for line in text.splitlines()
            if line.startswith(
                ("booking_queue", "booking_emails_total", "booking_collector_up", "booking_worker")
            )
        )
    )


def _try_scrape(port: int) -> tuple[str, Samples] | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_a_failing_or_slow_collector_is_reported_not_fatal() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    from service.observability.collectors import ScrapeCollector

    class Fine:
        name = "fine"

        def collect(self) -> list[Any]:
            return [GaugeMetricFamily("booking_fine", "ok", 1)]

    class Broken:
        name = "broken"

        def collect(self) -> list[Any]:
            raise ConnectionError("backend down")

    class Slow:
        name = "slow"

        def collect(self) -> list[Any]:
            time.sleep(2)
            return []

    registry = CollectorRegistry()
    registry.register(ScrapeCollector([Fine(), Broken(), Slow()], deadline=0.5))
    started = time.monotonic()
    text = generate_latest(registry).decode()
    assert time.monotonic() - started < 1.5
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("booking_fine", ())] == 1
    assert samples[("booking_collector_up", (("collector", "broken"),))] == 0
    assert samples[("booking_collector_up", (("collector", "slow"),))] == 0
    assert samples[("booking_collector_up", (("collector", "fine"),))] == 1
    assert samples[("booking_collector_errors_total", (("collector", "broken"),))] == 1


def test_relay_style_serve_metrics_exports_heartbeat_and_outbox(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app import App
    from service.observability import serve_metrics
    from service.observability.heartbeat import Heartbeat

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    app = App.for_cli(
        {
            **service_env,
            "HEALTH_FILE": str(tmp_path / "heartbeat"),
            "METRICS_BIND_ADDRESS": "127.0.0.1",
        }
    )
    beat = Heartbeat(tmp_path / "heartbeat", role="relay", interval=0.5).start()
    server = serve_metrics(app.settings, app.scrape_sources(queues=False), port=0)
    assert server is not None
    try:
        _, samples = scrape(server.server_address[1])
    finally:
        server.shutdown()
        beat.stop()
    assert value(samples, "booking_outbox_pending") == 0
    stamp = value(samples, "booking_relay_last_heartbeat_timestamp_seconds")
    assert stamp is not None and abs(stamp - time.time()) < 5
    assert not any(k[0] == "booking_queue_depth" for k in samples)
    assert not list(tmp_path.glob("heartbeat.*.json"))  # a clean stop removes the record
