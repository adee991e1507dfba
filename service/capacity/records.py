"""The stored things the capacity shell loads, as frozen values: bookings, venues, holds and
policy revisions.

Pure like the rest of the domain: the repository builds these from rows (through psycopg row
factories, field names matching column names), the decisions read them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.capacity.policy import CapacityPolicy


@dataclass(frozen=True)
class Booking:
    id: uuid.UUID
    venue_id: uuid.UUID
    status: str
    party_size: int
    starts_at: datetime
    needs_attention: bool


@dataclass(frozen=True)
class Venue:
    id: uuid.UUID
    name: str
    timezone: str


@dataclass(frozen=True)
class Hold:
    """A table hold, as stored. ``metadata`` is the stored JSON, unvalidated (see
    :func:`service.capacity.holds.hold_metadata_problems`)."""

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

    def __post_init__(self) -> None:
        # Postgres arrays arrive as lists.
        object.__setattr__(self, "table_ids", tuple(self.table_ids))

    @property
    def claimed_version(self) -> str | None:
        """The policy version the metadata says the hold was made under, if it says one."""
        claimed = self.metadata.get("policyVersion") if isinstance(self.metadata, Mapping) else None
        return claimed if isinstance(claimed, str) else None

    def is_live(self, now: datetime) -> bool:
        """Active and unexpired: the only state a hold can be confirmed in."""
        return self.status == "active" and self.expires_at > now


@dataclass(frozen=True)
class PolicyRevision:
    """One stored revision of a venue's policy; ``version`` is ``policy_version(policy)``."""

    id: int
    venue_id: uuid.UUID
    revision: int
    version: str
    adjacency_hash: str
    created_at: datetime
    policy: CapacityPolicy
