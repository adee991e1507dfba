"""Builders and hypothesis strategies shared by the capacity-domain tests."""

from __future__ import annotations

from datetime import time
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from service.capacity.policy import (
    CapacityPolicy,
    ServicePeriod,
    Table,
    TableStatus,
    TurnTime,
    Zone,
)

NO_DEADLINE = settings(deadline=None)
"""Property tests here are CPU-bound and fast; a busy shared machine must not make them flaky."""

ALL_DAY = ServicePeriod(name="all day", weekdays=list(range(7)), start=time(0), end=time(23, 59))
TIMEZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]


def table(
    table_id: str,
    zone_id: str = "main",
    capacity: int = 4,
    min_party: int = 1,
    max_party: int | None = None,
    status: TableStatus = "active",
) -> Table:
    return Table(
        id=table_id,
        zone_id=zone_id,
        capacity=capacity,
        min_party=min_party,
        max_party=capacity if max_party is None else max_party,
        status=status,
    )


def make_policy(
    tables: list[Table],
    adjacency: list[tuple[str, str]] | None = None,
    zones: list[Zone] | None = None,
    **overrides: Any,
) -> CapacityPolicy:
    """A valid policy around ``tables``, open all day, with zones inferred from the tables."""
    if zones is None:
        zones = [Zone(id=z, name=z.title()) for z in sorted({t.zone_id for t in tables})]
    fields: dict[str, Any] = {
        "venue_id": "venue-1",
        "timezone": "UTC",
        "zones": zones,
        "tables": tables,
        "adjacency": adjacency or [],
        "service_periods": [ALL_DAY],
        "turn_times": [TurnTime(max_party=2, minutes=90), TurnTime(max_party=20, minutes=120)],
        "buffer_minutes": 15,
    }
    fields.update(overrides)
    return CapacityPolicy(**fields)


@st.composite
def tables_strategy(draw: st.DrawFn, zone_ids: list[str], max_tables: int) -> list[Table]:
    count = draw(st.integers(min_value=1, max_value=max_tables))
    result = []
    for index in range(count):
        capacity = draw(st.integers(min_value=1, max_value=8))
        min_party = draw(st.integers(min_value=1, max_value=capacity))
        max_party = draw(st.integers(min_value=min_party, max_value=capacity + 2))
        result.append(
            Table(
                id=f"t{index:02d}",
                zone_id=draw(st.sampled_from(zone_ids)),
                capacity=capacity,
                min_party=min_party,
                max_party=max_party,
                status=draw(st.sampled_from(["active", "active", "active", "out_of_service"])),
            )
        )
    return result


@st.composite
def edges_strategy(draw: st.DrawFn, tables: list[Table]) -> list[tuple[str, str]]:
    pairs = [
        (a.id, b.id)
        for i, a in enumerate(tables)
        for b in tables[i + 1 :]
        if a.zone_id == b.zone_id
    ]
    if not pairs:
        return []
    return draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)))


@st.composite
def service_periods_strategy(draw: st.DrawFn) -> ServicePeriod:
    start = draw(st.integers(0, 24 * 60 - 1))
    length = draw(st.integers(30, 12 * 60))
    end = (start + length) % (24 * 60)
    return ServicePeriod(
        name=draw(st.sampled_from(["lunch", "dinner", "late"])),
        weekdays=draw(st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True)),
        start=time(start // 60, start % 60),
        end=time(end // 60, end % 60),
    )


@st.composite
def policies(
    draw: st.DrawFn, max_zones: int = 3, max_tables: int = 12, open_all_day: bool = False
) -> CapacityPolicy:
    zone_ids = [f"z{i}" for i in range(draw(st.integers(min_value=1, max_value=max_zones)))]
    tables = draw(tables_strategy(zone_ids, max_tables))
    turn_parties = draw(st.lists(st.integers(1, 20), min_size=1, max_size=4, unique=True))
    periods = (
        [ALL_DAY]
        if open_all_day
        else draw(st.lists(service_periods_strategy(), min_size=1, max_size=3))
    )
    return CapacityPolicy(
        venue_id="venue-1",
        timezone=draw(st.sampled_from(TIMEZONES)),
        zones=[Zone(id=z, name=f"Zone {z}") for z in zone_ids],
        tables=tables,
        adjacency=draw(edges_strategy(tables)),
        service_periods=periods,
        turn_times=[
            TurnTime(max_party=n, minutes=draw(st.integers(30, 240))) for n in turn_parties
        ],
        buffer_minutes=draw(st.integers(0, 30)),
    )


def revised(policy: CapacityPolicy, **fields: Any) -> CapacityPolicy:
    """``policy`` with ``fields`` replaced, lists turned into tuples as validation would.

    Not validated, so that a test can build the intermediate states of an edit.
    """
    update = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return policy.model_copy(update=update)
