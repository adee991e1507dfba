"""Every process that serves traffic reports the flags it would use: an email-only worker pod
(whose actors never ask for ``policy-requote-enabled``) exports ``booking_flag_enabled`` for
every flag, so the kill-switch runbook's check ("the gauge drops to 0 on all processes") works
for the email Deployment too."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import free_port, wait_for
from harness.workers import WorkerGroup

pytestmark = pytest.mark.slow


def _flag_values(port: int) -> dict[str, set[float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, set[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "booking_flag_enabled":
                values.setdefault(sample.labels["flag"], set()).add(sample.value)
    return values


def test_an_email_only_worker_pod_reports_every_flag(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "METRICS_PORT": str(port),
        "METRICS_BIND_ADDRESS": "127.0.0.1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "FEATURE_EMAIL_QUEUE_ENABLED": "true",
        "FEATURE_POLICY_REQUOTE_ENABLED": "false",
    }
    (tmp_path / "prom").mkdir()
    group = WorkerGroup(
        env, processes=2, threads=1, queues=("pending-booking-emails",), log_path=tmp_path / "w.log"
    ).start()
    try:
        wait_for(lambda: len(_flag_values(port)) == 2, 30, "booking_flag_enabled for both flags")
        values = _flag_values(port)
    finally:
        group.stop()
    assert values == {"email-queue-enabled": {1.0}, "policy-requote-enabled": {0.0}}
