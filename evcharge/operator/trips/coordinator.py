"""This operator as a trip's coordinator: two-phase commit with presumed abort.

A vehicle's home server books a trip whose stops belong to several operators,
each a participant (the home server is one too, for its own stops):

1. PREPARE goes to every owner in parallel; each checks and holds all its
   stops in one writer section, stores the holds, and votes YES (or NO with the
   conflicting stops). Holds carry a deadline.
2. All YES before the deadline: the coordinator stores the trip row (that row
   *is* the COMMIT record) and only then tells everyone. Anything else: ABORT.
   No row for a transaction means it aborted.
3. A participant that voted YES never decides alone: once the deadline has
   passed it asks the coordinator (``outcome``) until it gets an answer. A
   coordinator that restarts re-sends the decisions its store says are not yet
   acknowledged (``recovery``).
4. On NO the coordinator re-plans around the conflicts and tries again
   (``MAX_ATTEMPTS``), so the losers of a race still get a trip if one exists.

Every trip row is written through ``Books.apply`` (the one commit engine),
with the coordinator's own stops in the same transaction. Deadlines here are
real (wall-clock) seconds: they are about the network, not the simulated road.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from evcharge.domain import planner
from evcharge.domain.clock import to_datetime
from evcharge.domain.model import Trip
from evcharge.domain.world import VehicleConfig
from evcharge.operator.crash_points import crash_point
from evcharge.operator.fair import FairQueue
from evcharge.operator.ids import new_id
from evcharge.operator.pushes import Online
from evcharge.operator.state import Actor, Books, Change
from evcharge.operator.store import Op, StoreError, put_trip, put_trip_unacked
from evcharge.operator.trips.batching import Batcher, Result
from evcharge.operator.trips.participant import Participant
from evcharge.operator.trips.peers import PEER_TIMEOUT, Peers
from evcharge.operator.trips.planning import Planning
from evcharge.operator.views import planned_trip_info, trip_info, trip_json
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, EvchargeError, ForbiddenError, NotFoundError, UnavailableError

log = logging.getLogger(__name__)

PREPARE_TIMEOUT = 5.0  # real seconds from PREPARE to decision
MAX_ATTEMPTS = 4  # plans tried per booking
RETRY_JITTER = 0.1  # seconds (times the attempt) of random delay before re-planning
MAX_REASON = 200  # characters of a peer's reason for a lost stop that the trip keeps
# Bookings (their two-phase commits) under way at once; beyond, vehicles take turns, so that
# one vehicle's flood of bookings does not hold everyone else's up (as for plans).
BOOKINGS_AT_ONCE = 32
MAX_BOOKINGS_WAITING = 1024  # per vehicle; more are refused (unavailable)


@dataclass(slots=True)
class _Txn:
    """A booking this coordinator has not decided yet."""

    state: str  # preparing | committing | committed | aborted
    deadline: float
    owners: list[str]  # the participants: only they may ask how it ended


@dataclass(frozen=True, slots=True)
class Booked:
    trip: p.TripInfo
    attempts: int  # plans tried (more than one: re-planned around lost slots)
    as_shown: bool  # the plan shown as the booking's plan id, booked as it was


@dataclass(frozen=True, slots=True)
class TripCancelled:
    trip: p.TripInfo
    already: bool  # it was cancelled before: nothing was done now


@dataclass(slots=True)
class _Outcome:
    trip: p.TripInfo | None = None
    conflicts: str = ""


class Coordinator:
    def __init__(self, books: Books, participant: Participant, peers: Peers, planning: Planning, online: Online):
        self.books = books
        self.me = books.operator_id
        self.participant = participant
        self.peers = peers
        self.planning = planning
        self.online = online
        self.active: dict[str, _Txn] = {}
        # (trip id, state) of the decisions being delivered now: a cancellation is delivered
        # even while its commit still is (an owner takes either order).
        self.sending: set[tuple[str, str]] = set()
        self.storing_acks: set[str] = set()  # trips whose acknowledgements are being stored
        self._background: set[asyncio.Task[None]] = set()  # decisions being delivered, acknowledgements stored
        self._stopping = False
        self._booking: set[str] = set()  # ids of the trips being booked now (not stored yet)
        self._trip_locks: dict[str, asyncio.Lock] = {}
        self._writing: set[str] = set()  # trips whose row is being changed under their lock (_update_trip)
        self._turns = FairQueue(BOOKINGS_AT_ONCE, MAX_BOOKINGS_WAITING, "trip bookings")
        self._batchers: dict[str, Batcher] = {}  # per owner: concurrent trips' messages share frames and commits
        self._acks: dict[str, tuple[str, set[str]]] = {}  # trip id -> (its state, who acknowledged): to store
        self._acks_writer: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(b.stop() for b in self._batchers.values()), return_exceptions=True)

    def batcher(self, owner: str) -> Batcher:
        """The batches to one owner: ourselves (our own participant, directly), or a peer over its link."""
        batcher = self._batchers.get(owner)
        if batcher is not None:
            return batcher
        if owner == self.me:

            async def send(items: list[p.TwoPhaseItem], also: list[tuple[Op, ...]], deadline: float) -> list[Result]:
                return await self.participant.batch(self.me, items, also)

        else:
            link = self.peers.link(owner)

            async def send(items: list[p.TwoPhaseItem], also: list[tuple[Op, ...]], deadline: float) -> list[Result]:
                batch = p.TwoPhaseBatch(items=items)
                return (await link.call(batch, p.TwoPhaseResults, timeout=deadline - time.time())).results

        batcher = self._batchers[owner] = Batcher(f"operator {owner}", send)
        return batcher

    # --- booking ------------------------------------------------------------------------

    async def book(
        self,
        vehicle: VehicleConfig,
        query: p.TripQuery,
        plan_id: str = "",
        remember: Callable[[Booked], Op] | None = None,
    ) -> Booked:
        """Book a trip: the plan shown as ``plan_id`` if its slots are still free, else a fresh plan.

        ``remember`` (outcomes.py) is stored in the transaction of the COMMIT record. A
        vehicle's bookings take their turns (at most a few at once per vehicle).
        """
        async with self._turns.turn(vehicle.id):
            trip_id = new_id(f"{self.me}-T", self.books.trips, self._booking)
            self._booking.add(trip_id)
            try:
                return await self._book(trip_id, vehicle, query, plan_id, remember)
            finally:
                self._booking.discard(trip_id)

    async def _book(
        self,
        trip_id: str,
        vehicle: VehicleConfig,
        query: p.TripQuery,
        plan_id: str,
        remember: Callable[[Booked], Op] | None,
    ) -> Booked:
        conflicts = ""
        shown = self.planning.shown_plan(vehicle.id, query, plan_id) if plan_id else None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            as_shown = shown is not None
            if shown is not None:
                plan = shown
                self.planning.claim(trip_id, plan)
            else:
                plan = await self.planning.plan(vehicle, query, claim=trip_id)
            shown = None  # a plan that lost its slots is re-planned, not retried

            def booked(info: p.TripInfo, attempt: int = attempt, as_shown: bool = as_shown) -> Booked:
                return Booked(info, attempt, as_shown)

            try:
                outcome = await self._two_phase(
                    trip_id, f"{trip_id}.{attempt}", vehicle.id, query, plan, booked, remember
                )
            except BaseException:
                self.planning.unclaim(trip_id)
                raise
            if outcome.trip is not None:
                # Plans whose availability was read before these holds were placed still
                # need the claim for a moment.
                self.planning.unclaim(trip_id, later=True)
                return booked(outcome.trip)
            self.planning.unclaim(trip_id)
            conflicts = outcome.conflicts
            log.info("trip %s attempt %d lost a race (%s); re-planning", trip_id, attempt, conflicts)
            # The losers of one race would all re-plan onto the same next-best slots at once:
            # a little random delay lets the winners' holds show in the next availability.
            await asyncio.sleep(random.uniform(0, RETRY_JITTER * attempt))
        raise ConflictError(f"no trip: every plan lost its slots to other bookings ({MAX_ATTEMPTS} tries; {conflicts})")

    async def _two_phase(
        self,
        trip_id: str,
        txn_id: str,
        vehicle_id: str,
        query: p.TripQuery,
        plan: planner.Plan,
        booked: Callable[[p.TripInfo], Booked],
        remember: Callable[[Booked], Op] | None,
    ) -> _Outcome:
        by_owner: dict[str, list[int]] = {}
        for i, stop in enumerate(plan.stops):
            by_owner.setdefault(stop.option.operator_id, []).append(i)
        deadline = time.time() + PREPARE_TIMEOUT
        txn = _Txn("preparing", deadline, list(by_owner))
        self.active[txn_id] = txn
        try:
            owners = list(by_owner)
            votes = await asyncio.gather(
                *(
                    self._prepare_at(owner, txn_id, trip_id, vehicle_id, plan, by_owner[owner], deadline)
                    for owner in owners
                ),
                return_exceptions=True,
            )
            failed = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, BaseException)}
            noes = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, p.Vote) and not v.yes}
            yes = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, p.Vote) and v.yes}
            if not failed and not noes and txn.state == "preparing" and time.time() < deadline:
                txn.state = "committing"
                also = (lambda info: (remember(booked(info)),)) if remember is not None else None
                trip = await self._commit(trip_id, txn_id, vehicle_id, query, plan, by_owner, yes, also)
                txn.state = "committed"
                return _Outcome(trip=trip)
            txn.state = "aborted"
            # Everyone, not only those that said YES: a late PREPARE may still place holds.
            await self._tell_abort(txn_id, trip_id, owners)
            for exc in failed.values():
                if not isinstance(exc, EvchargeError):
                    raise exc
            if failed:
                names = ", ".join(f"{o} ({e})" for o, e in failed.items())
                raise UnavailableError(f"trip not booked: operator {names}; nothing was held")
            if any(not v.conflicts for v in noes.values()):
                reasons = "; ".join(f"{o}: {v.reason}" for o, v in noes.items())
                raise ConflictError(f"trip not booked: {reasons}")
            return _Outcome(
                conflicts=", ".join(f"{c.charge_point_id}@{o}" for o, v in noes.items() for c in v.conflicts)
            )
        except BaseException:
            if txn.state in ("preparing", "committing"):
                txn.state = "aborted"
            raise
        finally:
            self.active.pop(txn_id, None)

    async def _prepare_at(
        self,
        owner: str,
        txn_id: str,
        trip_id: str,
        vehicle_id: str,
        plan: planner.Plan,
        indexes: list[int],
        deadline: float,
    ) -> p.Vote:
        stops = [
            p.StopRequest(
                charge_point_id=plan.stops[i].option.charge_point_id,
                start=to_datetime(plan.stops[i].slot_start),
                end=to_datetime(plan.stops[i].slot_end),
            )
            for i in indexes
        ]
        prepare = p.Prepare(txn_id=txn_id, trip_id=trip_id, vehicle_id=vehicle_id, stops=stops, deadline=deadline)
        timeout = None if owner == self.me else deadline - time.time()
        vote = await self.batcher(owner).submit(prepare, timeout)
        if not isinstance(vote, p.Vote):
            raise UnavailableError(f"operator {owner} answered a PREPARE with {type(vote).__name__}")
        return vote

    async def _commit(
        self,
        trip_id: str,
        txn_id: str,
        vehicle_id: str,
        query: p.TripQuery,
        plan: planner.Plan,
        by_owner: dict[str, list[int]],
        votes: dict[str, p.Vote],
        also: Callable[[p.TripInfo], tuple[Op, ...]] | None,
    ) -> p.TripInfo:
        reservation_of: dict[int, str] = {}
        for owner, indexes in by_owner.items():
            reservation_of.update(zip(indexes, votes[owner].reservation_ids, strict=True))
        info = planned_trip_info(trip_id, vehicle_id, self.me, query, plan, reservation_of, state="committed")
        trip = Trip(
            id=trip_id,
            vehicle_id=vehicle_id,
            state="committed",
            txn_id=txn_id,
            participants=list(by_owner),
            unacked=[owner for owner in by_owner if owner != self.me],  # ours decide with the row
            info=trip_json(info),
            created=int(self.books.clock.now()),
        )
        try:
            # The COMMIT record: durable before anyone hears of it.
            await self._store_decision(trip, also(info) if also is not None else ())
        except (StoreError, UnavailableError):
            await self._tell_abort(txn_id, trip_id, list(by_owner))
            raise UnavailableError("the trip could not be stored; it was not booked") from None
        self.books.remember_trip(trip)
        crash_point("coordinator-committed")
        log.info(
            "trip %s committed for vehicle %s: %d stops at %s", trip_id, vehicle_id, len(plan.stops), trip.participants
        )
        # Booked from here on, whatever happens to the messages: the vehicle hears at once, and
        # the other owners beside it. Until they hear they hold the stops (nobody else gets
        # them), and the resolver keeps telling those that did not answer.
        self._spawn(self.deliver(trip))
        self.online.trip_changed(info, "booked")
        return info

    async def _store_decision(self, trip: Trip, also: tuple[Op, ...] = ()) -> None:
        """Store a trip's row (its decision); our own stops take the decision in the same transaction.

        ``also`` is written in that transaction too (the outcome kept under the request's key).
        """
        row = (put_trip(trip), *also)
        if self.me not in trip.participants:
            await self._store_row(trip, also)
        elif trip.state == "committed":
            decide = p.Decide(txn_id=trip.txn_id, trip_id=trip.id, commit=True)
            await self.batcher(self.me).submit(decide, None, also=row)
        else:
            await self.batcher(self.me).submit(p.ReleaseTrip(trip_id=trip.id), None, also=row)

    async def _store_row(self, trip: Trip, also: tuple[Op, ...] = ()) -> None:
        ops = [put_trip(trip), *also]
        await self.books.apply(Actor("coordinator", self.me), f"store trip {trip.id}", lambda: Change(None, ops))

    # --- telling the participants -----------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the request that started it; ``stop`` cancels what is left."""
        if self._stopping:  # nobody would wait for it; what it would store is redone after a restart
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def _tell(self, owner: str, trip_id: str, txn_id: str, decision: str) -> None:
        """Deliver one decision ("commit", "abort" or "release") to one owner."""
        request: p.TwoPhaseItem
        if decision == "release":
            request = p.ReleaseTrip(trip_id=trip_id)
        else:
            request = p.Decide(txn_id=txn_id, trip_id=trip_id, commit=decision == "commit")
        await self.batcher(owner).submit(request, None if owner == self.me else PEER_TIMEOUT)

    async def _tell_abort(self, txn_id: str, trip_id: str, owners: list[str]) -> None:
        """Best effort: a participant not reached asks us after its deadline."""
        results = await asyncio.gather(
            *(self._tell(o, trip_id, txn_id, "abort") for o in owners), return_exceptions=True
        )
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, BaseException):
                log.info("abort of %s not delivered to %s (it will ask): %s", txn_id, owner, result)

    async def deliver(self, trip: Trip) -> None:
        """Tell the participants not yet told the trip's latest decision; store who acknowledged.

        Who acknowledged is stored after this returns, with other trips' acknowledgements:
        a decision sent again (after a crash, or by the resolver before the write) is
        acknowledged again: deciding is idempotent.
        """
        key = (trip.id, trip.state)
        if key in self.sending or not trip.unacked:
            return
        self.sending.add(key)
        try:
            decision = "commit" if trip.state == "committed" else "release"
            owners = list(trip.unacked)
            results = await asyncio.gather(
                *(self._tell(o, trip.id, trip.txn_id, decision) for o in owners), return_exceptions=True
            )
            acked: set[str] = set()
            for owner, result in zip(owners, results, strict=True):
                if isinstance(result, BaseException):
                    log.info("trip %s: decision not delivered to %s yet: %s", trip.id, owner, result)
                else:
                    acked.add(owner)
            if acked:
                self._store_acks(trip, acked)
        finally:
            self.sending.discard(key)

    def _store_acks(self, trip: Trip, acked: set[str]) -> None:
        """Store who acknowledged, with the acknowledgements of other trips: one writer section, one commit."""
        self.storing_acks.add(trip.id)
        state, before = self._acks.get(trip.id, (trip.state, set()))
        self._acks[trip.id] = (trip.state, acked | before if state == trip.state else acked)
        if self._acks_writer is None or self._acks_writer.done():
            if self._stopping:  # what it would store is redone after a restart (the decision is sent again)
                return
            self._acks_writer = asyncio.get_running_loop().create_task(self._write_acks())
            self._background.add(self._acks_writer)
            self._acks_writer.add_done_callback(self._background_done)

    async def _write_acks(self) -> None:
        while self._acks:
            taken, self._acks = self._acks, {}

            def mutate(taken: dict[str, tuple[str, set[str]]] = taken) -> Change[None]:
                ops: list[Op] = []
                for trip_id, (state, acked) in taken.items():
                    current = self.books.trips.get(trip_id)
                    # A row being rewritten now (a cancellation, say) is not overwritten with
                    # what it was; a newer decision is delivered afresh: its own acks follow.
                    if current is None or current.state != state or trip_id in self._writing:
                        continue
                    unacked = [o for o in current.unacked if o not in acked]
                    if unacked != current.unacked:
                        updated = replace(current, unacked=unacked)
                        # Memory first, under the writer lock, as every change: a failed commit reloads it.
                        self.books.remember_trip(updated)
                        ops.append(put_trip_unacked(updated))
                return Change(None, ops)

            try:
                await self.books.apply(Actor("coordinator", self.me), f"acknowledgements of {len(taken)} trips", mutate)
            except (StoreError, UnavailableError) as exc:
                log.warning("acknowledgements of %d trips not stored (sent again later): %s", len(taken), exc)
            finally:
                for trip_id in taken:
                    if trip_id not in self._acks:
                        self.storing_acks.discard(trip_id)

    async def _update_trip(
        self,
        trip_id: str,
        change: Callable[[Trip], Trip | None],
        write: Callable[[Trip], Awaitable[None]] | None = None,
    ) -> Trip:
        """Store a change of a trip's row (with ``write``, by default the row alone), from its latest version.

        The per-trip lock orders the writes of that one row (a cancellation must not be
        overwritten by a late acknowledgement computed before it); nothing else waits on it.
        """
        async with self._trip_locks.setdefault(trip_id, asyncio.Lock()):
            self._writing.add(trip_id)
            try:
                current = self.books.trips[trip_id]
                updated = change(current)
                if updated is None:
                    return current
                await (write or self._store_row)(updated)
                self.books.remember_trip(updated)
                return updated
            finally:
                self._writing.discard(trip_id)

    def outcome(self, txn_id: str, asker: str) -> p.Outcome:
        """What a participant in doubt is told (presumed abort); anyone else is ``forbidden``."""
        trip = self.books.trips_by_txn.get(txn_id)
        txn = self.active.get(txn_id)
        if asker not in (trip.participants if trip else txn.owners if txn else [asker]):
            raise ForbiddenError(f"operator {asker} takes no part in {txn_id}")
        if trip is not None:
            return "commit"
        if txn is None:
            return "abort"
        if txn.state == "preparing" and time.time() >= txn.deadline:
            txn.state = "aborted"  # too late: it can no longer commit
        if txn.state in ("preparing", "committing"):
            return "pending"
        return "commit" if txn.state == "committed" else "abort"

    # --- a stop its owner withdrew ---------------------------------------------------------------

    async def stop_withdrawn(self, owner: str, trip_id: str, reservation_id: str, reason: str) -> None:
        """The owner of one of a trip's stops took it back: the trip shows it lost, the driver is offered a re-plan.

        Idempotent: the owner tells us until we answer.
        """
        trip = self.books.trips.get(trip_id)
        if trip is None:
            raise NotFoundError(f"no trip {trip_id!r}")
        stop = next((s for s in trip_info(trip).stops if s.reservation_id == reservation_id), None)
        if stop is None or stop.operator_id != owner:
            raise ForbiddenError(f"reservation {reservation_id} is not a stop of trip {trip_id} at operator {owner}")
        if stop.lost or trip.state != "committed":
            return  # known already, or the whole trip is released anyway
        reason = reason[:MAX_REASON] or f"withdrawn by operator {owner}"

        def lose(current: Trip) -> Trip | None:
            info = trip_info(current)
            lost = next(s for s in info.stops if s.reservation_id == reservation_id)
            if lost.lost or current.state != "committed":
                return None
            lost.lost = reason
            return replace(current, info=trip_json(info))

        try:
            trip = await self._update_trip(trip_id, lose)
        except StoreError:
            raise UnavailableError("the lost stop could not be stored; tell it again") from None
        log.info("trip %s lost its stop %s at %s: %s", trip_id, reservation_id, owner, reason)
        # The owner (or our own resolver) waits for this answer only: the re-plan, which asks every
        # peer and queues behind the vehicle's own plans, is done beside it.
        where = f"{stop.city} ({stop.charge_point_id}, operator {owner})"
        self._spawn(self._offer_replan(trip, f"stop at {where} lost: {reason}"))

    async def _offer_replan(self, trip: Trip, reason: str) -> None:
        offer = await self._replan_offer(trip)
        self.online.trip_changed(trip_info(self.books.trips[trip.id]), reason, offer)

    async def _replan_offer(self, trip: Trip) -> p.TripOffer | None:
        """A fresh plan for a trip that lost a stop, shown to its vehicle; None if underway or none found."""
        info = trip_info(trip)
        if not info.stops or info.depart.timestamp() <= self.books.clock.now():
            return None  # the vehicle is on the road: where from is the driver's call
        vehicle = self.books.world.vehicle(trip.vehicle_id)
        first = info.stops[0]
        # Its charge at departure: what it arrived at the first stop with, plus what the drive there took.
        used = first.drive_km * vehicle.consumption_kwh_per_km / vehicle.battery_kwh * 100
        query = p.TripQuery(
            origin=info.origin,
            destination=info.destination,
            soc_pct=round(min(100.0, first.soc_in + used), 1),
            depart=info.depart,
        )
        try:
            plan = await self.planning.plan(vehicle, query)
        except EvchargeError as exc:
            log.info("trip %s: no new plan to offer: %s", trip.id, exc.message)
            return None
        plan_id = self.planning.show(vehicle.id, query, plan)
        return p.TripOffer(query=query, plan=planned_trip_info(plan_id, vehicle.id, self.me, query, plan))

    # --- trips as the vehicle sees them -------------------------------------------------

    def trips_of(self, vehicle_id: str, include_cancelled: bool) -> list[p.TripInfo]:
        return [
            trip_info(t)
            for t in self.books.trips.values()
            if t.vehicle_id == vehicle_id and (include_cancelled or t.state != "cancelled")
        ]

    async def cancel_trip(
        self, vehicle_id: str, trip_id: str, remember: Callable[[TripCancelled], Op] | None = None
    ) -> TripCancelled:
        """Cancel a trip; ``remember`` is stored with the cancellation."""
        trip = self.books.trips.get(trip_id)
        if trip is None or trip.vehicle_id != vehicle_id:  # someone else's trip is not disclosed
            raise NotFoundError(f"no trip {trip_id!r}")
        self.planning.unclaim(trip_id)  # its slots are free again for the next plans
        if trip.state == "cancelled":
            return TripCancelled(trip_info(trip), already=True)

        wrote: list[Trip] = []

        def write(updated: Trip) -> Awaitable[None]:
            wrote.append(updated)
            also = (remember(TripCancelled(trip_info(updated), already=False)),) if remember is not None else ()
            return self._store_decision(updated, also)

        def cancelled(current: Trip) -> Trip | None:
            if current.state == "cancelled":
                return None
            # Our own stops are released in the transaction that stores the cancellation.
            unacked = [owner for owner in current.participants if owner != self.me]
            return replace(current, state="cancelled", unacked=unacked)

        try:
            trip = await self._update_trip(trip_id, cancelled, write=write)
        except (StoreError, UnavailableError):
            raise UnavailableError("the cancellation could not be stored; the trip stands") from None
        if not wrote:  # another cancellation of it, at the same time, stored it first
            return TripCancelled(trip_info(trip), already=True)
        log.info("trip %s cancelled by vehicle %s", trip_id, vehicle_id)
        # Cancelled from here on; the other owners release their stops beside the reply, as
        # for a booking.
        self._spawn(self.deliver(trip))
        self.online.trip_changed(trip_info(trip), "cancelled")
        return TripCancelled(trip_info(trip), already=False)
