from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any

from service.capacity.drift import (
    FieldChange,
    ItemChange,
    MovedTable,
    change_lines,
    diff_policies,
    diff_snapshot,
    summarize,
)
from service.capacity.holds import HoldMetadata, build_hold_metadata
from service.capacity.policy import (
    CapacityPolicy,
    ServicePeriod,
    Table,
    TurnTime,
    Zone,
    adjacency_hash,
    policy_version,
)
from service.capacity.quoting import Occupancy, quote
from tests.support.policies import make_policy, revised, table

NOW = datetime(2024, 7, 5, 9, 0, tzinfo=UTC)
START = datetime(2024, 7, 5, 19, 0, tzinfo=UTC)


def floor(**overrides: Any) -> CapacityPolicy:
    return make_policy(
        [table("t1"), table("t2"), table("t3"), table("p1", "patio")],
        adjacency=[("t1", "t2"), ("t2", "t3")],
        **overrides,
    )


def with_tables(policy: CapacityPolicy, *tables: Table) -> CapacityPolicy:
    return revised(policy, tables=tables)


def replace_table(policy: CapacityPolicy, table_id: str, **changes: object) -> CapacityPolicy:
    tables = [t.model_copy(update=changes) if t.id == table_id else t for t in policy.tables]
    return revised(policy, tables=tables)


# --- policy against policy ------------------------------------------------------------------


def test_identical_policies_have_an_empty_diff() -> None:
    diff = diff_policies(floor(), floor())
    assert not diff.changed
    assert change_lines(diff) == []
    assert diff.old_version == diff.new_version == policy_version(floor())
    assert diff.old_adjacency_hash == diff.new_adjacency_hash
    assert summarize(diff) == (
        f"The capacity policy is unchanged (version {policy_version(floor())[:12]})."
    )


def test_reordering_alone_is_no_change() -> None:
    old = floor()
    new = revised(
        old,
        **{
            "tables": list(reversed(old.tables)),
            "zones": list(reversed(old.zones)),
            "adjacency": [("t3", "t2"), ("t2", "t1")],
        },
    )
    diff = diff_policies(old, new)
    assert not diff.changed
    assert change_lines(diff) == []


def test_zones_added_removed_and_renamed() -> None:
    old = floor()
    new = revised(
        old,
        **{
            "zones": [Zone(id="main", name="Dining room"), Zone(id="bar", name="Bar")],
            "tables": [t for t in old.tables if t.zone_id == "main"],
        },
    )
    diff = diff_policies(old, new)
    assert diff.zones_added == ["bar"]
    assert diff.zones_removed == ["patio"]
    assert diff.zones_changed == [
        ItemChange(
            id="main", changes=[FieldChange(field="name", before="Main", after="Dining room")]
        )
    ]
    assert diff.tables_removed == ["p1"]


def test_tables_added_removed_and_changed_field_by_field() -> None:
    old = floor()
    new = replace_table(old, "t1", capacity=6, max_party=6, status="out_of_service")
    new = with_tables(new, *[t for t in new.tables if t.id != "p1"], table("t4"))
    diff = diff_policies(old, new)
    assert diff.tables_added == ["t4"]
    assert diff.tables_removed == ["p1"]
    assert diff.tables_changed == [
        ItemChange(
            id="t1",
            changes=[
                FieldChange(field="capacity", before=4, after=6),
                FieldChange(field="maxParty", before=4, after=6),
                FieldChange(field="status", before="active", after="out_of_service"),
            ],
        )
    ]
    assert diff.edges_added == diff.edges_removed == []
    assert diff.changed


def test_a_table_moving_zone_is_a_field_change() -> None:
    diff = diff_policies(
        floor(),
        revised(replace_table(floor(), "t3", zone_id="patio"), adjacency=[("t1", "t2")]),
    )
    assert diff.tables_changed == [
        ItemChange(id="t3", changes=[FieldChange(field="zoneId", before="main", after="patio")])
    ]
    assert diff.edges_removed == [("t2", "t3")]


def test_edges_added_and_removed_with_their_hashes() -> None:
    old = floor()
    new = revised(old, adjacency=[("t2", "t1"), ("t1", "t3")])
    diff = diff_policies(old, new)
    assert diff.edges_added == [("t1", "t3")]
    assert diff.edges_removed == [("t2", "t3")]
    assert diff.old_adjacency_hash == adjacency_hash(old.adjacency)
    assert diff.new_adjacency_hash == adjacency_hash(new.adjacency)
    assert diff.old_adjacency_hash != diff.new_adjacency_hash


def test_each_service_setting_is_reported() -> None:
    old = floor()
    new = revised(
        old,
        **{
            "timezone": "Europe/Paris",
            "buffer_minutes": 10,
            "turn_times": [TurnTime(max_party=2, minutes=75), TurnTime(max_party=20, minutes=120)],
            "service_periods": [
                ServicePeriod(name="dinner", weekdays=[4, 5], start=time(18), end=time(23))
            ],
        },
    )
    diff = diff_policies(old, new)
    by_field = {change.field: change for change in diff.service_changes}
    assert list(by_field) == ["timezone", "servicePeriods", "turnTimes", "bufferMinutes"]
    assert (by_field["timezone"].before, by_field["timezone"].after) == ("UTC", "Europe/Paris")
    assert (by_field["bufferMinutes"].before, by_field["bufferMinutes"].after) == (15, 10)
    assert by_field["turnTimes"].after[0] == {"maxParty": 2, "minutes": 75}
    assert by_field["servicePeriods"].after == [
        {"name": "dinner", "weekdays": [4, 5], "start": "18:00:00", "end": "23:00:00"}
    ]
    assert diff.tables_changed == diff.zones_changed == []


def test_a_single_service_setting_change_is_the_only_one() -> None:
    diff = diff_policies(floor(), floor(buffer_minutes=5))
    assert [change.field for change in diff.service_changes] == ["bufferMinutes"]
    assert change_lines(diff) == ["buffer 15 → 5 minutes"]


def test_policy_diff_serialises_to_camel_case_json() -> None:
    old = floor()
    new = revised(old, **{"adjacency": [("t1", "t2")], "buffer_minutes": 0})
    data = diff_policies(old, new).as_dict()
    json.dumps(data)
    assert data["edgesRemoved"] == [["t2", "t3"]]
    assert data["oldVersion"] == policy_version(old)
    assert data["serviceChanges"] == [{"field": "bufferMinutes", "before": 15, "after": 0}]
    assert set(data) >= {"zonesAdded", "tablesChanged", "oldAdjacencyHash", "newAdjacencyHash"}


def test_policy_summary_is_one_readable_paragraph() -> None:
    old = floor()
    new = revised(
        replace_table(old, "t1", capacity=6),
        **{
            "adjacency": [("t1", "t2")],
            "zones": [*old.zones, Zone(id="bar", name="Bar")],
            "tables": [*replace_table(old, "t1", capacity=6).tables, table("b1", "bar")],
            "service_periods": [
                ServicePeriod(name="lunch", weekdays=[0, 1], start=time(12), end=time(14, 30))
            ],
        },
    )
    text = summarize(diff_policies(old, new))
    assert "\n" not in text
    assert text.startswith(
        f"The capacity policy changed (version {policy_version(old)[:12]} → "
        f"{policy_version(new)[:12]}): "
    )
    for clause in (
        "zone bar added",
        "table b1 added",
        "edge t2+t3 removed",
        "table t1 capacity 4 → 6",
        "service periods (all day Mon,Tue,Wed,Thu,Fri,Sat,Sun 00:00-23:59) → "
        "(lunch Mon,Tue 12:00-14:30)",
    ):
        assert clause in text
    assert text.endswith(".")


def test_plural_clauses_name_every_item() -> None:
    old = floor()
    new = revised(with_tables(old, table("t1"), table("t2")), **{"adjacency": []})
    assert change_lines(diff_policies(old, new)) == [
        "tables p1, t3 removed",
        "edges t1+t2, t2+t3 removed",
    ]


# --- a hold's snapshot against the current policy ----------------------------------------------------


def held(policy: CapacityPolicy, party_size: int = 10, busy: tuple[str, ...] = ()) -> HoldMetadata:
    occupied = [Occupancy(busy, START, START + timedelta(hours=3))] if busy else []
    return HoldMetadata.model_validate(
        build_hold_metadata(policy, quote(policy, party_size, START, occupied, NOW))
    )


def test_an_unchanged_venue_leaves_the_snapshot_intact() -> None:
    policy = floor()
    metadata = held(policy)
    diff = diff_snapshot(metadata, policy)
    assert diff.table_ids == ["t1", "t2", "t3"]
    assert not diff.version_changed
    assert diff.selection_usable
    assert change_lines(diff) == []
    assert diff.snapshot_adjacency_hash == diff.current_adjacency_hash
    assert summarize(diff) == (
        "The hold on tables t1, t2, t3 matches the current policy; "
        "the selection can still be seated as held."
    )


def test_a_change_elsewhere_changes_the_version_but_not_the_selection() -> None:
    metadata = held(floor())
    diff = diff_snapshot(metadata, floor(buffer_minutes=0))
    assert diff.version_changed
    assert diff.selection_usable
    assert change_lines(diff) == []
    assert "is unaffected by the policy change" in summarize(diff)


def test_a_vanished_table_is_missing() -> None:
    policy = floor()
    metadata = held(policy)
    diff = diff_snapshot(
        metadata,
        revised(
            with_tables(policy, table("t1"), table("t2"), table("p1", "patio")),
            **{"adjacency": [("t1", "t2")]},
        ),
    )
    assert diff.tables_missing == ["t3"]
    assert diff.edges_removed == [("t2", "t3")]
    assert not diff.selection_usable
    assert change_lines(diff) == ["table t3 no longer exists", "edge t2+t3 no longer exists"]


def test_a_table_that_changed_zone_is_moved() -> None:
    policy = floor()
    metadata = held(policy, party_size=3, busy=("p1",))
    assert metadata.table_ids == ["t1"]
    diff = diff_snapshot(
        metadata,
        revised(replace_table(policy, "t1", zone_id="patio"), **{"adjacency": [("t2", "t3")]}),
    )
    assert diff.tables_moved == [
        MovedTable(table_id="t1", snapshot_zone_ids=["main"], zone_id="patio")
    ]
    assert not diff.selection_usable
    assert "table t1 moved to zone patio" in summarize(diff)


def test_an_out_of_service_table_is_reported() -> None:
    policy = floor()
    metadata = held(policy)
    diff = diff_snapshot(metadata, replace_table(policy, "t2", status="out_of_service"))
    assert diff.tables_out_of_service == ["t2"]
    assert not diff.selection_usable
    assert "table t2 is out of service" in summarize(diff)
    assert summarize(diff).endswith("the selection can no longer be seated as held.")


def test_a_removed_edge_that_disconnects_the_selection() -> None:
    policy = floor()
    metadata = held(policy)
    diff = diff_snapshot(metadata, revised(policy, **{"adjacency": [("t1", "t2")]}))
    assert diff.edges_removed == [("t2", "t3")]
    assert diff.edges_added == []
    assert diff.current_adjacency_hash == adjacency_hash([("t1", "t2")])
    assert diff.snapshot_adjacency_hash != diff.current_adjacency_hash
    assert not diff.selection_usable


def test_rewired_edges_that_keep_the_selection_connected() -> None:
    policy = floor()
    metadata = held(policy)
    rewired = revised(policy, **{"adjacency": [("t1", "t2"), ("t1", "t3")]})
    diff = diff_snapshot(metadata, rewired)
    assert diff.edges_removed == [("t2", "t3")]
    assert diff.edges_added == [("t1", "t3")]
    assert diff.selection_usable
    assert change_lines(diff) == ["edge t2+t3 no longer exists", "edge t1+t3 now exists"]


def test_snapshot_diff_serialises_to_camel_case_json() -> None:
    policy = floor()
    metadata = held(policy)
    data = diff_snapshot(metadata, replace_table(policy, "t2", status="out_of_service")).as_dict()
    json.dumps(data)
    assert data["tablesOutOfService"] == ["t2"]
    assert data["holdVersion"] == policy_version(policy)
    assert data["selectionUsable"] is False
