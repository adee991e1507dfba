"""Feature flags the rest of the code asks; see docs/flags.md.

Every answer is local and immediate: from the toggles Unleash last sent this process, else
from the copy saved in ``FLAG_CACHE_DIR``, else from the environment default. Evaluation never
raises and never waits on the network.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from service.config import get_settings
from service.flags.client import ClientState, close_client, get_client
from service.flags.definitions import EMAIL_QUEUE, FLAGS, POLICY_REQUOTE, Flag, Source
from service.logs import get_logger
from service.metrics import FLAG_ENABLED

__all__ = [
    "EMAIL_QUEUE",
    "FLAGS",
    "POLICY_REQUOTE",
    "Flag",
    "FlagStatus",
    "Source",
    "email_queue_enabled",
    "is_enabled",
    "policy_requote_enabled",
    "shutdown",
    "start",
    "status",
]

log = get_logger(__name__)
_ERROR_LOG_INTERVAL = 60.0
_last_error_log = 0.0
_reported: dict[str, bool] = {}
"""Last value written to the gauge per flag: the multiprocess gauge costs a file write."""
os.register_at_fork(after_in_child=_reported.clear)


def _context(venue_id: object | None) -> dict[str, Any]:
    if venue_id is None:
        return {}
    venue = str(venue_id)
    return {"userId": venue, "properties": {"venueId": venue}}


def _default(flag: Flag) -> bool:
    try:
        return flag.default(get_settings())
    except Exception:
        return flag.last_resort


def _report(flag: Flag, error: Exception) -> None:
    global _last_error_log
    now = time.monotonic()
    if now - _last_error_log >= _ERROR_LOG_INTERVAL:
        _last_error_log = now
        log.error("flag_evaluation_failed", flag=flag.name, error=repr(error))


def is_enabled(flag: Flag, venue_id: object | None = None) -> bool:
    """Evaluate ``flag`` for an optional venue; never raises, never blocks."""
    default = _default(flag)
    value = default
    try:
        client = get_client()
        if client is not None:
            value = client.is_enabled(flag.name, _context(venue_id), default)
    except Exception as error:
        _report(flag, error)
    if _reported.get(flag.name) is not value:
        try:
            FLAG_ENABLED.labels(flag=flag.name).set(1 if value else 0)
            _reported[flag.name] = value
        except Exception as error:
            _report(flag, error)
    return value


def email_queue_enabled(venue_id: object | None = None) -> bool:
    """Whether booking emails go through the queue (on) or are sent at once (off)."""
    return is_enabled(EMAIL_QUEUE, venue_id)


def policy_requote_enabled(venue_id: object | None = None) -> bool:
    """Whether a POLICY_CHANGED confirmation re-quotes and re-holds automatically."""
    return is_enabled(POLICY_REQUOTE, venue_id)


def start() -> None:
    """Create this process's Unleash client now (it syncs in the background)."""
    try:
        get_client()
    except Exception as error:
        log.error("flags_start_failed", error=repr(error))


def shutdown(wait: float = 0.0) -> None:
    """Stop this process's client, waiting at most ``wait`` seconds."""
    try:
        close_client(wait)
    except Exception as error:
        log.warning("flags_shutdown_failed", error=repr(error))


@dataclass(frozen=True)
class FlagStatus:
    """One flag's effective value and where it came from."""

    flag: Flag
    value: bool
    source: Source
    default: bool


def status(
    venue_id: object | None = None, wait: float = 0.0
) -> tuple[list[FlagStatus], ClientState | None]:
    """Every flag's value and source, after waiting up to ``wait`` s for a first sync."""
    client = get_client()
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
        rows.append(FlagStatus(flag, is_enabled(flag, venue_id), source, _default(flag)))
    return rows, state
