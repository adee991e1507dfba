"""Render a booking email: pure, from a BookingView to the bytes that go on the wire.

HTML templates autoescape; every header value built from guest or venue data is stripped of
control characters first, so no guest text can start a header of its own.

The message is written straight to bytes instead of through ``email.mime`` and a generator
(which cost as much CPU as everything else in a worker): what is the same for every email
(templates, the sender's header and envelope, MIME boundaries, content-type lines, the
calendar's constant lines) is built once per process, lazily; per email only the variable
parts are formatted. The encodings themselves come from the standard library: RFC 2047
encoded-words (``email.header``), quoted-printable bodies (``quopri``), address quoting
(``email.utils``); the calendar's TEXT escaping and line folding from icalendar.
"""

from __future__ import annotations

import quopri
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.headerregistry import Address
from email.utils import format_datetime, parseaddr, quote
from functools import lru_cache

import jinja2
from icalendar import vText
from icalendar.parser import Contentline, Parameters

from service.emails.models import BookingView
from service.emails.rules import EmailType
from service.text import single_line

SUBJECTS: dict[EmailType, str] = {
    EmailType.REQUEST_RECEIVED: "We received your booking request at {venue}",
    EmailType.CONFIRMED: "Your table at {venue} is confirmed",
    EmailType.UPDATED: "Your booking at {venue} was updated",
    EmailType.CANCELLED: "Your booking at {venue} is cancelled",
}
CALENDAR_DURATION = timedelta(hours=2)
MAX_LINE = 998  # RFC 5322: longer lines must be encoded
CRLF = "\r\n"
_EOL = re.compile(r"\r\n|\r|\n")
# Not sendable as 7bit: anything but printable ASCII, tab and line ends, and "=_", which starts
# every boundary (quoted-printable encodes "=", so an encoded part can never contain one).
_NOT_7BIT = re.compile(r"[^\t\r\n -~]|=_")
_ICAL_FOLD = 75  # octets per calendar line, RFC 5545 3.1


class UnrenderableBooking(ValueError):
    """The booking's data cannot make a valid email (for example a malformed address)."""


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """An email ready for SMTP: the envelope and the message exactly as it goes on the wire."""

    envelope_from: str
    envelope_to: tuple[str, ...]
    data: bytes
    message_id: str


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("service.emails", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        auto_reload=False,  # packaged templates never change under a running process
    )


@lru_cache(maxsize=len(EmailType))
def _templates(email_type: EmailType) -> tuple[jinja2.Template, jinja2.Template]:
    env = _env()
    return env.get_template(f"{email_type.value}.txt"), env.get_template(f"{email_type.value}.html")


@dataclass(frozen=True, slots=True)
class _Static:
    """What every email from one sender shares, built once per process."""

    envelope_from: str
    domain: str
    from_line: str
    alternative: str
    mixed: str


def _plain_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable() and "=?" not in value


@lru_cache(maxsize=8)
def _static(sender: str) -> _Static:
    name, address = parseaddr(sender)
    token = secrets.token_hex(12)  # boundaries start with "=_", see _NOT_7BIT
    return _Static(
        envelope_from=address,
        domain=address.rpartition("@")[2] or "booking.invalid",
        from_line=f"From: {sender if _plain_ascii(sender) else _address_header(name, address, 'From')}",
        alternative=f"=_{token}_alt",
        mixed=f"=_{token}_mix",
    )


def message_id(booking_id: object, email_type: EmailType, sender: str, revision: int = 1) -> str:
    """A deterministic Message-ID per (booking, email type, revision), so receivers can drop
    the copies of the at-least-once window while two updates stay two messages."""
    return f"<booking-{booking_id}.{email_type.value}.r{revision}@{_static(sender).domain}>"


def _unstructured(value: str, header_name: str) -> str:
    """A header value as sent: ASCII as it is, anything else (and ASCII that a reader would
    take for an encoded-word) as RFC 2047 encoded-words folded with CRLF."""
    if value.isascii() and "=?" not in value:
        return value
    return Header(value, "utf-8", header_name=header_name).encode(linesep=CRLF)


def _address_header(name: str, address: str, header_name: str = "To") -> str:
    """``"Name" <address>``: an ASCII name as a quoted-string (so that spacing and specials
    survive), any other as encoded-words."""
    if not name:
        return address
    if name.isascii() and "=?" not in name:
        return f'"{quote(name)}" <{address}>'
    return f"{_unstructured(name, header_name)} <{address}>"


@lru_cache(maxsize=4096)
def _subject(email_type: EmailType, venue_name: str) -> str:
    """Venues repeat: each distinct subject is formatted and encoded once."""
    return _unstructured(
        single_line(SUBJECTS[email_type].format(venue=venue_name))[:200], "Subject"
    )


def _recipient(booking: BookingView) -> tuple[str, str]:
    """The ``To`` header value (``Name <address>``, the name encoded) and the envelope address;
    raises UnrenderableBooking for an unusable address."""
    try:
        address = Address(addr_spec=booking.guest_email)
    except (ValueError, IndexError) as error:
        raise UnrenderableBooking(
            f"guest email address is not valid: {type(error).__name__}"
        ) from None
    if not address.domain or any(c in booking.guest_email for c in "\r\n"):
        raise UnrenderableBooking("guest email address is not valid: no domain")
    try:
        domain = address.domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnrenderableBooking("guest email address has an invalid domain") from None
    addr_spec = Address(username=address.username, domain=domain).addr_spec
    return _address_header(single_line(booking.guest_name)[:128], addr_spec), addr_spec


def _context(booking: BookingView) -> dict[str, object]:
    return {
        "guest_name": booking.guest_name,
        "party_size": booking.party_size,
        "when": booking.local_start().strftime("%A %d %B %Y at %H:%M"),
        "notes": booking.notes,
        "venue_name": booking.venue_name,
        "locale": single_line(booking.locale)[:16],
    }


def bodies(booking: BookingView, email_type: EmailType) -> tuple[str, str]:
    """The plain-text and HTML bodies (HTML escaped by its templates)."""
    text, html = _templates(email_type)
    context = _context(booking)
    return text.render(context), html.render(context)


def _ical_text(name: str, value: str) -> str:
    """One TEXT property line, escaped and folded (at 75 octets) by icalendar."""
    escaped: bytes = vText(value).to_ical()
    line = f"{name}:{escaped.decode('utf-8')}"
    if len(line) < _ICAL_FOLD - 1 and line.isascii():
        return line  # nothing to fold
    folded: bytes = Contentline.from_parts(name, Parameters(), vText(value)).to_ical()
    return folded.decode("utf-8")


def _ical_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def calendar_file(booking: BookingView, sender: str) -> str:
    """The booking as an iCalendar (RFC 5545) event, with CRLF line ends.

    Written line by line in the order and form icalendar's ``Calendar.to_ical`` produces
    (each TEXT line escaped and folded by icalendar's ``Contentline``); building its object tree per
    email cost as much as the rest of rendering.
    """
    venue = single_line(booking.venue_name)
    start = _ical_time(booking.starts_at)
    lines = (
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//booking-durability-service//EN",
        "METHOD:PUBLISH",
        "BEGIN:VEVENT",
        _ical_text("SUMMARY", f"Table for {booking.party_size} at {venue}"),
        f"DTSTART:{start}",
        f"DTEND:{_ical_time(booking.starts_at + CALENDAR_DURATION)}",
        f"DTSTAMP:{start}",
        _ical_text("UID", f"booking-{booking.booking_id}@{_static(sender).domain}"),
        _ical_text("LOCATION", venue),
        "END:VEVENT",
        "END:VCALENDAR",
        "",
    )
    return CRLF.join(lines)


def _part(media_type: str, body: str, extra_headers: str = "") -> str:
    """A text part: 7bit when it is short-lined printable ASCII, quoted-printable UTF-8
    otherwise (readable in raw form, and a guest's note typed as one long line stays within
    SMTP's line limit)."""
    lines = _EOL.split(body)
    if body.isascii() and not _NOT_7BIT.search(body) and max(map(len, lines)) <= MAX_LINE:
        head = f'Content-Type: {media_type}; charset="us-ascii"\r\nContent-Transfer-Encoding: 7bit'
        encoded = CRLF.join(lines)
    else:
        head = (
            f'Content-Type: {media_type}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable"
        )
        encoded = quopri.encodestring(CRLF.join(lines).encode("utf-8")).decode("ascii")
    return f"{head}\r\n{extra_headers}\r\n{encoded}"


def _multipart(subtype: str, boundary: str, parts: list[str]) -> str:
    """A multipart entity: its Content-Type line, a blank line and the delimited parts."""
    delimiter = f"\r\n--{boundary}\r\n"
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
        + delimiter.join(parts)
        + f"\r\n--{boundary}--\r\n"
    )


def compose(
    booking: BookingView,
    email_type: EmailType,
    sender: str,
    now: datetime,
    texts: tuple[str, str],
    calendar: str | None,
    revision: int = 1,
) -> tuple[str, str, str]:
    """The whole message as text (ASCII, CRLF line ends), its envelope recipient and
    Message-ID."""
    static = _static(sender)
    to_header, to_address = _recipient(booking)
    mid = message_id(booking.booking_id, email_type, sender, revision)
    body = _multipart(
        "alternative",
        static.alternative,
        [_part("text/plain", texts[0]), _part("text/html", texts[1])],
    )
    if calendar is not None:
        invite = _part(
            "text/calendar",
            calendar,
            'Content-Disposition: attachment; filename="booking.ics"\r\n',
        )
        body = _multipart("mixed", static.mixed, [body, invite])
    head = (
        f"{static.from_line}\r\n"
        f"To: {to_header}\r\n"
        f"Subject: {_subject(email_type, booking.venue_name)}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: {mid}\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return head + body, to_address, mid


def render(
    booking: BookingView, email_type: EmailType, sender: str, now: datetime, *, revision: int = 1
) -> RenderedEmail:
    """The complete email for ``email_type`` as requested at ``revision`` (the Message-ID's);
    raises UnrenderableBooking on unusable data."""
    calendar = calendar_file(booking, sender) if email_type is EmailType.CONFIRMED else None
    text, to_address, mid = compose(
        booking, email_type, sender, now, bodies(booking, email_type), calendar, revision
    )
    return RenderedEmail(_static(sender).envelope_from, (to_address,), text.encode("ascii"), mid)
