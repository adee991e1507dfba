"""The relay: claims due outbox events, hands each to its handler, records the outcome.

Claiming is one ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`` statement that counts
the attempt and sets a lease (``locked_until``) before committing; delivery then happens outside
any transaction. Two relays never hold the same event: the row lock separates them while
claiming and the lease afterwards. A relay that dies mid-delivery leaves a lease that simply
runs out, and the event is claimed again (at-least-once; receivers de-duplicate on the key).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from service.config import Settings
from service.db import Database, DatabaseError
from service.logs import get_logger
from service.metrics import OUTBOX_EVENTS
from service.outbox import store
from service.outbox.delivery import DeliveryError, Handler, TargetFailure
from service.outbox.store import OutboxEvent
from service.resilience import backoff_ms

log = get_logger(__name__)

MAX_BACKOFF_SECONDS = 3600.0
_LEASE_MARGIN_SECONDS = 2.0


@dataclass
class RelayResult:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    event_ids: list[uuid.UUID] = field(default_factory=list)

    def add(self, other: RelayResult) -> None:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.lost += other.lost
        self.event_ids += other.event_ids


def backoff_seconds(attempts: int, minimum: float, maximum: float = MAX_BACKOFF_SECONDS) -> float:
    """Delay before the attempt after ``attempts`` failed ones: ``minimum * 2**(attempts-1)``."""
    return backoff_ms(attempts, int(minimum * 1000), int(maximum * 1000)) / 1000


class Relay:
    """Delivers outbox events through ``handlers`` (event type -> handler)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        handlers: Mapping[str, Handler],
        *,
        batch_size: int = 10,
        lease_seconds: float | None = None,
        max_attempts: int | None = None,
        min_backoff_seconds: float | None = None,
    ) -> None:
        self.db = db
        self.handlers = handlers
        self.batch_size = batch_size
        per_event = settings.smtp_timeout_seconds + settings.webhook_timeout_seconds
        self.lease_seconds = lease_seconds or max(60.0, 2 * batch_size * per_event)
        self.max_attempts = max_attempts or settings.outbox_max_attempts
        self.min_backoff = min_backoff_seconds or settings.outbox_min_backoff_seconds
        self.poll_interval = settings.outbox_poll_interval_seconds

    def run_batch(self) -> RelayResult:
        """Claim one batch and deliver it."""
        token = uuid.uuid4()
        with self.db.transaction() as conn:
            events = store.claim_due(
                conn, limit=self.batch_size, lease_seconds=self.lease_seconds, token=token
            )
        deadline = time.monotonic() + self.lease_seconds - _LEASE_MARGIN_SECONDS
        result = RelayResult(claimed=len(events))
        for event in events:
            if time.monotonic() >= deadline:
                log.warning("outbox lease ran out before delivery", event_id=str(event.id))
                result.lost += 1
                continue
            self._process(event, result)
        return result

    def run_once(self, max_batches: int = 1000) -> RelayResult:
        """Deliver everything due now, then return (for tests and cron)."""
        total = RelayResult()
        for _ in range(max_batches):
            batch = self.run_batch()
            total.add(batch)
            if batch.claimed < self.batch_size:
                break
        return total

    def run_forever(
        self,
        stop: threading.Event,
        guard: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        """Poll until ``stop`` is set; a database outage pauses the loop instead of ending it.

        ``guard()`` wraps each batch (the process heartbeat marks it as a task with a limit).
        """
        log.info(
            "outbox relay started", batch_size=self.batch_size, lease_seconds=self.lease_seconds
        )
        while not stop.is_set():
            try:
                with guard() if guard is not None else nullcontext():
                    batch = self.run_batch()
            except DatabaseError as error:
                log.warning("outbox relay: database busy or unavailable", error=str(error))
                stop.wait(max(self.poll_interval, 5.0))
                continue
            if batch.claimed < self.batch_size:
                stop.wait(self.poll_interval)
        log.info("outbox relay stopped")

    def _process(self, event: OutboxEvent, result: RelayResult) -> None:
        result.event_ids.append(event.id)
        handler = self.handlers.get(event.event_type)
        delivered = set(event.delivered_targets)
        if handler is None:
            self._dead(event, delivered, f"unknown event type {event.event_type!r}", result)
            return
        if event.attempts > self.max_attempts:
            self._dead(event, delivered, "attempts exhausted (earlier claims were lost)", result)
            return
        try:
            handler(event, delivered)
        except DeliveryError as error:
            self._failed(event, delivered, str(error), error.permanent, result, error.targets)
        except Exception as error:
            log.exception("outbox handler crashed", event_id=str(event.id))
            self._failed(event, delivered, f"{type(error).__name__}: {error}", False, result, {})
        else:
            with self.db.transaction() as conn:
                kept = store.mark_delivered(conn, event, delivered)
            self._count(event, "delivered" if kept else None, result)

    def _failed(
        self,
        event: OutboxEvent,
        delivered: set[str],
        error: str,
        permanent: bool,
        result: RelayResult,
        targets: Mapping[str, TargetFailure],
    ) -> None:
        """Retry later, skipping the targets that failed for good; or, when nothing is left to
        retry or the attempts are spent, give up on the event and every failed target."""
        if permanent or event.attempts >= self.max_attempts:
            dead = {**event.dead_targets, **{t: f.reason for t, f in targets.items()}}
            self._dead(event, delivered, error, result, dead)
            return
        dead = {
            **event.dead_targets,
            **{t: f.reason for t, f in targets.items() if f.permanent},
        }
        delay = backoff_seconds(event.attempts, self.min_backoff)
        with self.db.transaction() as conn:
            kept = store.mark_retry(conn, event, delivered, error, delay, dead)
        log.info(
            "outbox event will be retried",
            event_id=str(event.id),
            event_type=event.event_type,
            attempts=event.attempts,
            delay_seconds=delay,
        )
        self._count(event, "retried" if kept else None, result)

    def _dead(
        self,
        event: OutboxEvent,
        delivered: set[str],
        error: str,
        result: RelayResult,
        dead_targets: Mapping[str, str] | None = None,
    ) -> None:
        with self.db.transaction() as conn:
            kept = store.mark_dead(
                conn,
                event,
                delivered,
                error,
                event.dead_targets if dead_targets is None else dead_targets,
            )
        log.error(
            "outbox event is dead",
            event_id=str(event.id),
            event_type=event.event_type,
            attempts=event.attempts,
            error=error,
        )
        self._count(event, "dead" if kept else None, result)

    def _count(self, event: OutboxEvent, outcome: str | None, result: RelayResult) -> None:
        if outcome is None:
            log.warning(
                "outbox claim was lost before the outcome was recorded", event_id=str(event.id)
            )
            result.lost += 1
            return
        OUTBOX_EVENTS.labels(event.event_type, outcome).inc()
        setattr(result, outcome, getattr(result, outcome) + 1)
