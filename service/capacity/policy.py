"""A venue's capacity policy: zones, tables, adjacency, service periods, turn times and buffers.

Also the two hashes everyone else compares: :func:`policy_version` (the whole policy) and
:func:`adjacency_hash` (a set of edges). Both hash :func:`canonical_json`, which is the only
serialisation used for hashing anywhere, SQL backfills included: compute hashes by calling these
functions, never by re-implementing them.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Edge = tuple[str, str]
TableStatus = Literal["active", "out_of_service"]

CANONICAL_FORMAT = 1
"""Bump when the canonical policy document changes shape: every version changes with it."""


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Zone(_Value):
    id: str = Field(min_length=1)
    name: str


class Table(_Value):
    """A table. ``capacity`` is its seats; ``min_party``/``max_party`` bound the party it takes."""

    id: str = Field(min_length=1)
    zone_id: str = Field(min_length=1)
    capacity: int = Field(ge=1)
    min_party: int = Field(default=1, ge=1)
    max_party: int = Field(ge=1)
    status: TableStatus = "active"

    @model_validator(mode="after")
    def _party_bounds(self) -> Table:
        if self.min_party > self.max_party:
            raise ValueError(f"min_party {self.min_party} exceeds max_party {self.max_party}")
        return self


class ServicePeriod(_Value):
    """Local wall-clock hours on some weekdays (0 = Monday). ``end <= start`` crosses midnight:
    the weekday is the day the period starts."""

    name: str
    weekdays: tuple[int, ...] = Field(min_length=1)
    start: time
    end: time

    @field_validator("weekdays")
    @classmethod
    def _weekdays_in_range(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 <= day <= 6 for day in value):
            raise ValueError("weekdays are 0 (Monday) to 6 (Sunday)")
        return value

    @model_validator(mode="after")
    def _local_times(self) -> ServicePeriod:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("service period times are local wall-clock times without a zone")
        if self.start == self.end:
            raise ValueError("a service period cannot start and end at the same time")
        return self

    def contains(self, local: datetime) -> bool:
        """Whether a naive local wall-clock moment starts inside this period."""
        moment, weekday = local.time(), local.weekday()
        if self.start < self.end:
            return weekday in self.weekdays and self.start <= moment < self.end
        started_today = weekday in self.weekdays and moment >= self.start
        started_yesterday = (weekday - 1) % 7 in self.weekdays and moment < self.end
        return started_today or started_yesterday


class TurnTime(_Value):
    """Parties of up to ``max_party`` guests keep their tables for ``minutes``."""

    max_party: int = Field(ge=1)
    minutes: int = Field(ge=1)


class CapacityPolicy(_Value):
    """Everything that decides which tables a party may get, and for how long.

    ``adjacency`` holds undirected edges between tables that can be pushed together; an edge
    may only join two tables of the same zone.
    """

    venue_id: str
    timezone: str
    zones: tuple[Zone, ...]
    tables: tuple[Table, ...]
    adjacency: tuple[Edge, ...] = ()
    service_periods: tuple[ServicePeriod, ...]
    turn_times: tuple[TurnTime, ...] = Field(min_length=1)
    buffer_minutes: int = Field(default=0, ge=0)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CapacityPolicy:
        problems: list[str] = []
        zone_ids = [zone.id for zone in self.zones]
        problems += [f"duplicate zone id {z!r}" for z in _duplicates(zone_ids)]
        problems += [f"duplicate table id {t!r}" for t in _duplicates(t.id for t in self.tables)]
        problems += [
            f"table {t.id!r} is in unknown zone {t.zone_id!r}"
            for t in self.tables
            if t.zone_id not in zone_ids
        ]
        problems += [
            f"two turn times for parties up to {n}"
            for n in _duplicates(turn.max_party for turn in self.turn_times)
        ]
        zone_of = {table.id: table.zone_id for table in self.tables}
        for a, b in self.adjacency:
            if a == b:
                problems.append(f"edge [{a!r}, {b!r}] joins a table to itself")
            elif a not in zone_of or b not in zone_of:
                missing = [t for t in (a, b) if t not in zone_of]
                problems.append(f"edge [{a!r}, {b!r}] names unknown table(s) {missing}")
            elif zone_of[a] != zone_of[b]:
                problems.append(
                    f"edge [{a!r}, {b!r}] joins zones {zone_of[a]!r} and {zone_of[b]!r}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _duplicates(values: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    repeated: list[Any] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def normalize_edges(edges: Iterable[Sequence[str]]) -> list[Edge]:
    """Undirected edges in canonical form: endpoints ordered, duplicates dropped, list sorted."""
    normalised: set[Edge] = set()
    for edge in edges:
        if len(edge) != 2:
            raise ValueError(f"an edge has two endpoints, got {list(edge)!r}")
        a, b = edge
        normalised.add((a, b) if a <= b else (b, a))
    return sorted(normalised)


def canonical_policy(policy: CapacityPolicy) -> dict[str, Any]:
    """The policy as a plain document in which every set-like list has a canonical order.

    ``venue_id`` is left out: it names the policy's owner and decides no allocation.
    """
    periods = [
        {
            "name": period.name,
            "weekdays": sorted(set(period.weekdays)),
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
        }
        for period in policy.service_periods
    ]
    return {
        "format": CANONICAL_FORMAT,
        "timezone": policy.timezone,
        "zones": [{"id": z.id, "name": z.name} for z in sorted(policy.zones, key=lambda z: z.id)],
        "tables": [
            {
                "id": t.id,
                "zoneId": t.zone_id,
                "capacity": t.capacity,
                "minParty": t.min_party,
                "maxParty": t.max_party,
                "status": t.status,
            }
            for t in sorted(policy.tables, key=lambda t: t.id)
        ],
        "adjacency": [list(edge) for edge in normalize_edges(policy.adjacency)],
        "servicePeriods": sorted(periods, key=_dumps),
        "turnTimes": [
            {"maxParty": turn.max_party, "minutes": turn.minutes}
            for turn in sorted(policy.turn_times, key=lambda turn: turn.max_party)
        ],
        "bufferMinutes": policy.buffer_minutes,
    }


def _dumps(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys, the one serialisation every hash in the service uses.

    A :class:`CapacityPolicy` is first turned into :func:`canonical_policy`; any other pydantic
    model is dumped in JSON mode; plain JSON values are serialised as they are.
    """
    if isinstance(value, CapacityPolicy):
        value = canonical_policy(value)
    elif isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return _dumps(value)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_versions: dict[int, str] = {}


def policy_version(policy: CapacityPolicy) -> str:
    """SHA-256 hex of the canonical policy: changes whenever anything allocation depends on does.

    A policy is immutable (frozen, tuples all the way down), so its hash is remembered for as
    long as the object lives: quoting, metadata and drift checks on one policy hash it once.
    """
    key = id(policy)
    version = _versions.get(key)
    if version is None:
        version = _sha256(canonical_json(policy))
        _versions[key] = version
        weakref.finalize(policy, _versions.pop, key, None)
    return version


def adjacency_hash(edges: Iterable[Sequence[str]]) -> str:
    """SHA-256 hex of the normalised edge list, e.g. of ``[["t1","t2"],["t2","t3"]]``."""
    return _sha256(_dumps([list(edge) for edge in normalize_edges(edges)]))


def edges_among(edges: Iterable[Sequence[str]], table_ids: Iterable[str]) -> list[Edge]:
    """The normalised edges whose two endpoints are both in ``table_ids``."""
    members = set(table_ids)
    return [edge for edge in normalize_edges(edges) if edge[0] in members and edge[1] in members]


def tables_by_id(policy: CapacityPolicy) -> dict[str, Table]:
    return {table.id: table for table in policy.tables}


def turn_minutes(policy: CapacityPolicy, party_size: int) -> int:
    """Minutes of the smallest turn-time bracket that takes the party; the largest bracket
    covers parties bigger than every bracket."""
    brackets = sorted(policy.turn_times, key=lambda turn: turn.max_party)
    for turn in brackets:
        if party_size <= turn.max_party:
            return turn.minutes
    return brackets[-1].minutes


def service_window(
    policy: CapacityPolicy, starts_at: datetime, party_size: int
) -> tuple[datetime, datetime] | None:
    """The ``(start, end)`` a party would occupy, in UTC, or ``None`` when ``starts_at`` does not
    fall inside a service period in the venue's timezone.

    ``end`` is ``start`` plus the party's turn time plus the buffer, measured in elapsed time
    (a DST change in between does not stretch or shrink the booking).
    """
    if starts_at.tzinfo is None or starts_at.utcoffset() is None:
        raise ValueError("starts_at must be timezone-aware")
    local = starts_at.astimezone(ZoneInfo(policy.timezone)).replace(tzinfo=None)
    if not any(period.contains(local) for period in policy.service_periods):
        return None
    start = starts_at.astimezone(UTC)
    minutes = turn_minutes(policy, party_size) + policy.buffer_minutes
    return start, start + timedelta(minutes=minutes)
