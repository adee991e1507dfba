"""Every console route over HTTP against real Postgres and Redis: authentication, roles, CSRF,
lookups, dead letters (filters, paging, preview, replay, purge), queues, outbox, audit."""

from __future__ import annotations

import base64
import uuid

import dramatiq
import psycopg
import pytest
import redis
from starlette.testclient import TestClient

from harness.servers import SmtpSink
from service.app import App
from service.console.auth import hash_password
from service.console.web import create_app
from tests.support.console import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    Seeded,
    csrf_of,
    signed_in,
)
from tests.support.current_app import running_app
from tests.support.emails import eventually, received_for


def audit_rows(url: str) -> list[tuple[str, str, str, list[str], str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT actor, role, action, items, outcome FROM console_audit ORDER BY id"
        ).fetchall()


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/bookings/" + str(uuid.uuid4()), "/dead-letters", "/queues", "/audit"]
)
def test_every_page_refuses_anonymous_access(anonymous: TestClient, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Sign in" in response.text


def test_a_wrong_token_is_refused_at_login_and_as_bearer(
    anonymous: TestClient, console_env: dict[str, str]
) -> None:
    page = anonymous.get("/login")
    response = anonymous.post(
        "/login", data={"token": "wrong-token-0123456789", "csrf_token": csrf_of(page.text)}
    )
    assert response.status_code == 401
    assert "not accepted" in response.text
    assert (
        anonymous.get("/", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code
        == 401
    )
    assert audit_rows(console_env["DATABASE_URL"])[-1][2:] == ("login", [], "refused")


def test_bearer_token_works_without_a_session(anonymous: TestClient) -> None:
    response = anonymous.get("/", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
    assert response.status_code == 200
    assert "viewer-token (viewer)" in response.text


def test_login_without_csrf_token_is_refused(anonymous: TestClient) -> None:
    anonymous.get("/login")
    response = anonymous.post("/login", data={"token": OPERATOR_TOKEN})
    assert response.status_code == 403


def test_session_cookie_is_httponly_and_samesite_strict(console_app: App) -> None:
    with TestClient(create_app(console_app)) as client:
        page = client.get("/login")
        cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "secure" not in cookie


def test_secure_cookies_when_configured(console_env: dict[str, str]) -> None:
    env = {**console_env, "CONSOLE_SECURE_COOKIES": "true"}
    with (
        running_app(env) as application,
        TestClient(create_app(application), base_url="https://testserver") as client,
    ):
        cookie = client.get("/login").headers["set-cookie"].lower()
    assert "; secure" in cookie


def test_security_headers_on_every_response(operator: TestClient) -> None:
    for path in ("/", "/login", "/no-such-page", "/static/console.css"):
        headers = operator.get(path).headers
        assert "default-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"


def test_logout_ends_the_session(operator: TestClient) -> None:
    home = operator.get("/")
    response = operator.post(
        "/logout", data={"csrf_token": csrf_of(home.text)}, follow_redirects=False
    )
    assert response.status_code == 303
    assert operator.get("/").status_code == 401


def test_basic_auth_with_scrypt_hashes(console_env: dict[str, str]) -> None:
    users = f"olga:operator:{hash_password('olga password 1')},vic:viewer:{hash_password('vic password 1')}"
    env = {**console_env, "CONSOLE_AUTH": "basic", "CONSOLE_USERS": users}
    with running_app(env) as application, TestClient(create_app(application)) as client:

        def basic(user: str, password: str) -> dict[str, str]:
            return {
                "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            }

        assert client.get("/", headers=basic("olga", "olga password 1")).status_code == 200
        refused = client.get("/", headers=basic("olga", "wrong"))
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert client.get("/", headers=basic("nobody", "x")).status_code == 401
        page = client.get("/login")
        assert 'name="password"' in page.text
        logged = client.post(
            "/login",
            data={
                "username": "vic",
                "password": "vic password 1",
                "csrf_token": csrf_of(page.text),
            },
        )
        assert logged.status_code == 200
        assert "vic (viewer)" in logged.text


def test_proxy_headers_are_honoured_only_from_trusted_addresses(
    console_env: dict[str, str],
) -> None:
    env = {**console_env, "CONSOLE_AUTH": "proxy", "CONSOLE_TRUSTED_PROXIES": "10.0.0.0/8"}
    headers = {"X-Forwarded-User": "sam", "X-Forwarded-Role": "operator"}
    with running_app(env) as application:
        web = create_app(application)
        with TestClient(web, client=("10.1.2.3", 5000)) as trusted:
            page = trusted.get("/", headers=headers)
            assert page.status_code == 200
            assert "sam (operator)" in page.text
            assert trusted.get("/").status_code == 401
        with TestClient(web, client=("192.0.2.7", 5000)) as stranger:
            assert stranger.get("/", headers=headers).status_code == 401


# -- booking lookup ----------------------------------------------------------------------------


def test_booking_page_shows_emails_dead_letters_and_what_is_due(
    operator: TestClient, seeded: Seeded
) -> None:
    page = operator.get(f"/bookings/{seeded.dead}")
    assert page.status_code == 200
    assert "550 mailbox unavailable" in page.text
    assert seeded.dead_message_id in page.text
    assert "jane.doe@guests.example" in page.text  # operators see the address
    assert "Nothing is due" in page.text  # the dead row is finished: replay is the operator's call
    sent = operator.get(f"/bookings/{seeded.sent}")
    assert f"&lt;booking-{seeded.sent}.confirmed@example.test&gt;" in sent.text
    pending = operator.get(f"/bookings/{seeded.pending}")
    assert (
        "Still due: request_received (called for by status pending) has no delivery row"
        in pending.text
    )


def test_viewers_see_masked_guest_addresses(viewer: TestClient, seeded: Seeded) -> None:
    page = viewer.get(f"/bookings/{seeded.dead}")
    assert page.status_code == 200
    assert "j***@guests.example" in page.text
    assert "jane.doe" not in page.text


def test_booking_lookup_errors_are_clear(operator: TestClient, seeded: Seeded) -> None:
    missing = operator.get(f"/bookings/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert "no booking" in missing.text
    malformed = operator.get("/bookings/not-a-uuid")
    assert malformed.status_code == 400
    assert "not a valid UUID" in malformed.text
    assert operator.get("/bookings?id=nope").status_code == 400
    redirect = operator.get(f"/bookings?id={seeded.sent}", follow_redirects=False)
    assert redirect.status_code == 303
    assert redirect.headers["location"] == f"/bookings/{seeded.sent}"


def test_lookup_by_email_is_for_operators_and_audited(
    operator: TestClient, viewer: TestClient, seeded: Seeded, console_env: dict[str, str]
) -> None:
    home = operator.get("/")
    found = operator.post(
        "/bookings/search",
        data={"email": "Jane.Doe@guests.example", "csrf_token": csrf_of(home.text)},
    )
    assert found.status_code == 200
    assert str(seeded.dead) in found.text
    actor, role, action, items, outcome = audit_rows(console_env["DATABASE_URL"])[-1]
    assert (actor, role, action, items, outcome) == (
        "operator-token",
        "operator",
        "lookup_by_email",
        [str(seeded.dead)],
        "1 found",
    )
    bad = operator.post(
        "/bookings/search", data={"email": "nope", "csrf_token": csrf_of(home.text)}
    )
    assert bad.status_code == 400
    viewer_home = viewer.get("/")
    assert "Guest email" not in viewer_home.text
    refused = viewer.post(
        "/bookings/search",
        data={"email": seeded.dead_email, "csrf_token": csrf_of(viewer_home.text)},
    )
    assert refused.status_code == 403


def test_lookups_are_rate_limited_per_user(console_env: dict[str, str], seeded: Seeded) -> None:
    env = {**console_env, "CONSOLE_LOOKUP_BURST": "3", "CONSOLE_LOOKUPS_PER_MINUTE": "1"}
    with running_app(env) as application, TestClient(create_app(application)) as client:
        signed_in(client, OPERATOR_TOKEN)
        codes = [client.get(f"/bookings/{seeded.sent}").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = client.get(f"/bookings/{seeded.sent}")
        assert int(limited.headers["retry-after"]) >= 1
        other = client.get(
            f"/bookings/{seeded.sent}", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}
        )
        assert other.status_code == 200  # another user has a budget of their own


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letter_list_detail_and_filters(operator: TestClient, seeded: Seeded) -> None:
    listing = operator.get("/dead-letters")
    assert listing.status_code == 200
    assert seeded.dead_message_id in listing.text
    assert 'name="ids"' in listing.text
    assert (
        seeded.dead_message_id
        in operator.get(
            "/dead-letters?type=confirmed&reason=permanent_failure&queue=pending-booking-emails&newer_than=1h"
        ).text
    )
    assert seeded.dead_message_id not in operator.get("/dead-letters?older_than=2h").text
    assert seeded.dead_message_id not in operator.get("/dead-letters?type=cancelled").text
    detail = operator.get(f"/dead-letters/{seeded.dead_message_id}")
    assert detail.status_code == 200
    assert "permanent_failure" in detail.text
    assert "Replay" in detail.text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("size=100000", "size must be between 1 and 200"),
        ("size=0", "size must be between 1 and 200"),
        ("page=abc", "page must be a whole number"),
        ("page=200&size=200", "page too deep"),
        ("older_than=yesterday", "not a duration"),
        ("reason=bored", "reason must be one of"),
        ("type=birthday", "type must be one of"),
        ("queue=a%20b", "queue: letters"),
    ],
)
def test_malformed_dead_letter_filters_get_400(
    operator: TestClient, query: str, message: str
) -> None:
    response = operator.get(f"/dead-letters?{query}")
    assert response.status_code == 400
    assert message in response.text


def test_dead_letter_paging(operator: TestClient, console_env: dict[str, str]) -> None:
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        for i in range(5):
            conn.execute(
                "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, failed_at)"
                " VALUES (%s, 'q', 'a', '{}', 'retries_exhausted', now() - make_interval(mins => %s))",
                (f"m-{i}", 10 - i),
            )
    first = operator.get("/dead-letters?size=2")
    assert "m-0" in first.text and "m-1" in first.text and "m-2" not in first.text
    assert "page=2" in first.text
    third = operator.get("/dead-letters?size=2&page=3")
    assert "m-4" in third.text and "next" not in third.text.split("Page 3")[1]


def test_unknown_and_malformed_dead_letter_ids(operator: TestClient) -> None:
    assert operator.get("/dead-letters/no-such-id").status_code == 404
    assert operator.get("/dead-letters/bad%20id%3Cscript%3E").status_code == 400


def test_replay_through_preview_and_confirm_sends_once(
    operator: TestClient,
    seeded: Seeded,
    console_app: App,
    smtp_sink: SmtpSink,
    console_env: dict[str, str],
) -> None:
    listing = operator.get("/dead-letters")
    preview = operator.post(
        "/dead-letters/preview",
        data={
            "action": "replay",
            "ids": [seeded.dead_message_id, "never-existed"],
            "csrf_token": csrf_of(listing.text),
        },
    )
    assert preview.status_code == 200
    assert "send again through send_booking_email from the Postgres record" in preview.text
    assert "no such dead letter" in preview.text
    assert "Confirm replay of 1" in preview.text
    with psycopg.connect(console_env["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT replayed_at FROM dead_letters").fetchone() == (None,)
    done = operator.post(
        "/dead-letters/replay",
        data={"ids": [seeded.dead_message_id], "csrf_token": csrf_of(preview.text)},
    )
    assert done.status_code == 200
    assert "1 done, 0 failed, 0 skipped" in done.text
    worker = dramatiq.Worker(console_app.broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        eventually(lambda: received_for(smtp_sink, seeded.dead))
    finally:
        worker.stop(timeout=10_000)
    again = operator.post(
        "/dead-letters/replay",
        data={"ids": [seeded.dead_message_id], "csrf_token": csrf_of(preview.text)},
    )
    assert "0 done, 0 failed, 1 skipped" in again.text
    assert len(received_for(smtp_sink, seeded.dead)) == 1
    entries = audit_rows(console_env["DATABASE_URL"])
    assert entries[-2][:5] == (
        "operator-token",
        "operator",
        "replay",
        [seeded.dead_message_id],
        "ok",
    )
    audit_page = operator.get("/audit")
    assert "replay" in audit_page.text and seeded.dead_message_id in audit_page.text


def preview_replay(client: TestClient, message_id: str) -> str:
    """The preview page of replaying one dead letter (the dry run)."""
    listing = client.get("/dead-letters")
    return client.post(
        "/dead-letters/preview",
        data={"action": "replay", "ids": [message_id], "csrf_token": csrf_of(listing.text)},
    ).text


def test_preview_says_an_already_sent_email_is_not_sent_again(
    operator: TestClient, seeded: Seeded, console_env: dict[str, str]
) -> None:
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE email_deliveries SET state = 'sent' WHERE booking_id = %s", (seeded.dead,)
        )
    preview = preview_replay(operator, seeded.dead_message_id)
    assert "already sent, so it is recorded as a duplicate" in preview


def test_booking_page_and_preview_follow_revisions(
    operator: TestClient, seeded: Seeded, console_env: dict[str, str]
) -> None:
    """A booking changed twice: each revision's row is shown, the superseded one says by what,
    and replaying the dead letter of the superseded revision is previewed as not sent."""
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE bookings SET party_size = party_size + 1 WHERE id = %s", (seeded.dead,)
        )
        conn.execute(
            "UPDATE bookings SET party_size = party_size + 1 WHERE id = %s", (seeded.dead,)
        )
        conn.execute(
            "UPDATE email_deliveries SET state = 'superseded', superseded_by = 3"
            " WHERE booking_id = %s AND revision = 1",
            (seeded.dead,),
        )
        conn.execute(
            "INSERT INTO email_deliveries (booking_id, email_type, revision, state, attempts)"
            " VALUES (%s, 'confirmed', 3, 'sent', 1)",
            (seeded.dead,),
        )
        conn.execute(
            "UPDATE dead_letters SET message = jsonb_set(message, '{kwargs,revision}', '1')"
            " WHERE message_id = %s",
            (seeded.dead_message_id,),
        )
    page = operator.get(f"/bookings/{seeded.dead}")
    assert page.status_code == 200
    assert '<dd data-testid="booking-revision">3</dd>' in page.text
    assert "superseded by revision 3" in page.text
    assert "Given up on" not in page.text  # the latest revision was sent
    preview = preview_replay(operator, seeded.dead_message_id)
    assert "superseded this email, so it is not sent" in preview


def test_purge_removes_the_broker_copy_and_marks_the_record(
    operator: TestClient, seeded: Seeded, console_env: dict[str, str]
) -> None:
    client = redis.Redis.from_url(console_env["BROKER_URL"])
    client.hset(
        "dramatiq:pending-booking-emails.XQ.msgs",
        "r1",
        b'{"message_id": "broker-only", "queue_name": "pending-booking-emails", "actor_name": "send_booking_email", "args": [], "kwargs": {}, "options": {}, "message_timestamp": 0}',
    )
    client.zadd("dramatiq:pending-booking-emails.XQ", {"r1": 1000})
    page = operator.get("/dead-letters")
    assert "broker-only" in page.text
    preview = operator.post(
        "/dead-letters/preview",
        data={"action": "purge", "ids": ["broker-only"], "csrf_token": csrf_of(page.text)},
    )
    assert "delete the broker copy" in preview.text
    done = operator.post(
        "/dead-letters/purge", data={"ids": ["broker-only"], "csrf_token": csrf_of(preview.text)}
    )
    assert "1 done" in done.text
    assert client.hlen("dramatiq:pending-booking-emails.XQ.msgs") == 0
    with psycopg.connect(console_env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT purged_at FROM dead_letters WHERE message_id = 'broker-only'"
        ).fetchone()
    assert row is not None and row[0] is not None


def test_viewers_cannot_replay_purge_or_requeue(viewer: TestClient, seeded: Seeded) -> None:
    page = viewer.get("/dead-letters")
    assert seeded.dead_message_id in page.text
    assert "Preview replay" not in page.text
    assert 'name="ids"' not in page.text
    assert "Replay" not in viewer.get(f"/dead-letters/{seeded.dead_message_id}").text
    token = csrf_of(page.text)
    for path in (
        "/dead-letters/preview",
        "/dead-letters/replay",
        "/dead-letters/purge",
        f"/outbox/{uuid.uuid4()}/requeue",
    ):
        response = viewer.post(
            path, data={"action": "replay", "ids": [seeded.dead_message_id], "csrf_token": token}
        )
        assert response.status_code == 403, path


def test_a_post_without_the_csrf_token_is_refused(
    operator: TestClient, seeded: Seeded, console_env: dict[str, str]
) -> None:
    for data in (
        {"ids": [seeded.dead_message_id]},
        {"ids": [seeded.dead_message_id], "csrf_token": "forged"},
    ):
        response = operator.post("/dead-letters/replay", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.text
    with psycopg.connect(console_env["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT replayed_at FROM dead_letters").fetchone() == (None,)


def test_bad_selections_get_400(operator: TestClient) -> None:
    token = csrf_of(operator.get("/").text)
    assert (
        operator.post(
            "/dead-letters/preview", data={"action": "replay", "csrf_token": token}
        ).status_code
        == 400
    )
    assert (
        operator.post(
            "/dead-letters/preview", data={"action": "explode", "ids": ["a"], "csrf_token": token}
        ).status_code
        == 400
    )
    many = [f"m{i}" for i in range(201)]
    assert (
        operator.post("/dead-letters/replay", data={"ids": many, "csrf_token": token}).status_code
        == 400
    )
    assert (
        operator.post(
            "/dead-letters/frobnicate", data={"ids": ["a"], "csrf_token": token}
        ).status_code
        == 404
    )


# -- queues, outbox, flags, audit --------------------------------------------------------------


def test_queues_outbox_and_flags_page(
    operator: TestClient, console_app: App, console_env: dict[str, str]
) -> None:
    console_app.broker.enqueue(
        dramatiq.Message(
            queue_name="pending-booking-emails",
            actor_name="send_booking_email",
            args=(),
            kwargs={"booking_id": str(uuid.uuid4()), "type": "confirmed"},
            options={},
        )
    )
    dead_event = uuid.uuid4()
    with psycopg.connect(console_env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_events (id, event_type, dedupe_key, payload, status, attempts, dead_at, last_error)"
            " VALUES (%s, 'policy_drift_escalated', 'k1', '{}', 'dead', 8, now(), 'smtp down')",
            (dead_event,),
        )
        conn.execute(
            "INSERT INTO outbox_events (id, event_type, dedupe_key, payload) VALUES (%s, 'hold_released_irreparable', 'k2', '{}')",
            (uuid.uuid4(),),
        )
    page = operator.get("/queues")
    assert page.status_code == 200
    row = page.text.split("<td>pending-booking-emails</td>")[1].split("</tr>")[0]
    assert row.startswith("<td>1</td>")  # one ready message
    assert "hold_released_irreparable since" in page.text
    assert str(dead_event) in page.text
    assert "email-queue-enabled" in page.text and "environment default" in page.text
    requeued = operator.post(
        f"/outbox/{dead_event}/requeue",
        data={"csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert requeued.status_code == 303
    with psycopg.connect(console_env["DATABASE_URL"]) as conn:
        assert conn.execute(
            "SELECT status FROM outbox_events WHERE id = %s", (dead_event,)
        ).fetchone() == ("pending",)
    assert audit_rows(console_env["DATABASE_URL"])[-1][2:] == (
        "requeue_outbox_event",
        [str(dead_event)],
        "ok",
    )
    again = operator.post(f"/outbox/{dead_event}/requeue", data={"csrf_token": csrf_of(page.text)})
    assert again.status_code == 404
    assert (
        operator.post(
            "/outbox/not-a-uuid/requeue", data={"csrf_token": csrf_of(page.text)}
        ).status_code
        == 400
    )


def test_audit_page_paging_and_bad_input(operator: TestClient) -> None:
    assert operator.get("/audit").status_code == 200
    assert operator.get("/audit?size=5000").status_code == 400
    assert operator.get("/audit?page=-1").status_code == 400


def test_unknown_page_is_a_clear_404(operator: TestClient) -> None:
    response = operator.get("/nothing-here")
    assert response.status_code == 404
    assert "Not found" in response.text


def test_healthz_needs_no_credentials_and_says_nothing_else(anonymous: TestClient) -> None:
    response = anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


def test_rotating_a_token_ends_the_sessions_signed_in_with_it(console_env: dict[str, str]) -> None:
    with running_app(console_env) as application, TestClient(create_app(application)) as client:
        signed_in(client, OPERATOR_TOKEN)
        cookies = dict(client.cookies)
        assert client.get("/").status_code == 200
    rotated = {**console_env, "CONSOLE_OPERATOR_TOKEN": "a-brand-new-operator-token-42"}
    with running_app(rotated) as application, TestClient(create_app(application)) as client:
        client.cookies.update(cookies)  # same session secret: the cookie's signature is valid
        assert client.get("/").status_code == 401


def test_a_tampered_session_cookie_is_ignored(operator: TestClient) -> None:
    value = operator.cookies["console_session"]
    operator.cookies.clear()
    operator.cookies.set("console_session", "x" + value[1:])
    assert operator.get("/").status_code == 401
