"""The short Redis failover run inside ``make test``: the combined scenario, nothing lost.

Runs ``python -m bench.failover_redis --short`` in its own process (its own Postgres, SMTP
server and Sentinel deployment): 250 bookings while a replica is stopped and started, the
primary is ``kill -9``-ed (Sentinel promotes a replica), a replica's link is cut and restored,
both replicas are cut off while the primary acknowledges enqueues and the primary is killed
(those enqueues are lost by Redis; the reconciler sends them), and two worker processes are
``kill -9``-ed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("failover")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failover_redis", "--short", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    if not (out / "failover_redis.json").exists():
        pytest.fail(
            f"the failover run produced no result:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    print((out / "failover_redis.md").read_text())
    (scenario,) = json.loads((out / "failover_redis.json").read_text())["scenarios"]
    data: dict[str, Any] = scenario
    return data


def test_every_fault_happened(result: dict[str, Any]) -> None:
    kinds = sorted(e["kind"] for e in result["events"])
    assert kinds == sorted(
        [
            "kill_9",
            "kill_9",
            "replica_stop",
            "redis_primary_kill",
            "link_cut",
            "unreplicated_primary_kill",
        ]
    )
    assert all(e["started"] is not None and "error" not in e["detail"] for e in result["events"])
    kills = [e for e in result["events"] if e["kind"].endswith("primary_kill")]
    assert all(e["detail"]["promoted"] != e["detail"]["killed"] for e in kills)
    assert result["pod_restarts"] >= 2


def test_no_email_lost_and_no_unexplained_duplicate(result: dict[str, Any]) -> None:
    assert result["expected"] == 250
    assert result["lost"] == 0, result["lost_detail"]
    assert result["received_unique"] == result["expected"]
    assert result["delivery_states"] == {"sent": 250}
    causes = [d["cause"] for d in result["duplicate_detail"]]
    assert "unexplained" not in causes, result["duplicate_detail"]
    assert result["unexpected_emails"] == 0
    assert result["ok"]


def test_enqueues_lost_by_the_failover_are_recovered_by_the_reconciler(
    result: dict[str, Any],
) -> None:
    (cut,) = [e for e in result["events"] if e["kind"] == "unreplicated_primary_kill"]
    assert cut["detail"]["enqueues acknowledged by the primary alone"] > 0
    # The producer records each request before enqueueing it, so what Redis lost is a delivery
    # row left pending, which the reconciler re-enqueues once the grace has passed.
    recovered = result["reconciler"].get("re-enqueued: no delivery record", 0) + result[
        "reconciler"
    ].get("re-enqueued: stuck pending/retrying", 0)
    assert recovered > 0, result["reconciler"]
