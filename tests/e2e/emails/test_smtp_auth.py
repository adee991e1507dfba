"""An SMTP server refusing our credentials (535), against a real sink that requires AUTH: guest
emails are dead-lettered at once, outbox emails are dead with the reason, the failure is counted
and the readiness probe fails on the process that met it."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from harness.servers import SmtpSink, wait_for
from harness.workers import service_command, start_service
from service.observability.heartbeat import clear_unready
from service.smtp import AUTH_FAILED, UNREADY_KEY
from tests.support.current_app import reconfigure, relay
from tests.support.emails import Db, eventually

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

LOGIN, PASSWORD = "relay", "s3cret pass"


@pytest.fixture(scope="module")
def auth_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink.start_new(auth=(LOGIN, PASSWORD))
    yield sink
    sink.destroy()


@pytest.fixture
def wrong_credentials(
    service_env: dict[str, str], auth_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The service pointed at the AUTH sink with a wrong password (requested before ``app``,
    so that the test's App is built with it)."""
    auth_sink.clear()
    url = f"smtp://{LOGIN}:wrong@127.0.0.1:{auth_sink.port}"
    monkeypatch.setenv("SMTP_URL", url)
    service_env["SMTP_URL"] = url
    clear_unready(UNREADY_KEY)
    yield service_env
    clear_unready(UNREADY_KEY)


def auth_failures() -> float:
    return REGISTRY.get_sample_value("booking_smtp_auth_failures_total") or 0.0


def test_a_guest_email_is_dead_lettered_at_once_with_the_reason(
    wrong_credentials: dict[str, str], broker: Any, worker: Any, db: Db, auth_sink: SmtpSink
) -> None:
    from service.actors.emails import send_booking_email

    before = auth_failures()
    booking = db.booking(status="pending")
    send_booking_email.send(str(booking), "request_received")

    row = eventually(
        lambda: (r := db.delivery(booking, "request_received")) and r["state"] == "dead" and r
    )
    assert row["attempts"] == 1, "a configuration error is not retried"
    assert row["last_error"].startswith(AUTH_FAILED)
    assert "wrong" not in row["last_error"]
    assert [d["reason"] for d in eventually(db.dead_letters)] == ["permanent_failure"]
    assert auth_failures() == before + 1
    assert auth_sink.count() == 0


def test_an_outbox_email_is_dead_with_the_reason_and_the_webhook_still_goes(
    wrong_credentials: dict[str, str], app: Any, auth_sink: SmtpSink
) -> None:
    from tests.integration.capacity.test_outbox import _row
    from tests.integration.capacity.test_outbox_recipients import _event
    from tests.support.capacity import WEBHOOK_SECRET, WebhookReceiver

    reconfigure(
        webhook_signing_secret=WEBHOOK_SECRET,
        webhook_allow_http="true",
        webhook_allowed_networks="127.0.0.1/32",
    )
    receiver = WebhookReceiver()
    receiver.start()
    try:
        admins = [f"a-{uuid.uuid4().hex[:6]}@venue.example", "b@venue.example"]
        event_id = _event(admins, receiver.url)
        result = relay().run_once()
    finally:
        receiver.stop()

    assert result.dead == 1
    row = _row(event_id)
    assert (row["status"], row["attempts"]) == ("dead", 1)
    assert row["delivered_targets"] == ["webhook"]
    assert set(row["dead_targets"]) == {f"email:{a}" for a in admins}
    assert all(
        reason.startswith(f"email: {AUTH_FAILED}") for reason in row["dead_targets"].values()
    )
    assert AUTH_FAILED in row["last_error"]
    assert len(receiver.requests) == 1
    assert auth_sink.count() == 0


def _health(env: dict[str, str]) -> tuple[int, str]:
    done = service_command(env, "health", "--readiness")
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.mark.slow
def test_readiness_fails_on_the_relay_that_met_an_auth_failure(
    wrong_credentials: dict[str, str], app: Any, tmp_path: Path
) -> None:
    from tests.integration.capacity.test_outbox_recipients import _event

    env = {
        **os.environ,
        "HEALTH_FILE": str(tmp_path / "health" / "relay"),
        "HEALTH_MAX_AGE_SECONDS": "5",
        "METRICS_PORT": "0",
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.1",
        "LOG_LEVEL": "WARNING",
    }
    relay = start_service(env, "outbox", "relay")
    try:
        wait_for(lambda: list((tmp_path / "health").glob("relay.*.json")), 30, "relay heartbeat")
        assert _health(env) == (0, "ok: broker and database answer")
        _event(["ops@venue.example"])
        _, out = eventually(lambda: (r := _health(env))[0] == 1 and r, timeout=30, interval=0.5)
        assert out.startswith(f"fail: relay process {relay.pid}: {AUTH_FAILED}"), out
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=30)
    assert relay.returncode == 0, stderr
    assert "SMTP authentication failed" in stderr
    assert "wrong" not in stderr and PASSWORD not in stderr
