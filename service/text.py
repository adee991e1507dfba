"""Text that goes into an email header (pure): no guest or venue text may start a header."""

from __future__ import annotations

import unicodedata


def single_line(text: str) -> str:
    """Drop control characters (CR, LF, NUL, ...) so that text is safe inside one header."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C").strip()
