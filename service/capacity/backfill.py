"""Repair the metadata of active holds, or release the holds that cannot be repaired.

Each batch is read without locks, judged and rebuilt in Python with the code that creates holds
(:func:`build_hold_metadata`), then written by two set-based statements, each its own
transaction, that claim the rows with ``FOR UPDATE SKIP LOCKED`` and only if they are unchanged
since the read (same ``xmin``), change them, log them and write the outbox events. A row that
is locked or changed meanwhile is read again later. Row locks are therefore held for one
statement's run on the server, never while Python works, and never waited for.

A repaired hold is rebuilt under its own policy revision (``holds.policy_revision_id``) when
that revision has all its tables, so a hold made under an older policy still meets
``POLICY_CHANGED`` at confirmation and is re-quoted; else under the revision its metadata
names; else under the venue's current policy. A hold none of those can seat is released
(``irreparable_metadata``) with a ``hold.released_irreparable`` event to the venue's admins.
An expired hold with broken metadata is released as ``expired``: it can never be confirmed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row, tuple_row

from service.capacity.audit import (
    METADATA_CONSTRAINT,
    ActiveHold,
    AnyConnection,
    HoldPolicies,
    KnownPolicy,
    PolicyBook,
    constraint_validated,
    fetch_active_holds,
    fetch_holds_by_id,
    hold_problems,
)
from service.capacity.holds import MetadataProblem, build_hold_metadata
from service.capacity.notifications import (
    HOLD_RELEASED_IRREPARABLE,
    IrreparableHoldRelease,
)
from service.capacity.policy import tables_by_id
from service.capacity.quoting import Quote
from service.db import Database, DatabaseError
from service.logs import get_logger

log = get_logger(__name__)

IRREPARABLE_RELEASE_REASON = "irreparable_metadata"
EXPIRED_RELEASE_REASON = "expired"

Action = Literal["valid", "repair", "release"]


# -- the verdict on one hold (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one hold. ``reason`` is set for releases, ``metadata`` for repairs."""

    hold: ActiveHold
    action: Action
    problems: tuple[MetadataProblem, ...] = ()
    reason: str | None = None
    metadata: dict[str, Any] | None = None
    rebuilt_under: KnownPolicy | None = None
    missing_table_ids: tuple[str, ...] = ()


def rebuild_metadata(hold: ActiveHold, under: KnownPolicy) -> dict[str, Any]:
    """The hold's metadata as hold creation would have written it under ``under``."""
    tables = tables_by_id(under.policy)
    capacity = sum(tables[t].capacity for t in hold.table_ids)
    offer = Quote(
        table_ids=hold.table_ids,
        zone_id=tables[hold.table_ids[0]].zone_id,
        capacity=capacity,
        waste=max(capacity - hold.party_size, 0),
        starts_at=hold.starts_at,
        ends_at=hold.ends_at,
        policy_version=under.version,
    )
    return build_hold_metadata(under.policy, offer)


@dataclass
class Memo:
    """Results of the pure steps for inputs already seen in a run, so that a run does the work
    once per distinct input: identical stored metadata checked against the same revision for
    the same tables has the same problems, and :func:`build_hold_metadata` depends only on the
    policy and the tables, so holds on the same tables under the same revision share their
    rebuilt metadata. Each table is cleared when it reaches ``limit`` entries."""

    limit: int = 50_000
    problems: dict[tuple[Any, ...], tuple[MetadataProblem, ...]] = field(default_factory=dict)
    rebuilt: dict[tuple[int, tuple[str, ...]], tuple[dict[str, Any], bool]] = field(
        default_factory=dict
    )

    def check(self, hold: ActiveHold, policies: HoldPolicies) -> tuple[MetadataProblem, ...]:
        reference = policies.reference
        fingerprint = json.dumps(hold.metadata, sort_keys=True, separators=(",", ":"))
        key = (reference.revision_id if reference else None, hold.table_ids, fingerprint)
        found = self.problems.get(key)
        if found is None:
            if len(self.problems) >= self.limit:
                self.problems.clear()
            found = self.problems[key] = tuple(hold_problems(hold, policies))
        return found

    def rebuild(
        self, hold: ActiveHold, policies: HoldPolicies, under: KnownPolicy
    ) -> tuple[dict[str, Any], bool]:
        """The rebuilt metadata, and whether it passes the same check."""
        key = (under.revision_id, hold.table_ids)
        found = self.rebuilt.get(key)
        if found is None:
            if len(self.rebuilt) >= self.limit:
                self.rebuilt.clear()
            metadata = rebuild_metadata(hold, under)
            rebuilt = replace(hold, metadata=metadata)
            found = self.rebuilt[key] = (
                metadata,
                not hold_problems(rebuilt, replace(policies, claimed=under)),
            )
        return found


def judge(hold: ActiveHold, policies: HoldPolicies, memo: Memo | None = None) -> Verdict:
    """Valid, repairable (with the rebuilt metadata) or to be released (with the reason)."""
    memo = memo or Memo()
    problems = memo.check(hold, policies)
    if not problems:
        return Verdict(hold, "valid")
    if hold.expired:
        return Verdict(hold, "release", problems, EXPIRED_RELEASE_REASON)
    candidates = policies.rebuild_candidates()
    if not candidates:
        return Verdict(hold, "release", problems, "policy_missing")
    for under in candidates:
        if not under.table_ids.issuperset(hold.table_ids):
            continue
        metadata, valid = memo.rebuild(hold, policies, under)
        if not valid:
            return Verdict(hold, "release", problems, "selection_invalid")
        return Verdict(hold, "repair", problems, metadata=metadata, rebuilt_under=under)
    missing = tuple(sorted(set(hold.table_ids) - candidates[0].table_ids))
    return Verdict(hold, "release", problems, "tables_missing", missing_table_ids=missing)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class BackfillSummary:
    """Every scanned hold ends in exactly one of the counted outcomes."""

    dry_run: bool
    run_id: uuid.UUID
    scanned: int = 0
    already_valid: int = 0
    repaired: int = 0
    irreparable: int = 0
    expired_released: int = 0
    gone: int = 0
    busy: int = 0
    irreparable_reasons: Counter[str] = field(default_factory=Counter)
    irreparable_holds: list[dict[str, str]] = field(default_factory=list)
    batches: int = 0
    lock_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    constraint: str = "not checked"

    @property
    def max_lock_ms(self) -> float:
        return max(self.lock_ms, default=0.0)

    @property
    def p95_lock_ms(self) -> float:
        if not self.lock_ms:
            return 0.0
        ordered = sorted(self.lock_ms)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    @property
    def holds_per_second(self) -> float:
        return self.scanned / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "runId": str(self.run_id),
            "scanned": self.scanned,
            "alreadyValid": self.already_valid,
            "repaired": self.repaired,
            "irreparable": self.irreparable,
            "irreparableReasons": dict(sorted(self.irreparable_reasons.items())),
            "irreparableHolds": self.irreparable_holds,
            "expiredReleased": self.expired_released,
            "gone": self.gone,
            "busy": self.busy,
            "batches": self.batches,
            "writeBatches": len(self.lock_ms),
            "maxBatchLockMs": round(self.max_lock_ms, 2),
            "p95BatchLockMs": round(self.p95_lock_ms, 2),
            "seconds": round(self.seconds, 3),
            "holdsPerSecond": round(self.holds_per_second, 1),
            "constraint": self.constraint,
        }


_WRITE = """
    WITH input AS (
        SELECT * FROM unnest(%(ids)s::uuid[], %(versions)s::text[], %(values)s::text[],
                             %(reasons)s::text[], %(revisions)s::bigint[], %(problems)s::text[],
                             %(events)s::text[])
            AS i(id, row_version, value, reason, revision, problems, event)
    ),
    claimed AS (
        SELECT h.id, h.venue_id, h.metadata AS previous, i.value, i.reason, i.revision,
               i.problems, i.event
        FROM holds h JOIN input i ON i.id = h.id
        WHERE h.id = ANY(%(ids)s::uuid[])
          AND h.status = 'active' AND h.xmin::text = i.row_version
        FOR UPDATE OF h SKIP LOCKED
    ),
    changed AS (
        UPDATE holds h SET {assignments}, updated_at = now()
        FROM claimed c WHERE h.id = c.id
        RETURNING h.id
    ),
    notified AS (
        INSERT INTO outbox_events (id, event_type, dedupe_key, venue_id, payload)
        SELECT gen_random_uuid(), %(event_type)s, %(event_type)s || ':' || c.id, c.venue_id,
               c.event::jsonb
        FROM claimed c JOIN changed USING (id)
        WHERE c.event IS NOT NULL
        ON CONFLICT (dedupe_key) DO NOTHING
    )
    INSERT INTO hold_metadata_repairs
        (run_id, hold_id, venue_id, action, reason, policy_revision_id, problems,
         previous_metadata)
    SELECT %(run)s, c.id, c.venue_id, %(action)s, c.reason, c.revision, c.problems::jsonb,
           c.previous
    FROM claimed c JOIN changed USING (id)
    RETURNING hold_id,
              extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000 AS elapsed_ms
"""
_REPAIR = _WRITE.format(assignments="metadata = c.value::jsonb")
_RELEASE = _WRITE.format(
    assignments="status = 'released', released_at = now(), release_reason = c.value"
)


@dataclass(frozen=True, slots=True)
class VenueContext:
    name: str
    timezone: str


def release_event(verdict: Verdict, venue: VenueContext, now: datetime) -> dict[str, Any]:
    """The ``hold.released_irreparable`` payload for a hold being released."""
    hold = verdict.hold
    return IrreparableHoldRelease(
        venue_id=str(hold.venue_id),
        venue_name=venue.name,
        venue_timezone=venue.timezone,
        hold_id=str(hold.id),
        booking_id=str(hold.booking_id),
        party_size=hold.party_size,
        starts_at=hold.starts_at,
        table_ids=list(hold.table_ids),
        reason=verdict.reason,  # type: ignore[arg-type]
        missing_table_ids=list(verdict.missing_table_ids),
        problems=[p.as_dict() for p in verdict.problems],
        released_at=now,
    ).model_dump(mode="json")


def _params(
    run_id: uuid.UUID,
    action: str,
    verdicts: Sequence[Verdict],
    values: list[str],
    events: list[str | None],
) -> dict[str, Any]:
    return {
        "run": run_id,
        "action": action,
        "event_type": HOLD_RELEASED_IRREPARABLE,
        "ids": [v.hold.id for v in verdicts],
        "versions": [v.hold.row_version for v in verdicts],
        "values": values,
        "reasons": [v.reason or "incomplete_metadata" for v in verdicts],
        "revisions": [v.rebuilt_under.revision_id if v.rebuilt_under else None for v in verdicts],
        "problems": [json.dumps([p.as_dict() for p in v.problems]) for v in verdicts],
        "events": events,
    }


@dataclass(frozen=True)
class PreparedWrite:
    """One batch's changes with their statement parameters (event payloads included) already
    built, so that nothing but one statement runs while rows are locked."""

    repairs: list[Verdict]
    releases: list[Verdict]
    repair_params: dict[str, Any]
    release_params: dict[str, Any]


def prepare_write(
    run_id: uuid.UUID,
    verdicts: Sequence[Verdict],
    venues: Mapping[uuid.UUID, VenueContext],
    now: datetime | None = None,
) -> PreparedWrite:
    """``venues`` must name the venue of every irreparable hold (its event needs the name)."""
    now = now or datetime.now(UTC)
    repairs = [v for v in verdicts if v.action == "repair"]
    releases = [v for v in verdicts if v.action == "release"]
    metadata = [json.dumps(v.metadata, separators=(",", ":")) for v in repairs]
    expired = [v.reason == EXPIRED_RELEASE_REASON for v in releases]
    reasons = [EXPIRED_RELEASE_REASON if e else IRREPARABLE_RELEASE_REASON for e in expired]
    events = [
        None if e else json.dumps(release_event(v, venues[v.hold.venue_id], now))
        for v, e in zip(releases, expired, strict=True)
    ]
    return PreparedWrite(
        repairs,
        releases,
        _params(run_id, "repaired", repairs, metadata, [None] * len(repairs)),
        _params(run_id, "released", releases, reasons, events),
    )


def _run(
    conn: AnyConnection, statement: str, params: dict[str, Any]
) -> tuple[set[uuid.UUID], float]:
    """One claim-change-log statement (see ``_WRITE``): the ids it changed, and how long it
    had run on the server when it produced its last row."""
    if not params["ids"]:
        return set(), 0.0
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(statement, params).fetchall()
    return {row[0] for row in rows}, max((float(row[1]) for row in rows), default=0.0)


@dataclass
class WriteResult:
    repaired: set[uuid.UUID]
    released: set[uuid.UUID]
    lock_ms: float


def apply_write(conn: AnyConnection, write: PreparedWrite) -> WriteResult:
    """Apply one batch as two statements: the repairs, then the releases with their outbox
    events. Each claims its rows, changes them and logs the change; on an autocommit
    connection each is its own transaction, committed as it ends, without a client round
    trip while its row locks are held. Holds locked or changed elsewhere are left untouched
    and out of the result. ``lock_ms`` is the longer statement's run time on the server."""
    repaired, repair_ms = _run(conn, _REPAIR, write.repair_params)
    released, release_ms = _run(conn, _RELEASE, write.release_params)
    return WriteResult(repaired, released, max(repair_ms, release_ms))


ProgressCallback = Callable[[int], object]


@dataclass
class Backfill:
    """One run over the active holds (optionally of one venue)."""

    db: Database
    batch_size: int = 500
    dry_run: bool = False
    venue_id: uuid.UUID | None = None
    retry_rounds: int = 5
    progress: ProgressCallback | None = None
    summary: BackfillSummary = field(init=False)
    _book: PolicyBook = field(init=False, default_factory=PolicyBook)
    _conn: psycopg.Connection[Any] | None = field(init=False, default=None)
    _venues: dict[uuid.UUID, VenueContext] = field(init=False, default_factory=dict)
    _memo: Memo = field(init=False, default_factory=Memo)

    def __post_init__(self) -> None:
        self.summary = BackfillSummary(dry_run=self.dry_run, run_id=uuid.uuid4())

    def total_active(self) -> int:
        """Active holds in scope now, for a progress bar."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM holds WHERE status = 'active'"
                " AND (%(venue)s::uuid IS NULL OR venue_id = %(venue)s)",
                {"venue": self.venue_id},
            ).fetchone()
        count = row["n"] if row else 0
        assert isinstance(count, int)
        return count

    def run(self) -> BackfillSummary:
        """Judge batch n+1 while batch n is being written (one writer thread), then retry
        the holds that were locked or changed, then validate the constraint if complete."""
        started = time.perf_counter()
        try:
            retry = self._scan()
            for round_ in range(self.retry_rounds):
                if not retry:
                    break
                time.sleep(0.1 * (round_ + 1))
                retry = self._retry(retry)
        finally:
            if self._conn is not None:
                self._conn.close()
        self.summary.busy = len(retry)
        self.summary.seconds = time.perf_counter() - started
        self.summary.constraint = self._validate_constraint()
        logged = {k: v for k, v in self.summary.as_dict().items() if k != "irreparableHolds"}
        log.info("holds backfill finished", **logged)
        return self.summary

    def _load(self, conn: AnyConnection, holds: Sequence[ActiveHold]) -> None:
        """The policies and the venue names the batch needs, in the read transaction."""
        self._book.load(conn, holds)
        unknown = sorted({h.venue_id for h in holds} - self._venues.keys())
        if unknown:
            with conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(
                    "SELECT id, name, timezone FROM venues WHERE id = ANY(%s)", (unknown,)
                ).fetchall()
            self._venues.update({r["id"]: VenueContext(r["name"], r["timezone"]) for r in rows})

    def _scan(self) -> list[uuid.UUID]:
        """The pass over every active hold in scope; returns the ids to try again."""
        retry: list[uuid.UUID] = []
        with ThreadPoolExecutor(1, thread_name_prefix="holds-backfill-writer") as writer:
            inflight: deque[Future[list[uuid.UUID]]] = deque()
            for holds in self._batches():
                self.summary.scanned += len(holds)
                self.summary.batches += 1
                pending = self._judge(holds)
                if pending:
                    write = prepare_write(self.summary.run_id, pending, self._venues)
                    inflight.append(writer.submit(self._write, write))
                while len(inflight) > 1:
                    retry += inflight.popleft().result()
                if self.progress is not None:
                    self.progress(len(holds))
            for future in inflight:
                retry += future.result()
        return retry

    def _batches(self) -> Iterator[list[ActiveHold]]:
        after: uuid.UUID | None = None
        while True:
            with self.db.transaction() as conn:
                holds = fetch_active_holds(
                    conn, after=after, limit=self.batch_size, venue_id=self.venue_id
                )
                self._load(conn, holds)
            if not holds:
                return
            yield holds
            after = holds[-1].id

    def _retry(self, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        still: list[uuid.UUID] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            with self.db.transaction() as conn:
                holds = fetch_holds_by_id(conn, chunk)
                self._load(conn, holds)
            self.summary.gone += len(chunk) - len(holds)
            pending = self._judge(holds)
            if pending:
                still += self._write(prepare_write(self.summary.run_id, pending, self._venues))
        return still

    def _judge(self, holds: Sequence[ActiveHold]) -> list[Verdict]:
        """The verdicts that call for a change (all of them counted at once in a dry run)."""
        verdicts = [judge(hold, self._book.policies_for(hold), self._memo) for hold in holds]
        self.summary.already_valid += sum(1 for v in verdicts if v.action == "valid")
        pending = [v for v in verdicts if v.action != "valid"]
        if self.dry_run:
            self._count(pending)
            return []
        return pending

    def _write(self, write: PreparedWrite) -> list[uuid.UUID]:
        """Apply one batch on the writer's own autocommit connection; returns the ids to try
        again (locked or changed since they were read)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.db.url, autocommit=True, row_factory=dict_row)
        result = apply_write(self._conn, write)
        self.summary.lock_ms.append(result.lock_ms)
        done = result.repaired | result.released
        pending = write.repairs + write.releases
        self._count([v for v in pending if v.hold.id in done])
        return [v.hold.id for v in pending if v.hold.id not in done]

    def _count(self, verdicts: Sequence[Verdict]) -> None:
        for verdict in verdicts:
            if verdict.action == "repair":
                self.summary.repaired += 1
            elif verdict.reason == EXPIRED_RELEASE_REASON:
                self.summary.expired_released += 1
            else:
                self.summary.irreparable += 1
                self.summary.irreparable_reasons[verdict.reason or ""] += 1
                self.summary.irreparable_holds.append(
                    {
                        "holdId": str(verdict.hold.id),
                        "bookingId": str(verdict.hold.booking_id),
                        "venueId": str(verdict.hold.venue_id),
                        "reason": verdict.reason or "",
                    }
                )

    def _validate_constraint(self) -> str:
        """After a complete run over every venue, validate the metadata check constraint
        (SHARE UPDATE EXCLUSIVE: reads and writes of holds go on)."""
        with self.db.transaction() as conn:
            validated = constraint_validated(conn)
        if validated is None:
            return "absent (run migrate)"
        if validated:
            return "validated"
        if self.dry_run or self.venue_id is not None or self.summary.busy:
            return "not validated (needs a complete run over every venue)"
        try:
            with self.db.transaction() as conn:
                conn.execute("SET LOCAL lock_timeout = '5s'")
                conn.execute(f"ALTER TABLE holds VALIDATE CONSTRAINT {METADATA_CONSTRAINT}")
        except (DatabaseError, psycopg.errors.CheckViolation) as error:
            return f"not validated ({type(error).__name__}); run the backfill again"
        return "validated"


def run_backfill(
    db: Database,
    *,
    batch_size: int = 500,
    dry_run: bool = False,
    venue_id: uuid.UUID | None = None,
    progress: ProgressCallback | None = None,
) -> BackfillSummary:
    """Repair or release every active hold with incomplete metadata; see the module docstring."""
    return Backfill(
        db, batch_size=batch_size, dry_run=dry_run, venue_id=venue_id, progress=progress
    ).run()
