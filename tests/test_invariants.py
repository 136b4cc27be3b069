"""The invariant checker itself: it must see each kind of violation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from evcharge.apps.invariants import HOLD_GRACE_S, violations
from evcharge.operator.server import Server
from evcharge.wire import protocol as p

from .conftest import operator

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def res(rid: str, cp: str, start: int, end: int, state: str = "booked", trip: str | None = None) -> p.ReservationInfo:
    return p.ReservationInfo(
        id=rid,
        operator_id=rid[0],
        station_id="S",
        charge_point_id=cp,
        vehicle_id="V01",
        start=T0 + timedelta(minutes=start),
        end=T0 + timedelta(minutes=end),
        state=state,
        trip_id=trip,
    )


def trip(tid: str, stops: list[tuple[str, str]], state: str = "committed") -> p.TripInfo:
    return p.TripInfo(
        id=tid,
        vehicle_id="V01",
        state=state,
        origin="Natal",
        destination="Recife",
        depart=T0,
        arrival=T0,
        distance_km=1,
        soc_at_arrival=10,
        total_kwh=1,
        total_cost=1,
        stops=[
            p.TripStop(
                city="X",
                operator_id=op,
                station_id="S",
                station_name="S",
                charge_point_id="cp",
                power_kw=50,
                drive_km=1,
                arrival=T0,
                slot_start=T0,
                slot_end=T0,
                soc_in=1,
                soc_out=2,
                kwh=1,
                cost=1,
                reservation_id=rid,
            )
            for op, rid in stops
        ],
    )


def state(op: str, reservations: list[p.ReservationInfo], trips: list[p.TripInfo] | None = None) -> p.InspectResult:
    return p.InspectResult(operator_id=op, server_time=T0, stations=[], reservations=reservations, trips=trips or [])


def test_a_clean_world_has_no_violations() -> None:
    states = {
        "A": state(
            "A", [res("A1", "c1", 0, 30, trip="T1"), res("A2", "c1", 30, 60)], [trip("T1", [("A", "A1"), ("B", "B1")])]
        ),
        "B": state("B", [res("B1", "c9", 0, 30, trip="T1"), res("B2", "c9", 10, 20, "cancelled")]),
    }
    assert violations(states) == []


def test_each_kind_of_violation_is_reported() -> None:
    overlap = {"A": state("A", [res("A1", "c1", 0, 30), res("A2", "c1", 29, 60)])}
    assert any("overlap" in v for v in violations(overlap))
    partial = {
        "A": state("A", [res("A1", "c1", 0, 30, trip="T1")], [trip("T1", [("A", "A1"), ("B", "B1")])]),
        "B": state("B", [res("B1", "c9", 0, 30, "aborted", trip="T1")]),
    }
    assert any("not whole" in v for v in violations(partial))
    orphan = {"A": state("A", []), "B": state("B", [res("B1", "c9", 0, 30, trip="T9")])}
    assert any("no coordinator committed" in v for v in violations(orphan))
    held = {"B": state("B", [res("B1", "c9", 0, 30, "held", trip="T9")])}
    assert any("holds left" in v for v in violations(held))
    assert not any("holds" in v for v in violations(held, allow_holds=True))
    cancelled = {
        "A": state("A", [], [trip("T1", [("B", "B1")], state="cancelled")]),
        "B": state("B", [res("B1", "c9", 0, 30, trip="T1")]),
    }
    assert any("cancelled trip" in v for v in violations(cancelled))


def test_a_hold_well_past_its_deadline_counts_even_when_holds_are_allowed() -> None:
    hold = res("B1", "c9", 0, 30, "held", trip="T9")
    hold.hold_deadline = 1_000.0
    states = {"B": state("B", [hold])}
    assert violations(states, allow_holds=True) == []  # no clock given: holds are not judged
    assert violations(states, allow_holds=True, now=1_000.0 + HOLD_GRACE_S - 1) == []
    assert any("past its deadline" in v for v in violations(states, allow_holds=True, now=1_000.0 + HOLD_GRACE_S + 1))
    hold.hold_deadline = None
    assert any("no deadline" in v for v in violations(states, allow_holds=True, now=0.0))


async def test_inspect_tells_each_holds_deadline(server: Server) -> None:
    deadline = time.time() + 5
    start = datetime.fromtimestamp(server.clock.now(), UTC) + timedelta(hours=2)
    prepare = p.Prepare(
        txn_id="T1.1",
        trip_id="B-T1",
        vehicle_id="V02",
        stops=[p.StopRequest(charge_point_id="NAT-PN-1", start=start, end=start + timedelta(minutes=30))],
        deadline=deadline,
    )
    vote = await server.participant.hold("B", prepare)
    async with operator(server) as c:
        [held] = (await c.inspect()).reservations
    assert held.id == vote.reservation_ids[0] and held.state == "held" and held.hold_deadline == deadline
    await server.participant.resolve("B", "T1.1", "B-T1", commit=True)
    async with operator(server) as c:
        [booked] = (await c.inspect()).reservations
    assert booked.state == "booked" and booked.hold_deadline is None


def record(rid: str, owner: str, cost: float, delivered: bool = True) -> p.ChargeRecordInfo:
    session = p.SessionInfo(
        reservation_id=rid,
        operator_id=owner,
        station_id="S",
        city="Recife",
        charge_point_id="CP",
        started=T0,
        ended=T0 + timedelta(minutes=30),
        kwh=10.0,
        price_per_kwh=cost / 10,
        cost=cost,
    )
    return p.ChargeRecordInfo(vehicle_id="V01", home_operator_id="A", session=session, delivered=delivered)


def test_the_checker_sees_charge_records_the_two_sides_disagree_on() -> None:
    from evcharge.apps.invariants import in_transit, settlement_violations

    def books(charged: list[p.ChargeRecordInfo], received: list[p.ChargeRecordInfo]) -> dict[str, p.Settlement]:
        return {
            "B": p.Settlement(operator_id="B", charged=charged, received=[]),
            "A": p.Settlement(operator_id="A", charged=[], received=received),
        }

    agree = books([record("B-1", "B", 24.9), record("B-2", "B", 5.0, delivered=False)], [record("B-1", "B", 24.9)])
    assert settlement_violations(agree) == [] and in_transit(agree) == 1
    lost = settlement_violations(books([record("B-1", "B", 24.9)], []))
    assert lost == ["charge record B-1 of B is delivered, but A does not have it"]
    differ = settlement_violations(books([record("B-1", "B", 24.9)], [record("B-1", "B", 20.0)]))
    assert differ == ["charge record B-1: B charged 10.0 kWh, R$ 24.9; A holds 10.0 kWh, R$ 20.0"]
    invented = settlement_violations(books([], [record("B-9", "B", 1.0)]))
    assert invented == ["A holds charge record B-9 of B, which B never charged"]


def test_a_stop_its_owner_withdrew_counts_as_lost_not_missing() -> None:
    lost = trip("T1", [("A", "A1"), ("B", "B1")])
    lost.stops[1].lost = "withdrawn by operator B: charge point c9 is faulted"
    withdrawn = {
        "A": state("A", [res("A1", "c1", 0, 30, trip="T1")], [lost]),
        "B": state("B", [res("B1", "c9", 0, 30, "cancelled", trip="T1")]),
    }
    assert violations(withdrawn) == []
    still_held = {**withdrawn, "B": state("B", [res("B1", "c9", 0, 30, trip="T1")])}
    assert any("lost, but it is still held" in v for v in violations(still_held))
    withdrawn["B"].reservations[0].state = "booked"
    lost.stops[1].lost = ""
    assert violations(withdrawn) == []
