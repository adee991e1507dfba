"""The flags the service knows, their Unleash names and their environment defaults."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.config import Settings


class Source(StrEnum):
    """Where an evaluated value came from."""

    UNLEASH = "unleash"
    CACHE = "cache"
    DEFAULT = "environment default"


@dataclass(frozen=True)
class Flag:
    """One toggle: its Unleash name and type, and the setting that supplies its default."""

    name: str
    kind: str
    env_var: str
    setting: str
    summary: str
    last_resort: bool = True

    def default(self, settings: Settings) -> bool:
        """The environment default, used until Unleash (or the cache) knows the toggle."""
        return bool(getattr(settings, self.setting))


EMAIL_QUEUE = Flag(
    name="email-queue-enabled",
    kind="kill-switch",
    env_var="FEATURE_EMAIL_QUEUE_ENABLED",
    setting="feature_email_queue_enabled",
    summary="on: booking emails go through the durable queue; off: sent at once in-process",
)
POLICY_REQUOTE = Flag(
    name="policy-requote-enabled",
    kind="operational",
    env_var="FEATURE_POLICY_REQUOTE_ENABLED",
    setting="feature_policy_requote_enabled",
    summary="on: POLICY_CHANGED re-quotes and re-holds (at most two cycles); off: rejected",
)
FLAGS: tuple[Flag, ...] = (EMAIL_QUEUE, POLICY_REQUOTE)
