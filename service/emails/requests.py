"""Email requests written inside the booking service's own transaction.

``record_booking_email(conn, booking_id, type, scheduled_for=None)`` writes the request row and
an outbox event in the caller's psycopg transaction and enqueues nothing: the outbox relay
enqueues the email once the caller committed (``EmailRequestHandler``, registered in
``App.outbox_handlers``). A rollback leaves neither the row nor the event, so no email is sent
for a change that never happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from service.emails import deliveries
from service.emails.models import EmailPayload, InvalidPayload
from service.outbox.delivery import DeliveryError
from service.outbox.store import OutboxEvent, write_event

EMAIL_REQUESTED = "booking_email.requested"


@contextmanager
def _dict_rows(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """The host's connection may return tuples; our SQL reads rows by name."""
    saved = conn.row_factory
    conn.row_factory = dict_row
    try:
        yield conn
    finally:
        conn.row_factory = saved


def record_booking_email(
    conn: psycopg.Connection[Any],
    booking_id: UUID | str,
    email_type: str,
    scheduled_for: datetime | str | None = None,
) -> int:
    """Record the email in the caller's transaction; the relay enqueues it after the commit.
    Returns the booking revision the request is about (0: the booking is not visible in this
    transaction; the worker then takes the revision current when it runs)."""
    payload = EmailPayload.from_call((booking_id, email_type, scheduled_for), None)
    with _dict_rows(conn) as c:
        revision = deliveries.record_request(
            c, payload.booking_id, payload.type, None, payload.scheduled_for
        )
        write_event(
            c,
            EMAIL_REQUESTED,
            payload.at_revision(revision).as_kwargs(),
            dedupe_key=f"booking-email:{payload.booking_id}:{payload.type.value}:r{revision}",
        )
    return revision


class EmailRequestHandler:
    """The outbox handler of ``EMAIL_REQUESTED``: enqueues the email with its revision."""

    def __init__(self, enqueue: Callable[[EmailPayload], None]) -> None:
        self.enqueue = enqueue

    def __call__(self, event: OutboxEvent, delivered: set[str]) -> None:
        try:
            payload = EmailPayload.from_call((), event.payload)
        except InvalidPayload as error:
            raise DeliveryError(str(error), permanent=True) from None
        self.enqueue(payload)
        delivered.add("queue")
