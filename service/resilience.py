"""One vocabulary for failure and retry, used at every boundary.

Adapters map what their library raises onto ``TransientError`` (retrying later can succeed)
or ``PermanentError`` (it never will) once, where the library is called. Waiting and retrying
go through ``keep_trying`` (tenacity) and ``backoff_ms`` (Dramatiq's own exponential backoff),
so every loop in the service backs off the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from dramatiq.common import compute_backoff
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

T = TypeVar("T")


class ServiceError(Exception):
    """Base of the service's own errors."""

    permanent = False


class TransientError(ServiceError):
    """Retrying later can succeed (an outage, a lock conflict, a deferral)."""

    permanent = False


class PermanentError(ServiceError):
    """Retrying can never succeed (bad data, a refused address, wrong configuration)."""

    permanent = True


class InvalidMessage(PermanentError, ValueError):
    """A message that can never be processed (malformed arguments): dead-lettered at once."""


def backoff_ms(attempts: int, min_ms: int, max_ms: int) -> int:
    """Delay before the next try after ``attempts`` failed ones (Dramatiq's formula, no jitter)."""
    return compute_backoff(max(attempts - 1, 0), factor=min_ms, max_backoff=max_ms, jitter=False)[1]


def keep_trying(
    call: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    deadline_seconds: float,
    first_pause: float = 0.2,
    max_pause: float = 5.0,
) -> T:
    """``call()`` until it succeeds or ``deadline_seconds`` pass, pausing exponentially between
    tries while it raises one of ``retry_on``; past the deadline the last error is raised."""
    retrying = Retrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop_after_delay(deadline_seconds),
        wait=wait_exponential(multiplier=first_pause, max=max_pause),
        reraise=True,
    )
    try:
        return retrying(call)
    except RetryError as error:  # pragma: no cover - reraise=True re-raises the cause
        raise error.last_attempt.exception() or error from None
