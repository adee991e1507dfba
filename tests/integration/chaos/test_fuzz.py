"""Fuzzing the two places where outside data enters: the email actor's payload and hold metadata.

No input may crash a worker or escape as an unhandled error: the payload decoder and the actor
raise ``InvalidPayload`` or succeed; a real worker fed garbage keeps running and dead-letters it
as ``invalid_payload``; the hold metadata validator returns problems and never raises.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from service.app import App
from service.capacity.holds import MetadataProblem, build_hold_metadata, validate_hold_metadata
from service.capacity.policy import CapacityPolicy
from service.capacity.quoting import quote
from service.emails.models import EmailPayload, InvalidPayload
from tests.support.emails import QUEUE, Db, eventually, received_for
from tests.support.policies import make_policy, table

FIELDS = ("booking_id", "type", "scheduled_for")
TYPES = ("request_received", "confirmed", "updated", "cancelled")

# -- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
near_misses = st.sampled_from(
    [
        *TYPES,
        "CONFIRMED",
        " confirmed",
        "",
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        uuid.uuid4().hex,
        "00000000-0000-0000-0000-000000000000",
        "2026-12-01T18:00:00+00:00",
        "2026-12-01T18:00:00",
        "2026-02-30T18:00:00Z",
        "9999-12-31T23:59:59+14:00",
        "0001-01-01T00:00:00-12:00",
        "tomorrow",
        "1e309",
    ]
)
python_oddities = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        b"\xff\xfe",
        uuid.uuid4(),
        datetime(2026, 1, 1),
        datetime(2026, 1, 1, tzinfo=UTC),
        object(),
        {1, 2},
        (1, "a"),
        "\x00",
        "\ud800",
        "a" * 10_000,
    ]
)
any_value = json_values | near_misses | python_oddities
arg_lists = st.lists(any_value, max_size=5)
kwarg_dicts = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), any_value, max_size=5)

FUZZ = settings(deadline=None, max_examples=300)


def outcome_of(args: list[Any], kwargs: dict[str, Any]) -> EmailPayload | None:
    """Decode; None for an ``InvalidPayload``; any other exception propagates (a failure)."""
    try:
        return EmailPayload.from_call(args, kwargs)
    except InvalidPayload as error:
        assert str(error)
        return None


# -- the payload decoder --------------------------------------------------------------------------


@FUZZ
@given(args=arg_lists, kwargs=kwarg_dicts)
def test_payload_decoding_raises_only_invalid_payload(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    payload = outcome_of(args, kwargs)
    if payload is not None:
        assert payload.type.value in TYPES
        assert payload.scheduled_for is None or payload.scheduled_for.tzinfo is not None
        again = EmailPayload.from_call((), json.loads(json.dumps(payload.as_kwargs())))
        assert again == payload
        payload.delay_ms(datetime.now(UTC))


@FUZZ
@given(
    booking_id=st.uuids().map(str) | any_value,
    email_type=st.sampled_from(TYPES) | any_value,
    scheduled=st.none()
    | st.datetimes(timezones=st.timezones()).map(datetime.isoformat)
    | st.datetimes().map(datetime.isoformat)
    | any_value,
)
def test_near_valid_payloads_decode_or_raise_invalid_payload(
    booking_id: Any, email_type: Any, scheduled: Any
) -> None:
    outcome_of([], {"booking_id": booking_id, "type": email_type, "scheduled_for": scheduled})
    outcome_of([booking_id, email_type, scheduled], {})


# -- the actor function, outside a worker ---------------------------------------------------------


class _RecordingBroker:
    def __init__(self) -> None:
        self.enqueued: list[tuple[dramatiq.Message[Any], int | None]] = []

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> None:
        self.enqueued.append((message, delay))


@pytest.fixture
def actor_fn(app: App, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The actor's function with delivery and the broker stubbed: only its decoding is under test.

    The stubs are undone before the App closes its real broker.
    """
    from service.actors import emails
    from service.emails.rules import Action

    delivered: list[EmailPayload] = []

    def fake_deliver(room: Any, payload: EmailPayload, attempt: Any) -> Action:
        delivered.append(payload)
        return Action.SKIP

    with monkeypatch.context() as patch:
        patch.setattr(emails, "deliver", fake_deliver)
        patch.setattr(app, "broker", _RecordingBroker())
        yield emails.send_booking_email.fn


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=arg_lists, kwargs=kwarg_dicts)
def test_the_actor_raises_only_invalid_payload(
    actor_fn: Any, args: list[Any], kwargs: dict[str, Any]
) -> None:
    with contextlib.suppress(InvalidPayload):
        actor_fn(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(["a", "b", "c", "d"], {}), (["a"], {"booking_id": "b"})],
    ids=["four-positional", "given-twice"],
)
def test_the_actor_reports_unbindable_arguments_as_invalid_payload(
    actor_fn: Any, args: list[Any], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidPayload):
        actor_fn(*args, **kwargs)


# -- a real worker fed garbage --------------------------------------------------------------------


# Any text: NUL characters, lone surrogates and astral characters included.
garbage_text = st.text(max_size=30)
garbage_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | garbage_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(garbage_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def garbage_message(draw: st.DrawFn) -> tuple[list[Any], dict[str, Any]]:
    """Any arguments: too many, given twice, unknown names, values Postgres cannot store."""
    args = draw(st.lists(garbage_json | near_misses, max_size=4))
    keys = st.sampled_from(FIELDS) | garbage_text
    kwargs = draw(st.dictionaries(keys, garbage_json | near_misses, max_size=4))
    return args, kwargs


def garbage_batches() -> st.SearchStrategy[list[tuple[list[Any], dict[str, Any]]]]:
    return st.lists(garbage_message(), min_size=5, max_size=12)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    deadline=None,
    max_examples=4,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each try takes seconds
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=garbage_batches())
def test_a_worker_fed_garbage_keeps_running_and_dead_letters_it(
    broker: Any,
    worker: Any,
    db: Db,
    smtp_sink: Any,
    batch: list[tuple[list[Any], dict[str, Any]]],
) -> None:
    from service.actors.emails import send_booking_email

    for args, kwargs in batch:
        assume(outcome_of(args, kwargs) is None)  # a valid payload by chance is not garbage
    sent_ids = []
    for args, kwargs in batch:
        message = dramatiq.Message(
            queue_name=QUEUE,
            actor_name="send_booking_email",
            args=tuple(args),
            kwargs=kwargs,
            options={},
        )
        sent_ids.append(broker.enqueue(message).message_id)

    def dead_lettered() -> bool:
        rows = db.conn.execute(
            "SELECT message_id, reason FROM dead_letters WHERE message_id = ANY(%s)", (sent_ids,)
        ).fetchall()
        return len(rows) == len(sent_ids) and all(r["reason"] == "invalid_payload" for r in rows)

    eventually(dead_lettered, timeout=60)
    assert all(t.is_alive() for t in worker.workers)
    booking = db.booking(status="confirmed")
    send_booking_email.send(str(booking), "confirmed")
    eventually(lambda: received_for(smtp_sink, booking), timeout=60)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"booking_id": "\x00", "type": "confirmed"},
        {"booking_id": math.nan, "type": "confirmed"},
        {"booking_id": "x", "\udcd5\U0001f970": "confirmed"},
    ],
    ids=["nul-character", "nan", "lone-surrogate-key"],
)
def test_garbage_postgres_cannot_store_is_still_recorded_as_a_dead_letter(
    broker: Any,
    worker: Any,
    db: Db,
    kwargs: dict[str, Any],
) -> None:
    message = dramatiq.Message(
        queue_name=QUEUE, actor_name="send_booking_email", args=(), kwargs=kwargs, options={}
    )
    sent = broker.enqueue(message)
    dead = f"dramatiq:{QUEUE}.XQ.msgs"
    eventually(
        lambda: any(sent.message_id.encode() in v for v in broker.client.hvals(dead)), timeout=30
    )
    assert all(t.is_alive() for t in worker.workers)
    rows = db.conn.execute(
        "SELECT reason FROM dead_letters WHERE message_id = %s", (sent.message_id,)
    ).fetchall()
    assert [r["reason"] for r in rows] == ["invalid_payload"]


# -- the hold metadata validator ------------------------------------------------------------------

NOW = datetime(2024, 7, 5, 9, 0, tzinfo=UTC)
POLICY = make_policy(
    [table("t1"), table("t2"), table("t3"), table("p1", "patio")],
    adjacency=[("t1", "t2"), ("t2", "t3")],
)
VALID = build_hold_metadata(POLICY, quote(POLICY, 7, NOW + timedelta(hours=10), [], NOW))


def check(raw: Any, policy: CapacityPolicy = POLICY) -> list[MetadataProblem]:
    problems = validate_hold_metadata(raw, policy)
    assert isinstance(problems, list)
    assert all(isinstance(p, MetadataProblem) and isinstance(p.message, str) for p in problems)
    return problems


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """Valid metadata with a few parts replaced, deleted or added at random paths."""
    doc: Any = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        parent, key = doc, None
        node = doc
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(
                st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node)))
            )
            parent, node = node, node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if key is None:
            if action == "replace":
                doc = draw(json_values | python_oddities)
            elif isinstance(doc, dict):
                doc[draw(st.text(max_size=8))] = draw(json_values)
            continue
        if action == "replace":
            parent[key] = draw(json_values | near_misses | python_oddities)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


@settings(deadline=None, max_examples=500)
@given(raw=json_values | python_oddities)
def test_the_validator_never_raises_on_arbitrary_values(raw: Any) -> None:
    problems = check(raw)
    if not isinstance(raw, dict):
        assert problems


@settings(deadline=None, max_examples=500)
@given(raw=mutated())
def test_the_validator_never_raises_on_mutated_metadata(raw: Any) -> None:
    check(raw)
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError):
        return
    check(text)
    check(text.encode())


@settings(deadline=None, max_examples=200)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_the_validator_reports_any_text_that_is_not_an_object(text: str | bytes) -> None:
    problems = check(text)
    try:
        parsed = json.loads(text)
    except ValueError:
        assert problems and problems[0].path == ""
        return
    if not isinstance(parsed, dict):
        assert problems


def test_the_unmutated_metadata_is_valid() -> None:
    assert check(VALID) == []
