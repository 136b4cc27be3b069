"""The rules of single reservations: reserve, cancel, who may charge when, no-shows.

Each change is a ``mutate`` function run by ``Books.apply`` (under the writer
lock, then stored before anyone is answered); checks that only read take the
reader lock or run inside a ``mutate``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from evcharge.domain.clock import to_datetime
from evcharge.domain.model import Reservation
from evcharge.operator.ids import new_id
from evcharge.operator.state import MIN, Actor, Books, Change, ChargePointState
from evcharge.operator.store import Op, put_reservation
from evcharge.wire.errors import BadRequestError, ConflictError, NotFoundError, UnavailableError


def _minute(seconds: int) -> str:
    """A time for a message; a client's "year 1 at +05:00" is before the first datetime there is."""
    try:
        return f"{to_datetime(seconds):%Y-%m-%d %H:%M}Z"
    except (ValueError, OverflowError):
        return f"{seconds} s from 1970"


@dataclass(frozen=True, slots=True)
class Cancelled:
    reservation: Reservation
    already: bool  # it had ended before: nothing was done now


class Reservations:
    def __init__(self, books: Books) -> None:
        self.books = books
        self.rules = books.rules

    async def reserve(
        self,
        actor: Actor,
        vehicle_id: str,
        cp_id: str,
        start: int,
        minutes: int,
        remember: Callable[[Reservation], Op] | None = None,
    ) -> Reservation:
        books, rules = self.books, self.rules
        if not 1 <= minutes <= rules.max_reservation_min:
            raise BadRequestError(f"duration must be 1..{rules.max_reservation_min} minutes, not {minutes}")
        now = int(books.clock.now())
        if start < now - MIN:
            raise BadRequestError(f"start {_minute(start)} is in the past")
        if start > now + rules.max_advance_days * 86400:
            raise BadRequestError(f"start is more than {rules.max_advance_days} days ahead")
        end = start + minutes * MIN

        def mutate() -> Change[Reservation]:
            cp = books.charge_point(cp_id)
            if cp.out_of_service:
                raise UnavailableError(f"charge point {cp_id} is {cp.out_of_service}")
            if not cp.ledger.fits(start, end):
                free = cp.ledger.next_free(start, end - start)
                raise ConflictError(
                    f"charge point {cp_id} is taken then; next free start {to_datetime(free):%Y-%m-%d %H:%M}Z",
                    next_free=to_datetime(free),
                )
            r = Reservation(
                id=new_id(f"{books.operator_id}-", books.reservations),
                charge_point_id=cp_id,
                vehicle_id=vehicle_id,
                start=start,
                end=end,
                state="booked",
                created=now,
            )
            books.index(r)
            return Change(r, [put_reservation(r)], [(r, "booked")])

        return await books.apply(actor, f"reserve {cp_id} {minutes} min for {vehicle_id}", mutate, remember)

    async def cancel(
        self, actor: Actor, reservation_id: str, remember: Callable[[Cancelled], Op] | None = None
    ) -> Cancelled:
        books = self.books

        def mutate() -> Change[Cancelled]:
            r = books.owned(actor, reservation_id)
            if r.state in ("cancelled", "expired", "completed", "aborted"):
                return Change(Cancelled(r, already=True))  # cancelling twice is no error: nothing to do
            if r.state == "charging":
                raise ConflictError(f"reservation {reservation_id} is charging; stop charging first")
            if r.state == "held":
                raise ConflictError(f"reservation {reservation_id} is held by a trip booking in progress")
            if r.trip_id is not None:  # only the trip's coordinator releases its stops, all together
                raise ConflictError(f"reservation {reservation_id} is a stop of trip {r.trip_id}; cancel the trip")
            books.leave_live(r, "cancelled")
            return Change(Cancelled(r, already=False), [put_reservation(r)], [(r, "cancelled")])

        return await books.apply(actor, f"cancel {reservation_id}", mutate, remember)

    def check_can_start(self, actor: Actor, reservation_id: str) -> tuple[Reservation, ChargePointState]:
        """Raise unless charging may begin on this reservation now."""
        books = self.books
        r = books.owned(actor, reservation_id)
        if r.state == "charging":
            raise ConflictError(f"reservation {reservation_id} is already charging")
        if r.state != "booked":
            raise ConflictError(f"reservation {reservation_id} is {r.state}")
        now = books.clock.now()
        if now < r.start - self.rules.early_start_min * MIN:
            raise ConflictError(
                f"too early: reservation {reservation_id} starts at {to_datetime(r.start):%H:%M}Z "
                f"(charging may begin {self.rules.early_start_min} min before)"
            )
        if now >= r.end:
            raise ConflictError(f"reservation {reservation_id} has ended")
        cp = books.charge_points[r.charge_point_id]
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
        books = self.books
        async with books.lock.reader_lock:
            cp = books.charge_point(actor.ident)
            mine = [books.reservations[rid] for _, _, rid in cp.ledger.intervals()]
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

    def remind(self) -> list[Reservation]:
        """Tell drivers whose booked slot starts within ``reserved_soon_min`` (once each; memory only)."""
        books = self.books
        now = books.clock.now()
        soon = self.rules.reserved_soon_min * MIN
        due = []
        while books.reminder_due and books.reminder_due[0][0] <= now:
            _, rid = heapq.heappop(books.reminder_due)
            r = books.reservations.get(rid)
            # Not one booked within the window: its driver has just heard of it.
            if r is not None and r.state == "booked" and now < r.start and r.created <= r.start - soon:
                due.append(r)
        for r in due:
            minutes = max(1, round((r.start - now) / MIN))
            for listener in books.listeners:
                listener.reservation_changed(r, f"reminder: starts in {minutes} min")
        return due

    async def expire_no_shows(self) -> list[Reservation]:
        """Booked reservations whose grace period passed without charging."""
        books = self.books
        now = int(books.clock.now())
        grace = self.rules.no_show_grace_min * MIN

        def mutate() -> Change[list[Reservation]]:
            expired = []
            while books.no_show_due and books.no_show_due[0][0] <= now:
                _, rid = heapq.heappop(books.no_show_due)
                r = books.reservations.get(rid)
                if r is not None and r.state == "booked" and now >= min(r.start + grace, r.end):
                    expired.append(r)
            for r in expired:
                books.leave_live(r, "expired")
            return Change(expired, [put_reservation(r) for r in expired], [(r, "no-show") for r in expired])

        if not books.no_show_due or books.no_show_due[0][0] > now:
            return []  # nothing due: no lock, no store round trip
        return await books.apply(Actor("operator", books.operator_id), "expire no-shows", mutate)
