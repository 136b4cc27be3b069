"""Charging sessions from start to end: the books and the charge point's connection together.

A vehicle's ``StartCharging`` sends ``RemoteStart`` to its charge point and
records the session once the charge point took it; a charge point may also
start one itself for a driver it authorized. A session ends by the vehicle,
the charge point, a fault, the end of its slot, or its charge point going
away; the last meter reading becomes the session's energy and cost. No
reservation is started or ended twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from evcharge.domain.clock import to_datetime
from evcharge.domain.model import ChargingSession, Reservation
from evcharge.operator.pushes import Connected, Online
from evcharge.operator.reservations import Reservations
from evcharge.operator.state import Actor, Books, Change
from evcharge.operator.store import Op, put_reservation, put_session
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, EvchargeError, UnavailableError

log = logging.getLogger(__name__)


class Charging:
    def __init__(self, books: Books, reservations: Reservations, online: Online) -> None:
        self.books = books
        self.reservations = reservations
        self.online = online
        self._starting: set[str] = set()  # reservations whose charge point is being started
        self._ending: set[str] = set()  # reservations whose session is being ended
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        me = books.operator_id
        self._visitor_home = {v.id: v.home for v in books.world.vehicles if v.home != me}
        self.session_ended: list[Callable[[ChargingSession], None]] = []  # once stored

    @property
    def _operator(self) -> Actor:
        return Actor("operator", self.books.operator_id)

    # --- starting ----------------------------------------------------------------------

    async def start(
        self, actor: Actor, reservation_id: str, remember: Callable[[Reservation], Op] | None = None
    ) -> Reservation:
        """A vehicle asks: its charge point is told to start, then the session is recorded."""
        async with self.books.lock.reader_lock:
            r, cp = self.reservations.check_can_start(actor, reservation_id)
        charge_point = self.online.charge_points.get(cp.config.id)
        if charge_point is None:
            raise UnavailableError(f"charge point {cp.config.id} is offline")
        with _once(self._starting, reservation_id, "started"):
            try:
                until = to_datetime(r.end)
                await charge_point.command(p.RemoteStart(reservation_id=r.id, vehicle_id=r.vehicle_id, until=until))
                return await self._begin(actor, reservation_id, remember)
            except EvchargeError:
                # The charge point may have started (a lost or late answer) while we record
                # nothing: make sure it stops again -- unless a session is recorded after all
                # (the charge point started it itself for the same driver).
                if self.books.reservations[reservation_id].state != "charging":
                    self._spawn(_command_quietly(charge_point, p.RemoteStop(reservation_id=reservation_id)))
                raise

    async def started_by_charge_point(self, actor: Actor, reservation_id: str) -> Reservation:
        """A charge point started a session itself, for a driver it authorized: no RemoteStart."""
        with _once(self._starting, reservation_id, "started"):
            return await self._begin(actor, reservation_id)

    async def _begin(
        self, actor: Actor, reservation_id: str, remember: Callable[[Reservation], Op] | None = None
    ) -> Reservation:
        books = self.books

        def mutate() -> Change[Reservation]:
            r, cp = self.reservations.check_can_start(actor, reservation_id)
            r.state = "charging"
            cp.charging = r.id
            session = ChargingSession(
                reservation_id=r.id,
                vehicle_id=r.vehicle_id,
                charge_point_id=cp.config.id,
                started=int(books.clock.now()),
                price_per_kwh=cp.config.price_per_kwh,
                home=self._visitor_home.get(r.vehicle_id),
            )
            books.sessions[r.id] = session
            return Change(r, [put_reservation(r), put_session(session)], [(r, "charging")])

        result = await books.apply(actor, f"start charging {reservation_id}", mutate, remember)
        books.charge_point_changed(result.charge_point_id)
        return result

    # --- while charging -------------------------------------------------------------------

    def meter_value(self, cp_id: str, reservation_id: str, kwh: float) -> None:
        """A meter value from the charge point: kept in memory (stored at the end), shown to the vehicle."""
        session = self.books.sessions.get(reservation_id)
        if session is None or session.charge_point_id != cp_id or session.ended is not None:
            return
        session.kwh = max(session.kwh, round(kwh, 4))
        event = p.ChargingProgress(reservation_id=reservation_id, kwh=session.kwh, cost=session.cost)
        self.online.to_vehicle(session.vehicle_id, event)
        self.online.to_operator_tools(event)  # the monitor and dashboard show kWh and cost as they grow

    async def charge_point_reported(self, actor: Actor, status: p.ReportedStatus, info: str) -> None:
        self.books.set_reported(actor.ident, status)
        cp = self.books.charge_points[actor.ident]
        if status != "available" and cp.charging is not None:
            what = "fault" if status == "faulted" else "unavailable"
            await self.complete(actor, cp.charging, None, f"charge point {what}: {info}".strip())

    # --- ending ---------------------------------------------------------------------------

    async def stop(
        self, actor: Actor, reservation_id: str, remember: Callable[[Reservation], Op] | None = None
    ) -> Reservation:
        """A vehicle asks to stop charging."""
        async with self.books.lock.reader_lock:
            r = self.books.owned(actor, reservation_id)
            if r.state != "charging":
                raise ConflictError(f"reservation {reservation_id} is {r.state}, not charging")
        return await self._end(r.id, actor, "stopped by vehicle", remember)

    async def _end(
        self,
        reservation_id: str,
        actor: Actor | None,
        reason: str,
        remember: Callable[[Reservation], Op] | None = None,
    ) -> Reservation:
        """Stop the charge point if it is there, then record the final reading."""
        with _once(self._ending, reservation_id, "stopped"):
            r = self.books.reservations[reservation_id]
            kwh: float | None = None
            charge_point = self.online.charge_points.get(r.charge_point_id)
            if charge_point is not None:
                try:
                    report = await charge_point.command(p.RemoteStop(reservation_id=reservation_id))
                    if isinstance(report, p.SessionReport):
                        kwh = report.kwh
                except EvchargeError as exc:
                    log.warning("stopping %s on %s: %s; using the last meter value", reservation_id, charge_point, exc)
            return await self.complete(actor or self._operator, reservation_id, kwh, reason, remember)

    async def complete(
        self,
        actor: Actor,
        reservation_id: str,
        kwh: float | None,
        reason: str,
        remember: Callable[[Reservation], Op] | None = None,
    ) -> Reservation:
        """End a charging session with the final meter reading (None: the last one seen)."""
        books = self.books

        def mutate() -> Change[Reservation]:
            r = books.owned(actor, reservation_id)
            if r.state != "charging":
                return Change(r)  # already completed: reporting twice is harmless
            session = books.sessions[r.id]
            if kwh is not None:
                session.kwh = max(session.kwh, round(kwh, 4))
            session.ended = max(int(books.clock.now()), session.started)
            books.leave_live(r, "completed")
            return Change(r, [put_reservation(r), put_session(session)], [(r, reason)])

        result = await books.apply(actor, f"complete charging {reservation_id} ({reason})", mutate, remember)
        books.charge_point_changed(result.charge_point_id)
        session = books.sessions.get(result.id)
        if session is not None and session.ended is not None:
            for listener in self.session_ended:
                listener(session)
        return result

    def charge_point_went_away(self, cp_id: str) -> None:
        """Its connection closed: a vanished charge point must not leave a session open forever."""
        charging = self.books.charge_points[cp_id].charging
        if charging is not None and not self._stopping:
            self._spawn(self._end(charging, None, "charge point went offline"))

    def end_overdue(self) -> None:
        """Stop the sessions whose slot has ended."""
        books = self.books
        now = books.clock.now()
        for cp in books.charge_points.values():
            if (
                cp.charging is not None
                and cp.charging not in self._ending
                and now >= books.reservations[cp.charging].end
            ):
                self._spawn(self._end(cp.charging, None, "reservation ended"))

    # --- bookkeeping ----------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """At shutdown: start nothing new, let what is running finish."""
        self._stopping = True
        await asyncio.gather(*self._background, return_exceptions=True)


@contextlib.contextmanager
def _once(busy: set[str], reservation_id: str, doing: str) -> Iterator[None]:
    """One start (or one end) of a reservation at a time; the next one is told so."""
    if reservation_id in busy:
        raise ConflictError(f"reservation {reservation_id} is already being {doing}")
    busy.add(reservation_id)
    try:
        yield
    finally:
        busy.discard(reservation_id)


async def _command_quietly(charge_point: Connected, request: p.Request) -> None:
    try:
        await charge_point.command(request)
    except EvchargeError as exc:
        log.warning("%s: %s failed: %s", charge_point, type(request).__name__, exc)


async def _logged(work: Coroutine[Any, Any, Any]) -> None:
    try:
        await work
    except EvchargeError as exc:
        log.warning("background work failed: %s", exc)
