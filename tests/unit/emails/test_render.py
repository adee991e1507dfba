"""Unit tests: templates escape guest text, headers resist injection, the .ics is valid."""

from __future__ import annotations

import email
import uuid
from datetime import UTC, datetime
from email import policy

import icalendar
import pytest

from service.emails.models import BookingView
from service.emails.render import UnrenderableBooking, message_id, render
from service.emails.rules import EmailType

SENDER = "Bookings <bookings@example.test>"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def booking(**overrides: object) -> BookingView:
    fields: dict[str, object] = {
        "booking_id": uuid.UUID("6f1d3c1e-0000-4000-8000-000000000001"),
        "status": "confirmed",
        "guest_name": "Ada Guest",
        "guest_email": "ada@guests.example",
        "party_size": 4,
        "starts_at": datetime(2026, 12, 1, 19, 0, tzinfo=UTC),
        "locale": "en",
        "notes": None,
        "venue_name": "Chez Test",
        "venue_timezone": "Europe/Paris",
    }
    fields.update(overrides)
    return BookingView(**fields)  # type: ignore[arg-type]


def parsed(b: BookingView, t: EmailType) -> email.message.EmailMessage:
    raw = render(b, t, SENDER, NOW).as_bytes()
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def html_and_text(msg: email.message.EmailMessage) -> tuple[str, str]:
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None and text is not None
    return html.get_content(), text.get_content()


@pytest.mark.parametrize("email_type", list(EmailType))
def test_each_type_has_text_and_html(email_type: EmailType) -> None:
    msg = parsed(booking(), email_type)
    html, text = html_and_text(msg)
    assert "Ada Guest" in html and "Ada Guest" in text
    assert "Tuesday 01 December 2026 at 20:00" in text  # 19:00 UTC shown in the venue's timezone
    assert msg["Message-ID"].strip() == message_id(booking().booking_id, email_type, SENDER)
    assert msg["To"].addresses[0].addr_spec == "ada@guests.example"


def test_html_escapes_guest_text() -> None:
    msg = parsed(
        booking(
            status="pending",
            guest_name="<script>alert(1)</script>",
            notes='<img src=x onerror="y">',
        ),
        EmailType.REQUEST_RECEIVED,
    )
    html, text = html_and_text(msg)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img" not in html and "&lt;img" in html
    assert "<script>alert(1)</script>" in text  # plain text is not HTML: shown as typed


def test_guest_and_venue_text_cannot_inject_headers() -> None:
    msg = parsed(
        booking(
            guest_name="Eve\r\nBcc: victim@evil.example",
            venue_name="Bistro\nX-Evil: 1\r\nBcc: v@evil.example",
        ),
        EmailType.CONFIRMED,
    )
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert [a.addr_spec for a in msg["To"].addresses] == ["ada@guests.example"]
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]


@pytest.mark.parametrize(
    "address", ["not-an-address", "ada@", "ada@guests.example\r\nBcc: x@evil.example"]
)
def test_unusable_guest_address_is_permanent(address: str) -> None:
    with pytest.raises(UnrenderableBooking):
        render(booking(guest_email=address), EmailType.CONFIRMED, SENDER, NOW)


def test_confirmed_email_carries_a_calendar_file() -> None:
    msg = parsed(booking(venue_name='Chez "Nous"; DTSTART:19990101'), EmailType.CONFIRMED)
    attachments = list(msg.iter_attachments())
    assert [a.get_content_type() for a in attachments] == ["text/calendar"]
    cal = icalendar.Calendar.from_ical(attachments[0].get_content())
    events = list(cal.walk("VEVENT"))
    assert len(events) == 1
    event = events[0]
    assert event.decoded("dtstart") == datetime(2026, 12, 1, 19, 0, tzinfo=UTC)
    assert str(event.get("summary")) == 'Table for 4 at Chez "Nous"; DTSTART:19990101'
    assert str(event.get("uid")).startswith("booking-6f1d3c1e")


@pytest.mark.parametrize(
    "email_type", [EmailType.REQUEST_RECEIVED, EmailType.UPDATED, EmailType.CANCELLED]
)
def test_other_emails_have_no_attachment(email_type: EmailType) -> None:
    assert list(parsed(booking(), email_type).iter_attachments()) == []


def test_message_id_is_deterministic_per_booking_type_and_revision() -> None:
    b = uuid.uuid4()
    assert message_id(b, EmailType.CONFIRMED, SENDER) == message_id(b, EmailType.CONFIRMED, SENDER)
    assert message_id(b, EmailType.CONFIRMED, SENDER) != message_id(b, EmailType.CANCELLED, SENDER)
    assert message_id(b, EmailType.UPDATED, SENDER, 2) != message_id(
        b, EmailType.UPDATED, SENDER, 3
    )
    assert message_id(b, EmailType.UPDATED, SENDER, 2) == f"<booking-{b}.updated.r2@example.test>"
    raw = render(booking(), EmailType.UPDATED, SENDER, NOW, revision=7).as_bytes()
    assert b".updated.r7@example.test>" in raw


def test_non_ascii_names_survive_encoding() -> None:
    msg = parsed(booking(guest_name="Zoë Ångström", venue_name="Café Œuvre"), EmailType.CONFIRMED)
    assert msg["To"].addresses[0].display_name == "Zoë Ångström"
    assert msg["Subject"] == "Your table at Café Œuvre is confirmed"
    html, text = html_and_text(msg)
    assert "Zoë Ångström" in html and "Zoë Ångström" in text
    raw = render(booking(guest_name="Zoë"), EmailType.CONFIRMED, SENDER, NOW).as_bytes()
    assert raw.isascii(), "headers are RFC 2047 encoded and bodies quoted-printable"


def test_an_internationalised_domain_is_sent_as_punycode() -> None:
    msg = parsed(booking(guest_email="ada@bücher.example"), EmailType.CONFIRMED)
    assert msg["To"].addresses[0].addr_spec == "ada@xn--bcher-kva.example"


def test_a_non_ascii_local_part_is_refused_clearly() -> None:
    with pytest.raises(UnrenderableBooking, match="NonASCIILocalPart"):
        render(booking(guest_email="zoë@guests.example"), EmailType.CONFIRMED, SENDER, NOW)


def test_a_note_typed_as_one_long_line_stays_within_the_smtp_line_limit() -> None:
    note = "We are celebrating " + "a very long anniversary " * 200
    guest = booking(status="pending", notes=note.strip())
    raw = render(guest, EmailType.REQUEST_RECEIVED, SENDER, NOW).as_bytes()
    assert max(len(line) for line in raw.splitlines()) <= 998
    html, text = html_and_text(parsed(guest, EmailType.REQUEST_RECEIVED))
    assert note.strip() in text and note.strip() in html
