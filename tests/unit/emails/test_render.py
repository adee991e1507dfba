"""Unit tests: templates escape guest text, headers resist injection, the .ics is valid."""

from __future__ import annotations

import email
import re
import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from email.header import decode_header, make_header

import icalendar
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.emails.models import BookingView
from service.emails.render import (
    SUBJECTS,
    UnrenderableBooking,
    calendar_file,
    message_id,
    render,
)
from service.emails.rules import EmailType
from service.text import single_line

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
    raw = render(b, t, SENDER, NOW).data
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
    raw = render(booking(), EmailType.UPDATED, SENDER, NOW, revision=7).data
    assert b".updated.r7@example.test>" in raw


def test_non_ascii_names_survive_encoding() -> None:
    msg = parsed(booking(guest_name="Zoë Ångström", venue_name="Café Œuvre"), EmailType.CONFIRMED)
    assert msg["To"].addresses[0].display_name == "Zoë Ångström"
    assert msg["Subject"] == "Your table at Café Œuvre is confirmed"
    html, text = html_and_text(msg)
    assert "Zoë Ångström" in html and "Zoë Ångström" in text
    raw = render(booking(guest_name="Zoë"), EmailType.CONFIRMED, SENDER, NOW).data
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
    raw = render(guest, EmailType.REQUEST_RECEIVED, SENDER, NOW).data
    assert max(len(line) for line in raw.splitlines()) <= 998
    html, text = html_and_text(parsed(guest, EmailType.REQUEST_RECEIVED))
    assert note.strip() in text and note.strip() in html


# --- the wire bytes: parsed back by the stdlib, they say what was meant ---------------------


# Unicode (no lone surrogates: not text), CR/LF and other controls, words that look like
# headers or encoded-words, and lines far beyond every limit.
nasty_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=120),
    st.lists(
        st.sampled_from(
            [
                "Zoë",
                "Ångström",
                "\r\n",
                "\n",
                "\r",
                "Bcc: x@evil.example",
                "=?utf-8?q?x?=",
                "=_",
                '"',
                "\\",
                ";",
                ",",
                "<b>",
                "  ",
                "\t",
                ".",
                "日本語",
                "🍝",
                "a" * 90,
                "\x00",
            ]
        ),
        max_size=40,
    ).map("".join),
)
STANDARD_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "auto-submitted",
    "mime-version",
    "content-type",
}


def display_name(raw: bytes) -> str:
    """The To display name as an RFC 2047 reader sees it. The header-registry parser keeps the
    folding space between two adjacent encoded-words of a phrase (RFC 2047 6.2 says to drop
    it), so a long encoded name is decoded with ``email.header.decode_header``, which does."""
    parsed_to = email.message_from_bytes(raw, policy=policy.default)["To"].addresses[0]
    source = str(email.message_from_bytes(raw, policy=policy.compat32)["To"])
    phrase = source.rpartition("<")[0].strip()
    if not phrase.startswith("=?"):
        return str(parsed_to.display_name)  # a quoted-string (or no name): parsed exactly
    return str(make_header(decode_header(phrase)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=nasty_text,
    venue=nasty_text.filter(lambda v: single_line(v) != ""),
    notes=nasty_text,
    email_type=st.sampled_from(list(EmailType)),
)
def test_headers_and_bodies_decode_to_the_original_text(
    name: str, venue: str, notes: str, email_type: EmailType
) -> None:
    guest = booking(guest_name=name, venue_name=venue, notes=notes or None, status="pending")
    rendered = render(guest, email_type, SENDER, NOW)
    raw = rendered.data
    assert raw.isascii()
    lines = raw.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines), "CRLF only"
    assert max(len(line) for line in lines) <= 998
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert not msg.defects
    assert {k.lower() for k in msg} == STANDARD_HEADERS  # nothing injected
    assert display_name(raw) == single_line(name)[:128]
    assert msg["To"].addresses[0].addr_spec == "ada@guests.example"
    assert rendered.envelope_to == ("ada@guests.example",)
    assert rendered.envelope_from == "bookings@example.test"
    assert str(msg["Subject"]) == single_line(SUBJECTS[email_type].format(venue=venue))[:200]
    assert msg["Message-ID"] == rendered.message_id
    assert msg["Auto-Submitted"] == "auto-generated"
    html, text = (part.replace("\r\n", "\n") for part in html_and_text(msg))
    expected_text = "\n".join(re.split(r"\r\n|\r|\n", venue))
    assert expected_text in text  # plain text shows the venue as typed (line ends normalised)
    if email_type is EmailType.REQUEST_RECEIVED and notes:
        assert "\n".join(re.split(r"\r\n|\r|\n", notes)) in text
    assert "<b>" not in html
    for part in msg.walk():
        assert not part.defects


@settings(max_examples=300, deadline=None)
@given(venue=nasty_text, party=st.integers(1, 500))
def test_the_calendar_file_is_what_icalendar_writes(venue: str, party: int) -> None:
    """Written line by line, the event is byte for byte what icalendar's own object tree
    produces, and icalendar parses it back to the same values."""
    guest = booking(venue_name=venue, party_size=party)
    ours = calendar_file(guest, SENDER).encode("utf-8")
    cal = icalendar.Calendar()
    cal.add("prodid", "-//booking-durability-service//EN")
    cal.add("version", "2.0")
    cal.add("method", "PUBLISH")
    event = icalendar.Event()
    event.add("uid", f"booking-{guest.booking_id}@example.test")
    event.add("dtstamp", guest.starts_at)
    event.add("dtstart", guest.starts_at)
    event.add("dtend", guest.starts_at + timedelta(hours=2))
    event.add("summary", f"Table for {party} at {single_line(venue)}")
    event.add("location", single_line(venue))
    cal.add_component(event)
    assert ours == cal.to_ical()
    parsed_event = next(iter(icalendar.Calendar.from_ical(ours).walk("VEVENT")))
    assert str(parsed_event.get("location")) == single_line(venue)
    assert parsed_event.decoded("dtend") == guest.starts_at + timedelta(hours=2)


def test_a_guest_note_holding_a_boundary_look_alike_cannot_end_a_part() -> None:
    rendered = render(booking(status="pending"), EmailType.REQUEST_RECEIVED, SENDER, NOW)
    boundary = re.search(rb'boundary="([^"]+)"', rendered.data)
    assert boundary is not None
    forged = f"--{boundary.group(1).decode()}--\nContent-Type: text/html\n\n<b>x</b>"
    msg = parsed(booking(status="pending", notes=forged), EmailType.REQUEST_RECEIVED)
    _, text = html_and_text(msg)
    assert forged in text.replace("\r\n", "\n") and len(list(msg.walk())) == 3


def test_the_same_booking_renders_the_same_bytes_but_for_date() -> None:
    first = render(booking(), EmailType.CONFIRMED, SENDER, NOW)
    second = render(booking(), EmailType.CONFIRMED, SENDER, NOW)
    assert first == second
