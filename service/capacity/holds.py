"""Hold metadata: what a hold records about its selection, and the validator run before confirm.

The stored JSON (camelCase)::

    {"policyVersion": "<sha256 hex>",
     "selection": {"tableIds": ["t1", "t2"],
                   "snapshot": {"zoneIds": ["main"],
                                "adjacency": {"undirected": true,
                                              "edges": [["t1", "t2"]],
                                              "hash": "<adjacency_hash(edges)>"}}}}

The validator checks presence, types and internal consistency against the venue's current tables.
It does not compare ``policyVersion`` with the current policy: a different version is a
``POLICY_CHANGED`` for the caller to handle, not broken metadata. Snapshot edges that the policy
no longer has are drift too (see :mod:`service.capacity.drift`), not a metadata problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from service.capacity.errors import HOLD_METADATA_INCOMPLETE, CapacityError
from service.capacity.policy import (
    CapacityPolicy,
    Edge,
    adjacency_hash,
    edges_among,
    normalize_edges,
    policy_version,
    tables_by_id,
)
from service.capacity.quoting import Quote

SHA256_HEX = r"^[0-9a-f]{64}$"

Sha256Hex = Annotated[str, Field(pattern=SHA256_HEX)]
EdgePair = Annotated[list[str], Field(min_length=2, max_length=2)]


class _CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        strict=True,
        frozen=True,
        extra="ignore",
    )


class AdjacencySnapshot(_CamelModel):
    undirected: Literal[True]
    edges: list[EdgePair]
    hash: Sha256Hex


class SelectionSnapshot(_CamelModel):
    zone_ids: list[str]
    adjacency: AdjacencySnapshot


class Selection(_CamelModel):
    table_ids: list[str] = Field(min_length=1)
    snapshot: SelectionSnapshot


class HoldMetadata(_CamelModel):
    """Validated hold metadata. Unknown keys in the stored JSON are ignored, not kept."""

    policy_version: Sha256Hex
    selection: Selection

    @property
    def table_ids(self) -> list[str]:
        return list(self.selection.table_ids)

    @property
    def zone_ids(self) -> list[str]:
        return list(self.selection.snapshot.zone_ids)

    @property
    def edges(self) -> list[Edge]:
        """The snapshot's edges, normalised."""
        return normalize_edges(self.selection.snapshot.adjacency.edges)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True, slots=True)
class MetadataProblem:
    """One defect, at a path such as ``selection.snapshot.adjacency.edges[1]`` (``""`` = root)."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


def build_hold_metadata(policy: CapacityPolicy, quote: Quote) -> dict[str, Any]:
    """Complete metadata for a hold on ``quote``'s tables, snapshotting their zones and edges.

    Raises ``ValueError`` if the quote was made under another policy or names unknown tables:
    either is a programming error in the caller.
    """
    version = policy_version(policy)
    if quote.policy_version != version:
        raise ValueError("the quote was made under a different policy version")
    tables = tables_by_id(policy)
    unknown = [table_id for table_id in quote.table_ids if table_id not in tables]
    if unknown:
        raise ValueError(f"the quote names tables the policy does not have: {unknown}")
    edges = edges_among(policy.adjacency, quote.table_ids)
    return {
        "policyVersion": version,
        "selection": {
            "tableIds": list(quote.table_ids),
            "snapshot": {
                "zoneIds": sorted({tables[table_id].zone_id for table_id in quote.table_ids}),
                "adjacency": {
                    "undirected": True,
                    "edges": [list(edge) for edge in edges],
                    "hash": adjacency_hash(edges),
                },
            },
        },
    }


def format_path(loc: tuple[int | str, ...]) -> str:
    """``("selection", "tableIds", 0)`` -> ``"selection.tableIds[0]"``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


_MISSING = object()


def _at(raw: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(raw, Mapping) or key not in raw:
            return _MISSING
        raw = raw[key]
    return raw


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _edge_pair(value: Any) -> tuple[str, str] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def _schema_problems(raw: Mapping[str, Any]) -> list[MetadataProblem]:
    try:
        HoldMetadata.model_validate(raw)
    except ValidationError as error:
        return [
            MetadataProblem(format_path(tuple(e["loc"])), e["msg"])
            for e in error.errors(include_url=False)
        ]
    return []


def _table_problems(table_ids: list[Any], policy: CapacityPolicy) -> list[MetadataProblem]:
    """Duplicate and unknown table ids; items of the wrong type are the schema's to report."""
    problems: list[MetadataProblem] = []
    tables = tables_by_id(policy)
    seen: set[str] = set()
    for index, table_id in enumerate(table_ids):
        if not isinstance(table_id, str):
            continue
        path = f"selection.tableIds[{index}]"
        if table_id in seen:
            problems.append(MetadataProblem(path, f"table {table_id!r} is selected twice"))
        elif table_id not in tables:
            message = f"table {table_id!r} does not exist at venue {policy.venue_id}"
            problems.append(MetadataProblem(path, message))
        seen.add(table_id)
    return problems


def _snapshot_problems(
    raw: Mapping[str, Any], policy: CapacityPolicy, table_ids: list[str]
) -> list[MetadataProblem]:
    """Zone ids and edges against the selection; needs a well-formed, non-empty ``tableIds``."""
    problems: list[MetadataProblem] = []
    tables = tables_by_id(policy)
    selected = set(table_ids)
    expected_zones = sorted({tables[t].zone_id for t in selected if t in tables})
    zone_ids = _string_list(_at(raw, "selection", "snapshot", "zoneIds"))
    if expected_zones and zone_ids is not None and set(zone_ids) != set(expected_zones):
        problems.append(
            MetadataProblem(
                "selection.snapshot.zoneIds",
                f"zone ids {sorted(set(zone_ids))} do not match the selected tables' zones "
                f"{expected_zones}",
            )
        )

    edges = _at(raw, "selection", "snapshot", "adjacency", "edges")
    for index, edge in enumerate(edges if isinstance(edges, list) else []):
        pair = _edge_pair(edge)
        if pair is None:
            continue
        path = f"selection.snapshot.adjacency.edges[{index}]"
        outsiders = [t for t in pair if t not in selected]
        if pair[0] == pair[1]:
            problems.append(MetadataProblem(path, f"edge joins table {pair[0]!r} to itself"))
        elif outsiders:
            message = f"edge {list(pair)} joins unselected table(s) {outsiders}"
            problems.append(MetadataProblem(path, message))
    return problems


def _hash_problems(raw: Mapping[str, Any]) -> list[MetadataProblem]:
    adjacency = _at(raw, "selection", "snapshot", "adjacency")
    edges, stated = _at(adjacency, "edges"), _at(adjacency, "hash")
    if not isinstance(edges, list) or not isinstance(stated, str):
        return []
    pairs = [_edge_pair(edge) for edge in edges]
    if any(pair is None for pair in pairs) or len(stated) != 64:
        return []
    expected = adjacency_hash(pair for pair in pairs if pair is not None)
    if stated == expected:
        return []
    return [
        MetadataProblem(
            "selection.snapshot.adjacency.hash",
            f"hash {stated[:12]}... does not match the edges (expected {expected[:12]}...)",
        )
    ]


def validate_hold_metadata(
    raw: Mapping[str, Any] | Any, policy: CapacityPolicy
) -> list[MetadataProblem]:
    """Every problem with a hold's metadata, each with its path; an empty list means valid.

    ``raw`` is the stored JSON as a mapping (or JSON text). Consistency checks that depend on a
    malformed part are skipped rather than reported as its echo: zone ids and edges are only
    checked against the selection when ``tableIds`` is a non-empty list of strings, and the hash
    only when every edge is a pair of strings.
    """
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError as error:
            return [MetadataProblem("", f"metadata is not valid JSON: {error}")]
    if not isinstance(raw, Mapping):
        return [MetadataProblem("", f"metadata must be an object, got {type(raw).__name__}")]

    problems = _schema_problems(raw)
    table_ids = _at(raw, "selection", "tableIds")
    if isinstance(table_ids, list):
        problems += _table_problems(table_ids, policy)
    well_formed_ids = _string_list(table_ids)
    if well_formed_ids:
        problems += _snapshot_problems(raw, policy, well_formed_ids)
    problems += _hash_problems(raw)
    return problems


def hold_metadata_problems(
    raw: Any, table_ids: Sequence[str], policy: CapacityPolicy | None
) -> list[MetadataProblem]:
    """Every defect of a stored hold's metadata, all at once: the one check behind confirmation,
    the audit, the backfill and the invalid-holds gauge.

    ``raw`` is the stored JSON value (a JSON string is a defect: it was encoded twice),
    ``table_ids`` the hold's own tables, which ``selection.tableIds`` must equal. With a
    ``policy``, everything :func:`validate_hold_metadata` checks; without one (the hold's policy
    revision is not on record), the shape only.
    """
    if not isinstance(raw, Mapping):
        kind = "a JSON string (encoded twice?)" if isinstance(raw, str) else "not an object"
        return [MetadataProblem("", f"the stored metadata is {kind}")]
    problems = _schema_problems(raw) if policy is None else validate_hold_metadata(raw, policy)
    listed = _string_list(_at(raw, "selection", "tableIds"))
    if listed is not None and sorted(listed) != sorted(table_ids):
        problems.append(
            MetadataProblem(
                "selection.tableIds",
                f"tables {sorted(listed)} differ from the hold's tables {sorted(table_ids)}",
            )
        )
    return problems


def metadata_incomplete(problems: Sequence[MetadataProblem]) -> CapacityError:
    """``HOLD_METADATA_INCOMPLETE`` listing every problem in ``details["problems"]`` as
    ``{"path", "message"}`` objects."""
    listed = "; ".join(f"{p.path or '(root)'}: {p.message}" for p in problems)
    return CapacityError(
        HOLD_METADATA_INCOMPLETE,
        f"hold metadata has {len(problems)} problem(s): {listed}",
        {"problems": [p.as_dict() for p in problems]},
    )


def require_valid_hold_metadata(
    raw: Mapping[str, Any] | Any, policy: CapacityPolicy
) -> HoldMetadata:
    """The parsed metadata, or :func:`metadata_incomplete` listing every problem."""
    problems = validate_hold_metadata(raw, policy)
    if problems:
        raise metadata_incomplete(problems)
    if isinstance(raw, str | bytes):
        return HoldMetadata.model_validate_json(raw)
    return HoldMetadata.model_validate(raw)
