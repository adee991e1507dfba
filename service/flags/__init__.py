"""Feature flags the rest of the code asks; see docs/flags.md.

Every answer is local and immediate: from the toggles Unleash last sent this process, else
from the copy saved in ``FLAG_CACHE_DIR``, else from the environment default. Evaluation never
raises and never waits on the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from service.config import Settings
from service.flags.client import ClientHolder, ClientState
from service.flags.definitions import EMAIL_QUEUE, FLAGS, POLICY_REQUOTE, Flag, Source
from service.logs import get_logger
from service.metrics import FLAG_ENABLED

__all__ = [
    "EMAIL_QUEUE",
    "FLAGS",
    "POLICY_REQUOTE",
    "Flag",
    "FlagStatus",
    "Flags",
    "Source",
]

log = get_logger(__name__)
_ERROR_LOG_INTERVAL = 60.0


def _context(venue_id: object | None) -> dict[str, Any]:
    if venue_id is None:
        return {}
    venue = str(venue_id)
    return {"userId": venue, "properties": {"venueId": venue}}


@dataclass(frozen=True)
class FlagStatus:
    """One flag's effective value and where it came from."""

    flag: Flag
    value: bool
    source: Source
    default: bool


class Flags:
    """The flags of one process, evaluated from its Unleash client (created on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.holder = ClientHolder(settings)
        self._last_error_log = 0.0
        self._reported: dict[str, bool] = {}
        """Last value written to the gauge per flag: the multiprocess gauge costs a file write."""

    def default(self, flag: Flag) -> bool:
        try:
            return flag.default(self.settings)
        except Exception:
            return flag.last_resort

    def _report(self, flag: Flag, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error("flag_evaluation_failed", flag=flag.name, error=repr(error))

    def is_enabled(self, flag: Flag, venue_id: object | None = None) -> bool:
        """Evaluate ``flag`` for an optional venue; never raises, never blocks."""
        default = self.default(flag)
        value = default
        try:
            client = self.holder.get()
            if client is not None:
                value = client.is_enabled(flag.name, _context(venue_id), default)
        except Exception as error:
            self._report(flag, error)
        if self._reported.get(flag.name) is not value:
            try:
                FLAG_ENABLED.labels(flag=flag.name).set(1 if value else 0)
                self._reported[flag.name] = value
            except Exception as error:
                self._report(flag, error)
        return value

    def email_queue_enabled(self, venue_id: object | None = None) -> bool:
        """Whether booking emails go through the queue (on) or are sent at once (off)."""
        return self.is_enabled(EMAIL_QUEUE, venue_id)

    def policy_requote_enabled(self, venue_id: object | None = None) -> bool:
        """Whether a POLICY_CHANGED confirmation re-quotes and re-holds automatically."""
        return self.is_enabled(POLICY_REQUOTE, venue_id)

    def report_all(self) -> None:
        """Evaluate every flag once, so this process exports each flag's gauge."""
        for flag in FLAGS:
            self.is_enabled(flag)

    def start(self) -> None:
        """Create this process's Unleash client now (it syncs in the background)."""
        self._reported.clear()
        try:
            self.holder.get()
        except Exception as error:
            log.error("flags_start_failed", error=repr(error))

    def stop(self, wait: float = 0.0) -> None:
        """Stop this process's client, waiting at most ``wait`` seconds."""
        try:
            self.holder.close(wait)
        except Exception as error:
            log.warning("flags_shutdown_failed", error=repr(error))

    def status(
        self, venue_id: object | None = None, wait: float = 0.0
    ) -> tuple[list[FlagStatus], ClientState | None]:
        """Every flag's value and source, after waiting up to ``wait`` s for a first sync."""
        client = self.holder.get()
        state = None
        if client is not None:
            client.wait_ready(wait)
            state = client.state()
        rows = []
        for flag in FLAGS:
            if state is None or flag.name not in state.known_toggles:
                source = Source.DEFAULT
            else:
                source = Source.UNLEASH if state.fresh else Source.CACHE
            rows.append(
                FlagStatus(flag, self.is_enabled(flag, venue_id), source, self.default(flag))
            )
        return rows, state
