"""Delivering an event to a venue's admins: email to ``admin_emails`` and a signed webhook.

Each admin address is a target of its own (``email:<address>``), and so is the webhook
(``webhook``). A handler receives the claimed event and the set of targets already served by
earlier attempts; it adds each target it serves to that set, skips the targets an earlier
attempt gave up on (``event.dead_targets``), and raises :class:`DeliveryError` listing each
target that failed, so that a retry only repeats what did not go through: an admin whose
address the SMTP server deferred (4xx) is retried, one it refused (5xx) is dead for this event,
and the others get the email once. An event ends ``delivered`` only when every current target
was served; with a target dead it ends ``dead`` once nothing is left to retry.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, Protocol

import httpx

from service.config import Settings
from service.db import Database
from service.logs import get_logger
from service.metrics import OUTBOX_RECIPIENTS
from service.outbox import egress
from service.outbox.notifications import Notification
from service.outbox.signing import signed_headers
from service.outbox.store import OutboxEvent
from service.smtp import Refusal, SmtpError

log = get_logger(__name__)

EMAIL_TARGET = "email"
WEBHOOK_TARGET = "webhook"
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_BODY_EXCERPT_CHARS = 200


def email_target(address: str) -> str:
    return f"{EMAIL_TARGET}:{address}"


@dataclass(frozen=True)
class TargetFailure:
    """Why one target was not served this time; ``permanent``: it will not be retried."""

    reason: str
    permanent: bool


class DeliveryError(Exception):
    """A delivery failed; ``permanent`` says that retrying cannot help.

    ``targets`` says which targets failed and how; it is empty when the event itself is at
    fault (no venue, malformed payload).
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        targets: Mapping[str, TargetFailure] | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.targets: dict[str, TargetFailure] = dict(targets or {})


class Handler(Protocol):
    def __call__(self, event: OutboxEvent, delivered: set[str]) -> None: ...


Formatter = Callable[[dict[str, Any]], Notification]


@dataclass(frozen=True)
class Postbox:
    """What delivering a notification needs, built by the composition root."""

    db: Database
    send_to: Callable[[EmailMessage, Sequence[str]], dict[str, Refusal]]
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
    if not isinstance(value, list):
        return []
    return list(dict.fromkeys(str(item).strip() for item in value if str(item).strip()))


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


def _host(url: str | None) -> str:
    """The host named by ``url`` for messages, ``?`` when there is none to show."""
    try:
        return httpx.URL(url or "").host or "?"
    except httpx.InvalidURL:
        return "?"


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text[:_BODY_EXCERPT_CHARS]


def post_webhook(
    settings: Settings, url: str, event: OutboxEvent, notification: Notification
) -> None:
    """POST the signed JSON document through ``egress.post``; raises DeliveryError classified by
    the outcome (a refused URL or address, a redirect and most 4xx are permanent)."""
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
    host = _host(url)
    try:
        answer = egress.post(
            url,
            content=body,
            headers=headers,
            timeout=settings.webhook_timeout_seconds,
            allow_http=settings.webhook_allow_http,
            allowed_networks=settings.webhook_allowed_networks,
            ca_file=settings.webhook_ca_file,
        )
    except egress.EgressRefused as error:
        raise DeliveryError(f"webhook refused: {error}", permanent=True) from error
    except TimeoutError as error:
        raise DeliveryError(
            f"webhook to {host}: no answer within {settings.webhook_timeout_seconds:g}s"
        ) from error
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise DeliveryError(f"webhook to {host}: {type(error).__name__}: {error}") from error
    status = answer.status
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        raise DeliveryError(
            f"webhook to {host} answered HTTP {status} (a redirect to {_host(answer.location)}); "
            "redirects are not followed",
            permanent=True,
        )
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    excerpt = _excerpt(answer.body)
    raise DeliveryError(
        f"webhook to {host} answered HTTP {status}" + (f": {excerpt}" if excerpt else ""),
        permanent=not retryable,
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
        if not venue.admin_emails and not venue.webhook_url:
            raise DeliveryError("venue has neither admin emails nor a webhook", permanent=True)
        targets = [email_target(a) for a in venue.admin_emails]
        if venue.webhook_url:
            targets.append(WEBHOOK_TARGET)
        if EMAIL_TARGET in delivered:  # recorded before per-recipient tracking: all admins
            delivered.update(email_target(a) for a in venue.admin_emails)
        skipped = delivered | set(event.dead_targets)
        failures: dict[str, TargetFailure] = {}
        pending = [a for a in venue.admin_emails if email_target(a) not in skipped]
        if pending:
            failures |= self._email(event, notification, venue.admin_emails, pending, delivered)
        if venue.webhook_url and WEBHOOK_TARGET not in skipped:
            try:
                post_webhook(self.postbox.settings, venue.webhook_url, event, notification)
            except DeliveryError as error:
                failures[WEBHOOK_TARGET] = TargetFailure(str(error), error.permanent)
            else:
                delivered.add(WEBHOOK_TARGET)
        for name, failure in failures.items():
            log.warning(
                "outbox target failed",
                event_id=str(event.id),
                target=name.partition(":")[0],
                permanent=failure.permanent,
                error=failure.reason,
            )
        earlier = {t: event.dead_targets[t] for t in targets if t in event.dead_targets}
        if not failures and not earlier:
            return
        summary = [f"{t}: {reason}" for t, reason in earlier.items()]
        summary += [f"{t}: {f.reason}" for t, f in failures.items()]
        raise DeliveryError(
            "; ".join(summary),
            permanent=all(f.permanent for f in failures.values()),
            targets=failures,
        )

    def _email(
        self,
        event: OutboxEvent,
        notification: Notification,
        admins: list[str],
        recipients: list[str],
        delivered: set[str],
    ) -> dict[str, TargetFailure]:
        """One SMTP transaction to ``recipients``; marks each accepted one delivered and returns
        the failures of the others."""
        try:
            message = build_email(self.postbox.settings.sender, event, notification, admins)
        except ValueError as error:  # an address or header the email library refuses
            OUTBOX_RECIPIENTS.labels("refused").inc(len(recipients))
            reason = f"email: the message cannot be built ({type(error).__name__})"
            return {email_target(a): TargetFailure(reason, True) for a in recipients}
        try:
            refused = self.postbox.send_to(message, recipients)
        except SmtpError as error:
            OUTBOX_RECIPIENTS.labels("refused" if error.permanent else "deferred").inc(
                len(recipients)
            )
            return {
                email_target(a): TargetFailure(f"email: {error}", error.permanent)
                for a in recipients
            }
        failures: dict[str, TargetFailure] = {}
        for address in recipients:
            refusal = refused.get(address)
            if refusal is None:
                delivered.add(email_target(address))
                OUTBOX_RECIPIENTS.labels("delivered").inc()
            elif refusal.permanent:
                failures[email_target(address)] = TargetFailure(f"refused ({refusal})", True)
                OUTBOX_RECIPIENTS.labels("refused").inc()
            else:
                failures[email_target(address)] = TargetFailure(f"deferred ({refusal})", False)
                OUTBOX_RECIPIENTS.labels("deferred").inc()
        return failures
