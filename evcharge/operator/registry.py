"""An operator's stations, charge points and reservations, in memory.

Reads (queries, status) take the reader side of one async reader-writer lock;
changes take the writer side, apply in memory, and queue their SQL for the
store. The lock is released before waiting for the commit, and the caller is
answered only after that commit, so nothing is acknowledged that a crash could
lose, and no lock is ever held across I/O.

If the store fails, the change is refused with ``unavailable``; memory is then
rebuilt from what is on disk once the store can write again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import aiorwlock

from evcharge.domain.clock import SimClock, to_datetime, to_seconds
from evcharge.domain.geo import great_circle_km
from evcharge.domain.ledger import Ledger
from evcharge.domain.model import ChargingSession, Reservation
from evcharge.domain.world import ChargePointConfig, StationConfig, World
from evcharge.operator.store import Op, Store, StoredState, StoreError, put_reservation, put_session
from evcharge.wire import protocol as p
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN = 60
RECOVERY_WAIT = 10.0  # seconds a refused change waits for memory to be re-read from the store
# Stops of one PREPARE. Checking them runs in one writer section, quadratic in their number:
# thousands (a frame holds ~15,000) would stall every connection for seconds. No trip has 100.
MAX_TRIP_STOPS = 100


def _minute(seconds: int) -> str:
    """A time for a message; a client's "year 1 at +05:00" is before the first datetime there is."""
    try:
        return f"{to_datetime(seconds):%Y-%m-%d %H:%M}Z"
    except (ValueError, OverflowError):
        return f"{seconds} s from 1970"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: a vehicle acts for itself, an operator for all of its state."""

    role: str
    ident: str

    def __str__(self) -> str:
        return f"{self.role} {self.ident}"


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
    def reservation_changed(self, reservation: Reservation, reason: str) -> None: ...

    def charge_point_changed(self, cp_id: str) -> None: ...


@dataclass(slots=True)
class _Change(Generic[T]):
    result: T
    ops: list[Op] = field(default_factory=list)
    changed: list[tuple[Reservation, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Recovery:
    consistent: asyncio.Event  # set once memory matches the disk again
    task: asyncio.Task[None]


class Registry:
    def __init__(self, world: World, operator_id: str, store: Store, clock: SimClock) -> None:
        self.world = world
        self.operator_id = operator_id
        self.rules = world.rules
        self.store = store
        self.clock = clock
        self.lock = aiorwlock.RWLock()
        self.listeners: list[Listener] = []
        self.stations: dict[str, StationConfig] = {s.id: s for s in world.stations_of(operator_id)}
        self.charge_points: dict[str, ChargePointState] = {
            cp.id: ChargePointState(cp, s) for s in self.stations.values() for cp in s.charge_points
        }
        self.reservations: dict[str, Reservation] = {}
        self.by_vehicle: dict[str, list[Reservation]] = {}
        self.by_trip: dict[str, list[Reservation]] = {}  # trip stops here (also holds, by txn)
        # (when it falls due, reservation id) heaps; entries of reservations that moved on are skipped.
        self._no_show_due: list[tuple[float, str]] = []  # booked: simulated seconds
        self._hold_due: list[tuple[float, str]] = []  # held: real seconds
        self.sessions: dict[str, ChargingSession] = {}
        self.positions: dict[str, tuple[float, float]] = {}
        self._recovery: _Recovery | None = None
        self.reload_hooks: list[Callable[[StoredState], None]] = []  # others whose memory the store backs
        store.on_failure = self._ensure_recovery

    # --- loading ---------------------------------------------------------------------

    def load(self, state: StoredState) -> None:
        """Replace reservations and sessions with what the store holds."""
        for cp in self.charge_points.values():
            cp.ledger = Ledger()
            cp.charging = None
        self.reservations = {}
        self.by_vehicle = {}
        self.by_trip = {}
        self._no_show_due = []
        self._hold_due = []
        for r in state.reservations:
            if r.charge_point_id not in self.charge_points:
                log.warning("reservation %s names unknown charge point %s; kept as is", r.id, r.charge_point_id)
            self._index(r)
        self.sessions = {s.reservation_id: s for s in state.sessions}

    def _index(self, r: Reservation) -> None:
        self.reservations[r.id] = r
        self.by_vehicle.setdefault(r.vehicle_id, []).append(r)
        if r.trip_id is not None:
            self.by_trip.setdefault(r.trip_id, []).append(r)
        cp = self.charge_points.get(r.charge_point_id)
        if cp is not None and r.live:
            cp.ledger.add(r.start, r.end, r.id)
            if r.state == "charging":
                cp.charging = r.id
        self._watch(r)

    def _watch(self, r: Reservation) -> None:
        """Remember when a booked or held reservation falls due, so sweeps look only there."""
        if r.state == "booked":
            due = min(r.start + self.rules.no_show_grace_min * MIN, r.end)
            heapq.heappush(self._no_show_due, (due, r.id))
        elif r.state == "held":
            heapq.heappush(self._hold_due, (r.hold_deadline or 0.0, r.id))

    def _leave_live(self, r: Reservation, state: str) -> None:
        cp = self.charge_points.get(r.charge_point_id)  # None: a charge point gone from the world
        if cp is not None and r.live:
            cp.ledger.remove(r.start, r.id)
        if cp is not None and cp.charging == r.id:
            cp.charging = None
        r.state = state

    # --- the one way to change state -----------------------------------------------

    async def _apply(self, actor: Actor, what: str, mutate: Callable[[], _Change[T]]) -> T:
        if self.store.failed:
            self._ensure_recovery()
            raise UnavailableError("the operator's store cannot be written; changes are refused for now")
        async with self.lock.writer_lock:
            change = mutate()
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
                    await self._ensure_recovery().consistent.wait()
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

    def _ensure_recovery(self) -> _Recovery:
        """After a failed commit: make memory match the disk, then wait until writes work."""
        if self._recovery is None or self._recovery.task.done():
            self._recovery = _Recovery(asyncio.Event(), asyncio.get_running_loop().create_task(self._recover()))
        return self._recovery

    async def _recover(self) -> None:
        assert self._recovery is not None
        delay = 0.2
        while True:
            try:
                state = await self.store.reread()
                break
            except StoreError as exc:
                log.error("cannot re-read the store: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        async with self.lock.writer_lock:
            self.load(state)
            for hook in self.reload_hooks:
                hook(state)
        self._recovery.consistent.set()
        log.warning("state reloaded from the store; changes refused until it can write again")
        delay = 0.2
        while not await self.store.probe():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self.store.resume()
        log.warning("store writable again; accepting changes")

    async def stop(self) -> None:
        if self._recovery is not None:
            self._recovery.task.cancel()
            await asyncio.gather(self._recovery.task, return_exceptions=True)

    # --- reservations ------------------------------------------------------------

    def _reservation(self, reservation_id: str) -> Reservation:
        r = self.reservations.get(reservation_id)
        if r is None:
            raise NotFoundError(f"no reservation {reservation_id!r}")
        return r

    def _owned(self, actor: Actor, reservation_id: str) -> Reservation:
        r = self._reservation(reservation_id)
        if actor.role == "vehicle" and r.vehicle_id != actor.ident:
            raise ForbiddenError(f"reservation {reservation_id} belongs to another vehicle")
        if actor.role == "station" and r.charge_point_id != actor.ident:
            raise ForbiddenError(f"reservation {reservation_id} is not on charge point {actor.ident}")
        return r

    def _charge_point(self, cp_id: str) -> ChargePointState:
        cp = self.charge_points.get(cp_id)
        if cp is None:
            raise NotFoundError(f"no charge point {cp_id!r} at operator {self.operator_id}")
        return cp

    async def reserve(self, actor: Actor, vehicle_id: str, cp_id: str, start: int, minutes: int) -> Reservation:
        rules = self.rules
        if not 1 <= minutes <= rules.max_reservation_min:
            raise BadRequestError(f"duration must be 1..{rules.max_reservation_min} minutes, not {minutes}")
        now = int(self.clock.now())
        if start < now - MIN:
            raise BadRequestError(f"start {_minute(start)} is in the past")
        if start > now + rules.max_advance_days * 86400:
            raise BadRequestError(f"start is more than {rules.max_advance_days} days ahead")
        end = start + minutes * MIN

        def mutate() -> _Change[Reservation]:
            cp = self._charge_point(cp_id)
            if cp.out_of_service:
                raise UnavailableError(f"charge point {cp_id} is {cp.out_of_service}")
            if not cp.ledger.fits(start, end):
                free = cp.ledger.next_free(start, end - start)
                raise ConflictError(
                    f"charge point {cp_id} is taken then; next free start {to_datetime(free):%Y-%m-%d %H:%M}Z",
                    next_free=to_datetime(free),
                )
            r = Reservation(
                id=f"{self.operator_id}-{secrets.token_hex(5)}",
                charge_point_id=cp_id,
                vehicle_id=vehicle_id,
                start=start,
                end=end,
                state="booked",
                created=now,
            )
            self._index(r)
            return _Change(r, [put_reservation(r)], [(r, "booked")])

        return await self._apply(actor, f"reserve {cp_id} {minutes} min for {vehicle_id}", mutate)

    async def cancel(self, actor: Actor, reservation_id: str) -> Reservation:
        def mutate() -> _Change[Reservation]:
            r = self._owned(actor, reservation_id)
            if r.state in ("cancelled", "expired", "completed", "aborted"):
                return _Change(r)  # cancelling twice is not an error: the slot is free
            if r.state == "charging":
                raise ConflictError(f"reservation {reservation_id} is charging; stop charging first")
            if r.state == "held":
                raise ConflictError(f"reservation {reservation_id} is held by a trip booking in progress")
            if r.trip_id is not None:  # only the trip's coordinator releases its stops, all together
                raise ConflictError(f"reservation {reservation_id} is a stop of trip {r.trip_id}; cancel the trip")
            self._leave_live(r, "cancelled")
            return _Change(r, [put_reservation(r)], [(r, "cancelled")])

        return await self._apply(actor, f"cancel {reservation_id}", mutate)

    def check_can_start(self, actor: Actor, reservation_id: str) -> tuple[Reservation, ChargePointState]:
        """Raise unless charging may begin on this reservation now."""
        r = self._owned(actor, reservation_id)
        if r.state == "charging":
            raise ConflictError(f"reservation {reservation_id} is already charging")
        if r.state != "booked":
            raise ConflictError(f"reservation {reservation_id} is {r.state}")
        now = self.clock.now()
        if now < r.start - self.rules.early_start_min * MIN:
            raise ConflictError(
                f"too early: reservation {reservation_id} starts at {to_datetime(r.start):%H:%M}Z "
                f"(charging may begin {self.rules.early_start_min} min before)"
            )
        if now >= r.end:
            raise ConflictError(f"reservation {reservation_id} has ended")
        cp = self.charge_points[r.charge_point_id]
        if now < r.start and not cp.ledger.fits(int(now), r.start):
            raise ConflictError(f"too early: charge point {cp.config.id} is reserved by someone else until then")
        if not cp.online:
            raise UnavailableError(f"charge point {cp.config.id} is offline")
        if cp.out_of_service:
            raise UnavailableError(f"charge point {cp.config.id} is {cp.out_of_service}")
        if cp.charging is not None:
            raise ConflictError(f"charge point {cp.config.id} is still charging another vehicle")
        return r, cp

    async def authorize(self, actor: Actor, vehicle_id: str) -> Reservation:
        """The reservation that lets this vehicle charge on the asking charge point now.

        Its session if it is charging already; else a booked one it may start now (its slot,
        or early while nobody else's is in the way). Raises why not otherwise.
        """
        async with self.lock.reader_lock:
            cp = self._charge_point(actor.ident)
            mine = [self.reservations[rid] for _, _, rid in cp.ledger.intervals()]
            mine = [r for r in mine if r.vehicle_id == vehicle_id]
            for r in mine:
                if r.state == "charging":
                    return r
            refusal: ConflictError | UnavailableError | None = None
            for r in mine:
                if r.state != "booked":
                    continue  # a trip stop still being decided
                try:
                    self.check_can_start(actor, r.id)
                except (ConflictError, UnavailableError) as exc:
                    refusal = refusal or exc
                    continue
                return r
        if refusal is not None:
            raise refusal
        raise NotFoundError(f"vehicle {vehicle_id} has no reservation on charge point {actor.ident}")

    async def reservations_on(self, cp_id: str, include_past: bool) -> list[p.ReservationInfo]:
        """A charge point's reservations, by start: the live ones (or every one)."""
        async with self.lock.reader_lock:
            cp = self._charge_point(cp_id)
            if include_past:
                found = [r for r in self.reservations.values() if r.charge_point_id == cp_id]
                found.sort(key=lambda r: r.start)
            else:
                found = [self.reservations[rid] for _, _, rid in cp.ledger.intervals()]
            return [self.reservation_info(r) for r in found]

    async def begin_charging(self, actor: Actor, reservation_id: str) -> Reservation:
        def mutate() -> _Change[Reservation]:
            r, cp = self.check_can_start(actor, reservation_id)
            r.state = "charging"
            cp.charging = r.id
            session = ChargingSession(
                reservation_id=r.id,
                vehicle_id=r.vehicle_id,
                charge_point_id=cp.config.id,
                started=int(self.clock.now()),
                price_per_kwh=cp.config.price_per_kwh,
            )
            self.sessions[r.id] = session
            return _Change(r, [put_reservation(r), put_session(session)], [(r, "charging")])

        result = await self._apply(actor, f"start charging {reservation_id}", mutate)
        self._charge_point_changed(result.charge_point_id)
        return result

    def check_charging(self, actor: Actor, reservation_id: str) -> Reservation:
        r = self._owned(actor, reservation_id)
        if r.state != "charging":
            raise ConflictError(f"reservation {reservation_id} is {r.state}, not charging")
        return r

    def record_meter(self, cp_id: str, reservation_id: str, kwh: float) -> ChargingSession | None:
        """A meter value from the charge point (kept in memory; stored at the end)."""
        session = self.sessions.get(reservation_id)
        if session is None or session.charge_point_id != cp_id or session.ended is not None:
            return None
        session.kwh = max(session.kwh, round(kwh, 4))
        return session

    async def complete_charging(self, actor: Actor, reservation_id: str, kwh: float | None, reason: str) -> Reservation:
        """End a charging session with the final meter reading (None: the last one seen)."""

        def mutate() -> _Change[Reservation]:
            r = self._reservation(reservation_id)
            if actor.role == "station" and r.charge_point_id != actor.ident:
                raise ForbiddenError(f"reservation {reservation_id} is not on charge point {actor.ident}")
            if actor.role == "vehicle" and r.vehicle_id != actor.ident:
                raise ForbiddenError(f"reservation {reservation_id} belongs to another vehicle")
            if r.state != "charging":
                return _Change(r)  # already completed: reporting twice is harmless
            session = self.sessions[r.id]
            if kwh is not None:
                session.kwh = max(session.kwh, round(kwh, 4))
            session.ended = max(int(self.clock.now()), session.started)
            self._leave_live(r, "completed")
            return _Change(r, [put_reservation(r), put_session(session)], [(r, reason)])

        result = await self._apply(actor, f"complete charging {reservation_id} ({reason})", mutate)
        self._charge_point_changed(result.charge_point_id)
        return result

    async def expire_no_shows(self) -> list[Reservation]:
        """Booked reservations whose grace period passed without charging."""
        now = int(self.clock.now())
        grace = self.rules.no_show_grace_min * MIN

        def mutate() -> _Change[list[Reservation]]:
            expired = []
            while self._no_show_due and self._no_show_due[0][0] <= now:
                _, rid = heapq.heappop(self._no_show_due)
                r = self.reservations.get(rid)
                if r is not None and r.state == "booked" and now >= min(r.start + grace, r.end):
                    expired.append(r)
            for r in expired:
                self._leave_live(r, "expired")
            return _Change(expired, [put_reservation(r) for r in expired], [(r, "no-show") for r in expired])

        if not self._no_show_due or self._no_show_due[0][0] > now:
            return []  # nothing due: no lock, no store round trip
        return await self._apply(Actor("operator", self.operator_id), "expire no-shows", mutate)

    def overdue_sessions(self) -> list[Reservation]:
        """Charging reservations whose slot has ended (to be stopped)."""
        now = self.clock.now()
        return [
            self.reservations[cp.charging]
            for cp in self.charge_points.values()
            if cp.charging is not None and now >= self.reservations[cp.charging].end
        ]

    # --- trip stops: this operator as a two-phase-commit participant ------------------

    async def hold(self, coordinator: str, prepare: p.Prepare) -> p.Vote:
        """PREPARE: check every stop and hold them all in one writer section, or none."""
        stops = [(st.charge_point_id, to_seconds(st.start), to_seconds(st.end)) for st in prepare.stops]
        actor = Actor("coordinator", coordinator)

        def mutate() -> _Change[p.Vote]:
            held = [r for r in self.by_trip.get(prepare.trip_id, []) if r.txn_id == prepare.txn_id]
            if held:  # a repeated PREPARE: the same answer while the holds stand
                still = all(r.state == "held" for r in held)
                ids = [r.id for r in held] if still else []
                return _Change(p.Vote(txn_id=prepare.txn_id, yes=still, reservation_ids=ids, reason="decided already"))
            if not math.isfinite(prepare.deadline) or prepare.deadline <= time.time():
                return _Change(self._no(prepare, "the booking's deadline has passed"))
            if len(stops) > MAX_TRIP_STOPS:
                return _Change(self._no(prepare, f"{len(stops)} stops; a trip has at most {MAX_TRIP_STOPS}"))
            now = int(self.clock.now())
            conflicts: list[p.StopConflict] = []
            for i, (cp_id, start, end) in enumerate(stops):
                if start < now - MIN or end > now + self.rules.max_advance_days * 86400:
                    return _Change(self._no(prepare, f"slot of {cp_id} is in the past or too far ahead"))
                cp = self.charge_points.get(cp_id)
                if cp is None:
                    return _Change(self._no(prepare, f"no charge point {cp_id!r} at operator {self.operator_id}"))
                if not start < end:
                    return _Change(self._no(prepare, f"empty slot for {cp_id}"))
                clash = not cp.ledger.fits(start, end) or any(
                    other == cp_id and o_start < end and start < o_end for other, o_start, o_end in stops[:i]
                )
                if clash or cp.out_of_service:
                    free = cp.ledger.next_free(start, end - start)
                    conflicts.append(p.StopConflict(charge_point_id=cp_id, next_free=to_datetime(free)))
            if conflicts:
                return _Change(p.Vote(txn_id=prepare.txn_id, yes=False, conflicts=conflicts, reason="slots taken"))
            made = [
                Reservation(
                    id=f"{self.operator_id}-{secrets.token_hex(5)}",
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
                self._index(r)
            vote = p.Vote(txn_id=prepare.txn_id, yes=True, reservation_ids=[r.id for r in made])
            return _Change(vote, [put_reservation(r) for r in made], [(r, "held") for r in made])

        return await self._apply(actor, f"hold {len(stops)} stops of trip {prepare.trip_id}", mutate)

    @staticmethod
    def _no(prepare: p.Prepare, reason: str) -> p.Vote:
        return p.Vote(txn_id=prepare.txn_id, yes=False, reason=reason)

    async def resolve(
        self, coordinator: str, txn_id: str, trip_id: str, commit: bool, also_store: tuple[Op, ...] = ()
    ) -> list[Reservation]:
        """The coordinator's decision: held stops become booked, or are dropped.

        ``also_store`` goes into the same transaction: a coordinator stores its decision
        and applies it to its own stops at once.
        """
        actor = Actor("coordinator", coordinator)

        def mutate() -> _Change[list[Reservation]]:
            held = [
                r
                for r in self.by_trip.get(trip_id, [])
                if r.state == "held" and r.coordinator == coordinator and r.txn_id == txn_id
            ]
            for r in held:
                if commit:
                    r.state = "booked"
                    self._watch(r)
                    r.hold_deadline = None
                else:
                    self._leave_live(r, "aborted")
            reason = "booked" if commit else "aborted"
            return _Change(held, [*(put_reservation(r) for r in held), *also_store], [(r, reason) for r in held])

        return await self._apply(actor, f"{'commit' if commit else 'abort'} {txn_id}", mutate)

    async def release_trip(self, coordinator: str, trip_id: str, also_store: tuple[Op, ...] = ()) -> list[Reservation]:
        """Cancel the trip's booked stops here (only its coordinator may); idempotent.

        ``also_store`` goes into the same transaction (the coordinator's own cancellation).
        """
        actor = Actor("coordinator", coordinator)

        def mutate() -> _Change[list[Reservation]]:
            # Only the stops this coordinator placed (another's trip id is none of its business).
            stops = [r for r in self.by_trip.get(trip_id, []) if r.coordinator == coordinator]
            # Held stops too: a cancellation can overtake the commit it follows.
            freed = [r for r in stops if r.state in ("booked", "held")]
            for r in freed:
                self._leave_live(r, "cancelled")
            ops = [*(put_reservation(r) for r in freed), *also_store]
            return _Change(freed, ops, [(r, "trip cancelled") for r in freed])

        return await self._apply(actor, f"release trip {trip_id}", mutate)

    def overdue_holds(self, now_real: float) -> dict[str, tuple[str, str]]:
        """Holds whose deadline passed: txn id -> (coordinator, trip id)."""
        due: list[Reservation] = []
        while self._hold_due and self._hold_due[0][0] <= now_real:
            _, rid = heapq.heappop(self._hold_due)
            r = self.reservations.get(rid)
            if r is not None and r.state == "held":
                due.append(r)
        for r in due:  # still in doubt: due again next time until its coordinator answers
            heapq.heappush(self._hold_due, (r.hold_deadline or 0.0, r.id))
        return {r.txn_id: (r.coordinator, r.trip_id) for r in due if r.txn_id and r.coordinator and r.trip_id}

    async def busy_between(self, start: int, end: int) -> list[p.CpBusy]:
        async with self.lock.reader_lock:
            return [
                p.CpBusy(cp_id, [p.Interval(to_datetime(s), to_datetime(e)) for s, e in cp.ledger.busy(start, end)])
                for cp_id, cp in self.charge_points.items()
            ]

    # --- charge point liveness ----------------------------------------------------

    def set_online(self, cp_id: str, online: bool) -> None:
        cp = self.charge_points[cp_id]
        if cp.online != online:
            cp.online = online
            log.info("charge point %s %s", cp_id, "online" if online else "offline")
            self._charge_point_changed(cp_id)

    def set_reported(self, cp_id: str, status: p.ReportedStatus) -> None:
        """What the charge point says of itself: in service, broken, or out of service on purpose."""
        cp = self.charge_points[cp_id]
        before = cp.out_of_service
        cp.faulted = status == "faulted"
        cp.unavailable = status == "unavailable"
        if cp.out_of_service != before:
            log.info("charge point %s %s", cp_id, cp.out_of_service or "available again")
            self._charge_point_changed(cp_id)

    def _charge_point_changed(self, cp_id: str) -> None:
        for listener in self.listeners:
            listener.charge_point_changed(cp_id)

    # --- queries ------------------------------------------------------------------

    def status_of(self, cp: ChargePointState, now: float) -> p.ChargePointStatus:
        if not cp.online:
            return "offline"
        if cp.out_of_service:
            return "faulted" if cp.faulted else "unavailable"
        if cp.charging is not None:
            return "charging"
        if cp.ledger.busy(int(now), int(now) + self.rules.reserved_soon_min * MIN + 1):
            return "reserved"
        return "available"

    def _cp_info(self, cp: ChargePointState, now: float, *, with_busy: bool = False) -> p.ChargePointInfo:
        t = int(now)
        free = cp.ledger.next_free(t, MIN)
        info = p.ChargePointInfo(
            id=cp.config.id,
            power_kw=cp.config.power_kw,
            connector=cp.config.connector,
            price_per_kwh=cp.config.price_per_kwh,
            status=self.status_of(cp, now),
            free_at=to_datetime(free) if free > t else None,
        )
        if with_busy:
            info.busy = [p.Interval(to_datetime(s), to_datetime(e)) for s, e in cp.ledger.busy(t, t + 86400)]
        return info

    def station_info(self, station: StationConfig, now: float, *, with_busy: bool = False) -> p.StationInfo:
        return p.StationInfo(
            id=station.id,
            operator_id=station.operator,
            name=station.name,
            city=station.city,
            lat=station.lat,
            lon=station.lon,
            charge_points=[
                self._cp_info(self.charge_points[c.id], now, with_busy=with_busy) for c in station.charge_points
            ],
        )

    async def list_stations(
        self, city: str | None, near: tuple[float, float] | None, limit: int | None
    ) -> list[p.StationInfo]:
        async with self.lock.reader_lock:
            now = self.clock.now()
            chosen: Iterable[StationConfig] = self.stations.values()
            if city:
                wanted = city.casefold()  # once: the city asked for may be as long as a frame
                chosen = [s for s in chosen if s.city.casefold() == wanted]
            infos = [self.station_info(s, now) for s in chosen]
        if near is not None:
            for info in infos:
                info.distance_km = round(great_circle_km(near[0], near[1], info.lat, info.lon), 1)
            infos.sort(key=lambda i: i.distance_km or 0.0)
        return infos[:limit] if limit else infos

    async def nearest_available(self, lat: float, lon: float, min_power_kw: float) -> tuple[p.StationInfo, str, float]:
        async with self.lock.reader_lock:
            now = self.clock.now()
            best: tuple[float, StationConfig, ChargePointConfig] | None = None
            for station in self.stations.values():
                distance = great_circle_km(lat, lon, station.lat, station.lon)
                if best is not None and distance >= best[0]:
                    continue
                usable = [
                    c
                    for c in station.charge_points
                    if c.power_kw >= min_power_kw and self.status_of(self.charge_points[c.id], now) == "available"
                ]
                if usable:
                    best = (distance, station, max(usable, key=lambda c: c.power_kw))
            if best is None:
                raise NotFoundError(f"no available charge point of at least {min_power_kw:g} kW right now")
            distance, station, cp = best
            return self.station_info(station, now), cp.id, round(distance, 1)

    async def station_status(self, station_id: str) -> p.StationInfo:
        async with self.lock.reader_lock:
            station = self.stations.get(station_id)
            if station is None:
                raise NotFoundError(f"no station {station_id!r} at operator {self.operator_id}")
            return self.station_info(station, self.clock.now(), with_busy=True)

    def reservation_info(self, r: Reservation) -> p.ReservationInfo:
        cp = self.charge_points.get(r.charge_point_id)
        session = self.sessions.get(r.id)
        return p.ReservationInfo(
            id=r.id,
            operator_id=self.operator_id,
            station_id=cp.station.id if cp else "",
            charge_point_id=r.charge_point_id,
            vehicle_id=r.vehicle_id,
            start=to_datetime(r.start),
            end=to_datetime(r.end),
            state=r.state,  # type: ignore[arg-type]
            trip_id=r.trip_id,
            kwh=session.kwh if session else 0.0,
            cost=session.cost if session else 0.0,
            hold_deadline=r.hold_deadline if r.state == "held" else None,
        )

    async def reservations_of(self, vehicle_id: str, include_past: bool) -> list[p.ReservationInfo]:
        async with self.lock.reader_lock:
            mine = self.by_vehicle.get(vehicle_id, [])
            return [self.reservation_info(r) for r in mine if include_past or r.live]

    async def history_of(self, vehicle_id: str) -> list[p.SessionInfo]:
        async with self.lock.reader_lock:
            out = []
            for r in self.by_vehicle.get(vehicle_id, []):
                s = self.sessions.get(r.id)
                if s is None or s.ended is None:
                    continue
                cp = self.charge_points[s.charge_point_id]
                out.append(
                    p.SessionInfo(
                        reservation_id=r.id,
                        operator_id=self.operator_id,
                        station_id=cp.station.id,
                        city=cp.station.city,
                        charge_point_id=s.charge_point_id,
                        started=to_datetime(s.started),
                        ended=to_datetime(s.ended),
                        kwh=s.kwh,
                        price_per_kwh=s.price_per_kwh,
                        cost=s.cost,
                    )
                )
            out.sort(key=lambda s: s.started)
            return out

    async def snapshot(self) -> tuple[list[p.StationInfo], list[p.ReservationInfo]]:
        async with self.lock.reader_lock:
            now = self.clock.now()
            stations = [self.station_info(s, now, with_busy=True) for s in self.stations.values()]
            reservations = sorted(
                (self.reservation_info(r) for r in self.reservations.values()),
                key=lambda r: (r.start, r.charge_point_id),
            )
            return stations, reservations
