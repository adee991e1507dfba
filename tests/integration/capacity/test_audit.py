"""The shared validity check, the cheap count behind the gauge, `holds audit`, and the verdicts
and notification of the backfill (pure parts)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from harness.factories import insert_booking, insert_venue
from service.capacity import repository as repo
from service.capacity.audit import (
    ActiveHold,
    HoldPolicies,
    KnownPolicy,
    ValidityCounter,
    count_active_holds_by_validity,
    hold_problems,
)
from service.capacity.backfill import judge
from service.capacity.holds import build_hold_metadata
from service.capacity.notifications import IrreparableHoldRelease, format_irreparable_hold_release
from service.capacity.policy import CapacityPolicy, policy_version
from service.capacity.quoting import Quote
from tests.support.policies import make_policy, table

START = datetime(2030, 5, 17, 19, 0, tzinfo=UTC)


def known(policy: CapacityPolicy, revision_id: int) -> KnownPolicy:
    return KnownPolicy(
        revision_id=revision_id,
        venue_id=uuid.UUID(int=1),
        version=policy_version(policy),
        policy=policy,
        table_ids=frozenset(t.id for t in policy.tables),
    )


OLD = make_policy([table("a"), table("b"), table("c")], adjacency=[("a", "b"), ("b", "c")])
NEW = make_policy([table("a"), table("b", capacity=6)], adjacency=[("a", "b")])
OLD_REV, NEW_REV = known(OLD, 1), known(NEW, 2)


def metadata_for(policy: CapacityPolicy, tables: tuple[str, ...]) -> dict[str, Any]:
    offer = Quote(tables, "main", 8, 0, START, START, policy_version(policy))
    return build_hold_metadata(policy, offer)


def active(
    metadata: Any, tables: tuple[str, ...] = ("a", "b"), *, expired: bool = False
) -> ActiveHold:
    return ActiveHold(
        id=uuid.uuid4(),
        venue_id=uuid.UUID(int=1),
        booking_id=uuid.uuid4(),
        table_ids=tables,
        metadata=metadata,
        policy_revision_id=1,
        starts_at=START,
        ends_at=START + timedelta(hours=2),
        expired=expired,
        row_version="1",
        party_size=4,
    )


# -- the check and the verdicts (pure) -----------------------------------------------------------


def test_metadata_is_checked_against_the_revision_it_claims() -> None:
    old_metadata = metadata_for(OLD, ("b", "c"))
    policies = HoldPolicies(own=OLD_REV, claimed=OLD_REV, current=NEW_REV)
    assert hold_problems(active(old_metadata, ("b", "c")), policies) == []
    assert [p.path for p in hold_problems(active(old_metadata, ("a", "b")), policies)] == [
        "selection.tableIds"
    ]


def test_stored_json_strings_and_nulls_are_invalid_even_if_they_parse() -> None:
    policies = HoldPolicies(own=NEW_REV, claimed=None, current=NEW_REV)
    for raw in (json.dumps(metadata_for(NEW, ("a", "b"))), None, ["a"]):
        problems = hold_problems(active(raw), policies)
        assert [p.path for p in problems] == [""]


def test_a_hold_is_rebuilt_under_its_own_revision_to_keep_drift_visible() -> None:
    broken = metadata_for(OLD, ("b", "c"))
    del broken["selection"]["snapshot"]
    verdict = judge(
        active(broken, ("b", "c")), HoldPolicies(own=OLD_REV, claimed=OLD_REV, current=NEW_REV)
    )
    assert verdict.action == "repair"
    assert verdict.rebuilt_under == OLD_REV
    assert verdict.metadata == metadata_for(OLD, ("b", "c"))
    assert [p.path for p in verdict.problems] == ["selection.snapshot"]


def test_without_a_usable_revision_the_current_policy_is_used() -> None:
    verdict = judge(active({}), HoldPolicies(own=None, claimed=None, current=NEW_REV))
    assert (verdict.action, verdict.rebuilt_under) == ("repair", NEW_REV)
    assert verdict.metadata == metadata_for(NEW, ("a", "b"))


@pytest.mark.parametrize(
    ("hold", "policies", "reason"),
    [
        (active({}, ("c",)), HoldPolicies(None, None, NEW_REV), "tables_missing"),
        (active({}), HoldPolicies(None, None, None), "policy_missing"),
        (active({}, ("a", "a")), HoldPolicies(NEW_REV, None, NEW_REV), "selection_invalid"),
        (active({}, expired=True), HoldPolicies(NEW_REV, None, NEW_REV), "expired"),
    ],
)
def test_holds_that_cannot_be_repaired_are_released_with_a_reason(
    hold: ActiveHold, policies: HoldPolicies, reason: str
) -> None:
    verdict = judge(hold, policies)
    assert (verdict.action, verdict.reason) == ("release", reason)
    assert verdict.problems


def test_valid_metadata_is_left_alone_even_when_expired() -> None:
    metadata = metadata_for(NEW, ("a", "b"))
    for expired in (False, True):
        verdict = judge(active(metadata, expired=expired), HoldPolicies(NEW_REV, None, NEW_REV))
        assert verdict.action == "valid"


# -- the notification ----------------------------------------------------------------------------


def release_payload(**overrides: Any) -> dict[str, Any]:
    payload = IrreparableHoldRelease(
        venue_id=str(uuid.UUID(int=1)),
        venue_name="Chez Audit",
        venue_timezone="Europe/Paris",
        hold_id=str(uuid.UUID(int=2)),
        booking_id=str(uuid.UUID(int=3)),
        party_size=5,
        starts_at=START,
        table_ids=["t7", "t8"],
        reason="tables_missing",
        missing_table_ids=["t8"],
        problems=[{"path": "policyVersion", "message": "Field required"}],
        released_at=START - timedelta(days=1),
    ).model_dump(mode="json")
    payload.update(overrides)
    return payload


def test_the_release_notification_names_the_booking_tables_and_reason() -> None:
    notification = format_irreparable_hold_release(release_payload())
    assert notification.subject == (
        "Table hold released at Chez Audit: booking for 5 on Fri 17 May 2030 21:00 (Europe/Paris)"
    )
    for text in (str(uuid.UUID(int=3)), "t7, t8", "t8", "tables_missing", "policyVersion"):
        assert text in notification.text
    assert notification.data["hold"]["missing_table_ids"] == ["t8"]


def test_a_malformed_release_payload_is_refused() -> None:
    with pytest.raises(ValueError):
        format_irreparable_hold_release(release_payload(reason="because"))
    with pytest.raises(ValueError):
        format_irreparable_hold_release(release_payload(guest_email="someone@example.com"))


# -- counting and the audit command on real Postgres ----------------------------------------------


class Floor:
    def __init__(self, url: str) -> None:
        self.url = url
        with self.connect() as conn:
            self.venue_id = insert_venue(conn, name="Chez Audit", timezone="UTC")
            policy = make_policy(
                [table("a"), table("b")], adjacency=[("a", "b")], venue_id=str(self.venue_id)
            )
            self.revision = repo.save_policy(conn, self.venue_id, policy)

    def connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(self.url, row_factory=dict_row, autocommit=True)

    def hold(
        self, metadata: Any = None, *, expired: bool = False, status: str = "active"
    ) -> uuid.UUID:
        now = datetime.now(UTC)
        with self.connect() as conn:
            booking = insert_booking(conn, self.venue_id, starts_at=START)
            record = repo.insert_hold(
                conn,
                booking_id=booking,
                venue_id=self.venue_id,
                table_ids=["a", "b"],
                starts_at=START,
                ends_at=START + timedelta(hours=2),
                expires_at=now + (timedelta(minutes=-1) if expired else timedelta(minutes=10)),
                metadata=(
                    metadata_for(self.revision.policy, ("a", "b")) if metadata is None else metadata
                ),
                policy_revision_id=self.revision.id,
                now=now,
            )
            if status != "active":
                conn.execute(
                    "UPDATE holds SET status = 'released', released_at = now() WHERE id = %s",
                    (record.id,),
                )
        return record.id

    def set_metadata(self, hold_id: uuid.UUID, metadata: Any) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE holds SET metadata = %s WHERE id = %s", (Jsonb(metadata), hold_id))


@pytest.fixture
def floor(service_env: dict[str, str]) -> Floor:
    return Floor(service_env["DATABASE_URL"])


def test_the_count_covers_unexpired_active_holds_and_follows_changes(floor: Floor) -> None:
    good = floor.hold()
    floor.hold({"policyVersion": "0" * 64})
    floor.hold({}, expired=True)
    floor.hold({}, status="released")
    counter = ValidityCounter()
    with floor.connect() as conn:
        assert counter.count(conn) == {"valid": 1, "invalid": 1}
        floor.set_metadata(good, {})
        assert counter.count(conn) == {"valid": 0, "invalid": 2}
        floor.set_metadata(good, metadata_for(floor.revision.policy, ("a", "b")))
        assert counter.count(conn) == {"valid": 1, "invalid": 1}
        assert count_active_holds_by_validity(conn) == {"valid": 1, "invalid": 1}


def test_the_count_only_rechecks_new_or_changed_holds(
    floor: Floor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.capacity.audit as audit_module

    for _ in range(5):
        floor.hold()
    checked: list[uuid.UUID] = []
    real = audit_module.hold_problems

    def spy(hold: ActiveHold, policies: HoldPolicies) -> Any:
        checked.append(hold.id)
        return real(hold, policies)

    monkeypatch.setattr(audit_module, "hold_problems", spy)
    counter = ValidityCounter()
    with floor.connect() as conn:
        assert counter.count(conn) == {"valid": 5, "invalid": 0}
        assert len(checked) == 5
        fresh = floor.hold({})
        assert counter.count(conn) == {"valid": 5, "invalid": 1}
        assert checked[5:] == [fresh]


def test_the_audit_command_exits_non_zero_while_any_hold_is_invalid(floor: Floor) -> None:
    from service.cli import app

    runner = CliRunner()
    floor.hold()
    floor.hold({}, expired=True)
    clean = runner.invoke(app, ["holds", "audit"])
    assert clean.exit_code == 0, clean.output
    assert "active holds: 1 valid, 0 invalid" in clean.output
    assert "expired, not yet released: 0 valid, 1 invalid" in clean.output

    broken = floor.hold({"policyVersion": "v1"})
    result = runner.invoke(app, ["holds", "audit", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output.strip().splitlines()[-1])
    assert (report["valid"], report["invalid"]) == (1, 1)
    assert report["invalidHolds"] == [{"holdId": str(broken), "venueId": str(floor.venue_id)}]
    assert report["problemsByPath"] == {"policyVersion": 1, "selection": 1}
    assert report["constraintValidated"] is False


def test_the_backfill_command_prints_a_summary_and_dry_run_changes_nothing(floor: Floor) -> None:
    from service.cli import app

    runner = CliRunner()
    broken = floor.hold({})
    dry = runner.invoke(app, ["holds", "backfill", "--dry-run", "--no-progress"])
    assert dry.exit_code == 0, dry.output
    assert "would be repaired:" in dry.output
    with floor.connect() as conn:
        row = conn.execute("SELECT metadata FROM holds WHERE id = %s", (broken,)).fetchone()
    assert row is not None and row["metadata"] == {}

    result = runner.invoke(app, ["holds", "backfill", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["scanned"], summary["repaired"], summary["constraint"]) == (1, 1, "validated")
    assert runner.invoke(app, ["holds", "audit"]).exit_code == 0
