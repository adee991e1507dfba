"""The hold metadata backfill on real Postgres: legacy holds seeded on the schema before the
integrity migration, `migrate`, then `holds backfill` (in process and as a killed process)."""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from harness.factories import insert_booking, insert_venue
from harness.servers import PostgresServer, SmtpSink
from service.capacity import repository as repo
from service.capacity.audit import (
    PolicyBook,
    count_active_holds_by_validity,
    fetch_holds_by_id,
    hold_problems,
)
from service.capacity.audit import audit as run_audit
from service.capacity.backfill import IRREPARABLE_RELEASE_REASON, run_backfill
from service.capacity.confirm import confirm_hold_assignment, create_hold, load_confirmation
from service.capacity.errors import POLICY_CHANGED, CapacityError
from service.capacity.holds import build_hold_metadata, hold_metadata_problems, metadata_incomplete
from service.capacity.notifications import HOLD_RELEASED_IRREPARABLE
from service.capacity.policy import CapacityPolicy, adjacency_hash, policy_version
from service.capacity.quoting import Quote
from service.capacity.records import PolicyRevision
from service.db import MIGRATIONS_DIR, migrate
from tests.support.current_app import capacity, current_app, relay
from tests.support.policies import make_policy, table

ROOT = Path(__file__).resolve().parents[3]
GUEST_NAME = "Gwendolyn Guestworthy"
INTEGRITY_MIGRATIONS = ("0004_hold_integrity", "0004b_hold_integrity_index")
NOW = datetime.now(UTC)
FIRST_START = (NOW + timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)


@pytest.fixture
def database_url(pg_server: PostgresServer) -> str:
    """A database on the schema as it was before the hold integrity migration."""
    from yoyo import get_backend, read_migrations

    from service.db import _yoyo_url

    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    backend = get_backend(_yoyo_url(url))
    earlier = read_migrations(str(MIGRATIONS_DIR)).filter(
        lambda m: m.id not in INTEGRITY_MIGRATIONS
    )
    with backend.lock():
        backend.apply_migrations(backend.to_apply(earlier))
    return url


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(url, row_factory=dict_row, autocommit=True)


# -- the seeded world ------------------------------------------------------------------------------


def old_floor(venue: str) -> CapacityPolicy:
    tables = [table(f"m{i}", capacity=4) for i in range(1, 9)]
    tables += [table(f"p{i}", "patio", capacity=2) for i in range(1, 5)]
    edges = [(f"m{i}", f"m{i + 1}") for i in range(1, 8)] + [("p1", "p2"), ("p3", "p4")]
    return make_policy(tables, adjacency=edges, venue_id=venue)


def new_floor(venue: str) -> CapacityPolicy:
    """The old floor with p4 removed, m8 enlarged and m9 added."""
    tables = [table(f"m{i}", capacity=4) for i in range(1, 8)] + [table("m8", capacity=6)]
    tables += [table("m9", capacity=4)] + [table(f"p{i}", "patio", capacity=2) for i in range(1, 4)]
    edges = [(f"m{i}", f"m{i + 1}") for i in range(1, 9)] + [("p1", "p2")]
    return make_policy(tables, adjacency=edges, venue_id=venue)


def built(policy: CapacityPolicy, tables: tuple[str, ...]) -> dict[str, Any]:
    start = FIRST_START
    offer = Quote(tables, "main", 8, 0, start, start, policy_version(policy))
    return build_hold_metadata(policy, offer)


@dataclass(frozen=True)
class Kind:
    """A family of seeded holds and what the backfill must do with each."""

    name: str
    tables: tuple[str, ...]
    revision: str | None  # "old", "new" or None (legacy: no revision recorded)
    metadata: Callable[[CapacityPolicy, CapacityPolicy], Any]
    expect: str  # valid, repaired, released, expired, untouched
    venue: str = "main"
    expired: bool = False
    status: str = "active"
    rebuilt_under: str | None = None


def _drop(path: str, under: str = "new") -> Callable[[CapacityPolicy, CapacityPolicy], Any]:
    def make(old: CapacityPolicy, new: CapacityPolicy) -> Any:
        metadata = built(old if under == "old" else new, ("m1", "m2"))
        *parents, leaf = path.split(".")
        node = metadata
        for key in parents:
            node = node[key]
        del node[leaf]
        return metadata

    return make


def _bad_hash(old: CapacityPolicy, new: CapacityPolicy) -> Any:
    metadata = built(new, ("m1", "m2"))
    metadata["selection"]["snapshot"]["adjacency"]["hash"] = adjacency_hash([("m1", "m9")])
    return metadata


def _foreign_edge(old: CapacityPolicy, new: CapacityPolicy) -> Any:
    metadata = built(new, ("m1", "m2"))
    adjacency = metadata["selection"]["snapshot"]["adjacency"]
    adjacency["edges"].append(["m2", "m3"])
    adjacency["hash"] = adjacency_hash(adjacency["edges"])
    return metadata


def _camel_typo(old: CapacityPolicy, new: CapacityPolicy) -> Any:
    metadata = built(new, ("m1", "m2"))
    metadata["selection"]["table_ids"] = metadata["selection"].pop("tableIds")
    return metadata


def _other_tables(old: CapacityPolicy, new: CapacityPolicy) -> Any:
    return built(new, ("m1", "m2"))


KINDS = [
    Kind("valid_new", ("m1", "m2"), "new", lambda o, n: built(n, ("m1", "m2")), "valid"),
    Kind("valid_old", ("p3", "p4"), "old", lambda o, n: built(o, ("p3", "p4")), "valid"),
    Kind(
        "no_version", ("m1", "m2"), "new", _drop("policyVersion"), "repaired", rebuilt_under="new"
    ),
    Kind(
        "no_snapshot_old",
        ("m1", "m2"),
        "old",
        _drop("selection.snapshot", "old"),
        "repaired",
        rebuilt_under="old",
    ),
    Kind(
        "no_edges",
        ("m1", "m2"),
        "new",
        _drop("selection.snapshot.adjacency.edges"),
        "repaired",
        rebuilt_under="new",
    ),
    Kind("bad_hash", ("m1", "m2"), "new", _bad_hash, "repaired", rebuilt_under="new"),
    Kind("foreign_edge", ("m1", "m2"), "new", _foreign_edge, "repaired", rebuilt_under="new"),
    Kind("camel_typo", ("m1", "m2"), "new", _camel_typo, "repaired", rebuilt_under="new"),
    Kind("empty", ("m3", "m4"), "new", lambda o, n: {}, "repaired", rebuilt_under="new"),
    Kind(
        "double_encoded",
        ("m1", "m2"),
        "new",
        lambda o, n: json.dumps(built(n, ("m1", "m2"))),
        "repaired",
        rebuilt_under="new",
    ),
    Kind("json_null", ("m5",), "old", lambda o, n: None, "repaired", rebuilt_under="old"),
    Kind("other_tables", ("m3", "m4"), "new", _other_tables, "repaired", rebuilt_under="new"),
    Kind("legacy", ("m8", "m9"), None, lambda o, n: {}, "repaired", rebuilt_under="new"),
    Kind(
        "legacy_old_version",
        ("p3", "p4"),
        None,
        lambda o, n: {"policyVersion": policy_version(o)},
        "repaired",
        rebuilt_under="old",
    ),
    Kind("legacy_gone_table", ("p3", "p4"), None, lambda o, n: {}, "released"),
    Kind("no_policy", ("m1",), None, lambda o, n: {}, "released", venue="bare"),
    Kind("duplicate_table", ("m1", "m1"), "new", lambda o, n: {}, "released"),
    Kind("expired_broken", ("m1", "m2"), "new", lambda o, n: {}, "expired", expired=True),
    Kind(
        "expired_valid",
        ("m1", "m2"),
        "new",
        lambda o, n: built(n, ("m1", "m2")),
        "valid",
        expired=True,
    ),
    Kind("consumed_broken", ("m1", "m2"), "new", lambda o, n: {}, "untouched", status="consumed"),
    Kind("released_broken", ("m1", "m2"), "new", lambda o, n: {}, "untouched", status="released"),
]
KIND = {kind.name: kind for kind in KINDS}


@dataclass
class World:
    url: str
    venue_id: uuid.UUID
    bare_venue_id: uuid.UUID
    old: PolicyRevision
    new: PolicyRevision
    holds: dict[uuid.UUID, Kind]

    def of(self, *names: str) -> list[uuid.UUID]:
        return [hold_id for hold_id, kind in self.holds.items() if kind.name in names]

    def expecting(self, *outcomes: str) -> list[uuid.UUID]:
        return [hold_id for hold_id, kind in self.holds.items() if kind.expect in outcomes]


def seed(url: str, per_kind: int | dict[str, int]) -> World:
    """A venue with an old and a new policy revision, a venue without a policy, and holds of every
    kind (one booking each, each at its own time so that any of them could be confirmed)."""
    with connect(url) as conn:
        venue_id = insert_venue(conn, name="Chez Backfill", timezone="UTC")
        bare_id = insert_venue(conn, name="Sans Plan", timezone="UTC")
        with conn.transaction():
            old = repo.save_policy(conn, venue_id, old_floor(str(venue_id)))
            new = repo.save_policy(conn, venue_id, new_floor(str(venue_id)))
        counts = per_kind if isinstance(per_kind, dict) else {k.name: per_kind for k in KINDS}
        bookings: list[tuple[Any, ...]] = []
        holds: list[tuple[Any, ...]] = []
        kinds: dict[uuid.UUID, Kind] = {}
        slot = 0
        for kind in KINDS:
            for _ in range(counts.get(kind.name, 0)):
                slot += 1
                booking_id, hold_id = uuid.uuid4(), uuid.uuid4()
                starts = FIRST_START + timedelta(hours=3 * slot)
                venue = venue_id if kind.venue == "main" else bare_id
                booking_status = "confirmed" if kind.status == "consumed" else "pending"
                bookings.append(
                    (
                        booking_id,
                        venue,
                        booking_status,
                        GUEST_NAME,
                        f"g{slot}@guests.example",
                        4,
                        starts,
                    )
                )
                revision = {"old": old.id, "new": new.id, None: None}[kind.revision]
                expires = NOW - timedelta(minutes=5) if kind.expired else NOW + timedelta(days=1)
                holds.append(
                    (
                        hold_id,
                        booking_id,
                        venue,
                        list(kind.tables),
                        starts,
                        starts + timedelta(minutes=135),
                        expires,
                        kind.status,
                        Jsonb(kind.metadata(old.policy, new.policy)),
                        revision,
                        NOW if kind.status == "consumed" else None,
                        NOW if kind.status == "released" else None,
                    )
                )
                kinds[hold_id] = kind
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(
                "COPY bookings (id, venue_id, status, guest_name, guest_email, party_size,"
                " starts_at) FROM STDIN"
            ) as copy_:
                for row in bookings:
                    copy_.write_row(row)
            with cur.copy(
                "COPY holds (id, booking_id, venue_id, table_ids, starts_at, ends_at, expires_at,"
                " status, metadata, policy_revision_id, consumed_at, released_at) FROM STDIN"
            ) as copy_:
                for row in holds:
                    copy_.write_row(row)
        conn.execute("ANALYZE holds")
    return World(url, venue_id, bare_id, old, new, kinds)


def snapshot(url: str) -> dict[uuid.UUID, dict[str, Any]]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT id, xmin::text AS row_version, status, release_reason, metadata FROM holds"
        ).fetchall()
    return {row["id"]: row for row in rows}


def confirmation_check(url: str, hold_ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
    """Run the confirmation's own metadata check on each hold; returns the failures."""
    failures: list[tuple[uuid.UUID, str]] = []
    with connect(url) as conn:
        for hold_id in hold_ids:
            hold = repo.get_hold(conn, hold_id)
            assert hold is not None
            held_under = load_confirmation(conn, hold.booking_id, hold_id).held_under
            problems = hold_metadata_problems(
                hold.metadata, hold.table_ids, None if held_under is None else held_under.policy
            )
            if problems:
                failures.append((hold_id, str(metadata_incomplete(problems))))
    return failures


def all_problems(url: str) -> dict[uuid.UUID, list[str]]:
    """The shared check (audit and backfill) on every active hold that still has problems."""
    with connect(url) as conn:
        ids = [r["id"] for r in conn.execute("SELECT id FROM holds WHERE status = 'active'")]
        holds = fetch_holds_by_id(conn, ids)
        book = PolicyBook()
        book.load(conn, holds)
    found = {h.id: [p.path for p in hold_problems(h, book.policies_for(h))] for h in holds}
    return {k: v for k, v in found.items() if v}


def assert_outcome(world: World, before: dict[uuid.UUID, dict[str, Any]]) -> None:
    """Every seeded hold ended as its kind says; only what had to change changed."""
    after = snapshot(world.url)
    wrong = []
    for hold_id, kind in world.holds.items():
        row, old = after[hold_id], before[hold_id]
        changed = row["row_version"] != old["row_version"]
        ok = {
            "valid": not changed and row["status"] == "active",
            "untouched": not changed,
            "repaired": changed and row["status"] == "active",
            "released": row["status"] == "released"
            and row["release_reason"] == IRREPARABLE_RELEASE_REASON,
            "expired": row["status"] == "released" and row["release_reason"] == "expired",
        }[kind.expect]
        if not ok:
            wrong.append((kind.name, row["status"], row["release_reason"], changed))
    assert wrong == []
    assert all_problems(world.url) == {}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- tests ---------------------------------------------------------------------------------------


def test_rollout_migrate_dry_run_backfill_audit_repairs_everything_repairable(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    world = seed(capacity_env["DATABASE_URL"], 120)
    url = world.url
    assert migrate(url) == list(INTEGRITY_MIGRATIONS)
    before = snapshot(url)
    with connect(url) as conn:
        assert count_active_holds_by_validity(conn)["invalid"] > 0

    dry = run_backfill(current_app().db, dry_run=True, batch_size=250)
    assert snapshot(url) == before
    assert dry.constraint == "not validated (needs a complete run over every venue)"

    summary = run_backfill(current_app().db, batch_size=250)
    expected = Counter(kind.expect for kind in world.holds.values())
    assert summary.scanned == sum(1 for k in world.holds.values() if k.status == "active")
    assert summary.already_valid == expected["valid"]
    assert summary.repaired == expected["repaired"]
    assert summary.irreparable == expected["released"]
    assert summary.expired_released == expected["expired"]
    assert (summary.gone, summary.busy) == (0, 0)
    assert summary.irreparable_reasons == {
        "tables_missing": 120,
        "policy_missing": 120,
        "selection_invalid": 120,
    }
    assert summary.constraint == "validated"
    assert summary.max_lock_ms > 0
    for field_ in ("scanned", "repaired", "alreadyValid", "irreparable", "maxBatchLockMs"):
        assert field_ in summary.as_dict()
    # the dry run predicted exactly what the run did
    assert (dry.repaired, dry.irreparable, dry.expired_released, dry.already_valid) == (
        summary.repaired,
        summary.irreparable,
        summary.expired_released,
        summary.already_valid,
    )
    assert_outcome(world, before)

    # repaired holds pass the confirmation's own check, and hold what hold creation would write
    repaired = world.expecting("repaired")
    assert confirmation_check(url, repaired) == []
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT id, table_ids, metadata, policy_revision_id FROM holds WHERE id = ANY(%s)",
            (repaired,),
        ).fetchall()
    for row in rows:
        kind = world.holds[row["id"]]
        under = world.old if kind.rebuilt_under == "old" else world.new
        assert row["metadata"] == built(under.policy, tuple(row["table_ids"])), kind.name

    # the repair log keeps what was replaced, one row per changed hold
    with connect(url) as conn:
        log = conn.execute(
            "SELECT hold_id, action, reason, previous_metadata FROM hold_metadata_repairs"
        ).fetchall()
    assert Counter(r["action"] for r in log) == {
        "repaired": expected["repaired"],
        "released": expected["released"] + expected["expired"],
    }
    assert len({r["hold_id"] for r in log}) == len(log)
    first_empty = world.of("empty")[0]
    assert next(r for r in log if r["hold_id"] == first_empty)["previous_metadata"] == {}

    # irreparable holds: one outbox event each, with venue context and no guest details
    with connect(url) as conn:
        events = conn.execute(
            "SELECT venue_id, payload FROM outbox_events WHERE event_type = %s",
            (HOLD_RELEASED_IRREPARABLE,),
        ).fetchall()
    released = set(world.expecting("released"))
    assert {uuid.UUID(e["payload"]["hold_id"]) for e in events} == released
    assert len(events) == len(released)
    text = json.dumps([e["payload"] for e in events])
    assert GUEST_NAME not in text and "@guests.example" not in text
    gone = next(
        e["payload"]
        for e in events
        if uuid.UUID(e["payload"]["hold_id"]) in set(world.of("legacy_gone_table"))
    )
    assert (gone["reason"], gone["missing_table_ids"], gone["venue_name"]) == (
        "tables_missing",
        ["p4"],
        "Chez Backfill",
    )

    # the audit agrees: nothing invalid is left; the gauge's count too
    with connect(url) as conn:
        report = run_audit(conn)
        counts = count_active_holds_by_validity(conn)
    assert (report.invalid, report.expired_invalid, report.constraint_validated) == (0, 0, True)
    assert counts == {"valid": report.valid, "invalid": 0}
    assert report.valid == sum(
        1 for k in world.holds.values() if k.expect in ("valid", "repaired") and not k.expired
    )

    # a second run changes nothing
    settled = snapshot(url)
    again = run_backfill(current_app().db, batch_size=97)
    assert (again.repaired, again.irreparable, again.expired_released) == (0, 0, 0)
    assert again.already_valid == again.scanned
    assert again.lock_ms == []
    assert snapshot(url) == settled


def test_repaired_holds_confirm_or_meet_policy_drift_never_incomplete_metadata(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"no_version": 3, "legacy": 2, "no_snapshot_old": 3})
    migrate(world.url)
    incomplete = metric("booking_confirmations_incomplete_metadata_total")
    run_backfill(current_app().db)
    with connect(world.url) as conn:
        booking_of = {
            r["id"]: r["booking_id"]
            for r in conn.execute("SELECT id, booking_id FROM holds").fetchall()
        }
    for hold_id in world.of("no_version", "legacy"):
        done = confirm_hold_assignment(capacity(lambda _: None), booking_of[hold_id], hold_id)
        assert done.hold_id == hold_id
    for hold_id in world.of("no_snapshot_old"):
        with pytest.raises(CapacityError) as caught:
            confirm_hold_assignment(capacity(lambda _: None), booking_of[hold_id], hold_id)
        assert caught.value.code == POLICY_CHANGED
        assert caught.value.details["expectedVersion"] == world.old.version
    assert metric("booking_confirmations_incomplete_metadata_total") == incomplete


def test_the_relay_delivers_the_irreparable_release_to_the_venue_admins(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"legacy_gone_table": 1, "valid_new": 1})
    migrate(world.url)
    summary = run_backfill(current_app().db)
    assert summary.irreparable == 1
    result = relay(batch_size=10).run_once()
    assert result.delivered == 1
    (message,) = [
        email.message_from_bytes(raw, policy=email.policy.default) for raw in smtp_sink.messages()
    ]
    assert str(message["Subject"]).startswith("Table hold released at Chez Backfill")
    body = message.get_body(preferencelist=("plain",)).get_content()
    assert "p4" in body and "tables_missing" in body
    assert GUEST_NAME not in body and "@guests.example" not in body


def _cli(env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-m", "service", "holds", *args]


def _child_env(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env, "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_a_backfill_killed_mid_way_and_restarted_finishes_correctly(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], 600)
    url = world.url
    migrate(url)
    before = snapshot(url)
    changes = len(world.expecting("repaired", "released", "expired"))
    env = _child_env(capacity_env)
    child = subprocess.Popen(
        _cli(env, "backfill", "--batch-size", "25", "--no-progress"),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    written = 0
    with connect(url) as conn:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            row = conn.execute("SELECT count(*) AS n FROM hold_metadata_repairs").fetchone()
            written = row["n"] if row else 0
            if written >= changes // 3:
                break
            time.sleep(0.01)
    assert child.poll() is None, f"the backfill ended before it could be killed: {child.stderr}"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM hold_metadata_repairs").fetchone()
        partial = row["n"] if row else 0
    assert changes // 3 <= partial < changes

    done = subprocess.run(
        _cli(env, "backfill", "--batch-size", "500", "--no-progress", "--json"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["repaired"] + summary["irreparable"] + summary["expiredReleased"] == (
        changes - partial
    )
    assert summary["constraint"] == "validated"
    assert_outcome(world, before)
    with connect(url) as conn:
        twice = conn.execute(
            "SELECT hold_id FROM hold_metadata_repairs GROUP BY hold_id HAVING count(*) > 1"
        ).fetchall()
        events = conn.execute(
            "SELECT count(*) AS n FROM outbox_events WHERE event_type = %s",
            (HOLD_RELEASED_IRREPARABLE,),
        ).fetchone()
    assert twice == []
    assert events is not None and events["n"] == len(world.expecting("released"))

    audit = subprocess.run(_cli(env, "audit"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert " 0 invalid" in audit.stdout


def test_holds_created_while_the_backfill_runs_are_valid_and_left_alone(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], 150)
    migrate(world.url)
    with connect(world.url) as conn:
        fresh = [
            insert_booking(
                conn, world.venue_id, party_size=2, starts_at=FIRST_START + timedelta(days=60 + i)
            )
            for i in range(60)
        ]
    created: list[uuid.UUID] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def book() -> None:
        try:
            for booking_id in fresh:
                if stop.is_set():
                    return
                created.append(create_hold(capacity(), booking_id).id)
        except BaseException as error:
            errors.append(error)

    booker = threading.Thread(target=book)
    booker.start()
    summary = run_backfill(current_app().db, batch_size=50)
    stop.set()
    booker.join(60)
    assert errors == []
    assert created, "no hold was created during the backfill"
    assert summary.busy == 0
    assert confirmation_check(world.url, created) == []
    with connect(world.url) as conn:
        touched = conn.execute(
            "SELECT count(*) AS n FROM hold_metadata_repairs WHERE hold_id = ANY(%s)", (created,)
        ).fetchone()
    assert touched is not None and touched["n"] == 0
    assert all_problems(world.url) == {}


def test_holds_locked_by_a_confirmation_are_skipped_then_picked_up(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"empty": 5})
    migrate(world.url)
    target = world.of("empty")[0]
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with connect(world.url) as conn, conn.transaction():
            conn.execute("SELECT id FROM holds WHERE id = %s FOR UPDATE", (target,))
            locked.set()
            release.wait(10)

    locker = threading.Thread(target=hold_lock)
    locker.start()
    assert locked.wait(10)
    threading.Timer(0.15, release.set).start()
    summary = run_backfill(current_app().db)
    locker.join(10)
    assert (summary.repaired, summary.busy) == (5, 0)
    assert all_problems(world.url) == {}


def test_a_venue_filter_only_touches_that_venue(capacity_env: dict[str, str]) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"empty": 4, "no_policy": 3})
    migrate(world.url)
    summary = run_backfill(current_app().db, venue_id=world.bare_venue_id)
    assert (summary.scanned, summary.irreparable, summary.repaired) == (3, 3, 0)
    assert summary.constraint.startswith("not validated")
    assert set(all_problems(world.url)) == set(world.of("empty"))


def test_the_integrity_migration_waits_at_most_its_lock_timeout_on_a_busy_table(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"valid_new": 3})
    with connect(world.url) as blocker, blocker.transaction():
        blocker.execute("SELECT count(*) FROM holds")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            migrate(world.url)
        assert time.monotonic() - started < 15
    assert migrate(world.url) == list(INTEGRITY_MIGRATIONS)
    with connect(world.url) as conn:
        row = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'holds_active_id_idx'::regclass"
        ).fetchone()
    assert row is not None and row["indisvalid"]


def test_the_migrated_schema_refuses_an_active_hold_whose_metadata_is_not_an_object(
    capacity_env: dict[str, str],
) -> None:
    world = seed(capacity_env["DATABASE_URL"], {"valid_new": 1, "released_broken": 1})
    migrate(world.url)
    active = world.of("valid_new")[0]
    with connect(world.url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE holds SET metadata = '\"{}\"' WHERE id = %s", (active,))
        conn.execute("UPDATE holds SET metadata = '{}' WHERE id = %s", (active,))
        released = world.of("released_broken")[0]
        conn.execute("UPDATE holds SET metadata = 'null' WHERE id = %s", (released,))
