"""Which active holds carry complete metadata: the one check shared by the backfill, the audit
command and the ``booking_holds_invalid_active`` gauge.

A hold is judged by the validator confirmation runs (:func:`hold_metadata_problems`, every
defect reported at once): its metadata must pass it against the policy revision whose version
it claims, and name the hold's own tables. Where confirmation would fall back to a shape-only check (the
claimed version is not on record, or absent), this check is stricter: it validates against the
hold's own revision (``holds.policy_revision_id``), else the venue's current policy.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client.core import Metric
from psycopg.rows import class_row, dict_row
from pydantic import ValidationError

from service.capacity.holds import MetadataProblem, hold_metadata_problems
from service.capacity.policy import CapacityPolicy, policy_version
from service.metrics import HOLDS_INVALID_ACTIVE
from service.observability.collectors import Database as ScrapeDatabase

METADATA_CONSTRAINT = "holds_active_metadata_object"
_VERSION = re.compile(r"^[0-9a-f]{64}$")

AnyConnection = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class KnownPolicy:
    """A stored policy revision; ``version`` is recomputed by :func:`policy_version`."""

    revision_id: int
    venue_id: uuid.UUID
    version: str
    policy: CapacityPolicy
    table_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class HoldPolicies:
    """The revisions a hold can be judged or rebuilt under."""

    own: KnownPolicy | None
    claimed: KnownPolicy | None
    current: KnownPolicy | None

    @property
    def reference(self) -> KnownPolicy | None:
        """The policy the metadata is validated against: the claimed version's revision (as
        confirmation does), else the hold's own revision, else the current policy."""
        return self.claimed or self.own or self.current

    def rebuild_candidates(self) -> list[KnownPolicy]:
        """Own revision first (keeps drift honest), then the claimed one, then the current."""
        seen: set[int] = set()
        found: list[KnownPolicy] = []
        for candidate in (self.own, self.claimed, self.current):
            if candidate is not None and candidate.revision_id not in seen:
                seen.add(candidate.revision_id)
                found.append(candidate)
        return found


@dataclass(frozen=True, slots=True)
class ActiveHold:
    """An active hold as the checks need it; ``row_version`` is its ``xmin``."""

    id: uuid.UUID
    venue_id: uuid.UUID
    booking_id: uuid.UUID
    table_ids: tuple[str, ...]
    metadata: Any
    policy_revision_id: int | None
    starts_at: datetime
    ends_at: datetime
    expired: bool
    row_version: str
    party_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_ids", tuple(self.table_ids))

    @property
    def claimed_version(self) -> str | None:
        claimed = self.metadata.get("policyVersion") if isinstance(self.metadata, Mapping) else None
        return claimed if isinstance(claimed, str) and _VERSION.match(claimed) else None


def hold_problems(hold: ActiveHold, policies: HoldPolicies) -> list[MetadataProblem]:
    """Every problem with the hold's metadata (:func:`hold_metadata_problems` against the
    reference policy); empty when confirmation would accept it."""
    reference = policies.reference
    problems = hold_metadata_problems(
        hold.metadata, hold.table_ids, None if reference is None else reference.policy
    )
    if reference is None and isinstance(hold.metadata, Mapping):
        missing = "the venue has no capacity policy to check the hold against"
        problems.insert(0, MetadataProblem("", missing))
    return problems


_HOLD_COLUMNS = """
    h.id, h.venue_id, h.booking_id, h.table_ids, h.metadata, h.policy_revision_id,
    h.starts_at, h.ends_at, h.expires_at <= now() AS expired, h.xmin::text AS row_version,
    b.party_size
"""


def fetch_active_holds(
    conn: AnyConnection,
    *,
    after: uuid.UUID | None,
    limit: int,
    venue_id: uuid.UUID | None = None,
) -> list[ActiveHold]:
    """The next ``limit`` active holds by id after ``after`` (keyset; no locks taken)."""
    conditions = ["h.status = 'active'"]
    if after is not None:
        conditions.append("h.id > %(after)s")
    if venue_id is not None:
        conditions.append("h.venue_id = %(venue)s")
    with conn.cursor(row_factory=class_row(ActiveHold)) as cur:
        return cur.execute(
            f"""
            SELECT {_HOLD_COLUMNS}
            FROM holds h JOIN bookings b ON b.id = h.booking_id
            WHERE {" AND ".join(conditions)}
            ORDER BY h.id
            LIMIT %(limit)s
            """,
            {"after": after, "venue": venue_id, "limit": limit},
        ).fetchall()


def fetch_holds_by_id(conn: AnyConnection, ids: Sequence[uuid.UUID]) -> list[ActiveHold]:
    """The holds among ``ids`` that are still active."""
    with conn.cursor(row_factory=class_row(ActiveHold)) as cur:
        return cur.execute(
            f"""
            SELECT {_HOLD_COLUMNS}
            FROM holds h JOIN bookings b ON b.id = h.booking_id
            WHERE h.status = 'active' AND h.id = ANY(%s)
            ORDER BY h.id
            """,
            (list(ids),),
        ).fetchall()


class PolicyBook:
    """Policy revisions loaded on demand. Revisions never change, so they are kept; which
    revision is current is re-read by every :meth:`load`."""

    def __init__(self) -> None:
        self._revisions: dict[int, KnownPolicy | None] = {}
        self._by_version: dict[tuple[uuid.UUID, str], int] = {}
        self._current: dict[uuid.UUID, int | None] = {}

    def load(self, conn: AnyConnection, holds: Iterable[ActiveHold]) -> None:
        """Make every revision the holds may need available, in at most three queries."""
        holds = list(holds)
        venues = sorted({h.venue_id for h in holds})
        if not venues:
            return
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                "SELECT venue_id, revision_id FROM capacity_current_policies"
                " WHERE venue_id = ANY(%s)",
                (venues,),
            ).fetchall()
            current = {row["venue_id"]: row["revision_id"] for row in rows}
            self._current.update({venue: current.get(venue) for venue in venues})
            wanted = sorted(
                {
                    (h.venue_id, v)
                    for h in holds
                    if (v := h.claimed_version) is not None
                    and (h.venue_id, v) not in self._by_version
                }
            )
            if wanted:
                rows = cur.execute(
                    """
                    SELECT DISTINCT ON (r.venue_id, r.version) r.id, r.venue_id, r.version
                    FROM capacity_policy_revisions r
                    JOIN unnest(%s::uuid[], %s::text[]) AS w(venue_id, version)
                      ON w.venue_id = r.venue_id AND w.version = r.version
                    ORDER BY r.venue_id, r.version, r.revision DESC
                    """,
                    ([v for v, _ in wanted], [s for _, s in wanted]),
                ).fetchall()
                self._by_version.update({(r["venue_id"], r["version"]): r["id"] for r in rows})
            needed = {rid for rid in current.values()}
            needed |= {h.policy_revision_id for h in holds if h.policy_revision_id is not None}
            needed |= {
                rid
                for h in holds
                if (v := h.claimed_version) is not None
                and (rid := self._by_version.get((h.venue_id, v))) is not None
            }
            missing = sorted(needed - self._revisions.keys())
            if missing:
                rows = cur.execute(
                    "SELECT id, venue_id, policy FROM capacity_policy_revisions WHERE id = ANY(%s)",
                    (missing,),
                ).fetchall()
                for row in rows:
                    self._revisions[row["id"]] = _known(row)

    def _get(self, revision_id: int | None) -> KnownPolicy | None:
        return None if revision_id is None else self._revisions.get(revision_id)

    def current_revision_id(self, venue_id: uuid.UUID) -> int | None:
        return self._current.get(venue_id)

    def policies_for(self, hold: ActiveHold) -> HoldPolicies:
        claimed = hold.claimed_version
        return HoldPolicies(
            own=self._get(hold.policy_revision_id),
            claimed=(
                None
                if claimed is None
                else self._get(self._by_version.get((hold.venue_id, claimed)))
            ),
            current=self._get(self._current.get(hold.venue_id)),
        )


def _known(row: Mapping[str, Any]) -> KnownPolicy | None:
    """A stored revision, or None when its document no longer parses (treated as missing)."""
    try:
        policy = CapacityPolicy.model_validate(row["policy"])
    except ValidationError:
        return None
    return KnownPolicy(
        revision_id=row["id"],
        venue_id=row["venue_id"],
        version=policy_version(policy),
        policy=policy,
        table_ids=frozenset(t.id for t in policy.tables),
    )


# -- counting ----------------------------------------------------------------------------------


@dataclass
class _Seen:
    row_version: str
    current_revision: int | None
    valid: bool


@dataclass
class ValidityCounter:
    """Counts live active holds by validity, re-checking only holds that are new or changed
    since the last count (or whose venue changed policy), so a scrape stays cheap."""

    book: PolicyBook = field(default_factory=PolicyBook)
    _seen: dict[uuid.UUID, _Seen] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, conn: AnyConnection) -> dict[str, int]:
        with self._lock, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                """
                SELECT h.id, h.xmin::text AS row_version, c.revision_id
                FROM holds h LEFT JOIN capacity_current_policies c ON c.venue_id = h.venue_id
                WHERE h.status = 'active' AND h.expires_at > now()
                """
            ).fetchall()
            live = {row["id"]: row for row in rows}
            stale = [
                hold_id
                for hold_id, row in live.items()
                if (seen := self._seen.get(hold_id)) is None
                or seen.row_version != row["row_version"]
                or seen.current_revision != row["revision_id"]
            ]
            self._seen = {k: v for k, v in self._seen.items() if k in live}
            for start in range(0, len(stale), 1000):
                holds = fetch_holds_by_id(conn, stale[start : start + 1000])
                self.book.load(conn, holds)
                for hold in holds:
                    self._seen[hold.id] = _Seen(
                        hold.row_version,
                        self.book.current_revision_id(hold.venue_id),
                        not hold_problems(hold, self.book.policies_for(hold)),
                    )
            valid = sum(1 for k in live if (s := self._seen.get(k)) is not None and s.valid)
            return {"valid": valid, "invalid": len(live) - valid}


_counters: dict[tuple[str, int, str], ValidityCounter] = {}
_counters_lock = threading.Lock()


def count_active_holds_by_validity(conn: AnyConnection) -> dict[str, int]:
    """``{"valid": n, "invalid": m}`` over unexpired active holds, for the audit and the gauge.

    Cheap to call repeatedly: a hold is validated again only when its row or its venue's
    current policy changed since the previous call in this process (for the same database).
    """
    key = (conn.info.host, conn.info.port, conn.info.dbname)
    with _counters_lock:
        counter = _counters.setdefault(key, ValidityCounter())
    return counter.count(conn)


# -- the audit report --------------------------------------------------------------------------


@dataclass
class AuditReport:
    valid: int = 0
    invalid: int = 0
    expired_valid: int = 0
    expired_invalid: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    invalid_holds: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    constraint_validated: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "invalid": self.invalid,
            "expiredValid": self.expired_valid,
            "expiredInvalid": self.expired_invalid,
            "problemsByPath": dict(sorted(self.problems.items())),
            "invalidHolds": [{"holdId": str(h), "venueId": str(v)} for h, v in self.invalid_holds],
            "constraintValidated": self.constraint_validated,
        }


def constraint_validated(conn: AnyConnection) -> bool | None:
    """Whether the metadata check constraint is validated; None if it does not exist."""
    row = conn.execute(
        "SELECT convalidated FROM pg_constraint WHERE conname = %s AND conrelid = 'holds'::regclass",
        (METADATA_CONSTRAINT,),
    ).fetchone()
    if row is None:
        return None
    value = row["convalidated"] if isinstance(row, Mapping) else row[0]
    return bool(value)


def _path_key(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path) or "(root)"


def audit(
    conn: AnyConnection,
    *,
    venue_id: uuid.UUID | None = None,
    batch_size: int = 1000,
    sample: int = 20,
) -> AuditReport:
    """Check every active hold (expired ones reported apart), without locking anything."""
    report = AuditReport(constraint_validated=constraint_validated(conn))
    book = PolicyBook()
    after: uuid.UUID | None = None
    while True:
        holds = fetch_active_holds(conn, after=after, limit=batch_size, venue_id=venue_id)
        if not holds:
            return report
        after = holds[-1].id
        book.load(conn, holds)
        for hold in holds:
            problems = hold_problems(hold, book.policies_for(hold))
            if hold.expired:
                if problems:
                    report.expired_invalid += 1
                else:
                    report.expired_valid += 1
                continue
            if not problems:
                report.valid += 1
                continue
            report.invalid += 1
            report.problems.update({_path_key(p.path) for p in problems})
            if len(report.invalid_holds) < sample:
                report.invalid_holds.append((hold.id, hold.venue_id))


class InvalidHoldsSource:
    """Scrape-time gauge: active, unexpired holds whose metadata fails validation, counted by the
    same check as ``holds audit`` (it re-validates only holds changed since the last scrape)."""

    name = "holds"

    def __init__(self, db: ScrapeDatabase) -> None:
        self.db = db

    def collect(self) -> list[Metric]:
        counts = self.db.run(count_active_holds_by_validity)
        return [HOLDS_INVALID_ACTIVE.family(counts["invalid"])]
