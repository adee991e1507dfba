"""The pure decisions of hold creation, confirmation and drift recovery, without any server."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.capacity.decisions import (
    MAX_REQUOTE_CYCLES,
    AlreadyConfirmed,
    Confirm,
    ConfirmationInputs,
    ConfirmDecision,
    Escalate,
    HoldInputs,
    PlaceHold,
    Reject,
    Requote,
    Surface,
    after_drift,
    after_failed_requote,
    confirmed_by,
    confirmed_outcome,
    decide_confirmation,
    decide_hold,
    escalation_error,
    hold_ttl,
    tables_taken,
)
from service.capacity.errors import (
    BOOKING_NOT_FOUND,
    BOOKING_NOT_PENDING,
    HOLD_BOOKING_MISMATCH,
    HOLD_EXPIRED,
    HOLD_METADATA_INCOMPLETE,
    HOLD_NOT_FOUND,
    NO_AVAILABILITY,
    POLICY_CHANGED,
    POLICY_NOT_FOUND,
    POLICY_REQUOTE_FAILED,
    POLICY_RETRY_FAILED,
    CapacityError,
)
from service.capacity.holds import build_hold_metadata
from service.capacity.policy import CapacityPolicy, policy_version
from service.capacity.quoting import Occupancy, quote
from service.capacity.records import Booking, Hold, PolicyRevision
from tests.support.policies import NO_DEADLINE, make_policy, revised, table

NOW = datetime(2030, 5, 17, 12, 0, tzinfo=UTC)
START = datetime(2030, 5, 17, 19, 0, tzinfo=UTC)
VENUE = uuid.UUID(int=1)
BOOKING = uuid.UUID(int=2)
HOLD = uuid.UUID(int=3)

OLD = make_policy([table("t1", capacity=2), table("t2"), table("t3")], adjacency=[("t2", "t3")])
NEW = revised(OLD, buffer_minutes=OLD.buffer_minutes + 10)


def revision(policy: CapacityPolicy, revision_id: int) -> PolicyRevision:
    return PolicyRevision(
        id=revision_id,
        venue_id=VENUE,
        revision=revision_id,
        version=policy_version(policy),
        adjacency_hash="0" * 64,
        created_at=NOW,
        policy=policy,
    )


OLD_REV, NEW_REV = revision(OLD, 1), revision(NEW, 2)


def metadata(policy: CapacityPolicy, tables: tuple[str, ...] = ("t1",)) -> dict[str, Any]:
    offer = quote(policy, 2, START, [], NOW, max_tables=1)
    return build_hold_metadata(policy, replace(offer, table_ids=tables))


def booking(status: str = "pending", booking_id: uuid.UUID = BOOKING) -> Booking:
    return Booking(booking_id, VENUE, status, 2, START, False)


def hold(
    *,
    hold_id: uuid.UUID = HOLD,
    booking_id: uuid.UUID = BOOKING,
    status: str = "active",
    expires_in: timedelta = timedelta(minutes=5),
    meta: Any = None,
    tables: tuple[str, ...] = ("t1",),
    replaced_by: uuid.UUID | None = None,
) -> Hold:
    return Hold(
        id=hold_id,
        booking_id=booking_id,
        venue_id=VENUE,
        table_ids=tables,
        starts_at=START,
        ends_at=START + timedelta(hours=2),
        expires_at=NOW + expires_in,
        status=status,
        metadata=metadata(NEW) if meta is None else meta,
        policy_revision_id=2,
        replaced_by=replaced_by,
        release_reason=None if status == "active" else "policy_drift",
    )


def code(decision: ConfirmDecision) -> str:
    assert isinstance(decision, Reject), decision
    return decision.error.code


# -- confirmation: the documented order, over every combination ---------------------------------

BOOKING_STATES = ["missing", "pending", "confirmed", "cancelled"]
HOLD_STATES = ["missing", "other_booking", "active", "consumed", "released"]
EXPIRY = [timedelta(minutes=-1), timedelta(0), timedelta(minutes=5)]
METADATA = ["valid", "incomplete", "tables_differ", "not_object"]
VERSIONS = ["current", "old_on_record", "old_not_on_record"]
CHAINS = ["none", "replaced_by_consumed", "replaced_twice_then_consumed", "unlinked_consumed"]


@dataclass(frozen=True)
class Case:
    booking: str
    hold: str
    expires_in: timedelta
    metadata: str
    version: str
    chain: str
    policy: bool

    def inputs(self) -> ConfirmationInputs:
        under = OLD if self.version != "current" else NEW
        meta: Any = {
            "valid": metadata(under),
            "incomplete": {k: v for k, v in metadata(under).items() if k != "selection"},
            "tables_differ": metadata(under, ("t2",)),
            "not_object": '{"policyVersion": "x"}',
        }[self.metadata]
        first_replacement, second_replacement = uuid.UUID(int=10), uuid.UUID(int=11)
        replacements: tuple[Hold, ...] = {
            "none": (),
            "replaced_by_consumed": (hold(hold_id=first_replacement, status="consumed"),),
            "replaced_twice_then_consumed": (
                hold(hold_id=first_replacement, status="released", replaced_by=second_replacement),
                hold(hold_id=second_replacement, status="consumed"),
            ),
            "unlinked_consumed": (hold(hold_id=uuid.UUID(int=99), status="consumed"),),
        }[self.chain]
        linked = None if self.chain in ("none", "unlinked_consumed") else first_replacement
        the_hold = (
            None
            if self.hold == "missing"
            else hold(
                booking_id=uuid.UUID(int=7) if self.hold == "other_booking" else BOOKING,
                status="active" if self.hold == "other_booking" else self.hold,
                expires_in=self.expires_in,
                meta=meta,
                replaced_by=linked,
            )
        )
        held_under = {"current": NEW_REV, "old_on_record": OLD_REV, "old_not_on_record": None}
        return ConfirmationInputs(
            booking_id=BOOKING,
            hold_id=HOLD,
            booking=None if self.booking == "missing" else booking(self.booking),
            hold=the_hold,
            replacements=replacements if the_hold is not None else (),
            current=NEW_REV if self.policy else None,
            held_under=held_under[self.version] if self.metadata != "not_object" else None,
        )

    def expected(self) -> str:
        """The order of checks documented in service/capacity/decisions.py, restated."""
        if self.booking == "missing":
            return BOOKING_NOT_FOUND
        if self.hold == "missing":
            return HOLD_NOT_FOUND
        if self.hold == "other_booking":
            return HOLD_BOOKING_MISMATCH
        if self.booking == "confirmed":
            if self.hold == "consumed":
                return f"already:{HOLD}"
            if self.chain == "replaced_by_consumed":
                return f"already:{uuid.UUID(int=10)}"
            if self.chain == "replaced_twice_then_consumed":
                return f"already:{uuid.UUID(int=11)}"
        if self.hold != "active" or self.expires_in <= timedelta(0):
            return HOLD_EXPIRED
        if self.booking != "pending":
            return BOOKING_NOT_PENDING
        if not self.policy:
            return POLICY_NOT_FOUND
        if self.metadata != "valid":
            return HOLD_METADATA_INCOMPLETE
        if self.version != "current":
            return POLICY_CHANGED
        return "confirm"


def outcome_of(decision: ConfirmDecision) -> str:
    if isinstance(decision, Confirm):
        return "confirm"
    if isinstance(decision, AlreadyConfirmed):
        return f"already:{decision.hold.id}"
    return decision.error.code


def test_every_combination_gets_the_documented_decision() -> None:
    wrong = []
    for values in itertools.product(
        BOOKING_STATES, HOLD_STATES, EXPIRY, METADATA, VERSIONS, CHAINS, (True, False)
    ):
        case = Case(*values)
        got = outcome_of(decide_confirmation(case.inputs(), NOW))
        if got != case.expected():
            wrong.append((case, got))
    assert wrong == []


cases = st.builds(
    Case,
    booking=st.sampled_from(BOOKING_STATES),
    hold=st.sampled_from(HOLD_STATES),
    expires_in=st.timedeltas(min_value=timedelta(hours=-1), max_value=timedelta(hours=1)),
    metadata=st.sampled_from(METADATA),
    version=st.sampled_from(VERSIONS),
    chain=st.sampled_from(CHAINS),
    policy=st.booleans(),
)


@NO_DEADLINE
@given(cases)
def test_any_expiry_gets_the_documented_decision(case: Case) -> None:
    decision = decide_confirmation(case.inputs(), NOW)
    assert outcome_of(decision) == case.expected()
    if isinstance(decision, Confirm):
        assert decision.hold.id == HOLD


def test_expiry_is_exclusive_at_now() -> None:
    inputs = ConfirmationInputs(
        BOOKING, HOLD, booking(), hold(expires_in=timedelta(0)), current=NEW_REV, held_under=NEW_REV
    )
    assert code(decide_confirmation(inputs, NOW)) == HOLD_EXPIRED
    assert isinstance(decide_confirmation(inputs, NOW - timedelta(microseconds=1)), Confirm)


def test_rejections_carry_the_details_callers_use() -> None:
    other = hold(booking_id=uuid.UUID(int=7))
    mismatch = decide_confirmation(ConfirmationInputs(BOOKING, HOLD, booking(), other), NOW)
    assert isinstance(mismatch, Reject)
    assert mismatch.error.details["holdBookingId"] == str(uuid.UUID(int=7))

    released = hold(status="released")
    expired = decide_confirmation(ConfirmationInputs(BOOKING, HOLD, booking(), released), NOW)
    assert isinstance(expired, Reject)
    assert expired.error.details["status"] == "released"
    assert expired.error.details["releaseReason"] == "policy_drift"

    cancelled = ConfirmationInputs(BOOKING, HOLD, booking("cancelled"), hold(), current=NEW_REV)
    not_pending = decide_confirmation(cancelled, NOW)
    assert isinstance(not_pending, Reject)
    assert not_pending.error.details["status"] == "cancelled"


def test_metadata_defects_are_all_reported_together() -> None:
    broken = metadata(NEW, ("t2",))
    del broken["selection"]["snapshot"]["zoneIds"]
    inputs = ConfirmationInputs(
        BOOKING, HOLD, booking(), hold(meta=broken), current=NEW_REV, held_under=NEW_REV
    )
    decision = decide_confirmation(inputs, NOW)
    assert isinstance(decision, Reject) and decision.error.code == HOLD_METADATA_INCOMPLETE
    assert sorted(p["path"] for p in decision.error.details["problems"]) == [
        "selection.snapshot.zoneIds",
        "selection.tableIds",
    ]
    assert "2 problem(s)" in decision.error.message


def test_a_hold_under_an_older_revision_reads_as_drift_with_the_real_diff() -> None:
    inputs = ConfirmationInputs(
        BOOKING,
        HOLD,
        booking(),
        hold(meta=metadata(OLD)),
        current=NEW_REV,
        held_under=OLD_REV,
    )
    decision = decide_confirmation(inputs, NOW)
    assert isinstance(decision, Reject) and decision.error.code == POLICY_CHANGED
    details = decision.error.details
    assert (details["expectedVersion"], details["actualVersion"]) == (
        OLD_REV.version,
        NEW_REV.version,
    )
    assert details["diff"] and details["changes"] and details["summary"]

    snapshot_only = replace(inputs, held_under=None)
    decision = decide_confirmation(snapshot_only, NOW)
    assert isinstance(decision, Reject) and decision.error.code == POLICY_CHANGED


def test_an_old_table_is_drift_not_broken_metadata() -> None:
    without_t1 = revised(OLD, tables=[t for t in OLD.tables if t.id != "t1"])
    current = revision(without_t1, 3)
    inputs = ConfirmationInputs(
        BOOKING, HOLD, booking(), hold(meta=metadata(OLD)), current=current, held_under=OLD_REV
    )
    assert code(decide_confirmation(inputs, NOW)) == POLICY_CHANGED


def test_the_chain_is_followed_for_at_most_two_replacements() -> None:
    ids = [uuid.UUID(int=20 + i) for i in range(4)]
    chain = [hold(hold_id=ids[i], status="released", replaced_by=ids[i + 1]) for i in range(3)] + [
        hold(hold_id=ids[3], status="consumed")
    ]
    assert confirmed_by(booking("confirmed"), chain[1:]) == chain[3]
    assert confirmed_by(booking("confirmed"), chain) is None
    assert confirmed_by(booking("pending"), chain[2:]) is None


def test_a_lost_race_for_a_table_is_no_availability() -> None:
    error = tables_taken(hold(tables=("t2", "t3")))
    assert error.code == NO_AVAILABILITY
    assert (error.details["reason"], error.details["tableIds"]) == ("tables_taken", ["t2", "t3"])


# -- drift recovery -------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10), st.booleans())
def test_after_drift(cycles: int, enabled: bool) -> None:
    step = after_drift(cycles, requote_enabled=enabled)
    if not enabled:
        assert step == Surface()
    elif cycles >= MAX_REQUOTE_CYCLES:
        assert step == Escalate(POLICY_RETRY_FAILED, cycles)
    else:
        assert step == Requote(cycles + 1)


def test_a_policy_that_keeps_changing_gets_two_requotes_then_escalates() -> None:
    cycles, steps = 0, []
    while True:
        step = after_drift(cycles, requote_enabled=True)
        steps.append(step)
        if not isinstance(step, Requote):
            break
        cycles = step.cycle
    assert steps == [Requote(1), Requote(2), Escalate(POLICY_RETRY_FAILED, 2)]


def test_only_no_availability_at_requote_escalates() -> None:
    assert after_failed_requote(CapacityError(NO_AVAILABILITY), 1) == Escalate(
        POLICY_REQUOTE_FAILED, 1
    )
    for other in (BOOKING_NOT_PENDING, POLICY_NOT_FOUND, HOLD_METADATA_INCOMPLETE):
        assert after_failed_requote(CapacityError(other), 1) is None


def test_escalation_error_keeps_the_drift_and_the_cause() -> None:
    drift = CapacityError(POLICY_CHANGED, details={"expectedVersion": "a", "venueId": "v"})
    cause = CapacityError(NO_AVAILABILITY, details={"reason": "no_fit"})
    error = escalation_error(Escalate(POLICY_REQUOTE_FAILED, 1), drift, BOOKING, cause)
    assert error.code == POLICY_REQUOTE_FAILED
    assert error.details["expectedVersion"] == "a"
    assert (error.details["cycles"], error.details["bookingId"]) == (1, str(BOOKING))
    assert error.details["cause"]["code"] == NO_AVAILABILITY
    assert "cause" not in escalation_error(Escalate(POLICY_RETRY_FAILED, 2), drift, BOOKING).details


@pytest.mark.parametrize(
    ("cycles", "already", "confirmed_hold", "outcome"),
    [
        (0, False, HOLD, "confirmed"),
        (1, False, uuid.UUID(int=9), "recovered"),
        (2, False, uuid.UUID(int=9), "recovered"),
        (0, True, HOLD, "confirmed"),
        (0, True, uuid.UUID(int=9), "recovered"),
    ],
)
def test_confirmed_outcome(
    cycles: int, already: bool, confirmed_hold: uuid.UUID, outcome: str
) -> None:
    assert (
        confirmed_outcome(
            cycles=cycles,
            already_confirmed=already,
            hold_id=confirmed_hold,
            original_hold_id=HOLD,
        )
        == outcome
    )


# -- hold creation --------------------------------------------------------------------------------


def test_hold_ttl_defaults_only_for_none() -> None:
    assert hold_ttl(None, 600) == timedelta(seconds=600)
    assert hold_ttl(30, 600) == timedelta(seconds=30)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="ttl_seconds must be a positive"):
            hold_ttl(bad, 600)


def test_decide_hold() -> None:
    def decide(inputs: HoldInputs) -> PlaceHold | Reject:
        return decide_hold(inputs, NOW, ttl=timedelta(minutes=10), max_tables=3)

    missing = decide(HoldInputs(BOOKING, None))
    assert isinstance(missing, Reject) and missing.error.code == BOOKING_NOT_FOUND
    confirmed = decide(HoldInputs(BOOKING, booking("confirmed"), NEW_REV))
    assert isinstance(confirmed, Reject) and confirmed.error.code == BOOKING_NOT_PENDING
    no_policy = decide(HoldInputs(BOOKING, booking(), None))
    assert isinstance(no_policy, Reject) and no_policy.error.code == POLICY_NOT_FOUND

    placed = decide(HoldInputs(BOOKING, booking(), NEW_REV))
    assert isinstance(placed, PlaceHold)
    assert placed.offer.table_ids == ("t1",)
    assert placed.expires_at == NOW + timedelta(minutes=10)
    assert placed.metadata["policyVersion"] == NEW_REV.version

    everything_taken = [
        Occupancy(("t1", "t2", "t3"), START - timedelta(hours=1), START + timedelta(hours=4))
    ]
    full = decide(HoldInputs(BOOKING, booking(), NEW_REV, everything_taken))
    assert isinstance(full, Reject) and full.error.code == NO_AVAILABILITY
