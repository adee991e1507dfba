"""Quoting: which free table, or connected group of tables, best seats a party.

The fit rule, applied the same way to one table or a group of pushed-together tables:

* every table is ``active``, not blocked at the requested time, and in the same zone;
* a group is connected through the policy's adjacency edges (no table floats apart);
* ``sum(min_party) <= party_size <= min(sum(capacity), sum(max_party))`` -- each table in a group
  must be worth its place (two 8-tops with ``min_party`` 4 do not seat a party of 3), and the
  group seats at most its chairs and its tables' combined party limits.

Among the sets that fit, the quote is the one with the least waste (``capacity - party_size``),
then the fewest tables, then the smallest sorted id tuple; the result therefore does not depend
on the order of tables, edges or occupancies in the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.capacity.errors import NO_AVAILABILITY, CapacityError
from service.capacity.policy import CapacityPolicy, Table, policy_version, service_window


@dataclass(frozen=True, slots=True)
class Occupancy:
    """Tables taken for ``[starts_at, ends_at)``: a hold (with ``expires_at``) or an assignment.

    ``ends_at`` already includes the buffer of the booking that occupies the tables.
    """

    table_ids: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_ids", tuple(self.table_ids))

    def blocks(self, starts_at: datetime, ends_at: datetime, now: datetime) -> bool:
        """Whether this occupancy keeps its tables from ``[starts_at, ends_at)`` at ``now``.

        An expired hold never blocks, whether or not anything has swept it yet.
        """
        if self.expires_at is not None and self.expires_at <= now:
            return False
        return self.starts_at < ends_at and starts_at < self.ends_at


@dataclass(frozen=True, slots=True)
class Quote:
    """The tables offered to a party, for the window ``[starts_at, ends_at)`` in UTC."""

    table_ids: tuple[str, ...]
    zone_id: str
    capacity: int
    waste: int
    starts_at: datetime
    ends_at: datetime
    policy_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "tableIds": list(self.table_ids),
            "zoneId": self.zone_id,
            "capacity": self.capacity,
            "waste": self.waste,
            "startsAt": self.starts_at.isoformat(),
            "endsAt": self.ends_at.isoformat(),
            "policyVersion": self.policy_version,
        }


def fits(tables: Iterable[Table], party_size: int) -> bool:
    """The party-size half of the fit rule (see the module docstring)."""
    group = list(tables)
    seats = sum(t.capacity for t in group)
    limit = sum(t.max_party for t in group)
    return sum(t.min_party for t in group) <= party_size <= min(seats, limit)


def blocked_table_ids(
    occupied: Iterable[Occupancy], starts_at: datetime, ends_at: datetime, now: datetime
) -> set[str]:
    """Ids of tables some live occupancy holds during ``[starts_at, ends_at)``."""
    blocked: set[str] = set()
    for occupancy in occupied:
        if occupancy.blocks(starts_at, ends_at, now):
            blocked.update(occupancy.table_ids)
    return blocked


@dataclass
class _Search:
    """Best-first bookkeeping over connected table groups, by index into ``tables``.

    Groups are enumerated with the ESU scheme (each connected group exactly once, grown from its
    lowest index); a branch is cut as soon as its seats already waste at least the best waste
    found, since adding a table only adds seats.
    """

    tables: list[Table]
    neighbours: list[set[int]]
    party_size: int
    max_tables: int
    best_key: tuple[int, int, tuple[str, ...]] | None = None
    best: tuple[int, ...] = field(default_factory=tuple)

    def run(self) -> None:
        for root, table in enumerate(self.tables):
            extension = {n for n in self.neighbours[root] if n > root}
            self._grow((root,), extension, root, (table.capacity, table.min_party, table.max_party))

    def _grow(
        self,
        group: tuple[int, ...],
        extension: set[int],
        root: int,
        sums: tuple[int, int, int],
    ) -> None:
        seats, min_party, max_party = sums
        if min_party <= self.party_size <= min(seats, max_party):
            self._consider(group, seats)
        if len(group) == self.max_tables:
            return
        if self.best_key is not None and seats - self.party_size >= self.best_key[0]:
            return
        reached = set(group).union(*(self.neighbours[i] for i in group))
        pending = set(extension)
        while pending:
            added = pending.pop()
            table = self.tables[added]
            exclusive = {n for n in self.neighbours[added] if n > root and n not in reached}
            self._grow(
                (*group, added),
                pending | exclusive,
                root,
                (seats + table.capacity, min_party + table.min_party, max_party + table.max_party),
            )

    def _consider(self, group: tuple[int, ...], seats: int) -> None:
        key = (seats - self.party_size, len(group), tuple(sorted(self.tables[i].id for i in group)))
        if self.best_key is None or key < self.best_key:
            self.best_key, self.best = key, group


def quote(
    policy: CapacityPolicy,
    party_size: int,
    starts_at: datetime,
    occupied: Iterable[Occupancy],
    now: datetime,
    max_tables: int = 3,
) -> Quote:
    """The best table or connected group of up to ``max_tables`` tables for the party.

    Raises ``CapacityError(NO_AVAILABILITY)`` when the start is outside every service period or
    no free set fits; ``details["reason"]`` is ``"outside_service_period"`` or ``"no_fit"``.
    """
    if party_size < 1:
        raise ValueError(f"party_size must be at least 1, got {party_size}")
    if max_tables < 1:
        raise ValueError(f"max_tables must be at least 1, got {max_tables}")
    details: dict[str, Any] = {"partySize": party_size, "startsAt": starts_at.isoformat()}
    window = service_window(policy, starts_at, party_size)
    if window is None:
        raise CapacityError(
            NO_AVAILABILITY,
            "the requested time is outside the venue's service periods",
            {**details, "reason": "outside_service_period"},
        )
    start, end = window
    blocked = blocked_table_ids(occupied, start, end, now)
    free = sorted(
        (t for t in policy.tables if t.status == "active" and t.id not in blocked),
        key=lambda t: t.id,
    )
    index = {t.id: i for i, t in enumerate(free)}
    neighbours: list[set[int]] = [set() for _ in free]
    for a, b in policy.adjacency:
        i, j = index.get(a), index.get(b)
        if i is not None and j is not None and i != j and free[i].zone_id == free[j].zone_id:
            neighbours[i].add(j)
            neighbours[j].add(i)

    search = _Search(free, neighbours, party_size, max_tables)
    search.run()
    if search.best_key is None:
        raise CapacityError(
            NO_AVAILABILITY,
            f"no free table or group of up to {max_tables} tables seats {party_size}",
            {
                **details,
                "reason": "no_fit",
                "activeTables": sum(t.status == "active" for t in policy.tables),
                "blockedTables": sorted(blocked),
            },
        )
    chosen = [free[i] for i in search.best]
    waste, _, table_ids = search.best_key
    return Quote(
        table_ids=table_ids,
        zone_id=chosen[0].zone_id,
        capacity=sum(t.capacity for t in chosen),
        waste=waste,
        starts_at=start,
        ends_at=end,
        policy_version=policy_version(policy),
    )
