"""SQL of the capacity shell: policy revisions, bookings, holds, occupancy and assignments.

Every function runs on the caller's connection, inside the caller's transaction. Hashes are
computed by :mod:`service.capacity.policy` and only stored here.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from service.capacity.policy import CapacityPolicy, adjacency_hash, policy_version
from service.capacity.quoting import Occupancy

Connection = psycopg.Connection[dict[str, Any]]


@dataclass(frozen=True)
class PolicyRevision:
    id: int
    venue_id: uuid.UUID
    revision: int
    version: str
    adjacency_hash: str
    policy: CapacityPolicy
    created_at: datetime


@dataclass(frozen=True)
class BookingRecord:
    id: uuid.UUID
    venue_id: uuid.UUID
    status: str
    party_size: int
    starts_at: datetime
    needs_attention: bool


@dataclass(frozen=True)
class VenueRecord:
    id: uuid.UUID
    name: str
    timezone: str


@dataclass(frozen=True)
class HoldRecord:
    id: uuid.UUID
    booking_id: uuid.UUID
    venue_id: uuid.UUID
    table_ids: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    expires_at: datetime
    status: str
    metadata: Any
    policy_revision_id: int | None
    replaced_by: uuid.UUID | None
    release_reason: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> HoldRecord:
        return cls(
            id=row["id"],
            booking_id=row["booking_id"],
            venue_id=row["venue_id"],
            table_ids=tuple(row["table_ids"]),
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
            expires_at=row["expires_at"],
            status=row["status"],
            metadata=row["metadata"],
            policy_revision_id=row["policy_revision_id"],
            replaced_by=row["replaced_by"],
            release_reason=row["release_reason"],
        )


_POLICY_CACHE_SIZE = 256
_PolicyKey = tuple[uuid.UUID, str]
_policies: OrderedDict[_PolicyKey, CapacityPolicy] = OrderedDict()
_policies_lock = threading.Lock()


def _policy_of(conn: Connection, row: Mapping[str, Any]) -> CapacityPolicy:
    """The parsed policy of a revision row (read without its large ``policy`` column).

    Each process keeps recent policies by venue and version: the version hashes everything
    allocation depends on, so two revisions with one version hold the same policy, and a
    revision id reused after a database restore cannot answer with another policy.
    """
    key: _PolicyKey = (row["venue_id"], row["version"])
    with _policies_lock:
        cached = _policies.get(key)
        if cached is not None:
            _policies.move_to_end(key)
            return cached
    found = conn.execute(
        "SELECT policy::text AS policy FROM capacity_policy_revisions WHERE id = %s", (row["id"],)
    ).fetchone()
    if found is None:
        raise LookupError(f"policy revision {row['id']} not found")
    policy = CapacityPolicy.model_validate_json(found["policy"])
    with _policies_lock:
        _policies[key] = policy
        while len(_policies) > _POLICY_CACHE_SIZE:
            _policies.popitem(last=False)
    return policy


def _revision(row: Mapping[str, Any], policy: CapacityPolicy) -> PolicyRevision:
    return PolicyRevision(
        id=row["id"],
        venue_id=row["venue_id"],
        revision=row["revision"],
        version=row["version"],
        adjacency_hash=row["adjacency_hash"],
        policy=policy,
        created_at=row["created_at"],
    )


def save_policy(conn: Connection, venue_id: uuid.UUID, policy: CapacityPolicy) -> PolicyRevision:
    """Store ``policy`` as the venue's next revision and make it current.

    The venue row is locked so that revisions are numbered without gaps or races; every table
    of the policy gets its slot.
    """
    if policy.venue_id != str(venue_id):
        raise ValueError(f"policy is for venue {policy.venue_id}, not {venue_id}")
    conn.execute("SELECT id FROM venues WHERE id = %s FOR NO KEY UPDATE", (venue_id,))
    row = conn.execute(
        """
        INSERT INTO capacity_policy_revisions (venue_id, revision, version, adjacency_hash, policy)
        SELECT %(venue)s, COALESCE(max(revision), 0) + 1, %(version)s, %(adjacency)s, %(policy)s
        FROM capacity_policy_revisions WHERE venue_id = %(venue)s
        RETURNING id, venue_id, revision, version, adjacency_hash, created_at
        """,
        {
            "venue": venue_id,
            "version": policy_version(policy),
            "adjacency": adjacency_hash(policy.adjacency),
            "policy": Jsonb(policy.model_dump(mode="json")),
        },
    ).fetchone()
    assert row is not None
    conn.execute(
        """
        INSERT INTO capacity_current_policies (venue_id, revision_id) VALUES (%s, %s)
        ON CONFLICT (venue_id) DO UPDATE
        SET revision_id = EXCLUDED.revision_id, updated_at = now()
        """,
        (venue_id, row["id"]),
    )
    ensure_table_slots(conn, venue_id, [t.id for t in policy.tables])
    return _revision(row, policy)


def current_policy(conn: Connection, venue_id: uuid.UUID) -> PolicyRevision | None:
    row = conn.execute(
        """
        SELECT r.id, r.venue_id, r.revision, r.version, r.adjacency_hash, r.created_at
        FROM capacity_current_policies c
        JOIN capacity_policy_revisions r ON r.id = c.revision_id
        WHERE c.venue_id = %s
        """,
        (venue_id,),
    ).fetchone()
    return None if row is None else _revision(row, _policy_of(conn, row))


def policy_by_version(conn: Connection, venue_id: uuid.UUID, version: str) -> PolicyRevision | None:
    """The latest revision of the venue whose stored version is ``version``."""
    row = conn.execute(
        """
        SELECT r.id, r.venue_id, r.revision, r.version, r.adjacency_hash, r.created_at
        FROM capacity_policy_revisions r
        WHERE venue_id = %s AND version = %s
        ORDER BY revision DESC LIMIT 1
        """,
        (venue_id, version),
    ).fetchone()
    return None if row is None else _revision(row, _policy_of(conn, row))


def ensure_table_slots(
    conn: Connection, venue_id: uuid.UUID, table_ids: Iterable[str]
) -> dict[str, int]:
    """The slot of each table, allocating the missing ones (rarely any: a policy's tables get
    their slots when it is saved)."""
    ids = sorted(set(table_ids))
    query = (
        "SELECT table_id, slot FROM capacity_table_slots WHERE venue_id = %s AND table_id = ANY(%s)"
    )
    slots = {r["table_id"]: r["slot"] for r in conn.execute(query, (venue_id, ids))}
    missing = [t for t in ids if t not in slots]
    if missing:
        conn.execute(
            """
            INSERT INTO capacity_table_slots (venue_id, table_id)
            SELECT %s, t FROM unnest(%s::text[]) AS t
            ON CONFLICT (venue_id, table_id) DO NOTHING
            """,
            (venue_id, missing),
        )
        slots.update({r["table_id"]: r["slot"] for r in conn.execute(query, (venue_id, missing))})
    return slots


def _booking(row: Mapping[str, Any]) -> BookingRecord:
    return BookingRecord(
        id=row["id"],
        venue_id=row["venue_id"],
        status=row["status"],
        party_size=row["party_size"],
        starts_at=row["starts_at"],
        needs_attention=row["needs_attention"],
    )


def lock_booking(conn: Connection, booking_id: uuid.UUID) -> BookingRecord | None:
    """The booking, locked for the rest of the transaction (always the first lock taken)."""
    row = conn.execute(
        """
        SELECT id, venue_id, status, party_size, starts_at, needs_attention
        FROM bookings WHERE id = %s FOR UPDATE
        """,
        (booking_id,),
    ).fetchone()
    return None if row is None else _booking(row)


def lock_venue(conn: Connection, venue_id: uuid.UUID) -> VenueRecord:
    """The venue, locked: hold creation, confirmation and policy changes of one venue are
    serialised on this row. ``NO KEY UPDATE`` leaves inserts that reference the venue free."""
    row = conn.execute(
        "SELECT id, name, timezone FROM venues WHERE id = %s FOR NO KEY UPDATE", (venue_id,)
    ).fetchone()
    if row is None:
        raise LookupError(f"venue {venue_id} not found")
    return VenueRecord(id=row["id"], name=row["name"], timezone=row["timezone"])


def venue(conn: Connection, venue_id: uuid.UUID) -> VenueRecord:
    row = conn.execute(
        "SELECT id, name, timezone FROM venues WHERE id = %s", (venue_id,)
    ).fetchone()
    if row is None:
        raise LookupError(f"venue {venue_id} not found")
    return VenueRecord(id=row["id"], name=row["name"], timezone=row["timezone"])


def occupancy(
    conn: Connection,
    venue_id: uuid.UUID,
    window_start: datetime,
    window_end: datetime,
    now: datetime,
    exclude_booking: uuid.UUID | None = None,
) -> list[Occupancy]:
    """Live assignments and unexpired active holds of the venue overlapping the window.

    Expired holds are filtered here and again by :meth:`Occupancy.blocks`: an expired hold never
    blocks, swept or not. The booking being (re)held is left out.
    """
    rows = conn.execute(
        """
        SELECT array_agg(table_id ORDER BY table_id) AS table_ids, starts_at, ends_at,
               NULL::timestamptz AS expires_at
        FROM table_assignments
        WHERE venue_id = %(venue)s AND released_at IS NULL
          AND starts_at < %(end)s AND ends_at > %(start)s
          AND booking_id IS DISTINCT FROM %(exclude)s
        GROUP BY booking_id, starts_at, ends_at
        UNION ALL
        SELECT table_ids, starts_at, ends_at, expires_at
        FROM holds
        WHERE venue_id = %(venue)s AND status = 'active' AND expires_at > %(now)s
          AND starts_at < %(end)s AND ends_at > %(start)s
          AND booking_id IS DISTINCT FROM %(exclude)s
        """,
        {
            "venue": venue_id,
            "start": window_start,
            "end": window_end,
            "now": now,
            "exclude": exclude_booking,
        },
    ).fetchall()
    return [
        Occupancy(
            table_ids=tuple(r["table_ids"]),
            starts_at=r["starts_at"],
            ends_at=r["ends_at"],
            expires_at=r["expires_at"],
        )
        for r in rows
    ]


def insert_hold(
    conn: Connection,
    *,
    booking_id: uuid.UUID,
    venue_id: uuid.UUID,
    table_ids: Sequence[str],
    starts_at: datetime,
    ends_at: datetime,
    expires_at: datetime,
    metadata: Mapping[str, Any],
    policy_revision_id: int | None,
    now: datetime,
) -> HoldRecord:
    row = conn.execute(
        """
        INSERT INTO holds (id, booking_id, venue_id, table_ids, starts_at, ends_at, expires_at,
                           metadata, policy_revision_id, created_at, updated_at)
        VALUES (%(id)s, %(booking)s, %(venue)s, %(tables)s, %(starts)s, %(ends)s, %(expires)s,
                %(metadata)s, %(revision)s, %(now)s, %(now)s)
        RETURNING *
        """,
        {
            "id": uuid.uuid4(),
            "booking": booking_id,
            "venue": venue_id,
            "tables": list(table_ids),
            "starts": starts_at,
            "ends": ends_at,
            "expires": expires_at,
            "metadata": Jsonb(dict(metadata)),
            "revision": policy_revision_id,
            "now": now,
        },
    ).fetchone()
    assert row is not None
    return HoldRecord.from_row(row)


def lock_hold(conn: Connection, hold_id: uuid.UUID) -> HoldRecord | None:
    row = conn.execute("SELECT * FROM holds WHERE id = %s FOR UPDATE", (hold_id,)).fetchone()
    return None if row is None else HoldRecord.from_row(row)


def get_hold(conn: Connection, hold_id: uuid.UUID) -> HoldRecord | None:
    row = conn.execute("SELECT * FROM holds WHERE id = %s", (hold_id,)).fetchone()
    return None if row is None else HoldRecord.from_row(row)


def release_hold(
    conn: Connection,
    hold_id: uuid.UUID,
    *,
    reason: str,
    now: datetime,
    replaced_by: uuid.UUID | None = None,
) -> bool:
    """Release an active hold; False when it was not active."""
    row = conn.execute(
        """
        UPDATE holds
        SET status = 'released', released_at = %(now)s, release_reason = %(reason)s,
            replaced_by = %(replaced_by)s, updated_at = %(now)s
        WHERE id = %(id)s AND status = 'active'
        RETURNING id
        """,
        {"id": hold_id, "now": now, "reason": reason, "replaced_by": replaced_by},
    ).fetchone()
    return row is not None


def release_active_holds(
    conn: Connection,
    booking_id: uuid.UUID,
    *,
    reason: str,
    now: datetime,
    keep: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Release the booking's active holds except ``keep``; returns the ids released."""
    rows = conn.execute(
        """
        UPDATE holds
        SET status = 'released', released_at = %(now)s, release_reason = %(reason)s,
            replaced_by = %(keep)s, updated_at = %(now)s
        WHERE booking_id = %(booking)s AND status = 'active' AND id IS DISTINCT FROM %(keep)s
        RETURNING id
        """,
        {"booking": booking_id, "now": now, "reason": reason, "keep": keep},
    ).fetchall()
    return [r["id"] for r in rows]


def consume_hold(conn: Connection, hold_id: uuid.UUID, now: datetime) -> None:
    conn.execute(
        """
        UPDATE holds SET status = 'consumed', consumed_at = %(now)s, updated_at = %(now)s
        WHERE id = %(id)s AND status = 'active'
        """,
        {"id": hold_id, "now": now},
    )


def assign_tables(conn: Connection, hold: HoldRecord) -> None:
    """One assignment row per table of the hold, for the hold's window.

    The exclusion constraint ``table_assignments_no_overlap`` rejects the insert (with
    ``psycopg.errors.ExclusionViolation``) when any table is already assigned over an
    overlapping window, whatever other transactions are doing.
    """
    slots = ensure_table_slots(conn, hold.venue_id, hold.table_ids)
    with conn.cursor() as cur:
        cur.executemany(
            """
            INSERT INTO table_assignments (booking_id, hold_id, venue_id, table_id, table_slot,
                                           starts_at, ends_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            """,
            [
                (
                    hold.booking_id,
                    hold.id,
                    hold.venue_id,
                    table_id,
                    slots[table_id],
                    hold.starts_at,
                    hold.ends_at,
                )
                for table_id in hold.table_ids
            ],
        )


def assigned_tables(conn: Connection, booking_id: uuid.UUID) -> list[dict[str, Any]]:
    return conn.execute(
        """
        SELECT table_id, starts_at, ends_at, hold_id FROM table_assignments
        WHERE booking_id = %s AND released_at IS NULL ORDER BY table_id
        """,
        (booking_id,),
    ).fetchall()


def confirm_booking(conn: Connection, booking_id: uuid.UUID, now: datetime) -> None:
    conn.execute(
        """
        UPDATE bookings
        SET status = 'confirmed', status_changed_at = %(now)s, updated_at = %(now)s
        WHERE id = %(id)s
        """,
        {"id": booking_id, "now": now},
    )


def flag_needs_attention(conn: Connection, booking_id: uuid.UUID, now: datetime) -> None:
    conn.execute(
        "UPDATE bookings SET needs_attention = true, updated_at = %s WHERE id = %s",
        (now, booking_id),
    )
