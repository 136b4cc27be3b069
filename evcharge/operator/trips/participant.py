"""This operator as a two-phase-commit participant: it holds trip stops, then takes the decision.

PREPARE checks every stop of one owner against the rules of a single
reservation and holds them all in one writer section, or none (``hold``,
answering with a ``Vote``). The holds carry the coordinator's deadline, which
lies at most ``MAX_HOLD_S`` ahead; they end only by its decision (``resolve``),
which a participant that voted YES never takes alone: past the deadline it
asks (see ``recovery``). A committed trip's stops are released only with their
trip (``release_trip``), by its coordinator -- or withdrawn one by one by this
operator when their charge point is out of service (``withdraw``), and then the
coordinator is told (``recovery`` again), until it acknowledges.

Only the coordinator that placed a trip's stops may repeat its PREPARE, decide
or release them: to anyone else that trip id is ``forbidden``.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import time
from collections.abc import Callable, Sequence

from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.model import Reservation, Withdrawal
from evcharge.operator.ids import new_id
from evcharge.operator.state import MIN, Actor, Books, Change
from evcharge.operator.store import Op, StoredState, put_meta, put_reservation
from evcharge.operator.store.integrity import WITHDRAWN_META
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, EvchargeError, ForbiddenError

# Stops of one PREPARE. Checking them runs in one writer section, quadratic in their number:
# thousands (a frame holds ~15,000) would stall every connection for seconds. No trip has 100.
MAX_TRIP_STOPS = 100
# Real seconds from now a PREPARE's deadline may lie. Ours are 5 s; a hold must not keep a slot
# from everyone else for long on a coordinator's say-so (past it, we ask the coordinator).
MAX_HOLD_S = 30.0


class Participant:
    def __init__(self, books: Books) -> None:
        self.books = books
        self.rules = books.rules
        self.untold: dict[str, Withdrawal] = {}  # withdrawn stops whose coordinator does not know yet
        books.loaders.append(self._load)

    def _load(self, state: StoredState) -> None:
        self.untold = {}
        for key, value in state.meta.items():
            if key.startswith(WITHDRAWN_META):
                withdrawal = Withdrawal(**json.loads(value))
                if not withdrawal.told:
                    self.untold[withdrawal.reservation_id] = withdrawal

    def _stops(self, coordinator: str, trip_id: str) -> list[Reservation]:
        """The trip's stops here, if ``coordinator`` placed them: another's trip is none of its business."""
        stops = self.books.by_trip.get(trip_id, [])
        if any(r.coordinator != coordinator for r in stops):
            raise ForbiddenError(f"trip {trip_id} is not a trip of operator {coordinator}")
        return stops

    def _rule_broken(self, prepare: p.Prepare, stops: list[tuple[str, int, int]]) -> str:
        """Why the PREPARE may not hold its stops, if so: a peer's stop keeps a single reservation's rules."""
        rules = self.rules
        left = prepare.deadline - time.time()
        if not math.isfinite(left) or left <= 0:
            return "the booking's deadline has passed"
        if left > MAX_HOLD_S:
            return f"the booking's deadline is {left:.0f} s away; holds last at most {MAX_HOLD_S:g} s"
        if len(stops) > MAX_TRIP_STOPS:
            return f"{len(stops)} stops; a trip has at most {MAX_TRIP_STOPS}"
        now = int(self.books.clock.now())
        for cp_id, start, end in stops:
            if cp_id not in self.books.charge_points:
                return f"no charge point {cp_id!r} at operator {self.books.operator_id}"
            if not start < end:
                return f"empty slot for {cp_id}"
            if not MIN <= end - start <= rules.max_reservation_min * MIN:
                return f"slot of {cp_id} lasts {(end - start) / MIN:g} min, not 1..{rules.max_reservation_min}"
            if start < now - MIN:
                return f"slot of {cp_id} is in the past"
            if start > now + rules.max_advance_days * 86400:
                return f"slot of {cp_id} starts more than {rules.max_advance_days} days ahead"
        return ""

    async def hold(self, coordinator: str, prepare: p.Prepare) -> p.Vote:
        """PREPARE: check every stop and hold them all in one writer section, or none."""
        what = f"hold {len(prepare.stops)} stops of trip {prepare.trip_id}"
        return await self.books.apply(Actor("coordinator", coordinator), what, self._holding(coordinator, prepare))

    def _holding(self, coordinator: str, prepare: p.Prepare) -> Callable[[], Change[p.Vote]]:
        """The PREPARE's change, to run under the writer lock (alone, or in a batch)."""
        books = self.books
        stops = [(st.charge_point_id, to_seconds(st.start), to_seconds(st.end)) for st in prepare.stops]

        def mutate() -> Change[p.Vote]:
            held = [r for r in self._stops(coordinator, prepare.trip_id) if r.txn_id == prepare.txn_id]
            if held:  # a repeated PREPARE: the same answer while the holds stand
                still = all(r.state == "held" for r in held)
                ids = [r.id for r in held] if still else []
                return Change(p.Vote(txn_id=prepare.txn_id, yes=still, reservation_ids=ids, reason="decided already"))
            broken = self._rule_broken(prepare, stops)
            if broken:
                return Change(_no(prepare, broken))
            now = int(books.clock.now())
            conflicts: list[p.StopConflict] = []
            for i, (cp_id, start, end) in enumerate(stops):
                cp = books.charge_points[cp_id]
                clash = not cp.ledger.fits(start, end) or any(
                    other == cp_id and o_start < end and start < o_end for other, o_start, o_end in stops[:i]
                )
                if clash or cp.out_of_service:
                    free = cp.ledger.next_free(start, end - start)
                    conflicts.append(p.StopConflict(charge_point_id=cp_id, next_free=to_datetime(free)))
            if conflicts:
                return Change(p.Vote(txn_id=prepare.txn_id, yes=False, conflicts=conflicts, reason="slots taken"))
            made: list[Reservation] = []
            for cp_id, start, end in stops:
                r = Reservation(
                    id=new_id(f"{books.operator_id}-", books.reservations),
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
                books.index(r)  # before the next id is drawn: it is taken now
                made.append(r)
            vote = p.Vote(txn_id=prepare.txn_id, yes=True, reservation_ids=[r.id for r in made])
            return Change(vote, [put_reservation(r) for r in made], [(r, "held") for r in made])

        return mutate

    async def resolve(
        self, coordinator: str, txn_id: str, trip_id: str, commit: bool, also_store: tuple[Op, ...] = ()
    ) -> list[Reservation]:
        """The coordinator's decision: held stops become booked, or are dropped.

        ``also_store`` goes into the same transaction: a coordinator stores its decision
        and applies it to its own stops at once.
        """
        what = f"{'commit' if commit else 'abort'} {txn_id}"
        mutate = self._resolving(coordinator, txn_id, trip_id, commit, also_store)
        return await self.books.apply(Actor("coordinator", coordinator), what, mutate)

    def _resolving(
        self, coordinator: str, txn_id: str, trip_id: str, commit: bool, also_store: tuple[Op, ...] = ()
    ) -> Callable[[], Change[list[Reservation]]]:
        books = self.books

        def mutate() -> Change[list[Reservation]]:
            held = [r for r in self._stops(coordinator, trip_id) if r.state == "held" and r.txn_id == txn_id]
            for r in held:
                if commit:
                    r.state = "booked"
                    books.watch(r)
                    r.hold_deadline = None
                else:
                    books.leave_live(r, "aborted")
            reason = "booked" if commit else "aborted"
            return Change(held, [*(put_reservation(r) for r in held), *also_store], [(r, reason) for r in held])

        return mutate

    async def release_trip(self, coordinator: str, trip_id: str, also_store: tuple[Op, ...] = ()) -> list[Reservation]:
        """Cancel the trip's booked stops here (only its coordinator may); idempotent.

        ``also_store`` goes into the same transaction (the coordinator's own cancellation).
        """
        mutate = self._releasing(coordinator, trip_id, also_store)
        return await self.books.apply(Actor("coordinator", coordinator), f"release trip {trip_id}", mutate)

    def _releasing(
        self, coordinator: str, trip_id: str, also_store: tuple[Op, ...] = ()
    ) -> Callable[[], Change[list[Reservation]]]:
        books = self.books

        def mutate() -> Change[list[Reservation]]:
            # Held stops too: a cancellation can overtake the commit it follows.
            freed = [r for r in self._stops(coordinator, trip_id) if r.state in ("booked", "held")]
            for r in freed:
                books.leave_live(r, "cancelled")
            ops = [*(put_reservation(r) for r in freed), *also_store]
            return Change(freed, ops, [(r, "trip cancelled") for r in freed])

        return mutate

    async def batch(
        self,
        coordinator: str,
        items: Sequence[p.TwoPhaseItem],
        also_store: Sequence[tuple[Op, ...]] = (),
        allowed: Callable[[p.TwoPhaseItem], EvchargeError | None] | None = None,
    ) -> list[p.Vote | p.Ok | p.Error]:
        """Several trips' PREPAREs, decisions and releases of one coordinator: one writer section, one commit.

        Each item is taken in order exactly as it would be alone: a NO or an error for
        one (``allowed`` may refuse one before it is looked at) never touches the others.
        ``also_store[i]`` is written in the same transaction as item ``i`` (the
        coordinator's own trip rows, when it is its own participant).
        """

        def mutate() -> Change[list[p.Vote | p.Ok | p.Error]]:
            results: list[p.Vote | p.Ok | p.Error] = []
            ops: list[Op] = []
            changed: list[tuple[Reservation, str]] = []
            for i, item in enumerate(items):
                also = also_store[i] if also_store else ()
                try:
                    refused = allowed(item) if allowed is not None else None
                    if refused is not None:
                        raise refused
                    match item:
                        case p.Prepare():
                            vote = self._holding(coordinator, item)()
                            results.append(vote.result)
                            ops.extend(vote.ops)
                            changed.extend(vote.changed)
                        case p.Decide(txn_id=txn_id, trip_id=trip_id, commit=commit):
                            done = self._resolving(coordinator, txn_id, trip_id, commit)()
                            results.append(p.Ok())
                            ops.extend(done.ops)
                            changed.extend(done.changed)
                        case p.ReleaseTrip(trip_id=trip_id):
                            done = self._releasing(coordinator, trip_id)()
                            results.append(p.Ok())
                            ops.extend(done.ops)
                            changed.extend(done.changed)
                except EvchargeError as exc:  # refused before it changed anything (see _stops)
                    results.append(exc.to_reply(0))
                    continue
                ops.extend(also)
            return Change(results, ops, changed)

        what = f"{len(items)} two-phase-commit messages"
        return await self.books.apply(Actor("coordinator", coordinator), what, mutate)

    async def withdraw(self, actor: Actor, reservation_id: str) -> Reservation:
        """This operator takes back a booked trip stop whose charge point is out of service.

        The stop is cancelled here at once; its coordinator is told (until it acknowledges,
        see ``told``), and the trip then shows the stop as lost.
        """
        books = self.books

        def mutate() -> Change[Reservation]:
            r = books.owned(actor, reservation_id)
            if r.state in ("cancelled", "expired", "completed", "aborted"):
                return Change(r)  # withdrawn (or over) already
            cp = books.charge_points.get(r.charge_point_id)
            broken = cp.out_of_service if cp is not None else "gone from the world"
            if r.trip_id is None or r.coordinator is None or r.state != "booked" or not broken:
                raise ConflictError(
                    f"reservation {reservation_id} is a stop of trip {r.trip_id} ({r.state}); cancel the trip, or "
                    f"take charge point {r.charge_point_id} out of service first to withdraw the stop"
                )
            books.leave_live(r, "cancelled")
            reason = f"withdrawn by operator {books.operator_id}: charge point {r.charge_point_id} is {broken}"
            withdrawal = Withdrawal(r.id, r.trip_id, r.coordinator, reason)
            self.untold[r.id] = withdrawal
            return Change(r, [put_reservation(r), _put_withdrawal(withdrawal)], [(r, reason)])

        return await books.apply(actor, f"withdraw trip stop {reservation_id}", mutate)

    async def told(self, withdrawal: Withdrawal) -> None:
        """Its coordinator acknowledged a withdrawal: stop telling it."""

        def mutate() -> Change[None]:
            if self.untold.get(withdrawal.reservation_id) is not withdrawal:
                return Change(None)
            del self.untold[withdrawal.reservation_id]
            withdrawal.told = True
            return Change(None, [_put_withdrawal(withdrawal)])

        await self.books.apply(Actor("coordinator", withdrawal.coordinator), "withdrawal acknowledged", mutate)

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


def _put_withdrawal(withdrawal: Withdrawal) -> Op:
    return put_meta(WITHDRAWN_META + withdrawal.reservation_id, json.dumps(dataclasses.asdict(withdrawal)))
