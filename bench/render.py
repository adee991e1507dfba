"""CPU per email of rendering a booking email to wire bytes: the old path beside the new one.

``python -m bench render`` (or ``--only render``): a few thousand ``confirmed`` bookings (the
heaviest email: text, HTML and an .ics), rendered step by step along both paths:

- old (``bench.plain_email``, what the service did before): Jinja, an icalendar object tree,
  ``email.mime`` classes, a ``BytesGenerator`` flattening as ``smtplib.send_message`` does;
- new (``service.emails.render``): Jinja with templates compiled once, the calendar written
  line by line, the message written straight to text, encoded to bytes.

Each step runs over every booking and is timed with ``time.process_time``; rounds alternate
the order of the paths, and the figures are medians over rounds, in µs of CPU per email.
Target: the new render + serialisation at most half the old one's CPU.
"""

from __future__ import annotations

import email
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import policy
from typing import Any

from bench import plain_email
from bench.common import md_table, median, run_cli, say, verdict, write_json
from service.emails import render as new
from service.emails.models import BookingView
from service.emails.rules import EmailType

NAME = "render"
TARGET = 0.5
SENDER = "Bench Bistro <bookings@bench.example>"
STEPS = ("templates", "calendar", "MIME build", "serialise to bytes")
FIRST = ["Ada", "Zoë", "Łukasz", "Mei", "José", "Olu", "Søren", "Aiko", "Tom", "Ana"]
LAST = ["Guest", "Ångström", "Nowak", "Chen", "García", "Okafor", "Øby", "Sato", "Smith"]
VENUES = ["Bench Bistro", "Café Œuvre", "The Long Table, Dock 4", "Trattoria da Enzo"]


def bookings(count: int, seed: int = 7) -> list[BookingView]:
    rnd = random.Random(seed)
    start = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
    return [
        BookingView(
            booking_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
            status="confirmed",
            guest_name=f"{rnd.choice(FIRST)} {rnd.choice(LAST)}",
            guest_email=f"guest{i}@guests.example",
            party_size=rnd.randint(1, 12),
            starts_at=start + timedelta(minutes=15 * rnd.randint(0, 2000)),
            locale="en",
            notes=None,
            venue_name=rnd.choice(VENUES),
            venue_timezone="Europe/Paris",
        )
        for i in range(count)
    ]


def _timed(fn: Callable[[], list[Any]]) -> tuple[float, list[Any]]:
    c0 = time.process_time()
    out = fn()
    return time.process_time() - c0, out


def old_path(views: list[BookingView], now: datetime) -> dict[str, float]:
    plain = [plain_email.Booking.from_row(v) for v in views]
    t = "confirmed"
    s1, texts = _timed(lambda: [plain_email.texts(b, t) for b in plain])
    s2, icss = _timed(lambda: [plain_email.calendar(b, SENDER) for b in plain])
    s3, msgs = _timed(
        lambda: [
            plain_email.build(b, t, SENDER, now, x, c)
            for b, x, c in zip(plain, texts, icss, strict=True)
        ]
    )
    s4, _ = _timed(lambda: [plain_email.serialise(m) for m in msgs])
    return dict(zip(STEPS, (s1, s2, s3, s4), strict=True))


def new_path(views: list[BookingView], now: datetime) -> dict[str, float]:
    t = EmailType.CONFIRMED
    s1, texts = _timed(lambda: [new.bodies(b, t) for b in views])
    s2, icss = _timed(lambda: [new.calendar_file(b, SENDER) for b in views])
    s3, composed = _timed(
        lambda: [
            new.compose(b, t, SENDER, now, x, c) for b, x, c in zip(views, texts, icss, strict=True)
        ]
    )
    s4, _ = _timed(
        lambda: [
            new.RenderedEmail("bookings@bench.example", (to,), text.encode("ascii"), mid)
            for text, to, mid in composed
        ]
    )
    return dict(zip(STEPS, (s1, s2, s3, s4), strict=True))


def _same_content(view: BookingView, now: datetime) -> bool:
    """Both paths say the same thing: same headers decoded, same bodies, same calendar."""
    old_bytes = plain_email.serialise(
        plain_email.render(plain_email.Booking.from_row(view), "confirmed", SENDER, now)
    )[2]
    new_bytes = new.render(view, EmailType.CONFIRMED, SENDER, now).data
    a, b = (email.message_from_bytes(x, policy=policy.default) for x in (old_bytes, new_bytes))
    keys = ("From", "To", "Subject", "Message-ID", "Date", "Auto-Submitted")
    if any(str(a[k]).strip() != str(b[k]).strip() for k in keys):
        return False
    parts = [[p.get_content().replace("\r\n", "\n") for p in m.walk() if not p.is_multipart()]
             for m in (a, b)]  # fmt: skip
    return parts[0] == parts[1]


def run(quick: bool) -> dict[str, Any]:
    count, rounds = (500, 3) if quick else (3000, 7)
    views = bookings(count)
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    if not all(_same_content(v, now) for v in views[:50]):
        raise SystemExit("old and new paths disagree on the email's content")
    old_path(views[:100], now)  # warm both: templates compiled, caches filled
    new_path(views[:100], now)
    samples: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for k in range(rounds):
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        for path in order:
            fn = old_path if path == "old" else new_path
            samples[path].append({s: v / count * 1e6 for s, v in fn(views, now).items()})
        say(f"round {k + 1}/{rounds}")
    steps = {path: {s: median([r[s] for r in rs]) for s in STEPS} for path, rs in samples.items()}
    totals = {path: median([sum(r.values()) for r in rs]) for path, rs in samples.items()}
    ratio = totals["new"] / totals["old"]
    result = {
        "emails": count,
        "email_type": "confirmed",
        "rounds": rounds,
        "unit": "CPU µs per email (time.process_time), median over rounds",
        "steps_us": steps,
        "total_us": totals,
        "ratio_new_to_old": ratio,
        "target_ratio_max": TARGET,
        "met": ratio <= TARGET,
        "samples_us": samples,
        "bytes_per_email": {
            "old": len(
                plain_email.serialise(
                    plain_email.render(
                        plain_email.Booking.from_row(views[0]), "confirmed", SENDER, now
                    )
                )[2]
            ),
            "new": len(new.render(views[0], EmailType.CONFIRMED, SENDER, now).data),
        },
    }
    write_json(NAME, result)
    return result


def markdown(result: dict[str, Any]) -> str:
    steps, totals = result["steps_us"], result["total_us"]
    rows = [
        [s, f"{steps['old'][s]:.0f}", f"{steps['new'][s]:.0f}",
         f"{steps['new'][s] / steps['old'][s]:.2f}x" if steps["old"][s] else ""]
        for s in STEPS
    ]  # fmt: skip
    rows.append(
        [
            "**render + serialise**",
            f"**{totals['old']:.0f}**",
            f"**{totals['new']:.0f}**",
            f"**{result['ratio_new_to_old']:.2f}x** (≤ {TARGET}x: {verdict(result['met'])})",
        ]
    )
    size = result["bytes_per_email"]
    return (
        "### Rendering a booking email to wire bytes\n\n"
        f"{result['emails']} `confirmed` emails (text, HTML, .ics), CPU µs per email "
        f"(`time.process_time`), medians of {result['rounds']} interleaved rounds. Old: "
        "`email.mime` + icalendar + `BytesGenerator` (`bench/plain_email.py`); new: "
        "`service.emails.render` writing the bytes directly. Sizes: old "
        f"{size['old']} bytes, new {size['new']} bytes.\n\n"
        + md_table(["step", "old µs", "new µs", "new / old"], rows)
        + "\n"
    )


def main() -> None:
    run_cli(__doc__, NAME, run, markdown)


if __name__ == "__main__":
    main()
