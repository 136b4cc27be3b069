"""This operator as a two-phase-commit participant: it holds trip stops, then takes the decision.

PREPARE checks every stop of one owner and holds them all in one writer
section, or none (``hold``, answering with a ``Vote``). The holds carry the
coordinator's deadline; they end only by its decision (``resolve``), which a
participant that voted YES never takes alone: past the deadline it asks (see
``recovery``). A committed trip's stops are released only with their trip
(``release_trip``), by its coordinator.
"""

from __future__ import annotations

import heapq
import math
import secrets
import time

from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.model import Reservation
from evcharge.operator.state import MIN, Actor, Books, Change
from evcharge.operator.store import Op, put_reservation
from evcharge.wire import protocol as p

# Stops of one PREPARE. Checking them runs in one writer section, quadratic in their number:
# thousands (a frame holds ~15,000) would stall every connection for seconds. No trip has 100.
MAX_TRIP_STOPS = 100


class Participant:
    def __init__(self, books: Books) -> None:
        self.books = books
        self.rules = books.rules

    async def hold(self, coordinator: str, prepare: p.Prepare) -> p.Vote:
        """PREPARE: check every stop and hold them all in one writer section, or none."""
        books = self.books
        stops = [(st.charge_point_id, to_seconds(st.start), to_seconds(st.end)) for st in prepare.stops]

        def mutate() -> Change[p.Vote]:
            held = [r for r in books.by_trip.get(prepare.trip_id, []) if r.txn_id == prepare.txn_id]
            if held:  # a repeated PREPARE: the same answer while the holds stand
                still = all(r.state == "held" for r in held)
                ids = [r.id for r in held] if still else []
                return Change(p.Vote(txn_id=prepare.txn_id, yes=still, reservation_ids=ids, reason="decided already"))
            if not math.isfinite(prepare.deadline) or prepare.deadline <= time.time():
                return Change(_no(prepare, "the booking's deadline has passed"))
            if len(stops) > MAX_TRIP_STOPS:
                return Change(_no(prepare, f"{len(stops)} stops; a trip has at most {MAX_TRIP_STOPS}"))
            now = int(books.clock.now())
            conflicts: list[p.StopConflict] = []
            for i, (cp_id, start, end) in enumerate(stops):
                if start < now - MIN or end > now + self.rules.max_advance_days * 86400:
                    return Change(_no(prepare, f"slot of {cp_id} is in the past or too far ahead"))
                cp = books.charge_points.get(cp_id)
                if cp is None:
                    return Change(_no(prepare, f"no charge point {cp_id!r} at operator {books.operator_id}"))
                if not start < end:
                    return Change(_no(prepare, f"empty slot for {cp_id}"))
                clash = not cp.ledger.fits(start, end) or any(
                    other == cp_id and o_start < end and start < o_end for other, o_start, o_end in stops[:i]
                )
                if clash or cp.out_of_service:
                    free = cp.ledger.next_free(start, end - start)
                    conflicts.append(p.StopConflict(charge_point_id=cp_id, next_free=to_datetime(free)))
            if conflicts:
                return Change(p.Vote(txn_id=prepare.txn_id, yes=False, conflicts=conflicts, reason="slots taken"))
            made = [
                Reservation(
                    id=f"{books.operator_id}-{secrets.token_hex(5)}",
                    charge_point_id=cp_id,
                    vehicle_id=prepare.vehicle_id,
                    start=start,
                    end=end,
                    state="held",
                    created=now,
                    trip_id=prepare.trip_id,
                    hold_deadline=prepare.deadline,
                    txn_id=prepare.txn_id,
                    coordinator=coordinator,
                )
                for cp_id, start, end in stops
            ]
            for r in made:
                books.index(r)
            vote = p.Vote(txn_id=prepare.txn_id, yes=True, reservation_ids=[r.id for r in made])
            return Change(vote, [put_reservation(r) for r in made], [(r, "held") for r in made])

        return await books.apply(
            Actor("coordinator", coordinator), f"hold {len(stops)} stops of trip {prepare.trip_id}", mutate
        )

    async def resolve(
        self, coordinator: str, txn_id: str, trip_id: str, commit: bool, also_store: tuple[Op, ...] = ()
    ) -> list[Reservation]:
        """The coordinator's decision: held stops become booked, or are dropped.

        ``also_store`` goes into the same transaction: a coordinator stores its decision
        and applies it to its own stops at once.
        """
        books = self.books

        def mutate() -> Change[list[Reservation]]:
            held = [
                r
                for r in books.by_trip.get(trip_id, [])
                if r.state == "held" and r.coordinator == coordinator and r.txn_id == txn_id
            ]
            for r in held:
                if commit:
                    r.state = "booked"
                    books.watch(r)
                    r.hold_deadline = None
                else:
                    books.leave_live(r, "aborted")
            reason = "booked" if commit else "aborted"
            return Change(held, [*(put_reservation(r) for r in held), *also_store], [(r, reason) for r in held])

        what = f"{'commit' if commit else 'abort'} {txn_id}"
        return await books.apply(Actor("coordinator", coordinator), what, mutate)

    async def release_trip(self, coordinator: str, trip_id: str, also_store: tuple[Op, ...] = ()) -> list[Reservation]:
        """Cancel the trip's booked stops here (only its coordinator may); idempotent.

        ``also_store`` goes into the same transaction (the coordinator's own cancellation).
        """
        books = self.books

        def mutate() -> Change[list[Reservation]]:
            # Only the stops this coordinator placed (another's trip id is none of its business).
            stops = [r for r in books.by_trip.get(trip_id, []) if r.coordinator == coordinator]
            # Held stops too: a cancellation can overtake the commit it follows.
            freed = [r for r in stops if r.state in ("booked", "held")]
            for r in freed:
                books.leave_live(r, "cancelled")
            ops = [*(put_reservation(r) for r in freed), *also_store]
            return Change(freed, ops, [(r, "trip cancelled") for r in freed])

        return await books.apply(Actor("coordinator", coordinator), f"release trip {trip_id}", mutate)

    def overdue_holds(self, now_real: float) -> dict[str, tuple[str, str]]:
        """Holds whose deadline passed: txn id -> (coordinator, trip id)."""
        books = self.books
        due: list[Reservation] = []
        while books.hold_due and books.hold_due[0][0] <= now_real:
            _, rid = heapq.heappop(books.hold_due)
            r = books.reservations.get(rid)
            if r is not None and r.state == "held":
                due.append(r)
        for r in due:  # still in doubt: due again next time until its coordinator answers
            heapq.heappush(books.hold_due, (r.hold_deadline or 0.0, r.id))
        return {r.txn_id: (r.coordinator, r.trip_id) for r in due if r.txn_id and r.coordinator and r.trip_id}


def _no(prepare: p.Prepare, reason: str) -> p.Vote:
    return p.Vote(txn_id=prepare.txn_id, yes=False, reason=reason)
