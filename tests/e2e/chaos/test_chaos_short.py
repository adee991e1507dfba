"""The short chaos run inside ``make test``: every kind of failure once, nothing lost.

Runs ``python -m bench.chaos --short`` in its own process (its own Postgres, Redis and SMTP
server, its own environment): 200 bookings, each with its status email, some confirmed ones
changed twice with an ``updated`` email after each change (the first may be superseded by the
second), some changed once with an ``updated`` email scheduled 20-25 s ahead; one ``kill -9`` of
a worker process, one Redis restart with its append-only file, one Redis ``FLUSHALL`` recovered
by the reconciler, one Postgres restart and the SMTP server down for 5 s.
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
    out = tmp_path_factory.mktemp("chaos")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if not (out / "chaos.json").exists():
        pytest.fail(
            f"the chaos run produced no result:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    data: dict[str, Any] = json.loads((out / "chaos.json").read_text())
    print((out / "chaos.md").read_text())
    return data


def test_every_disruption_happened(result: dict[str, Any]) -> None:
    kinds = count_kinds(result["events"])
    assert kinds == {
        "kill_9": 1,
        "redis_restart": 1,
        "redis_flushall": 1,
        "postgres_restart": 1,
        "smtp_outage": 1,
    }
    assert all(e["started"] is not None and "error" not in e["detail"] for e in result["events"])
    assert result["pod_restarts"] >= 1


def test_the_mix_has_status_updated_and_scheduled_emails(result: dict[str, Any]) -> None:
    assert result["bookings_produced"] == 200
    assert result["status_emails"] == 200
    assert result["updates"] > 0 and result["updates"] == 2 * result["updated_bookings"]
    assert result["scheduled"] > 0
    assert result["expected"] == result["status_emails"] + result["updates"] + result["scheduled"]


def test_no_email_lost(result: dict[str, Any]) -> None:
    assert result["lost"] == 0, result["lost_detail"]
    assert result["all_delivered_at"] is not None
    # Every request's row ends sent or superseded (coalesced into the later revision).
    assert set(result["delivery_states"]) <= {"sent", "superseded"}, result["delivery_states"]
    # One Message-ID per request, except the superseded ones (nothing sent) and requests that
    # share an email with a later one (sent while Postgres was down, without a revision).
    assert result["superseded_but_received"] == 0, result["superseded_but_received_detail"]
    assert result["received_unique"] == (
        result["expected"] - result["superseded"] - result["coalesced"]
    )
    first = result["first_updates"]
    assert first["lost"] == 0
    assert sum(first.values()) == result["updated_bookings"]


def test_no_scheduled_email_sent_early(result: dict[str, Any]) -> None:
    assert result["early"] == 0, result["early_detail"]
    assert result["min_schedule_margin_s"] is not None and result["min_schedule_margin_s"] >= 0


def test_duplicates_are_each_explained(result: dict[str, Any]) -> None:
    causes = [d["cause"] for d in result["duplicate_detail"]]
    assert "unexplained" not in causes, result["duplicate_detail"]
    assert result["duplicates"] == sum(d["copies"] - 1 for d in result["duplicate_detail"])
    assert result["unexpected_emails"] == 0


def test_every_dead_letter_is_accounted_for(result: dict[str, Any]) -> None:
    for dead in result["dead_letters"]:
        assert dead["reason"] in ("retries_exhausted", "permanent_failure"), dead
        assert dead["replayed"], dead
        assert (dead["final_state"] == "sent" and dead["received"] >= 1) or dead[
            "final_state"
        ] == "superseded", dead
    assert result["dead_letters_accounted"]
    assert result["ok"]


def count_kinds(events: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    return counts
