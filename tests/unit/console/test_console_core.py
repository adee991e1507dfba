"""The console's pure parts: password hashes, the authenticators, masking, the lookup budget,
what is still due, the replay preview, and the console settings' validation."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from service.config import ConfigError, load_settings
from service.console.auth import (
    BasicAuth,
    LookupBudget,
    ProxyAuth,
    TokenAuth,
    build_authenticator,
    hash_password,
    mask_email,
    verify_password,
)
from service.console.summary import replay_plan, still_due
from service.console.web import parse_filters, queue_depths, request_of
from service.dlq.operations import DeadLetter
from service.metrics import QUEUE_DEPTH, QUEUE_OLDEST_AGE

OP = "operator-token-0123456789"
VIEW = "viewer-token-0123456789"


def test_scrypt_hash_round_trip_and_salting() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", hashed)
    assert not verify_password("wrong horse", hashed)
    assert hash_password("correct horse") != hashed
    assert not verify_password("x", "scrypt$garbage")


def test_token_auth_from_bearer_and_form() -> None:
    auth = TokenAuth({"operator": OP, "viewer": VIEW})
    who = auth.from_headers({"authorization": f"Bearer {OP}"}, "1.2.3.4")
    assert who is not None and who.operator
    viewer = auth.from_form({"token": VIEW})
    assert viewer is not None and viewer.role == "viewer" and not viewer.operator
    assert auth.from_headers({"authorization": "Bearer nope"}, None) is None
    assert auth.from_headers({"authorization": f"Basic {OP}"}, None) is None
    assert auth.from_form({"token": ""}) is None


def test_basic_auth() -> None:
    auth = BasicAuth([("ann", "operator", hash_password("ann's secret"))])
    header = "Basic " + base64.b64encode(b"ann:ann's secret").decode()
    who = auth.from_headers({"authorization": header}, None)
    assert who is not None and who.name == "ann" and who.operator
    assert auth.from_form({"username": "ann", "password": "nope"}) is None
    assert auth.from_form({"username": "bob", "password": "ann's secret"}) is None
    assert auth.from_headers({"authorization": "Basic !!!"}, None) is None


def test_proxy_auth_trusts_only_its_networks() -> None:
    settings = load_settings(
        {"CONSOLE_AUTH": "proxy", "CONSOLE_TRUSTED_PROXIES": "10.0.0.0/8,::1/128"}
    )
    auth = build_authenticator(settings)
    assert isinstance(auth, ProxyAuth)
    headers = {"x-forwarded-user": "kim", "x-forwarded-role": "operator"}
    who = auth.from_headers(headers, "10.9.8.7")
    assert who is not None and who.name == "kim" and who.operator
    assert auth.from_headers(headers, "192.168.1.1") is None
    assert auth.from_headers(headers, None) is None
    demoted = auth.from_headers({"x-forwarded-user": "kim", "x-forwarded-role": "root"}, "::1")
    assert demoted is not None and demoted.role == "viewer"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "CONSOLE_OPERATOR_TOKEN or CONSOLE_VIEWER_TOKEN: is required"),
        ({"CONSOLE_AUTH": "basic"}, "CONSOLE_USERS: is required"),
        ({"CONSOLE_AUTH": "proxy"}, "CONSOLE_TRUSTED_PROXIES: is required"),
        ({"CONSOLE_OPERATOR_TOKEN": OP, "CONSOLE_VIEWER_TOKEN": OP}, "must differ"),
    ],
)
def test_missing_credentials_stop_the_console_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_authenticator(load_settings(env))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CONSOLE_AUTH": "none"}, "CONSOLE_AUTH"),
        ({"CONSOLE_OPERATOR_TOKEN": "short"}, "CONSOLE_OPERATOR_TOKEN: must be at least 16"),
        ({"CONSOLE_USERS": "ann:admin:scrypt$1$2$3$4$5"}, "role must be viewer or operator"),
        ({"CONSOLE_USERS": "ann:viewer:plaintext"}, "not a scrypt hash"),
        ({"CONSOLE_TRUSTED_PROXIES": "not-a-net"}, "CONSOLE_TRUSTED_PROXIES"),
        ({"CONSOLE_PORT": "70000"}, "CONSOLE_PORT"),
    ],
)
def test_console_settings_are_validated_without_echoing_secrets(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_settings(env)
    assert "plaintext" not in str(error.value) and "short" not in str(error.value).split(":")[-1]


def test_mask_email() -> None:
    assert mask_email("jane.doe@example.com") == "j***@example.com"
    assert mask_email("not an address") == "***"


def test_lookup_budget_refills_per_user() -> None:
    budget = LookupBudget(per_minute=60, burst=2)
    assert budget.take("a", now=0) == 0
    assert budget.take("a", now=0) == 0
    assert budget.take("a", now=0) >= 1
    assert budget.take("b", now=0) == 0
    assert budget.take("a", now=1.0) == 0  # one token back after a second


def row(email_type: str, state: str, revision: int = 1) -> dict[str, Any]:
    return {"email_type": email_type, "state": state, "revision": revision}


def test_still_due() -> None:
    assert still_due("confirmed", [row("confirmed", "sent")]).due is False
    pending = still_due("confirmed", [row("confirmed", "retrying")])
    assert pending.due and pending.reasons == ("confirmed (revision 1) is retrying",)
    missing = still_due("cancelled", [row("confirmed", "sent")])
    assert missing.reasons == ("cancelled (called for by status cancelled) has no delivery row",)
    dead = still_due("confirmed", [row("confirmed", "dead")])
    assert not dead.due and dead.dead == ("confirmed",)
    assert still_due(None, [row("updated", "pending")]).due
    mended = still_due("confirmed", [row("updated", "dead", 2), row("updated", "sent", 3)])
    assert mended.dead == ()
    given_up = still_due("confirmed", [row("updated", "sent", 2), row("updated", "dead", 3)])
    assert given_up.dead == ("updated",)


def test_replay_plan() -> None:
    base = {
        "found": True,
        "open_": True,
        "undecodable": False,
        "source": "db",
        "actor": "send_booking_email",
    }
    ok, text = replay_plan(action="replay", delivery_state="dead", **base)
    assert ok and "from the Postgres record" in text
    ok, text = replay_plan(action="replay", delivery_state="sent", **base)
    assert ok and "not sent again" in text
    ok, text = replay_plan(action="replay", delivery_state="superseded", **base)
    assert ok and "superseded" in text and "not sent" in text
    ok, text = replay_plan(action="replay", delivery_state=None, **{**base, "undecodable": True})
    assert not ok and "only be purged" in text
    ok, text = replay_plan(action="purge", delivery_state=None, **{**base, "source": "broker"})
    assert ok and "delete the broker copy" in text
    assert replay_plan(action="replay", delivery_state=None, **{**base, "found": False})[0] is False
    assert replay_plan(action="purge", delivery_state=None, **{**base, "open_": False})[0] is False


def test_filters_bound_the_page() -> None:
    filters, page, size = parse_filters({"page": "2", "size": "20", "older_than": "1h"})
    assert (page, size, filters.limit) == (2, 20, 41)
    assert filters.older_than is not None and filters.older_than.total_seconds() == 3600


def test_queue_depths_from_metric_families() -> None:
    depth = QUEUE_DEPTH.family()
    depth.add_metric(["q", "ready"], 3)
    depth.add_metric(["q", "dead"], 1)
    oldest = QUEUE_OLDEST_AGE.family()
    oldest.add_metric(["q"], 12.0)
    assert queue_depths([depth, oldest]) == {
        "q": {"ready": 3, "dead": 1, "oldest_age_seconds": 12.0}
    }


def letter(kwargs: Any, email_type: str | None = "updated") -> DeadLetter:
    return DeadLetter(
        message_id="m",
        queue="pending-booking-emails",
        actor="send_booking_email",
        email_type=email_type,
        reason="retries_exhausted",
        error=None,
        failed_at=datetime.now(UTC),
        message={"kwargs": kwargs},
        recorded=True,
    )


def test_request_of_a_dead_letter() -> None:
    booking = uuid.uuid4()
    assert request_of(letter({"booking_id": str(booking), "revision": 3})) == (
        booking,
        "updated",
        3,
    )
    assert request_of(letter({"booking_id": str(booking)})) == (booking, "updated", None)
    assert request_of(letter({"booking_id": str(booking), "revision": True})) == (
        booking,
        "updated",
        None,
    )
    assert request_of(letter({"booking_id": "not-a-uuid"})) is None
    assert request_of(letter({"booking_id": str(booking)}, email_type=None)) is None
    assert request_of(letter("not a dict")) is None
