"""A booking service as a host application: its own Dramatiq broker and actor, our producer beside.

Run as ``python -m tests.integration.library.host_app <our broker url> <host broker url> <booking> [venue]``;
prints one JSON line describing what happened, for tests/integration/library/test_host_app.py.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker


def main(argv: list[str]) -> dict[str, Any]:
    host_url, booking, venues = argv[0], argv[1], argv[2:]
    host_broker = RedisBroker(url=host_url)
    dramatiq.set_broker(host_broker)

    @dramatiq.actor(queue_name="host-jobs")
    def host_job(n: int) -> None: ...

    threads_before = threading.active_count()
    from service.actors.emails import EmailNotAccepted, send_booking_email
    from service.config import ConfigError

    report: dict[str, Any] = {
        "imported_without_threads": threading.active_count() == threads_before,
        "global_broker_after_import_is_host": dramatiq.get_broker() is host_broker,
    }
    host_job.send(1)
    outcomes: dict[str, str] = {}
    for venue in venues or [""]:
        try:
            if venue:
                send_booking_email.send(booking, "confirmed", venue_id=venue)
            else:
                send_booking_email.send(booking, "confirmed")
            outcomes[venue] = "accepted"
        except EmailNotAccepted as error:
            outcomes[venue] = f"EmailNotAccepted: {error}"
        except ConfigError as error:
            outcomes[venue] = f"ConfigError: {error}"
    report["outcomes"] = outcomes
    report["global_broker_after_send_is_host"] = dramatiq.get_broker() is host_broker
    try:
        report["our_broker_is_private"] = send_booking_email.broker is not host_broker
    except ConfigError:  # never bound: this process cannot build its producer
        report["our_broker_is_private"] = None
    report["host_actor_on_host_broker"] = "host_job" in host_broker.actors
    report["our_actor_not_on_host_broker"] = "send_booking_email" not in host_broker.actors
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
