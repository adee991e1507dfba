"""HMAC-SHA256 signatures of webhook requests, and their verification for receivers.

The signed string is ``<timestamp>.<raw body>``; the header is ``v1=<hex digest>``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Booking-Signature"
TIMESTAMP_HEADER = "X-Booking-Timestamp"
SCHEME = "v1"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``v1=<hex>`` header value for ``body`` sent at unix time ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: int = 300,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs ``body`` at ``timestamp`` and the timestamp is recent enough."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_seconds:
        return False
    candidates = [part.strip() for part in header.split(",")]
    expected = signature(secret, sent, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
