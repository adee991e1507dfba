from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.capacity.errors import HOLD_METADATA_INCOMPLETE, CapacityError
from service.capacity.holds import (
    HoldMetadata,
    MetadataProblem,
    build_hold_metadata,
    format_path,
    require_valid_hold_metadata,
    validate_hold_metadata,
)
from service.capacity.policy import (
    CapacityPolicy,
    adjacency_hash,
    edges_among,
    policy_version,
)
from service.capacity.quoting import Quote, quote
from tests.support.policies import NO_DEADLINE, make_policy, policies, revised, table

NOW = datetime(2024, 7, 5, 9, 0, tzinfo=UTC)
START = datetime(2024, 7, 5, 19, 0, tzinfo=UTC)

P = "policyVersion"
S = "selection"
T = "selection.tableIds"
SN = "selection.snapshot"
Z = "selection.snapshot.zoneIds"
A = "selection.snapshot.adjacency"
U = "selection.snapshot.adjacency.undirected"
E = "selection.snapshot.adjacency.edges"
H = "selection.snapshot.adjacency.hash"


def floor() -> CapacityPolicy:
    return make_policy(
        [table("t1"), table("t2"), table("t3"), table("p1", "patio")],
        adjacency=[("t1", "t2"), ("t2", "t3")],
    )


def held(policy: CapacityPolicy, party_size: int = 7) -> dict[str, Any]:
    return build_hold_metadata(policy, quote(policy, party_size, START, [], NOW))


def paths(problems: list[MetadataProblem]) -> list[str]:
    return [problem.path for problem in problems]


# --- building ------------------------------------------------------------------------------------


def test_built_metadata_snapshots_only_the_selected_tables_edges() -> None:
    policy = floor()
    metadata = held(policy)
    assert metadata == {
        "policyVersion": policy_version(policy),
        "selection": {
            "tableIds": ["t1", "t2"],
            "snapshot": {
                "zoneIds": ["main"],
                "adjacency": {
                    "undirected": True,
                    "edges": [["t1", "t2"]],
                    "hash": adjacency_hash([("t1", "t2")]),
                },
            },
        },
    }
    assert validate_hold_metadata(metadata, policy) == []


def test_building_from_a_quote_of_another_policy_is_refused() -> None:
    policy = floor()
    stale = quote(policy, 2, START, [], NOW)
    changed = revised(policy, buffer_minutes=0)
    with pytest.raises(ValueError, match="different policy version"):
        build_hold_metadata(changed, stale)


def test_building_from_a_quote_with_unknown_tables_is_refused() -> None:
    policy = floor()
    bogus = Quote(("t9",), "main", 4, 0, START, START, policy_version(policy))
    with pytest.raises(ValueError, match="t9"):
        build_hold_metadata(policy, bogus)


# --- validating ----------------------------------------------------------------------------------


def test_format_path_dots_names_and_brackets_indices() -> None:
    assert format_path(("selection", "snapshot", "adjacency", "edges", 1, 0)) == (
        "selection.snapshot.adjacency.edges[1][0]"
    )
    assert format_path(()) == ""


def test_json_text_is_accepted_and_broken_json_reported() -> None:
    policy = floor()
    assert validate_hold_metadata(json.dumps(held(policy)), policy) == []
    problems = validate_hold_metadata("{not json", policy)
    assert paths(problems) == [""]
    assert "not valid JSON" in problems[0].message


@pytest.mark.parametrize("raw", [None, 42, ["policyVersion"]])
def test_metadata_that_is_not_an_object_is_one_root_problem(raw: object) -> None:
    problems = validate_hold_metadata(raw, floor())
    assert paths(problems) == [""]
    assert "must be an object" in problems[0].message


def test_an_outdated_policy_version_is_not_a_metadata_problem() -> None:
    policy = floor()
    metadata = held(policy)
    metadata["policyVersion"] = "0" * 64
    assert validate_hold_metadata(metadata, policy) == []


def test_a_malformed_policy_version_is() -> None:
    policy = floor()
    metadata = held(policy)
    metadata["policyVersion"] = "v2"
    assert paths(validate_hold_metadata(metadata, policy)) == [P]


def test_snapshot_edges_the_policy_no_longer_has_are_drift_not_defects() -> None:
    policy = floor()
    metadata = held(policy)
    rewired = revised(policy, adjacency=[("t2", "t3")])
    assert validate_hold_metadata(metadata, rewired) == []


def test_duplicate_tables_and_self_loops_are_reported() -> None:
    policy = floor()
    metadata = held(policy)
    metadata["selection"]["tableIds"].append("t1")
    edges = metadata["selection"]["snapshot"]["adjacency"]["edges"]
    edges.append(["t2", "t2"])
    metadata["selection"]["snapshot"]["adjacency"]["hash"] = adjacency_hash(edges)
    problems = validate_hold_metadata(metadata, policy)
    assert paths(problems) == [f"{T}[2]", f"{E}[1]"]
    assert "selected twice" in problems[0].message
    assert "to itself" in problems[1].message


def test_every_problem_is_reported_at_once() -> None:
    policy = floor()
    metadata = held(policy)
    metadata["policyVersion"] = 7
    metadata["selection"]["tableIds"] = ["t1", "ghost", 3]
    metadata["selection"]["snapshot"]["zoneIds"] = "main"
    adjacency = metadata["selection"]["snapshot"]["adjacency"]
    del adjacency["undirected"]
    adjacency["hash"] = "f" * 64
    problems = validate_hold_metadata(metadata, policy)
    assert sorted(paths(problems)) == sorted([P, f"{T}[2]", Z, U, f"{T}[1]", H])
    messages = {problem.path: problem.message for problem in problems}
    assert "does not exist at venue venue-1" in messages[f"{T}[1]"]
    assert "does not match the edges" in messages[H]
    assert messages[U] == "Field required"


def test_unknown_keys_are_ignored() -> None:
    policy = floor()
    metadata = held(policy)
    metadata["source"] = "web"
    metadata["selection"]["snapshot"]["note"] = "window seat"
    assert validate_hold_metadata(metadata, policy) == []


def test_require_valid_returns_the_parsed_metadata() -> None:
    policy = floor()
    raw = held(policy)
    parsed = require_valid_hold_metadata(raw, policy)
    assert isinstance(parsed, HoldMetadata)
    assert parsed.table_ids == ["t1", "t2"]
    assert parsed.zone_ids == ["main"]
    assert parsed.edges == [("t1", "t2")]
    assert parsed.as_json() == raw
    assert require_valid_hold_metadata(json.dumps(raw), policy) == parsed


def test_require_valid_raises_hold_metadata_incomplete_with_every_problem() -> None:
    policy = floor()
    metadata = held(policy)
    del metadata["policyVersion"]
    metadata["selection"]["tableIds"] = []
    with pytest.raises(CapacityError) as caught:
        require_valid_hold_metadata(metadata, policy)
    error = caught.value
    assert error.code == HOLD_METADATA_INCOMPLETE
    assert error.details == {
        "problems": [
            {"path": P, "message": "Field required"},
            {"path": T, "message": "List should have at least 1 item after validation, not 0"},
        ]
    }
    assert str(error).startswith("HOLD_METADATA_INCOMPLETE: hold metadata has 2 problem(s)")
    assert "policyVersion: Field required" in str(error)


def test_capacity_error_survives_pickling_and_serialises() -> None:
    error = CapacityError(HOLD_METADATA_INCOMPLETE, details={"problems": []})
    restored = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert (restored.code, restored.message, restored.details) == (
        error.code,
        error.message,
        error.details,
    )
    assert error.as_dict() == {
        "code": HOLD_METADATA_INCOMPLETE,
        "message": "the hold's metadata is missing or malformed",
        "details": {"problems": []},
    }


# --- properties ----------------------------------------------------------------------------------


@st.composite
def holds_on(draw: st.DrawFn) -> tuple[CapacityPolicy, dict[str, Any]]:
    """A policy and complete metadata for a hold on some of its tables."""
    policy = draw(policies())
    ids = [t.id for t in policy.tables]
    selected = sorted(draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4, unique=True)))
    chosen = [t for t in policy.tables if t.id in selected]
    capacity = sum(t.capacity for t in chosen)
    selection = Quote(
        tuple(selected), chosen[0].zone_id, capacity, 0, START, START, policy_version(policy)
    )
    return policy, build_hold_metadata(policy, selection)


@NO_DEADLINE
@given(holds_on())
def test_complete_metadata_has_no_problems(hold: tuple[CapacityPolicy, dict[str, Any]]) -> None:
    policy, metadata = hold
    assert validate_hold_metadata(metadata, policy) == []
    assert validate_hold_metadata(json.loads(json.dumps(metadata)), policy) == []
    parsed = require_valid_hold_metadata(metadata, policy)
    assert parsed.edges == edges_among(policy.adjacency, parsed.table_ids)


@NO_DEADLINE
@given(policies(open_all_day=True), st.integers(1, 14))
def test_metadata_built_from_real_quotes_is_valid(policy: CapacityPolicy, party_size: int) -> None:
    try:
        result = quote(policy, party_size, START, [], NOW)
    except CapacityError:
        return
    assert validate_hold_metadata(build_hold_metadata(policy, result), policy) == []


Mutator = Callable[[dict[str, Any], CapacityPolicy], str]
"""Applies a defect in place and returns the path it must be reported at."""


@dataclass(frozen=True)
class Defect:
    name: str
    touches: frozenset[str]
    needs: frozenset[str]
    inject: Mutator


def _parent(metadata: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = path.split(".")
    node = metadata
    for key in parents:
        node = node[key]
    return node, leaf


def _drop(path: str) -> Defect:
    def inject(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
        node, leaf = _parent(metadata, path)
        del node[leaf]
        return path

    return Defect(f"drop {path}", frozenset({path}), frozenset(), inject)


def _retype(path: str, value: object) -> Defect:
    def inject(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
        node, leaf = _parent(metadata, path)
        node[leaf] = value
        return path

    return Defect(f"retype {path} to {value!r}", frozenset({path}), frozenset(), inject)


def _unknown_table(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
    table_ids = metadata["selection"]["tableIds"]
    table_ids.append("ghost-table")
    return f"{T}[{len(table_ids) - 1}]"


def _empty_tables(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
    metadata["selection"]["tableIds"] = []
    return T


def _wrong_zones(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
    metadata["selection"]["snapshot"]["zoneIds"] = ["nowhere"]
    return Z


def _foreign_edge(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
    selected = metadata["selection"]["tableIds"]
    outsiders = [t.id for t in policy.tables if t.id not in selected] or ["ghost-table"]
    adjacency = metadata["selection"]["snapshot"]["adjacency"]
    adjacency["edges"].append([selected[0], outsiders[0]])
    adjacency["hash"] = adjacency_hash(adjacency["edges"])
    return f"{E}[{len(adjacency['edges']) - 1}]"


def _bad_hash(metadata: dict[str, Any], policy: CapacityPolicy) -> str:
    adjacency = metadata["selection"]["snapshot"]["adjacency"]
    adjacency["hash"] = adjacency_hash([*adjacency["edges"], ["x", "y"]])
    return H


DEFECTS = [
    *(_drop(path) for path in (P, S, T, SN, Z, A, U, E, H)),
    _retype(P, 42),
    _retype(S, "t1"),
    _retype(T, "t1"),
    _retype(SN, []),
    _retype(Z, "main"),
    _retype(A, None),
    _retype(U, "true"),
    _retype(E, "t1-t2"),
    _retype(H, 1234),
    _retype(H, "abc123"),
    _retype(P, "v2"),
    Defect("unknown table", frozenset({T}), frozenset({T}), _unknown_table),
    Defect("empty tableIds", frozenset({T}), frozenset({T}), _empty_tables),
    Defect("wrong zone ids", frozenset({Z}), frozenset({T}), _wrong_zones),
    Defect("foreign edge", frozenset({E, H}), frozenset({T}), _foreign_edge),
    Defect("bad hash", frozenset({H}), frozenset({E}), _bad_hash),
]


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _compatible(first: Defect, second: Defect) -> bool:
    def reaches(one: Defect, other: Defect) -> bool:
        return any(_related(t, o) for t in one.touches for o in other.touches | other.needs)

    return not reaches(first, second) and not reaches(second, first)


@st.composite
def defect_sets(draw: st.DrawFn) -> list[Defect]:
    """One to four defects that touch disjoint parts and leave each other's inputs intact."""
    chosen = [draw(st.sampled_from(DEFECTS))]
    for _ in range(draw(st.integers(0, 3))):
        candidates = [d for d in DEFECTS if all(_compatible(d, other) for other in chosen)]
        if not candidates:
            break
        chosen.append(draw(st.sampled_from(candidates)))
    return chosen


@pytest.mark.parametrize("defect", DEFECTS, ids=[defect.name for defect in DEFECTS])
def test_each_defect_alone_is_reported_once_at_its_path(defect: Defect) -> None:
    policy = floor()
    metadata = held(policy)
    expected = defect.inject(metadata, policy)
    assert paths(validate_hold_metadata(metadata, policy)) == [expected]


@NO_DEADLINE
@given(holds_on(), defect_sets())
def test_every_injected_defect_is_reported_at_its_path(
    hold: tuple[CapacityPolicy, dict[str, Any]], defects: list[Defect]
) -> None:
    policy, metadata = hold
    broken = copy.deepcopy(metadata)
    expected = [defect.inject(broken, policy) for defect in defects]
    problems = validate_hold_metadata(broken, policy)
    assert sorted(paths(problems)) == sorted(expected)
    assert all(problem.message for problem in problems)
    with pytest.raises(CapacityError) as caught:
        require_valid_hold_metadata(broken, policy)
    assert caught.value.details["problems"] == [p.as_dict() for p in problems]
