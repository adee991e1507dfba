"""SQL of the capacity shell: policy revisions, bookings, holds, occupancy and assignments.

Every function runs on the caller's connection, inside the caller's transaction. Hashes are
computed by :mod:`service.capacity.policy` and only stored here. Rows become the values of
:mod:`service.capacity.records` through psycopg's ``class_row`` (columns named as the fields).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from service.capacity.policy import CapacityPolicy, adjacency_hash, policy_version
from service.capacity.quoting import Occupancy
from service.capacity.records import Booking, Hold, PolicyRevision, Venue

Connection = psycopg.Connection[dict[str, Any]]

_HOLD_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in fields(Hold))


@dataclass(frozen=True)
class _StoredRevision:
    """A revision row without its (large) policy document."""

    id: int
    venue_id: uuid.UUID
    revision: int
    version: str
    adjacency_hash: str
    created_at: datetime


_POLICY_CACHE_SIZE = 256
_PolicyKey = tuple[uuid.UUID, str]
_policies: OrderedDict[_PolicyKey, CapacityPolicy] = OrderedDict()
_policies_lock = threading.Lock()


def _with_policy(conn: Connection, row: _StoredRevision) -> PolicyRevision:
    """The revision with its parsed policy (the row is read without its ``policy`` column).

    Each process keeps recent policies by venue and version: the version hashes everything
    allocation depends on, so two revisions with one version hold the same policy, and a
    revision id reused after a database restore cannot answer with another policy.
    """
    key: _PolicyKey = (row.venue_id, row.version)
    with _policies_lock:
        policy = _policies.get(key)
        if policy is not None:
            _policies.move_to_end(key)
    if policy is None:
        found = conn.execute(
            "SELECT policy::text AS policy FROM capacity_policy_revisions WHERE id = %s", (row.id,)
        ).fetchone()
        if found is None:
            raise LookupError(f"policy revision {row.id} not found")
        policy = CapacityPolicy.model_validate_json(found["policy"])
        with _policies_lock:
            _policies[key] = policy
            while len(_policies) > _POLICY_CACHE_SIZE:
                _policies.popitem(last=False)
    return PolicyRevision(**vars(row), policy=policy)


def _load_revision(
    conn: Connection, query: LiteralString, params: Sequence[Any]
) -> PolicyRevision | None:
    with conn.cursor(row_factory=class_row(_StoredRevision)) as cur:
        row = cur.execute(query, params).fetchone()
    return None if row is None else _with_policy(conn, row)


def save_policy(conn: Connection, venue_id: uuid.UUID, policy: CapacityPolicy) -> PolicyRevision:
    """Store ``policy`` as the venue's next revision and make it current.

    The venue row is locked so that revisions are numbered without gaps or races; every table
    of the policy gets its slot.
    """
    if policy.venue_id != str(venue_id):
        raise ValueError(f"policy is for venue {policy.venue_id}, not {venue_id}")
    conn.execute("SELECT id FROM venues WHERE id = %s FOR NO KEY UPDATE", (venue_id,))
    with conn.cursor(row_factory=class_row(_StoredRevision)) as cur:
        row = cur.execute(
            """
            INSERT INTO capacity_policy_revisions
                (venue_id, revision, version, adjacency_hash, policy)
            SELECT %(venue)s, COALESCE(max(revision), 0) + 1, %(version)s, %(adjacency)s,
                   %(policy)s
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
        (venue_id, row.id),
    )
    ensure_table_slots(conn, venue_id, [t.id for t in policy.tables])
    return PolicyRevision(**vars(row), policy=policy)


def current_policy(conn: Connection, venue_id: uuid.UUID) -> PolicyRevision | None:
    return _load_revision(
        conn,
        """
        SELECT r.id, r.venue_id, r.revision, r.version, r.adjacency_hash, r.created_at
        FROM capacity_current_policies c
        JOIN capacity_policy_revisions r ON r.id = c.revision_id
        WHERE c.venue_id = %s
        """,
        (venue_id,),
    )


def policy_by_version(conn: Connection, venue_id: uuid.UUID, version: str) -> PolicyRevision | None:
    """The latest revision of the venue whose stored version is ``version``."""
    return _load_revision(
        conn,
        """
        SELECT r.id, r.venue_id, r.revision, r.version, r.adjacency_hash, r.created_at
        FROM capacity_policy_revisions r
        WHERE venue_id = %s AND version = %s
        ORDER BY revision DESC LIMIT 1
        """,
        (venue_id, version),
    )


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


def lock_booking(conn: Connection, booking_id: uuid.UUID) -> Booking | None:
    """The booking, locked for the rest of the transaction (always the first lock taken)."""
    with conn.cursor(row_factory=class_row(Booking)) as cur:
        return cur.execute(
            """
            SELECT id, venue_id, status, party_size, starts_at, needs_attention
            FROM bookings WHERE id = %s FOR UPDATE
            """,
            (booking_id,),
        ).fetchone()


def _venue(conn: Connection, query: LiteralString, venue_id: uuid.UUID) -> Venue:
    with conn.cursor(row_factory=class_row(Venue)) as cur:
        found = cur.execute(query, (venue_id,)).fetchone()
    if found is None:
        raise LookupError(f"venue {venue_id} not found")
    return found


def lock_venue(conn: Connection, venue_id: uuid.UUID) -> Venue:
    """The venue, locked: hold creation, confirmation and policy changes of one venue are
    serialised on this row. ``NO KEY UPDATE`` leaves inserts that reference the venue free."""
    return _venue(
        conn, "SELECT id, name, timezone FROM venues WHERE id = %s FOR NO KEY UPDATE", venue_id
    )


def venue(conn: Connection, venue_id: uuid.UUID) -> Venue:
    return _venue(conn, "SELECT id, name, timezone FROM venues WHERE id = %s", venue_id)


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
    with conn.cursor(row_factory=class_row(Occupancy)) as cur:
        return cur.execute(
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
) -> Hold:
    query = sql.SQL(
        """
        INSERT INTO holds (id, booking_id, venue_id, table_ids, starts_at, ends_at, expires_at,
                           metadata, policy_revision_id, created_at, updated_at)
        VALUES (%(id)s, %(booking)s, %(venue)s, %(tables)s, %(starts)s, %(ends)s, %(expires)s,
                %(metadata)s, %(revision)s, %(now)s, %(now)s)
        RETURNING {columns}
        """
    ).format(columns=_HOLD_COLUMNS)
    params = {
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
    }
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        hold = cur.execute(query, params).fetchone()
    assert hold is not None
    return hold


def _hold(conn: Connection, hold_id: uuid.UUID, *, lock: bool) -> Hold | None:
    query = sql.SQL("SELECT {columns} FROM holds WHERE id = %s{lock}").format(
        columns=_HOLD_COLUMNS, lock=sql.SQL(" FOR UPDATE" if lock else "")
    )
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        return cur.execute(query, (hold_id,)).fetchone()


def lock_hold(conn: Connection, hold_id: uuid.UUID) -> Hold | None:
    return _hold(conn, hold_id, lock=True)


def get_hold(conn: Connection, hold_id: uuid.UUID) -> Hold | None:
    return _hold(conn, hold_id, lock=False)


def replacements(conn: Connection, hold: Hold, limit: int) -> list[Hold]:
    """The holds that replaced ``hold`` after re-quotes, in order, at most ``limit`` of them
    (read, not locked: a confirmed chain no longer changes)."""
    if hold.replaced_by is None or limit < 1:
        return []
    query = sql.SQL(
        """
        WITH RECURSIVE chain (id, depth) AS (
            SELECT %(first)s::uuid, 1
            UNION ALL
            SELECT h.replaced_by, c.depth + 1
            FROM chain c JOIN holds h ON h.id = c.id
            WHERE h.replaced_by IS NOT NULL AND c.depth < %(limit)s
        )
        SELECT {columns} FROM chain JOIN holds USING (id) ORDER BY chain.depth
        """
    ).format(columns=sql.SQL(", ").join(sql.Identifier("holds", f.name) for f in fields(Hold)))
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        return cur.execute(query, {"first": hold.replaced_by, "limit": limit}).fetchall()


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


def assign_tables(conn: Connection, hold: Hold) -> None:
    """One assignment row per table of the hold, for the hold's window, in one statement.

    The exclusion constraint ``table_assignments_no_overlap`` rejects the insert (with
    ``psycopg.errors.ExclusionViolation``) when any table is already assigned over an
    overlapping window, whatever other transactions are doing. A single statement (not
    ``executemany``, which pipelines one insert per table) fails cleanly: nothing is left queued
    behind the failed insert, so the caller's rollback is all there is to do.
    """
    slots = ensure_table_slots(conn, hold.venue_id, hold.table_ids)
    conn.execute(
        """
        INSERT INTO table_assignments (booking_id, hold_id, venue_id, table_id, table_slot,
                                       starts_at, ends_at)
        SELECT %(booking)s, %(hold)s, %(venue)s, t.table_id, t.slot, %(starts)s, %(ends)s
        FROM unnest(%(tables)s::text[], %(slots)s::bigint[]) AS t(table_id, slot)
        """,
        {
            "booking": hold.booking_id,
            "hold": hold.id,
            "venue": hold.venue_id,
            "tables": list(hold.table_ids),
            "slots": [slots[table_id] for table_id in hold.table_ids],
            "starts": hold.starts_at,
            "ends": hold.ends_at,
        },
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
