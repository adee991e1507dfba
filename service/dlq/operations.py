"""Dead-letter operations: select, replay and purge, over Postgres records and broker copies.

Every dead letter is recorded in ``dead_letters`` (service.deadletters) and kept by the broker
for 7 days. A selection merges both: a record whose broker copy expired is still listed and
replayed from Postgres; a broker copy that was never recorded (Postgres was down) is listed as
``unrecorded``. Replay re-sends the message through its actor (``send_with_options``) with a
fresh retry budget, so the email kill-switch and payload validation apply, and the message keeps
its arguments: a booking email keeps its revision, so a replayed email that was already sent is
recorded as a duplicate, not sent again (a letter from before revisions is about the booking's
current revision).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from psycopg.rows import class_row

from service.config import Settings
from service.db import Database
from service.deadletters import UNDECODABLE
from service.dlq.brokers import BrokerCopy, DeadQueues, open_dead_queues
from service.logs import get_logger

log = get_logger(__name__)

UNRECORDED = "unrecorded"
RUNTIME_OPTIONS = frozenset({"retries", "traceback", "eta", "redis_message_id"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``3d``, ``1w`` as a timedelta."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 2h, 3d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Filters:
    queue: str | None = None
    email_type: str | None = None
    reason: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    ids: tuple[str, ...] = ()
    include_handled: bool = False
    limit: int = 1000

    def matches(self, letter: DeadLetter, now: datetime) -> bool:
        age = now - letter.failed_at
        return (
            (self.queue is None or letter.queue == self.queue)
            and (self.email_type is None or letter.email_type == self.email_type)
            and (self.reason is None or letter.reason == self.reason)
            and (self.older_than is None or age >= self.older_than)
            and (self.newer_than is None or age <= self.newer_than)
            and (not self.ids or letter.message_id in self.ids)
            and (self.include_handled or letter.open)
        )


_RECORD_COLUMNS = (
    "message_id, queue_name AS queue, actor_name AS actor, email_type, reason, error,"
    " failed_at, message, true AS recorded, replayed_at, purged_at"
)


@dataclass
class DeadLetter:
    message_id: str
    queue: str
    actor: str
    email_type: str | None
    reason: str
    error: str | None
    failed_at: datetime
    message: dict[str, Any]
    recorded: bool
    replayed_at: datetime | None = None
    purged_at: datetime | None = None
    copy: BrokerCopy | None = field(default=None, repr=False)

    @property
    def open(self) -> bool:
        return self.replayed_at is None and self.purged_at is None

    @property
    def location(self) -> str:
        return "+".join(p for p, on in (("db", self.recorded), ("broker", self.copy)) if on)


def kind_of(broker: dramatiq.Broker, message: dict[str, Any]) -> str | None:
    """The label the message's actor gives its dead letters (its ``dead_letter_kind`` option)."""
    try:
        actor = broker.get_actor(str(message.get("actor_name", "")))
    except dramatiq.errors.ActorNotFound:
        return None
    label = actor.options.get("dead_letter_kind")
    kind = label(message) if label is not None else None
    return kind if isinstance(kind, str) else None


def _from_copy(broker: dramatiq.Broker, copy: BrokerCopy, now: datetime) -> DeadLetter:
    message = copy.message
    actor = str(message.get("actor_name", ""))
    email_type = kind_of(broker, message)
    return DeadLetter(
        message_id=copy.message_id,
        queue=copy.queue,
        actor=actor,
        email_type=email_type,
        reason=UNRECORDED,
        error=None,
        failed_at=copy.dead_at or now,
        message=message,
        recorded=False,
        copy=copy,
    )


def _records(db: Database, filters: Filters) -> list[DeadLetter]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if not filters.include_handled:
        clauses.append("replayed_at IS NULL AND purged_at IS NULL")
    for column, value in (
        ("queue_name", filters.queue),
        ("email_type", filters.email_type),
        ("reason", filters.reason),
    ):
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    if filters.older_than is not None:
        clauses.append("failed_at <= now() - %s")
        params.append(filters.older_than)
    if filters.newer_than is not None:
        clauses.append("failed_at >= now() - %s")
        params.append(filters.newer_than)
    if filters.ids:
        clauses.append("message_id = ANY(%s)")
        params.append(list(filters.ids))
    params.append(filters.limit)
    with db.transaction() as conn, conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        return cur.execute(
            f"SELECT {_RECORD_COLUMNS} FROM dead_letters WHERE {' AND '.join(clauses)}"
            " ORDER BY failed_at LIMIT %s",
            params,
        ).fetchall()


def _known_queues(db: Database, broker: dramatiq.Broker, filters: Filters) -> list[str]:
    if filters.queue is not None:
        return [filters.queue]
    declared = {q for q in broker.get_declared_queues() if not q.endswith((".DQ", ".XQ"))}
    with db.transaction() as conn:
        rows = conn.execute("SELECT DISTINCT queue_name FROM dead_letters").fetchall()
    return sorted(declared | {str(r["queue_name"]) for r in rows})


@contextmanager
def dead_letters(
    db: Database, broker: dramatiq.Broker, settings: Settings, filters: Filters
) -> Iterator[tuple[list[DeadLetter], DeadQueues]]:
    """The selected dead letters, with their broker copies attached, and the open broker session
    (RabbitMQ holds the copies unacknowledged until the session closes)."""
    now = datetime.now(UTC)
    letters = _records(db, filters)
    queues = open_dead_queues(settings)
    try:
        copies: dict[str, BrokerCopy] = {}
        for queue in _known_queues(db, broker, filters):
            copies.update(queues.copies(queue))
        recorded = set()
        for letter in letters:
            letter.copy = copies.get(letter.message_id)
            recorded.add(letter.message_id)
        unrecorded_ids = set(copies) - recorded
        if unrecorded_ids:
            with db.transaction() as conn:
                rows = conn.execute(
                    "SELECT message_id FROM dead_letters WHERE message_id = ANY(%s)",
                    (list(unrecorded_ids),),
                ).fetchall()
            unrecorded_ids -= {r["message_id"] for r in rows}
        extra = [_from_copy(broker, copies[i], now) for i in unrecorded_ids]
        letters += [letter for letter in extra if filters.matches(letter, now)]
        letters.sort(key=lambda letter: letter.failed_at)
        yield letters[: filters.limit], queues
    finally:
        queues.close()


def replay_message(broker: dramatiq.Broker, message: dict[str, Any]) -> str:
    """Send ``message`` again through its actor with a fresh retry budget; returns the new id."""
    if message.get(UNDECODABLE):
        raise ValueError("the body is not a Dramatiq message: it can only be purged")
    options = {k: v for k, v in (message.get("options") or {}).items() if k not in RUNTIME_OPTIONS}
    args = tuple(message.get("args") or ())
    kwargs = dict(message.get("kwargs") or {})
    actor_name = str(message.get("actor_name"))
    try:
        actor = broker.get_actor(actor_name)
    except dramatiq.errors.ActorNotFound:
        queue = str(message.get("queue_name", "default")).removesuffix(".DQ")
        fresh: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor_name, args=args, kwargs=kwargs, options=options
        )
        return broker.enqueue(fresh).message_id
    sent = actor.send_with_options(args=args, kwargs=kwargs, **options)
    return str(sent.message_id)


def _mark(db: Database, letter: DeadLetter, column: str) -> None:
    assert column in ("replayed_at", "purged_at")
    with db.transaction() as conn:
        if letter.recorded:
            conn.execute(
                f"UPDATE dead_letters SET {column} = now() WHERE message_id = %s",
                (letter.message_id,),
            )
            return
        conn.execute(
            f"""
            INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason,
                                      email_type, failed_at, {column})
            VALUES (%s, %s, %s, %s, %s, %s, %s, now())
            ON CONFLICT (message_id) DO UPDATE SET {column} = now()
            """,
            (
                letter.message_id,
                letter.queue,
                letter.actor,
                json.dumps(letter.message, default=str),
                UNRECORDED,
                letter.email_type,
                letter.failed_at,
            ),
        )


@dataclass
class Outcome:
    done: list[tuple[DeadLetter, str]] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)


def replay(
    db: Database,
    broker: dramatiq.Broker,
    letters: Iterable[DeadLetter],
    queues: DeadQueues,
    *,
    from_db: bool = False,
    progress: Callable[[Iterable[DeadLetter]], Iterable[DeadLetter]] = lambda x: x,
) -> Outcome:
    """Re-send each letter (the broker copy when present, else the Postgres record), then remove
    the broker copy and mark the record replayed. A failure leaves that letter untouched."""
    outcome = Outcome()
    for letter in progress(letters):
        source = letter.message if from_db or letter.copy is None else letter.copy.message
        try:
            new_id = replay_message(broker, source)
        except Exception as error:
            log.error("replay failed", message_id=letter.message_id, error=type(error).__name__)
            outcome.failed.append((letter, f"{type(error).__name__}: {error}"))
            continue
        if letter.copy is not None:
            queues.remove(letter.copy)
        _mark(db, letter, "replayed_at")
        log.info("dead letter replayed", message_id=letter.message_id, new_message_id=new_id)
        outcome.done.append((letter, new_id))
    return outcome


def purge(
    db: Database,
    letters: Iterable[DeadLetter],
    queues: DeadQueues,
    *,
    progress: Callable[[Iterable[DeadLetter]], Iterable[DeadLetter]] = lambda x: x,
) -> Outcome:
    """Delete each letter's broker copy and mark its record purged (the record stays)."""
    outcome = Outcome()
    for letter in progress(letters):
        if letter.copy is not None:
            queues.remove(letter.copy)
        _mark(db, letter, "purged_at")
        outcome.done.append((letter, "purged"))
    return outcome
