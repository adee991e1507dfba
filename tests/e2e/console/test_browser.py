"""The operator console in a real headless Chromium (the system's /usr/bin/chromium driven by
Playwright): an operator replays a booking's dead letter through preview and confirmation and
the email reaches the SMTP server through a real worker process; a viewer cannot; missing or
wrong credentials and forged POSTs are refused. With CONSOLE_SCREENSHOTS=1 the pages are saved
to docs/images/console-*.png (the README shows them)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from harness.console import ConsoleServer
from harness.factories import insert_booking, insert_venue
from harness.servers import SmtpSink
from harness.workers import WorkerGroup
from service.actors import send_booking_email
from service.app import App
from tests.support.console import OPERATOR_TOKEN, VIEWER_TOKEN
from tests.support.emails import eventually, received_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IMAGES = Path(__file__).resolve().parents[3] / "docs" / "images"
pytestmark = pytest.mark.slow


def shot(page: Page, name: str) -> None:
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=True)


MISSING_CHROMIUM = (
    "/usr/bin/chromium is missing: the console's browser tests need Debian's chromium package "
    "(scripts/install-system-deps.sh installs it; `make test` runs it)"
)


def test_chromium_is_installed() -> None:
    assert CHROMIUM.exists(), MISSING_CHROMIUM


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(MISSING_CHROMIUM)
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def stack(console_app: App, console_env: dict[str, str], tmp_path: Path) -> Iterator[ConsoleServer]:
    """The console process and one worker process, on this test's servers."""
    env = {**os.environ, **console_env, "LOG_LEVEL": "WARNING"}
    workers = WorkerGroup(env, processes=1, threads=2, log_path=tmp_path / "worker.log").start()
    console = ConsoleServer(env, log_path=tmp_path / "console.log").start()
    try:
        yield console
    finally:
        console.stop()
        workers.stop()


def sign_in(page: Page, base: str, token: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("identity")).to_be_visible()


def test_operator_replays_a_dead_letter_and_the_email_arrives(
    browser: Browser, stack: ConsoleServer, console_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        venue = insert_venue(conn, name="Le Console")
        booking = insert_booking(
            conn, venue, status="confirmed", guest_email="jo+reject@guests.example"
        )
    send_booking_email.send(str(booking), "confirmed")

    def dead_letter() -> str | None:
        with psycopg.connect(console_env["DATABASE_URL"]) as conn:
            row = conn.execute("SELECT message_id FROM dead_letters").fetchone()
        return row[0] if row else None

    message_id = eventually(dead_letter, timeout=60)
    assert not received_for(smtp_sink, booking)
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        # The booking service corrects the guest's address; the operator replays.
        conn.execute(
            "UPDATE bookings SET guest_email = 'jo@guests.example' WHERE id = %s", (booking,)
        )

    page = browser.new_page()
    sign_in(page, stack.url, OPERATOR_TOKEN)
    shot(page, "home")
    page.fill("input[name=id]", str(booking))
    page.click("form[action='/bookings'] button")
    expect(page.get_by_test_id("booking-status")).to_have_text("confirmed")
    expect(page.get_by_test_id("deliveries")).to_contain_text("dead")
    expect(page.get_by_test_id("booking-dead-letters")).to_contain_text(message_id)
    shot(page, "booking")

    page.click(f"text={message_id}")
    expect(page.get_by_test_id("letter-state")).to_have_text("open")
    page.click("button[value=replay]")
    expect(page.get_by_test_id("plan")).to_contain_text("send again through send_booking_email")
    shot(page, "preview")
    assert not received_for(smtp_sink, booking), "the preview changed nothing"
    page.click("text=Confirm replay of 1")
    expect(page.get_by_test_id("result")).to_contain_text("replayed as")
    shot(page, "result")

    arrived = eventually(lambda: received_for(smtp_sink, booking), timeout=60)
    assert len(arrived) == 1
    assert "jo@guests.example" in str(arrived[0]["To"])

    page.goto(f"{stack.url}/audit")
    expect(page.get_by_test_id("audit")).to_contain_text("replay")
    expect(page.get_by_test_id("audit")).to_contain_text(message_id)
    shot(page, "audit")
    page.goto(f"{stack.url}/bookings/{booking}")
    expect(page.get_by_test_id("deliveries")).to_contain_text("sent")
    page.goto(f"{stack.url}/dead-letters?all=1")
    shot(page, "dead-letters")
    page.goto(f"{stack.url}/queues")
    expect(page.get_by_test_id("queues")).to_contain_text("pending-booking-emails")
    expect(page.get_by_test_id("flags")).to_contain_text("email-queue-enabled")
    shot(page, "queues")
    page.close()


def test_a_viewer_cannot_replay(
    browser: Browser, stack: ConsoleServer, console_env: dict[str, str]
) -> None:
    message_id = str(uuid.uuid4())
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        venue = insert_venue(conn)
        booking = insert_booking(conn, venue, status="confirmed", guest_email="vera@guests.example")
        conn.execute(
            "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, email_type)"
            " VALUES (%s, 'pending-booking-emails', 'send_booking_email', %s, 'retries_exhausted', 'confirmed')",
            (
                message_id,
                psycopg.types.json.Jsonb(
                    {
                        "message_id": message_id,
                        "actor_name": "send_booking_email",
                        "queue_name": "pending-booking-emails",
                        "args": [],
                        "kwargs": {"booking_id": str(booking), "type": "confirmed"},
                        "options": {},
                    }
                ),
            ),
        )
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, stack.url, VIEWER_TOKEN)
    page.goto(f"{stack.url}/dead-letters/{message_id}")
    expect(page.get_by_test_id("letter-state")).to_have_text("open")
    assert page.locator("button[value=replay]").count() == 0
    page.goto(f"{stack.url}/bookings/{booking}")
    expect(page.get_by_test_id("guest-email")).to_have_text("v***@guests.example")
    shot(page, "viewer")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert token
    refused = page.request.post(
        f"{stack.url}/dead-letters/replay", form={"ids": message_id, "csrf_token": token}
    )
    assert refused.status == 403
    with psycopg.connect(console_env["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT replayed_at FROM dead_letters").fetchone() == (None,)
    context.close()


def test_missing_or_wrong_credentials_and_forged_posts_are_refused(
    browser: Browser, stack: ConsoleServer, console_env: dict[str, str]
) -> None:
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(f"{stack.url}/dead-letters")
    assert response is not None and response.status == 401
    expect(page.locator("h1")).to_have_text("Sign in")
    page.fill("input[name=token]", "not-the-token-at-all-0123")
    with page.expect_response(f"{stack.url}/login") as login:
        page.click("button[type=submit]")
    assert login.value.status == 401
    expect(page.locator("[role=alert]")).to_contain_text("not accepted")
    shot(page, "login")
    bearer = page.request.get(
        f"{stack.url}/", headers={"Authorization": "Bearer wrong-token-0123456789"}
    )
    assert bearer.status == 401

    sign_in(page, stack.url, OPERATOR_TOKEN)
    forged = page.request.post(f"{stack.url}/dead-letters/purge", form={"ids": "anything"})
    assert forged.status == 403
    assert "CSRF" in forged.text()
    wrong = page.request.post(
        f"{stack.url}/dead-letters/purge", form={"ids": "anything", "csrf_token": "forged"}
    )
    assert wrong.status == 403
    headers = page.request.get(f"{stack.url}/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    context.close()
