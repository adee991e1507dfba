"""Delivering an event to a venue's admins: email to ``admin_emails`` and a signed webhook.

A handler receives the claimed event and the set of targets already served by earlier attempts;
it adds each target it serves to that set and raises :class:`DeliveryError` when any target
failed, so a retry only repeats what did not go through.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.db import Database
from service.emails.transport import PermanentSmtpError, TransientSmtpError
from service.logs import get_logger
from service.outbox.notifications import Notification
from service.outbox.signing import signed_headers
from service.outbox.store import OutboxEvent

log = get_logger(__name__)

EMAIL_TARGET = "email"
WEBHOOK_TARGET = "webhook"
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class DeliveryError(Exception):
    """A delivery failed; ``permanent`` says that retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Handler(Protocol):
    def __call__(self, event: OutboxEvent, delivered: set[str]) -> None: ...


Formatter = Callable[[dict[str, Any]], Notification]


@dataclass(frozen=True)
class Postbox:
    """What delivering a notification needs, built by the composition root."""

    db: Database
    send: Callable[[EmailMessage], None]
    settings: Settings


@dataclass(frozen=True)
class VenueContacts:
    name: str
    admin_emails: list[str]
    webhook_url: str | None


def load_venue_contacts(db: Database, venue_id: uuid.UUID) -> VenueContacts | None:
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT name, admin_emails, webhook_url FROM venues WHERE id = %s", (venue_id,)
        ).fetchone()
    if row is None:
        return None
    return VenueContacts(
        name=str(row["name"]),
        admin_emails=_strings(row["admin_emails"]),
        webhook_url=str(row["webhook_url"]) if row["webhook_url"] else None,
    )


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def message_id(dedupe_key: str, sender: str) -> str:
    """A Message-ID that is the same on every attempt, so receivers can drop duplicates."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "booking.invalid"
    digest = hashlib.sha256(dedupe_key.encode("utf-8")).hexdigest()[:40]
    return f"<outbox.{digest}@{domain}>"


def build_email(
    sender: str, event: OutboxEvent, notification: Notification, recipients: list[str]
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = notification.subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(event.created_at)
    message["Message-ID"] = message_id(event.dedupe_key, sender)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Booking-Event-Id"] = str(event.id)
    message["X-Booking-Event-Type"] = event.event_type
    message.set_content(notification.text)
    message.add_attachment(
        json.dumps(notification.data, indent=2, sort_keys=True).encode("utf-8"),
        maintype="application",
        subtype="json",
        filename="details.json",
    )
    return message


def webhook_body(event: OutboxEvent, notification: Notification) -> bytes:
    document = {
        "id": str(event.id),
        "type": event.event_type,
        "dedupe_key": event.dedupe_key,
        "created_at": event.created_at.isoformat(),
        "subject": notification.subject,
        "text": notification.text,
        "data": notification.data,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def post_webhook(
    settings: Settings, url: str, event: OutboxEvent, notification: Notification
) -> None:
    """POST the signed JSON document; raises DeliveryError classified by the outcome."""
    if settings.webhook_signing_secret is None:
        raise DeliveryError("WEBHOOK_SIGNING_SECRET is not set; refusing to send unsigned")
    body = webhook_body(event, notification)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "booking-outbox/1",
        "Idempotency-Key": event.dedupe_key,
        "X-Booking-Event-Id": str(event.id),
        "X-Booking-Event-Type": event.event_type,
        "X-Booking-Delivery-Attempt": str(event.attempts),
        **signed_headers(settings.webhook_signing_secret.get_secret_value(), body),
    }
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
        )
    except httpx.HTTPError as error:
        raise DeliveryError(
            f"webhook to {urlsplit(url).hostname}: {type(error).__name__}"
        ) from error
    status = response.status_code
    if 200 <= status < 300:
        return
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    raise DeliveryError(
        f"webhook to {urlsplit(url).hostname} answered HTTP {status}", permanent=not retryable
    )


class AdminNotificationHandler:
    """Formats an event and sends it to the venue's admins by email and, if set, by webhook."""

    def __init__(self, formatter: Formatter, postbox: Postbox) -> None:
        self.formatter = formatter
        self.postbox = postbox

    def __call__(self, event: OutboxEvent, delivered: set[str]) -> None:
        if event.venue_id is None:
            raise DeliveryError("event names no venue", permanent=True)
        venue = load_venue_contacts(self.postbox.db, event.venue_id)
        if venue is None:
            raise DeliveryError("venue not found", permanent=True)
        try:
            notification = self.formatter(event.payload)
        except ValueError as error:
            raise DeliveryError(f"malformed payload: {error}", permanent=True) from error
        targets: dict[str, Callable[[], None]] = {}
        if venue.admin_emails:
            targets[EMAIL_TARGET] = lambda: self._email(event, notification, venue.admin_emails)
        if venue.webhook_url:
            url = venue.webhook_url
            targets[WEBHOOK_TARGET] = lambda: post_webhook(
                self.postbox.settings, url, event, notification
            )
        if not targets:
            raise DeliveryError("venue has neither admin emails nor a webhook", permanent=True)
        failures: list[DeliveryError] = []
        for name, send in targets.items():
            if name in delivered:
                continue
            try:
                send()
            except DeliveryError as error:
                log.warning(
                    "outbox target failed", event_id=str(event.id), target=name, error=str(error)
                )
                failures.append(error)
            else:
                delivered.add(name)
        if failures:
            raise DeliveryError(
                "; ".join(str(f) for f in failures),
                permanent=all(f.permanent for f in failures),
            )

    def _email(self, event: OutboxEvent, notification: Notification, recipients: list[str]) -> None:
        sender = self.postbox.settings.sender
        try:
            self.postbox.send(build_email(sender, event, notification, recipients))
        except TransientSmtpError as error:
            raise DeliveryError(f"email: {error}") from error
        except PermanentSmtpError as error:
            raise DeliveryError(f"email: {error}", permanent=True) from error
