"""Error codes of the capacity domain, and the one exception type that carries them.

The codes keep the names the booking service already knows; callers branch on ``error.code``,
never on the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

POLICY_CHANGED: Final = "POLICY_CHANGED"
HOLD_METADATA_INCOMPLETE: Final = "HOLD_METADATA_INCOMPLETE"
HOLD_NOT_FOUND: Final = "HOLD_NOT_FOUND"
HOLD_EXPIRED: Final = "HOLD_EXPIRED"
HOLD_BOOKING_MISMATCH: Final = "HOLD_BOOKING_MISMATCH"
POLICY_REQUOTE_FAILED: Final = "POLICY_REQUOTE_FAILED"
POLICY_RETRY_FAILED: Final = "POLICY_RETRY_FAILED"
NO_AVAILABILITY: Final = "NO_AVAILABILITY"
BOOKING_NOT_FOUND: Final = "BOOKING_NOT_FOUND"
BOOKING_NOT_PENDING: Final = "BOOKING_NOT_PENDING"
POLICY_NOT_FOUND: Final = "POLICY_NOT_FOUND"

DEFAULT_MESSAGES: Final[Mapping[str, str]] = {
    POLICY_CHANGED: "the venue's capacity policy changed since the hold was taken",
    HOLD_METADATA_INCOMPLETE: "the hold's metadata is missing or malformed",
    HOLD_NOT_FOUND: "no such hold",
    HOLD_EXPIRED: "the hold has expired",
    HOLD_BOOKING_MISMATCH: "the hold belongs to another booking",
    POLICY_REQUOTE_FAILED: "re-quoting under the new policy found no tables",
    POLICY_RETRY_FAILED: "the policy kept changing; confirmation gave up after its retries",
    NO_AVAILABILITY: "no table or table combination is available",
    BOOKING_NOT_FOUND: "no such booking",
    BOOKING_NOT_PENDING: "the booking is no longer pending",
    POLICY_NOT_FOUND: "the venue has no capacity policy",
}

ERROR_CODES: Final = frozenset(DEFAULT_MESSAGES)


class CapacityError(Exception):
    """A domain failure with a stable ``code`` and JSON-serialisable ``details``."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.message = message or DEFAULT_MESSAGES.get(code, code)
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"CapacityError({self.code!r}, {self.message!r}, details={self.details!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.details))

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}
