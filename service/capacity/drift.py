"""Policy drift: what changed between two policies, or between a hold's snapshot and the venue now.

Both diffs are pydantic models whose JSON (``as_dict()``) uses camelCase like the hold metadata,
and :func:`summarize` renders either as one readable paragraph for notifications.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from service.capacity.holds import HoldMetadata
from service.capacity.policy import (
    CapacityPolicy,
    Edge,
    adjacency_hash,
    canonical_policy,
    edges_among,
    normalize_edges,
    policy_version,
    tables_by_id,
)

SERVICE_SETTINGS = ("timezone", "servicePeriods", "turnTimes", "bufferMinutes")
"""Sections of :func:`canonical_policy` reported as service settings."""


class _Diff(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
    )

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class FieldChange(_Diff):
    """One field's value before and after; ``field`` uses the canonical (camelCase) name."""

    field: str
    before: Any
    after: Any


class ItemChange(_Diff):
    """The changed fields of a zone or table that exists on both sides."""

    id: str
    changes: list[FieldChange]


class PolicyDiff(_Diff):
    old_version: str
    new_version: str
    old_adjacency_hash: str
    new_adjacency_hash: str
    zones_added: list[str]
    zones_removed: list[str]
    zones_changed: list[ItemChange]
    tables_added: list[str]
    tables_removed: list[str]
    tables_changed: list[ItemChange]
    edges_added: list[Edge]
    edges_removed: list[Edge]
    service_changes: list[FieldChange]

    @property
    def changed(self) -> bool:
        return self.old_version != self.new_version


class MovedTable(_Diff):
    table_id: str
    snapshot_zone_ids: list[str]
    zone_id: str


class SnapshotDiff(_Diff):
    """A hold's snapshot against the current policy, limited to the held tables.

    ``selection_usable`` says whether the held tables could still seat the party as one group:
    all exist, are active, stay in the snapshot's zones and are still connected by edges.
    """

    table_ids: list[str]
    hold_version: str
    current_version: str
    snapshot_adjacency_hash: str
    current_adjacency_hash: str
    tables_missing: list[str]
    tables_moved: list[MovedTable]
    tables_out_of_service: list[str]
    edges_removed: list[Edge]
    edges_added: list[Edge]
    selection_usable: bool

    @property
    def version_changed(self) -> bool:
        return self.hold_version != self.current_version


def _by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def _item_changes(
    before: Mapping[str, dict[str, Any]], after: Mapping[str, dict[str, Any]]
) -> list[ItemChange]:
    changed = []
    for item_id in sorted(before.keys() & after.keys()):
        old, new = before[item_id], after[item_id]
        fields = [
            FieldChange(field=key, before=old.get(key), after=new.get(key))
            for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)
        ]
        if fields:
            changed.append(ItemChange(id=item_id, changes=fields))
    return changed


def diff_policies(old: CapacityPolicy, new: CapacityPolicy) -> PolicyDiff:
    """Everything that differs between two policies, each list sorted by id."""
    before, after = canonical_policy(old), canonical_policy(new)
    old_zones, new_zones = _by_id(before["zones"]), _by_id(after["zones"])
    old_tables, new_tables = _by_id(before["tables"]), _by_id(after["tables"])
    old_edges, new_edges = set(normalize_edges(old.adjacency)), set(normalize_edges(new.adjacency))
    return PolicyDiff(
        old_version=policy_version(old),
        new_version=policy_version(new),
        old_adjacency_hash=adjacency_hash(old_edges),
        new_adjacency_hash=adjacency_hash(new_edges),
        zones_added=sorted(new_zones.keys() - old_zones.keys()),
        zones_removed=sorted(old_zones.keys() - new_zones.keys()),
        zones_changed=_item_changes(old_zones, new_zones),
        tables_added=sorted(new_tables.keys() - old_tables.keys()),
        tables_removed=sorted(old_tables.keys() - new_tables.keys()),
        tables_changed=_item_changes(old_tables, new_tables),
        edges_added=sorted(new_edges - old_edges),
        edges_removed=sorted(old_edges - new_edges),
        service_changes=[
            FieldChange(field=key, before=before[key], after=after[key])
            for key in SERVICE_SETTINGS
            if before[key] != after[key]
        ],
    )


def _connected(table_ids: list[str], edges: list[Edge]) -> bool:
    if not table_ids:
        return False
    neighbours: dict[str, set[str]] = {table_id: set() for table_id in table_ids}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen, frontier = {table_ids[0]}, [table_ids[0]]
    while frontier:
        for neighbour in neighbours[frontier.pop()] - seen:
            seen.add(neighbour)
            frontier.append(neighbour)
    return len(seen) == len(neighbours)


def diff_snapshot(metadata: HoldMetadata, policy: CapacityPolicy) -> SnapshotDiff:
    """How the venue changed under a hold: its tables and the edges between them."""
    tables = tables_by_id(policy)
    selected = list(dict.fromkeys(metadata.table_ids))
    snapshot_zones = sorted(set(metadata.zone_ids))
    snapshot_edges = set(metadata.edges)
    current_edges = edges_among(policy.adjacency, selected)
    present = [t for t in selected if t in tables]
    moved = [
        MovedTable(table_id=t, snapshot_zone_ids=snapshot_zones, zone_id=tables[t].zone_id)
        for t in sorted(present)
        if tables[t].zone_id not in snapshot_zones
    ]
    missing = sorted(t for t in selected if t not in tables)
    out_of_service = sorted(t for t in present if tables[t].status != "active")
    zones_now = {tables[t].zone_id for t in present}
    return SnapshotDiff(
        table_ids=selected,
        hold_version=metadata.policy_version,
        current_version=policy_version(policy),
        snapshot_adjacency_hash=metadata.selection.snapshot.adjacency.hash,
        current_adjacency_hash=adjacency_hash(current_edges),
        tables_missing=missing,
        tables_moved=moved,
        tables_out_of_service=out_of_service,
        edges_removed=sorted(snapshot_edges - set(current_edges)),
        edges_added=sorted(set(current_edges) - snapshot_edges),
        selection_usable=not (missing or moved or out_of_service)
        and len(zones_now) == 1
        and _connected(selected, current_edges),
    )


# --- summaries --------------------------------------------------------------------------------

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _short(version: str) -> str:
    return version[:12]


def _ids(ids: list[str]) -> str:
    return ", ".join(ids)


def _edges(edges: list[Edge]) -> str:
    return ", ".join(f"{a}+{b}" for a, b in edges)


def _counted(
    noun: str, items: list[Any], render: Callable[[Any], str], verb: str, plural_verb: str = ""
) -> str:
    if len(items) == 1:
        return f"{noun} {render(items)} {verb}"
    return f"{noun}s {render(items)} {plural_verb or verb}"


def _period(period: Mapping[str, Any]) -> str:
    days = ",".join(WEEKDAYS[day] for day in period["weekdays"])
    return f"{period['name']} {days} {period['start'][:5]}-{period['end'][:5]}"


def _setting(change: FieldChange) -> str:
    if change.field == "timezone":
        return f"timezone {change.before} → {change.after}"
    if change.field == "bufferMinutes":
        return f"buffer {change.before} → {change.after} minutes"
    if change.field == "turnTimes":

        def turns(value: list[dict[str, int]]) -> str:
            return ", ".join(f"up to {t['maxParty']}: {t['minutes']} min" for t in value)

        return f"turn times ({turns(change.before)}) → ({turns(change.after)})"
    if change.field == "servicePeriods":

        def periods(value: list[dict[str, Any]]) -> str:
            return "; ".join(_period(p) for p in value) or "none"

        return f"service periods ({periods(change.before)}) → ({periods(change.after)})"
    return f"{change.field} {change.before} → {change.after}"


def _item(kind: str, item: ItemChange) -> str:
    fields = ", ".join(f"{c.field} {c.before} → {c.after}" for c in item.changes)
    return f"{kind} {item.id} {fields}"


def _policy_clauses(diff: PolicyDiff) -> list[str]:
    clauses: list[str] = []
    for noun, items, render, verb in (
        ("zone", diff.zones_added, _ids, "added"),
        ("zone", diff.zones_removed, _ids, "removed"),
        ("table", diff.tables_added, _ids, "added"),
        ("table", diff.tables_removed, _ids, "removed"),
        ("edge", diff.edges_added, _edges, "added"),
        ("edge", diff.edges_removed, _edges, "removed"),
    ):
        if items:
            clauses.append(_counted(noun, items, render, verb))
    clauses += [_item("zone", item) for item in diff.zones_changed]
    clauses += [_item("table", item) for item in diff.tables_changed]
    clauses += [_setting(change) for change in diff.service_changes]
    return clauses


def _snapshot_clauses(diff: SnapshotDiff) -> list[str]:
    clauses = [f"table {t} no longer exists" for t in diff.tables_missing]
    clauses += [f"table {m.table_id} moved to zone {m.zone_id}" for m in diff.tables_moved]
    clauses += [f"table {t} is out of service" for t in diff.tables_out_of_service]
    if diff.edges_removed:
        clauses.append(
            _counted("edge", diff.edges_removed, _edges, "no longer exists", "no longer exist")
        )
    if diff.edges_added:
        clauses.append(_counted("edge", diff.edges_added, _edges, "now exists", "now exist"))
    return clauses


def change_lines(diff: PolicyDiff | SnapshotDiff) -> list[str]:
    """The individual changes, one short clause each (empty when nothing changed)."""
    if isinstance(diff, PolicyDiff):
        return _policy_clauses(diff)
    return _snapshot_clauses(diff)


def summarize(diff: PolicyDiff | SnapshotDiff) -> str:
    """One paragraph describing ``diff`` for a venue admin."""
    clauses = change_lines(diff)
    if isinstance(diff, PolicyDiff):
        versions = f"version {_short(diff.old_version)} → {_short(diff.new_version)}"
        if not clauses:
            return f"The capacity policy is unchanged (version {_short(diff.new_version)})."
        return f"The capacity policy changed ({versions}): {'; '.join(clauses)}."

    held = f"The hold on table{'s' if len(diff.table_ids) != 1 else ''} {_ids(diff.table_ids)}"
    versions = f"policy {_short(diff.hold_version)} → {_short(diff.current_version)}"
    outcome = (
        "the selection can still be seated as held"
        if diff.selection_usable
        else "the selection can no longer be seated as held"
    )
    if not clauses:
        if diff.version_changed:
            return f"{held} is unaffected by the policy change ({versions}); {outcome}."
        return f"{held} matches the current policy; {outcome}."
    return f"{held} has drifted ({versions}): {'; '.join(clauses)}; {outcome}."
