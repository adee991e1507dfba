from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.capacity.policy import (
    CapacityPolicy,
    ServicePeriod,
    TurnTime,
    Zone,
    adjacency_hash,
    canonical_json,
    normalize_edges,
    policy_version,
    service_window,
    turn_minutes,
)
from tests.support.policies import NO_DEADLINE, make_policy, policies, table

PARIS = ZoneInfo("Europe/Paris")
T = TypeVar("T")


def base_policy() -> CapacityPolicy:
    return make_policy(
        [
            table("t1", "main"),
            table("t2", "main"),
            table("t3", "main", capacity=6),
            table("p1", "patio"),
        ],
        adjacency=[("t1", "t2"), ("t2", "t3")],
        timezone="Europe/Paris",
        service_periods=[
            ServicePeriod(name="lunch", weekdays=[0, 1, 2, 3, 4], start=time(12), end=time(15)),
            ServicePeriod(name="dinner", weekdays=[4, 5], start=time(18), end=time(1)),
        ],
    )


# --- model validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"adjacency": [("t1", "p1")]}, "joins zones"),
        ({"adjacency": [("t1", "ghost")]}, "unknown table"),
        ({"adjacency": [("t1", "t1")]}, "to itself"),
        ({"tables": [table("t1"), table("t1")]}, "duplicate table id"),
        ({"tables": [table("t1", "cellar")]}, "unknown zone"),
        ({"zones": [Zone(id="main", name="A"), Zone(id="main", name="B")]}, "duplicate zone id"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        (
            {"turn_times": [TurnTime(max_party=4, minutes=90), TurnTime(max_party=4, minutes=60)]},
            "two turn times",
        ),
        ({"turn_times": []}, "at least 1 item"),
    ],
)
def test_inconsistent_policies_are_rejected(change: dict[str, object], message: str) -> None:
    fields = base_policy().model_dump()
    fields.update(change)
    with pytest.raises(ValidationError, match=message):
        CapacityPolicy.model_validate(fields)


def test_table_min_party_cannot_exceed_max_party() -> None:
    with pytest.raises(ValidationError, match="exceeds max_party"):
        table("t1", min_party=5, max_party=4)


def test_service_period_rejects_bad_weekdays_and_empty_span() -> None:
    with pytest.raises(ValidationError, match="weekdays"):
        ServicePeriod(name="x", weekdays=[7], start=time(12), end=time(14))
    with pytest.raises(ValidationError, match="same time"):
        ServicePeriod(name="x", weekdays=[1], start=time(12), end=time(12))


def test_policy_accepts_json_shaped_input() -> None:
    raw = base_policy().model_dump(mode="json")
    assert CapacityPolicy.model_validate(raw) == base_policy()


# --- edges and hashes ---------------------------------------------------------------------


def test_normalize_edges_orders_endpoints_and_drops_duplicates() -> None:
    assert normalize_edges([["t3", "t2"], ("t1", "t2"), ("t2", "t3")]) == [
        ("t1", "t2"),
        ("t2", "t3"),
    ]


def test_normalize_edges_rejects_a_three_ended_edge() -> None:
    with pytest.raises(ValueError, match="two endpoints"):
        normalize_edges([["a", "b", "c"]])


def test_adjacency_hash_is_sha256_of_the_documented_serialisation() -> None:
    expected = hashlib.sha256(b'[["a","b"],["b","c"]]').hexdigest()
    assert adjacency_hash([("c", "b"), ("b", "a")]) == expected
    assert adjacency_hash([]) == hashlib.sha256(b"[]").hexdigest()


def test_adjacency_hash_differs_for_different_edges() -> None:
    assert adjacency_hash([("a", "b")]) != adjacency_hash([("a", "c")])
    assert adjacency_hash([("a", "b")]) != adjacency_hash([("a", "b"), ("b", "c")])


@NO_DEADLINE
@given(
    st.lists(st.tuples(st.sampled_from("abcdefg"), st.sampled_from("abcdefg")), max_size=12),
    st.randoms(use_true_random=False),
)
def test_adjacency_hash_ignores_edge_order_and_direction(
    edges: list[tuple[str, str]], rng: random.Random
) -> None:
    scrambled = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in edges]
    rng.shuffle(scrambled)
    assert adjacency_hash(scrambled) == adjacency_hash(edges)


def test_canonical_json_is_compact_with_sorted_keys() -> None:
    assert canonical_json({"b": [1, {"d": 1, "c": "é"}], "a": None}) == (
        '{"a":null,"b":[1,{"c":"é","d":1}]}'
    )


def test_canonical_json_of_a_policy_covers_every_allocation_field() -> None:
    document = canonical_json(base_policy())
    for key in (
        '"timezone":"Europe/Paris"',
        '"zones":[',
        '"tables":[',
        '"adjacency":[["t1","t2"],["t2","t3"]]',
        '"servicePeriods":[',
        '"turnTimes":[',
        '"bufferMinutes":15',
    ):
        assert key in document


@NO_DEADLINE
@given(policies(), st.randoms(use_true_random=False))
def test_policy_version_ignores_the_order_of_set_like_lists(
    policy: CapacityPolicy, rng: random.Random
) -> None:
    def shuffled(items: list[T]) -> list[T]:
        copy = list(items)
        rng.shuffle(copy)
        return copy

    scrambled = CapacityPolicy(
        venue_id=policy.venue_id,
        timezone=policy.timezone,
        zones=shuffled(policy.zones),
        tables=shuffled(policy.tables),
        adjacency=shuffled([(b, a) if rng.random() < 0.5 else (a, b) for a, b in policy.adjacency]),
        service_periods=[
            p.model_copy(update={"weekdays": shuffled(p.weekdays)})
            for p in shuffled(policy.service_periods)
        ],
        turn_times=shuffled(policy.turn_times),
        buffer_minutes=policy.buffer_minutes,
    )
    assert policy_version(scrambled) == policy_version(policy)


def _replace_table(policy: CapacityPolicy, table_id: str, **changes: object) -> CapacityPolicy:
    tables = [t.model_copy(update=changes) if t.id == table_id else t for t in policy.tables]
    return policy.model_copy(update={"tables": tables})


def _replace_period(policy: CapacityPolicy, index: int, **changes: object) -> CapacityPolicy:
    periods = list(policy.service_periods)
    periods[index] = periods[index].model_copy(update=changes)
    return policy.model_copy(update={"service_periods": periods})


MUTATIONS: dict[str, Callable[[CapacityPolicy], CapacityPolicy]] = {
    "timezone": lambda p: p.model_copy(update={"timezone": "Europe/London"}),
    "zone name": lambda p: p.model_copy(
        update={
            "zones": [
                z.model_copy(update={"name": "Garden"}) if z.id == "patio" else z for z in p.zones
            ]
        }
    ),
    "zone added": lambda p: p.model_copy(update={"zones": [*p.zones, Zone(id="bar", name="Bar")]}),
    "table added": lambda p: p.model_copy(update={"tables": [*p.tables, table("t4")]}),
    "table removed": lambda p: p.model_copy(update={"tables": p.tables[1:]}),
    "table capacity": lambda p: _replace_table(p, "t1", capacity=5),
    "table min party": lambda p: _replace_table(p, "t1", min_party=2),
    "table max party": lambda p: _replace_table(p, "t1", max_party=3),
    "table zone": lambda p: _replace_table(p, "t1", zone_id="patio"),
    "table status": lambda p: _replace_table(p, "t1", status="out_of_service"),
    "edge added": lambda p: p.model_copy(update={"adjacency": [*p.adjacency, ("t1", "t3")]}),
    "edge removed": lambda p: p.model_copy(update={"adjacency": p.adjacency[:1]}),
    "edge moved": lambda p: p.model_copy(update={"adjacency": [("t1", "t2"), ("t1", "t3")]}),
    "service period end": lambda p: _replace_period(p, 0, end=time(15, 30)),
    "service period start": lambda p: _replace_period(p, 0, start=time(11, 30)),
    "service period weekdays": lambda p: _replace_period(p, 0, weekdays=[0, 1, 2, 3]),
    "service period name": lambda p: _replace_period(p, 1, name="supper"),
    "service period removed": lambda p: p.model_copy(
        update={"service_periods": p.service_periods[:1]}
    ),
    "turn time minutes": lambda p: p.model_copy(
        update={"turn_times": [TurnTime(max_party=2, minutes=75), *p.turn_times[1:]]}
    ),
    "turn time bracket": lambda p: p.model_copy(
        update={"turn_times": [TurnTime(max_party=3, minutes=90), *p.turn_times[1:]]}
    ),
    "buffer": lambda p: p.model_copy(update={"buffer_minutes": 10}),
}


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_policy_version_changes_with_every_allocation_field(
    mutation: Callable[[CapacityPolicy], CapacityPolicy],
) -> None:
    policy = base_policy()
    assert policy_version(mutation(policy)) != policy_version(policy)


def test_all_mutations_give_distinct_versions() -> None:
    versions = {policy_version(mutate(base_policy())) for mutate in MUTATIONS.values()}
    assert len(versions) == len(MUTATIONS)


def test_policy_version_is_a_sha256_hex_and_ignores_the_venue_id() -> None:
    policy = base_policy()
    version = policy_version(policy)
    assert len(version) == 64
    assert int(version, 16) >= 0
    assert policy_version(policy.model_copy(update={"venue_id": "venue-2"})) == version


# --- turn times and service windows --------------------------------------------------------


def test_turn_minutes_picks_the_smallest_bracket_that_fits() -> None:
    policy = make_policy(
        [table("t1")],
        turn_times=[
            TurnTime(max_party=6, minutes=150),
            TurnTime(max_party=2, minutes=90),
            TurnTime(max_party=4, minutes=120),
        ],
    )
    assert [turn_minutes(policy, n) for n in (1, 2, 3, 4, 5, 6)] == [90, 90, 120, 120, 150, 150]
    assert turn_minutes(policy, 12) == 150


def test_service_window_uses_the_venue_timezone() -> None:
    policy = base_policy()
    friday_lunch = datetime(2024, 7, 5, 12, 30, tzinfo=PARIS)
    window = service_window(policy, friday_lunch, party_size=2)
    assert window == (
        datetime(2024, 7, 5, 10, 30, tzinfo=UTC),
        datetime(2024, 7, 5, 10, 30, tzinfo=UTC) + timedelta(minutes=90 + 15),
    )
    assert window is not None
    assert window[0].tzinfo is UTC
    # 12:30 UTC is 14:30 in Paris: still lunch. 13:30 UTC is 15:30 in Paris: closed.
    assert service_window(policy, datetime(2024, 7, 5, 12, 30, tzinfo=UTC), 2) is not None
    assert service_window(policy, datetime(2024, 7, 5, 13, 30, tzinfo=UTC), 2) is None


def test_service_window_end_depends_on_party_size() -> None:
    policy = base_policy()
    start = datetime(2024, 7, 5, 12, 30, tzinfo=PARIS)
    small = service_window(policy, start, party_size=2)
    large = service_window(policy, start, party_size=6)
    assert small is not None
    assert large is not None
    assert large[1] - small[1] == timedelta(minutes=30)


def test_service_window_respects_weekdays_and_period_bounds() -> None:
    policy = base_policy()
    saturday_lunch = datetime(2024, 7, 6, 12, 30, tzinfo=PARIS)
    assert service_window(policy, saturday_lunch, 2) is None
    assert service_window(policy, datetime(2024, 7, 5, 12, 0, tzinfo=PARIS), 2) is not None
    assert service_window(policy, datetime(2024, 7, 5, 15, 0, tzinfo=PARIS), 2) is None


def test_overnight_period_belongs_to_the_day_it_starts() -> None:
    policy = base_policy()
    # Dinner runs Friday and Saturday 18:00-01:00.
    assert service_window(policy, datetime(2024, 7, 6, 0, 30, tzinfo=PARIS), 2) is not None
    assert service_window(policy, datetime(2024, 7, 7, 0, 30, tzinfo=PARIS), 2) is not None
    assert service_window(policy, datetime(2024, 7, 5, 0, 30, tzinfo=PARIS), 2) is None
    assert service_window(policy, datetime(2024, 7, 6, 1, 0, tzinfo=PARIS), 2) is None


def test_service_window_measures_elapsed_time_across_dst() -> None:
    policy = base_policy()
    # Paris leaves summer time at 03:00 on 2024-10-27; Saturday dinner runs into it.
    start = datetime(2024, 10, 27, 0, 30, tzinfo=PARIS)
    window = service_window(policy, start, party_size=2)
    assert window is not None
    assert window[1] - window[0] == timedelta(minutes=105)


def test_service_window_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        service_window(base_policy(), datetime(2024, 7, 5, 12, 30), 2)


def test_a_policy_is_immutable_so_its_remembered_version_cannot_go_stale() -> None:
    policy = make_policy([table("t1"), table("t2")], adjacency=[("t1", "t2")])
    version = policy_version(policy)
    assert isinstance(policy.tables, tuple) and isinstance(policy.adjacency, tuple)
    with pytest.raises(ValidationError):
        policy.buffer_minutes = 5  # type: ignore[misc]
    changed = policy.model_copy(update={"buffer_minutes": 5})
    assert policy_version(changed) != version
    same = CapacityPolicy.model_validate(policy.model_dump(mode="json"))
    assert same is not policy and policy_version(same) == version == policy_version(policy)
    assert version == hashlib.sha256(canonical_json(policy).encode()).hexdigest()
