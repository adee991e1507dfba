"""The booking email built the straightforward way: ``email.mime`` classes, an icalendar object
tree and a ``BytesGenerator``, as the service rendered it before it wrote wire bytes directly.

It is the baseline of ``bench.render`` (the old path, step by step) and the email of the plain
Dramatiq job in ``bench.plain_actors``. No service code is imported: the templates are read
from the service's template directory as files.
"""

from __future__ import annotations

import copy
import io
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr, getaddresses, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import jinja2

TEMPLATES = Path(__file__).resolve().parents[1] / "service" / "emails" / "templates"
SUBJECTS = {
    "request_received": "We received your booking request at {venue}",
    "confirmed": "Your table at {venue} is confirmed",
    "updated": "Your booking at {venue} was updated",
    "cancelled": "Your booking at {venue} is cancelled",
}
MAX_LINE = 998
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


@dataclass(frozen=True)
class Booking:
    """The columns of the booking query (bookings joined with venues)."""

    booking_id: Any
    guest_name: str
    guest_email: str
    party_size: int
    starts_at: datetime
    locale: str
    notes: str | None
    venue_name: str
    venue_timezone: str

    @classmethod
    def from_row(cls, row: Any) -> Booking:
        return cls(**{name: getattr(row, name, None) for name in cls.__dataclass_fields__})


def single_line(text: str) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C").strip()


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def texts(booking: Booking, email_type: str) -> tuple[str, str]:
    """Step 1: the text and HTML bodies from the Jinja templates."""
    context = {
        "guest_name": booking.guest_name,
        "party_size": booking.party_size,
        "when": booking.starts_at.astimezone(ZoneInfo(booking.venue_timezone)).strftime(
            "%A %d %B %Y at %H:%M"
        ),
        "notes": booking.notes,
        "venue_name": booking.venue_name,
        "locale": single_line(booking.locale)[:16],
    }
    env = environment()
    return (
        env.get_template(f"{email_type}.txt").render(context),
        env.get_template(f"{email_type}.html").render(context),
    )


def calendar(booking: Booking, sender: str) -> bytes:
    """Step 2: the .ics attachment through icalendar's object tree."""
    cal = icalendar.Calendar()
    cal.add("prodid", "-//booking-durability-service//EN")
    cal.add("version", "2.0")
    cal.add("method", "PUBLISH")
    event = icalendar.Event()
    event.add("uid", f"booking-{booking.booking_id}@{parseaddr(sender)[1].rpartition('@')[2]}")
    event.add("dtstamp", booking.starts_at)
    event.add("dtstart", booking.starts_at)
    event.add("dtend", booking.starts_at + timedelta(hours=2))
    event.add("summary", f"Table for {booking.party_size} at {single_line(booking.venue_name)}")
    event.add("location", single_line(booking.venue_name))
    cal.add_component(event)
    return bytes(cal.to_ical())


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    short = all(len(line) <= MAX_LINE for line in body.splitlines())
    part.set_payload(body, "us-ascii" if body.isascii() and short else _UTF8_QP)
    return part


def _recipient(booking: Booking) -> str:
    address = Address(
        display_name=single_line(booking.guest_name)[:128], addr_spec=booking.guest_email
    )
    domain = address.domain.encode("idna").decode("ascii")
    return formataddr((address.display_name, f"{address.username}@{domain}"), charset="utf-8")


def build(
    booking: Booking,
    email_type: str,
    sender: str,
    now: datetime,
    bodies: tuple[str, str],
    ics: bytes | None,
) -> Message:
    """Step 3: the MIME tree (compat32 ``email.mime`` classes) with its headers."""
    body = MIMEMultipart(
        "alternative", _subparts=[_text_part(bodies[0], "plain"), _text_part(bodies[1], "html")]
    )
    msg: Message = body
    if ics is not None:
        invite = _text_part(ics.decode("utf-8"), "calendar")
        invite.add_header("Content-Disposition", "attachment", filename="booking.ics")
        msg = MIMEMultipart("mixed", _subparts=[body, invite])
    domain = parseaddr(sender)[1].rpartition("@")[2] or "booking.invalid"
    subject = single_line(SUBJECTS[email_type].format(venue=booking.venue_name))[:200]
    msg["From"] = sender
    msg["To"] = _recipient(booking)
    msg["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    msg["Message-ID"] = f"<booking-{booking.booking_id}.{email_type}@{domain}>"
    msg["Date"] = format_datetime(now)
    msg["Auto-Submitted"] = "auto-generated"
    return msg


def serialise(msg: Message) -> tuple[str, list[str], bytes]:
    """Step 4: the envelope and the bytes, exactly as ``smtplib.SMTP.send_message`` derives
    them before it talks to the server (a copy without Bcc, flattened with CRLF)."""
    sender = getaddresses([str(msg["From"])])[0][1]
    recipients = [a for _, a in getaddresses([str(v) for v in msg.get_all("To", [])])]
    msg_copy = copy.copy(msg)
    del msg_copy["Bcc"]
    del msg_copy["Resent-Bcc"]
    out = io.BytesIO()
    BytesGenerator(out).flatten(msg_copy, linesep="\r\n")
    return sender, recipients, out.getvalue()


def render(booking: Booking, email_type: str, sender: str, now: datetime) -> Message:
    """The whole message (steps 1 to 3)."""
    ics = calendar(booking, sender) if email_type == "confirmed" else None
    return build(booking, email_type, sender, now, texts(booking, email_type), ics)
