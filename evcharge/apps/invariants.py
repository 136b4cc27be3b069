"""Check the design's invariants from what every operator's ``inspect`` says.

1. Two live reservations never overlap on one charge point.
2. A trip is whole or absent: a committed trip has each of its stops booked
   (or already used or expired) at its owner, but for those it shows lost
   (withdrawn by their owner, and free there); a cancelled trip holds none; no
   stop is booked for a trip no coordinator committed; nothing stays held.
3. No hold outlives its deadline by more than the time its owner needs to ask
   the coordinator (checked when ``now`` is given; holds of bookings still in
   progress are allowed with ``allow_holds``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from evcharge.domain.model import LIVE_STATES
from evcharge.wire import protocol as p

# A stop nobody drove to expires like any no-show: it still belonged to its trip.
_TRIP_STOP_STATES = frozenset({"booked", "charging", "completed", "expired"})


HOLD_GRACE_S = 10.0  # real seconds past its deadline a hold may take to be resolved


def violations(
    states: dict[str, p.InspectResult],
    *,
    allow_holds: bool = False,
    now: float | None = None,
    hold_grace: float = HOLD_GRACE_S,
) -> list[str]:
    """Every broken invariant, as one sentence each (empty: all hold).

    ``now`` (wall-clock epoch seconds) turns on the check of holds against their deadlines.
    """
    found: list[str] = []
    if now is not None:
        found += stale_holds(states, now, hold_grace)
    for op_id, state in sorted(states.items()):
        live = sorted(
            (r for r in state.reservations if r.state in LIVE_STATES), key=lambda r: (r.charge_point_id, r.start)
        )
        for cp, group in itertools.groupby(live, key=lambda r: r.charge_point_id):
            for a, b in itertools.pairwise(group):
                if a.end > b.start:
                    found.append(f"overlap at {op_id}/{cp}: {a.id} [{a.start}, {a.end}) and {b.id} from {b.start}")
        if not allow_holds:
            held = [r.id for r in state.reservations if r.state == "held"]
            if held:
                found.append(f"holds left at {op_id}: {', '.join(held)}")

    stops_of: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for op_id, state in states.items():
        for r in state.reservations:
            if r.trip_id and r.state in _TRIP_STOP_STATES:
                stops_of[r.trip_id].add((op_id, r.id))
    trips = {t.id: t for state in states.values() for t in state.trips}
    holding = {(op_id, r.id) for op_id, state in states.items() for r in state.reservations if r.state in LIVE_STATES}
    for trip in trips.values():
        # A stop its owner withdrew (its charge point broke) shows in the trip as lost, and is free.
        expected = {(s.operator_id, s.reservation_id or "") for s in trip.stops if not s.lost}
        if trip.state == "committed" and stops_of.get(trip.id, set()) - _lost(trip) != expected:
            missing = sorted(expected - stops_of.get(trip.id, set()))
            found.append(f"trip {trip.id} is not whole: missing {missing}")
        for stop in sorted(_lost(trip) & holding):
            found.append(f"trip {trip.id} shows its stop {stop[1]} at {stop[0]} lost, but it is still held there")
        if trip.state == "cancelled" and any(
            r.trip_id == trip.id and r.state == "booked" for state in states.values() for r in state.reservations
        ):
            found.append(f"cancelled trip {trip.id} still has booked stops")
    committed = {t.id for t in trips.values() if t.state in ("committed", "cancelled")}
    for trip_id in sorted(set(stops_of) - committed):
        found.append(f"stops booked for trip {trip_id}, which no coordinator committed")
    return found


def _lost(trip: p.TripInfo) -> set[tuple[str, str]]:
    return {(s.operator_id, s.reservation_id or "") for s in trip.stops if s.lost}


def stale_holds(states: dict[str, p.InspectResult], now: float, grace: float = HOLD_GRACE_S) -> list[str]:
    """Holds still standing ``grace`` seconds after their deadline: nobody resolved them."""
    found = []
    for op_id, state in sorted(states.items()):
        for r in state.reservations:
            if r.state != "held":
                continue
            if r.hold_deadline is None:
                found.append(f"hold {r.id} at {op_id} (trip {r.trip_id}) has no deadline")
            elif now > r.hold_deadline + grace:
                found.append(
                    f"hold {r.id} at {op_id} (trip {r.trip_id}) is {now - r.hold_deadline:.1f} s past its deadline"
                )
    return found


def summary(states: dict[str, p.InspectResult]) -> str:
    live = sum(1 for s in states.values() for r in s.reservations if r.state in LIVE_STATES)
    trips = sum(1 for s in states.values() for t in s.trips if t.state == "committed")
    return f"{len(states)} operators, {live} live reservations, {trips} committed trips"


def settlement_violations(settlements: dict[str, p.Settlement]) -> list[str]:
    """Both sides of every charge record agree: what an owner charged a home's vehicle is what the home holds.

    A record the owner has not delivered yet is in transit, not a violation.
    """
    found = []
    held = {
        (op_id, r.session.reservation_id): r for op_id, s in settlements.items() for r in s.received
    }  # by (home, reservation)
    for owner, s in sorted(settlements.items()):
        for record in s.charged:
            home, rid = record.home_operator_id, record.session.reservation_id
            if not record.delivered or home not in settlements:
                continue
            theirs = held.get((home, rid))
            if theirs is None:
                found.append(f"charge record {rid} of {owner} is delivered, but {home} does not have it")
            elif (theirs.session.kwh, theirs.session.cost) != (record.session.kwh, record.session.cost):
                found.append(
                    f"charge record {rid}: {owner} charged {record.session.kwh} kWh, R$ {record.session.cost}; "
                    f"{home} holds {theirs.session.kwh} kWh, R$ {theirs.session.cost}"
                )
    charged = {(s.operator_id, r.session.reservation_id) for s in settlements.values() for r in s.charged}
    for (home, rid), record in sorted(held.items()):
        owner = record.session.operator_id
        if owner in settlements and (owner, rid) not in charged:
            found.append(f"{home} holds charge record {rid} of {owner}, which {owner} never charged")
    return found


def in_transit(settlements: dict[str, p.Settlement]) -> int:
    """Charge records their owners have not delivered to the vehicles' homes yet."""
    return sum(1 for s in settlements.values() for r in s.charged if not r.delivered)
