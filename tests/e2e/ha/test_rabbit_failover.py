"""The short RabbitMQ failover run: a 3-node cluster with quorum queues, nothing lost.

Runs ``python -m bench.failover_rabbit --short`` in its own process (its own Postgres, SMTP
server and cluster): 250 bookings; ``kill -9`` of the node leading the email queue and its
restart, then that queue's leader cut off from the other two nodes for 30 s; a worker process
killed with ``kill -9`` during each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("failover-rabbit")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failover_rabbit", "--short", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    if not (out / "failover_rabbit.json").exists():
        pytest.fail(
            f"the failover run produced no result:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    print((out / "failover_rabbit.md").read_text())
    data: dict[str, Any] = json.loads((out / "failover_rabbit.json").read_text())["results"][0]
    return data


def test_both_faults_and_the_worker_kills_happened(result: dict[str, Any]) -> None:
    assert [f["kind"] for f in result["faults"]] == ["leader_kill", "partition"]
    faults = [e for e in result["events"] if e["kind"] != "kill_9"]
    assert all(e["started"] is not None and "error" not in e["detail"] for e in faults)
    assert all("leader" in e["detail"] for e in faults)
    assert result["worker_kills"] == 2 and result["pod_restarts"] >= 1


def test_no_email_lost(result: dict[str, Any]) -> None:
    assert result["expected"] == 250
    assert result["lost"] == 0, result["lost_detail"]
    assert result["received_unique"] == result["expected"]
    assert result["delivery_states"] == {"sent": 250}
    assert result["all_delivered_at"] is not None


def test_no_unexplained_duplicate(result: dict[str, Any]) -> None:
    causes = [d["cause"] for d in result["duplicate_detail"]]
    assert "unexplained" not in causes, result["duplicate_detail"]
    assert result["unexpected_emails"] == 0
    assert result["ok"]


def test_deliveries_resume_after_each_fault(result: dict[str, Any]) -> None:
    for fault in result["faults"]:
        assert fault["first_delivery_after"] is not None, fault
