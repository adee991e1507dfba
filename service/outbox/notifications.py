"""What an outbox handler sends: the shared shape of every admin notification.

Each feature defines its event types, payload models and formatters beside its own code (for
example ``service.capacity.notifications``) and registers them at the composition root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.text import single_line


@dataclass(frozen=True)
class Notification:
    """What admins receive: a subject, a readable text, and the structured data behind it."""

    subject: str
    text: str
    data: dict[str, Any]

    def __post_init__(self) -> None:
        # The subject becomes a header: venue text with a CR or LF must not break the email.
        object.__setattr__(self, "subject", single_line(self.subject)[:200])
