"""Outbox emails are tracked per admin address, against the real SMTP sink refusing some of them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from prometheus_client import REGISTRY

from harness.factories import insert_venue
from harness.servers import SmtpSink
from service.capacity.notifications import POLICY_DRIFT_ESCALATED
from service.outbox import store, write_event
from service.outbox.relay import Relay
from tests.integration.capacity.test_outbox import _cli, _payload, _row
from tests.support.capacity import WebhookReceiver
from tests.support.current_app import relay, transaction


def _admin(tag: str = "") -> str:
    """A fresh address: the sink counts ``+flakyN`` deliveries per address for its lifetime."""
    return f"admin-{uuid.uuid4().hex[:8]}{tag}@venue.example"


def _event(admins: list[str], webhook_url: str | None = None) -> uuid.UUID:
    with transaction() as conn:
        venue_id = insert_venue(
            conn, name="Chez Outbox", admin_emails=admins, webhook_url=webhook_url
        )
        event_id = write_event(
            conn,
            POLICY_DRIFT_ESCALATED,
            _payload(venue_id),
            dedupe_key=f"test:{uuid.uuid4()}",
            venue_id=venue_id,
        )
    assert event_id is not None
    return event_id


def _recipients(outcome: str) -> float:
    value = REGISTRY.get_sample_value("booking_outbox_recipients_total", {"outcome": outcome})
    return value or 0.0


def _counts() -> dict[str, float]:
    return {o: _recipients(o) for o in ("delivered", "deferred", "refused")}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {o: v - before[o] for o, v in _counts().items()}


def _relay() -> Relay:
    return relay(min_backoff_seconds=0.01)


def _again(relay: Relay) -> Any:
    time.sleep(0.05)  # past the 10 ms backoff
    return relay.run_once()


def test_an_admin_deferred_with_451_is_retried_and_each_admin_gets_it_once(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    ok, flaky = _admin(), _admin("+flaky1")
    event_id = _event([ok, flaky])
    before = _counts()
    relay = _relay()

    first = relay.run_once()

    assert (first.retried, first.delivered, first.dead) == (1, 0, 0)
    row = _row(event_id)
    assert row["status"] == "pending"
    assert row["delivered_targets"] == [f"email:{ok}"]
    assert row["dead_targets"] == {}
    assert f"email:{flaky}: deferred (451" in row["last_error"]
    assert smtp_sink.deliveries() == [ok]

    second = _again(relay)

    assert second.delivered == 1
    row = _row(event_id)
    assert row["status"] == "delivered" and row["attempts"] == 2
    assert sorted(row["delivered_targets"]) == sorted([f"email:{ok}", f"email:{flaky}"])
    assert smtp_sink.deliveries() == sorted([ok, flaky]), "each admin got it exactly once"
    assert _delta(before) == {"delivered": 2, "deferred": 1, "refused": 0}


def test_an_admin_refused_with_550_is_dead_for_that_admin_and_the_others_get_it_once(
    capacity_env: dict[str, str], smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    ok, gone = _admin(), _admin("+reject")
    event_id = _event([ok, gone], webhook_receiver.url)
    before = _counts()

    result = _relay().run_once()

    assert (result.dead, result.retried, result.delivered) == (1, 0, 0)
    row = _row(event_id)
    assert row["status"] == "dead" and row["attempts"] == 1
    assert sorted(row["delivered_targets"]) == [f"email:{ok}", "webhook"]
    assert row["dead_targets"] == {f"email:{gone}": "refused (550 5.1.1 mailbox unavailable)"}
    assert row["last_error"] == f"email:{gone}: refused (550 5.1.1 mailbox unavailable)"
    assert smtp_sink.deliveries() == [ok]
    assert len(webhook_receiver.requests) == 1
    assert _delta(before) == {"delivered": 1, "deferred": 0, "refused": 1}
    (listed,) = [
        json.loads(line) for line in _cli("list", "--status", "dead", "--json").stdout.splitlines()
    ]
    assert listed["dead_targets"] == row["dead_targets"]
    assert sorted(listed["delivered_targets"]) == [f"email:{ok}", "webhook"]


def test_a_refused_admin_is_not_retried_while_a_deferred_one_is(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    ok, gone, flaky = _admin(), _admin("+reject"), _admin("+flaky1")
    event_id = _event([ok, gone, flaky])
    relay = _relay()

    assert relay.run_once().retried == 1
    row = _row(event_id)
    assert row["status"] == "pending"
    assert list(row["dead_targets"]) == [f"email:{gone}"]
    before = _counts()

    assert _again(relay).dead == 1, "nothing left to retry and one admin is dead: dead"

    row = _row(event_id)
    assert row["status"] == "dead"
    assert sorted(row["delivered_targets"]) == sorted([f"email:{ok}", f"email:{flaky}"])
    assert f"email:{gone}: refused (550" in row["last_error"]
    assert smtp_sink.deliveries() == sorted([ok, flaky])
    assert _delta(before) == {"delivered": 1, "deferred": 0, "refused": 0}, "gone not retried"


def test_requeue_after_fixing_the_address_sends_only_to_the_fixed_admin(
    capacity_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    ok, gone, fixed = _admin(), _admin("+reject"), _admin()
    event_id = _event([ok, gone])
    _relay().run_once()
    assert _row(event_id)["status"] == "dead"

    with transaction() as conn:
        conn.execute(
            "UPDATE venues SET admin_emails = %s "
            "WHERE id = (SELECT venue_id FROM outbox_events WHERE id = %s)",
            ([ok, fixed], event_id),
        )
        assert store.requeue(conn, event_id)
    assert _row(event_id)["dead_targets"] == {}
    result = _relay().run_once()

    assert result.delivered == 1
    assert _row(event_id)["status"] == "delivered"
    assert smtp_sink.deliveries() == sorted([ok, fixed])


def test_events_served_before_per_recipient_tracking_are_not_emailed_again(
    capacity_env: dict[str, str], smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    event_id = _event([_admin(), _admin()], webhook_receiver.url)
    with transaction() as conn:
        conn.execute(
            "UPDATE outbox_events SET delivered_targets = '{email}' WHERE id = %s", (event_id,)
        )

    assert _relay().run_once().delivered == 1

    assert smtp_sink.deliveries() == []
    assert len(webhook_receiver.requests) == 1
    assert _row(event_id)["status"] == "delivered"
