"""An operator's books in memory, and the one way to change them: ``Books.apply``.

Reads (queries, status) take the reader side of one async reader-writer lock;
changes take the writer side, apply in memory, and queue their SQL for the
store. The lock is released before waiting for the commit, and the caller is
answered only after that commit, so nothing is acknowledged that a crash could
lose, and no lock is ever held across I/O. Every write of the store goes
through ``apply``: reservations, charging sessions, the trip rows a
coordinator keeps.

If the store fails, the change is refused with ``unavailable``; memory is then
rebuilt from what is on disk once the store can write again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import aiorwlock

from evcharge.domain.clock import SimClock
from evcharge.domain.ledger import Ledger
from evcharge.domain.model import ChargeRecord, ChargingSession, Outcome, Reservation, Trip
from evcharge.domain.world import ChargePointConfig, Rules, StationConfig, World
from evcharge.operator.store import Op, StoredState, StoreError, StoreInDoubt, StoreLost, ThreadedStore
from evcharge.wire.errors import NotFoundError, RequestTimeoutError, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN = 60
RECOVERY_WAIT = 10.0  # seconds a refused change waits for memory to be re-read from the store


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: a vehicle acts for itself, a charge point for itself, an operator for all of its state."""

    role: str
    ident: str
    via: str = ""  # the home operator speaking for a visiting vehicle

    def __str__(self) -> str:
        return f"{self.role} {self.ident}" + (f" via operator {self.via}" if self.via else "")


@dataclass(slots=True)
class ChargePointState:
    config: ChargePointConfig
    station: StationConfig
    ledger: Ledger = field(default_factory=Ledger)
    online: bool = False
    faulted: bool = False
    unavailable: bool = False  # out of service on purpose (not broken)
    charging: str | None = None  # reservation being charged

    @property
    def out_of_service(self) -> str | None:
        """Why nobody can reserve or charge here now, if so: ``faulted`` or ``unavailable``."""
        if self.faulted:
            return "faulted"
        return "unavailable" if self.unavailable else None


class Listener(Protocol):
    """Told of every change once it is durable (the pushes to connected clients)."""

    def reservation_changed(self, reservation: Reservation, reason: str) -> None: ...

    def charge_point_changed(self, cp_id: str) -> None: ...


@dataclass(slots=True)
class Change(Generic[T]):
    """What a change made in memory: its result, the store writes, the reservations to announce."""

    result: T
    ops: list[Op] = field(default_factory=list)
    changed: list[tuple[Reservation, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Reload:
    consistent: asyncio.Event  # set once memory matches the disk again
    task: asyncio.Task[None]


class Books:
    def __init__(self, world: World, operator_id: str, store: ThreadedStore, clock: SimClock) -> None:
        self.world = world
        self.operator_id = operator_id
        self.rules: Rules = world.rules
        self.store = store
        self.clock = clock
        # fast: no yield to the loop after each acquire (every section under it is synchronous).
        self.lock = aiorwlock.RWLock(fast=True)
        self.listeners: list[Listener] = []
        # Called with what the store holds whenever memory is (re)built from it, after the rest.
        self.loaders: list[Callable[[StoredState], None]] = []
        self.stations: dict[str, StationConfig] = {s.id: s for s in world.stations_of(operator_id)}
        self.charge_points: dict[str, ChargePointState] = {
            cp.id: ChargePointState(cp, s) for s in self.stations.values() for cp in s.charge_points
        }
        self.reservations: dict[str, Reservation] = {}
        self.by_vehicle: dict[str, list[Reservation]] = {}
        self.by_trip: dict[str, list[Reservation]] = {}  # trip stops here (also holds, by txn)
        # (when it falls due, reservation id) heaps; entries of reservations that moved on are skipped.
        self.no_show_due: list[tuple[float, str]] = []  # booked: simulated seconds
        self.reminder_due: list[tuple[float, str]] = []  # booked, the driver not yet reminded: simulated seconds
        self.hold_due: list[tuple[float, str]] = []  # held: real seconds
        self.sessions: dict[str, ChargingSession] = {}
        self.positions: dict[str, tuple[float, float]] = {}
        # The trips this operator coordinates; a row is the two-phase commit's decision record.
        self.trips: dict[str, Trip] = {}
        self.trips_by_txn: dict[str, Trip] = {}
        # Answers to keyed requests, by (scope, key); see outcomes.py.
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        # Our vehicles' sessions at other operators' chargers, by reservation id.
        self.records: dict[str, ChargeRecord] = {}
        self._reload: _Reload | None = None
        store.on_failure = self._ensure_reload

    # --- loading ---------------------------------------------------------------------

    def load(self, state: StoredState) -> None:
        """Replace reservations, sessions and trips with what the store holds."""
        for cp in self.charge_points.values():
            cp.ledger = Ledger()
            cp.charging = None
        self.reservations = {}
        self.by_vehicle = {}
        self.by_trip = {}
        self.no_show_due = []
        self.reminder_due = []
        self.hold_due = []
        for r in state.reservations:
            if r.charge_point_id not in self.charge_points:
                log.warning("reservation %s names unknown charge point %s; kept as is", r.id, r.charge_point_id)
            self.index(r)
        self.sessions = {s.reservation_id: s for s in state.sessions}
        self.trips = {}
        self.trips_by_txn = {}
        for trip in state.trips:
            self.remember_trip(trip)
        # In the order they were made: forgetting the old ones looks at the front only.
        self.outcomes = {(o.scope, o.key): o for o in sorted(state.outcomes, key=lambda o: o.created)}
        self.records = {r.reservation_id: r for r in state.records}
        for loader in self.loaders:
            loader(state)

    def index(self, r: Reservation) -> None:
        self.reservations[r.id] = r
        self.by_vehicle.setdefault(r.vehicle_id, []).append(r)
        if r.trip_id is not None:
            self.by_trip.setdefault(r.trip_id, []).append(r)
        cp = self.charge_points.get(r.charge_point_id)
        if cp is not None and r.live:
            cp.ledger.add(r.start, r.end, r.id)
            if r.state == "charging":
                cp.charging = r.id
        self.watch(r)

    def watch(self, r: Reservation) -> None:
        """Remember when a booked or held reservation falls due, so sweeps look only there."""
        if r.state == "booked":
            due = min(r.start + self.rules.no_show_grace_min * MIN, r.end)
            heapq.heappush(self.no_show_due, (due, r.id))
            heapq.heappush(self.reminder_due, (r.start - self.rules.reserved_soon_min * MIN, r.id))
        elif r.state == "held":
            heapq.heappush(self.hold_due, (r.hold_deadline or 0.0, r.id))

    def leave_live(self, r: Reservation, state: str) -> None:
        cp = self.charge_points.get(r.charge_point_id)  # None: a charge point gone from the world
        if cp is not None and r.live:
            cp.ledger.remove(r.start, r.id)
        if cp is not None and cp.charging == r.id:
            cp.charging = None
        r.state = state

    def remember_trip(self, trip: Trip) -> None:
        """A trip row as stored (call only once it is durable: it answers participants in doubt)."""
        self.trips[trip.id] = trip
        self.trips_by_txn[trip.txn_id] = trip

    # --- lookups ------------------------------------------------------------------

    def reservation(self, reservation_id: str) -> Reservation:
        r = self.reservations.get(reservation_id)
        if r is None:
            raise NotFoundError(f"no reservation {reservation_id!r}")
        return r

    def owned(self, actor: Actor, reservation_id: str) -> Reservation:
        """The reservation, if ``actor`` may see and change it."""
        r = self.reservations.get(reservation_id)
        # Someone else's reservation is answered as if it did not exist: not even that is disclosed.
        if (
            r is None
            or (actor.role == "vehicle" and r.vehicle_id != actor.ident)
            or (actor.role == "station" and r.charge_point_id != actor.ident)
        ):
            raise NotFoundError(f"no reservation {reservation_id!r}")
        return r

    def charge_point(self, cp_id: str) -> ChargePointState:
        cp = self.charge_points.get(cp_id)
        if cp is None:
            raise NotFoundError(f"no charge point {cp_id!r} at operator {self.operator_id}")
        return cp

    # --- the one way to change state -----------------------------------------------

    async def apply(
        self,
        actor: Actor | str,
        what: str,
        mutate: Callable[[], Change[T]],
        remember: Callable[[T], Op] | None = None,
    ) -> T:
        """Run ``mutate`` under the writer lock, store what it wrote, then announce it.

        ``remember`` turns the result into one more write of the same transaction: the
        answer kept under a keyed request's key (outcomes.py), durable with the change.
        """
        if self.store.failed:
            self._ensure_reload()
            raise UnavailableError("the operator's store cannot be written; changes are refused for now")
        async with self.lock.writer_lock:
            change = mutate()
            if remember is not None:
                change.ops.append(remember(change.result))
        try:
            # Even a change that writes nothing waits for what is queued before it: a
            # repeated request must not be acknowledged before the first one is durable.
            await self.store.commit(change.ops)
        except StoreError as exc:
            log.error("%s by %s refused: %s", what, actor, exc)
            # Answer once memory matches the disk again, but never wait without end for it:
            # the store refuses every change until then anyway.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECOVERY_WAIT):
                    await self._ensure_reload().consistent.wait()
            if isinstance(exc, StoreInDoubt):  # the database may have committed it: not "nothing happened"
                raise RequestTimeoutError(
                    "the store's connection broke while committing: whether the change was made is not known "
                    "yet; ask again with the same key"
                ) from None
            raise UnavailableError("the change could not be stored; it was not made") from None
        if change.ops:
            log.info("%s by %s", what, actor)
        for reservation, reason in change.changed:
            for listener in self.listeners:
                try:
                    listener.reservation_changed(reservation, reason)
                except Exception:  # a push that fails must not turn a stored change into an error
                    log.exception("listener failed on %s", reservation.id)
        return change.result

    def _ensure_reload(self) -> _Reload:
        """After a failed commit: make memory match the disk, then wait until writes work."""
        if self._reload is None or self._reload.task.done():
            self._reload = _Reload(asyncio.Event(), asyncio.get_running_loop().create_task(self._reread()))
        return self._reload

    async def _reread(self) -> None:
        assert self._reload is not None
        delay = 0.2
        while True:
            try:
                state = await self.store.reread()
                break
            except StoreLost:  # another server of this operator serves from the store now: nothing to re-read
                self._reload.consistent.set()
                return
            except StoreError as exc:
                log.error("cannot re-read the store: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        async with self.lock.writer_lock:
            self.load(state)
        self._reload.consistent.set()
        log.warning("state reloaded from the store; changes refused until it can write again")
        delay = 0.2
        while not await self.store.probe():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self.store.resume()
        log.warning("store writable again; accepting changes")

    async def stop(self) -> None:
        if self._reload is not None:
            self._reload.task.cancel()
            await asyncio.gather(self._reload.task, return_exceptions=True)

    # --- charge point liveness (memory only: a restart learns it again) ----------------

    def set_online(self, cp_id: str, online: bool) -> None:
        cp = self.charge_points[cp_id]
        if cp.online != online:
            cp.online = online
            log.info("charge point %s %s", cp_id, "online" if online else "offline")
            self.charge_point_changed(cp_id)

    def set_reported(self, cp_id: str, status: str) -> None:
        """What the charge point says of itself: in service, broken, or out of service on purpose."""
        cp = self.charge_points[cp_id]
        before = cp.out_of_service
        cp.faulted = status == "faulted"
        cp.unavailable = status == "unavailable"
        if cp.out_of_service != before:
            log.info("charge point %s %s", cp_id, cp.out_of_service or "available again")
            self.charge_point_changed(cp_id)

    def charge_point_changed(self, cp_id: str) -> None:
        for listener in self.listeners:
            listener.charge_point_changed(cp_id)
