"""One typed coroutine per request, over whatever carries it: a ``Client`` (one connection) or a ``Link``.

Every state-changing request gets a fresh idempotency key here, one per call:
the server does it once per key and keeps the answer. Over a ``Link`` such a
request (and every query) is asked again when its reply is lost -- after a
reconnect if need be -- until ``answer_deadline`` has passed; only then does
the caller get ``OutcomeUnknownError`` (code ``timeout``) instead of a guess.
Over a plain ``Client`` a lost reply is raised as it happened.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import TypeVar

from evcharge.wire import protocol as p

R = TypeVar("R", bound=p.Reply)

PLAN_TIMEOUT = 30.0  # a trip plan searches every operator's chargers
BOOK_TIMEOUT = 60.0  # a booking may re-plan and ask every owner several times


def new_key() -> str:
    """A key for one intent (128 random bits)."""
    return secrets.token_urlsafe(16)


class Requests:
    timeout: float

    async def call(
        self, request: p.Request, expect: type[R], timeout: float | None = None, *, again_until: float | None = None
    ) -> R:
        raise NotImplementedError

    def server_now(self) -> datetime:
        raise NotImplementedError

    def answer_deadline(self, timeout: float | None = None) -> float | None:
        """Until when (loop clock) a lost reply is asked for again; None: not at all."""
        return None

    async def _ask(self, request: p.Request, expect: type[R], timeout: float | None = None) -> R:
        return await self.call(request, expect, timeout, again_until=self.answer_deadline(timeout))

    # --- any role ---------------------------------------------------------------------

    async def list_stations(
        self, *, city: str | None = None, near: tuple[float, float] | None = None, limit: int | None = None
    ) -> list[p.StationInfo]:
        lat, lon = near if near is not None else (None, None)
        reply = await self._ask(p.ListStations(city=city, lat=lat, lon=lon, limit=limit), p.StationList)
        return reply.stations

    async def find_nearest(self, lat: float, lon: float, *, min_power_kw: float = 0.0) -> p.NearestResult:
        return await self._ask(p.FindNearest(lat=lat, lon=lon, min_power_kw=min_power_kw), p.NearestResult)

    async def station_status(self, station_id: str) -> p.StationInfo:
        return (await self._ask(p.GetStationStatus(station_id=station_id), p.StationStatus)).station

    # --- vehicles -------------------------------------------------------------------

    async def reserve(self, charge_point_id: str, start: datetime, minutes: int) -> p.ReservationInfo:
        request = p.Reserve(charge_point_id=charge_point_id, start=start, minutes=minutes, key=new_key())
        return (await self._ask(request, p.ReservationReply)).reservation

    async def reservations(self, *, include_past: bool = False) -> list[p.ReservationInfo]:
        return (await self._ask(p.ListReservations(include_past=include_past), p.ReservationList)).reservations

    async def cancel(self, reservation_id: str) -> p.ReservationReply:
        """The reservation, and whether it was cancelled before (``unchanged``)."""
        return await self._ask(p.CancelReservation(reservation_id=reservation_id, key=new_key()), p.ReservationReply)

    async def start_charging(self, reservation_id: str) -> p.ReservationInfo:
        request = p.StartCharging(reservation_id=reservation_id, key=new_key())
        return (await self._ask(request, p.ReservationReply)).reservation

    async def stop_charging(self, reservation_id: str) -> p.ReservationInfo:
        request = p.StopCharging(reservation_id=reservation_id, key=new_key())
        return (await self._ask(request, p.ReservationReply)).reservation

    async def history(self) -> p.History:
        return await self._ask(p.GetHistory(), p.History)

    # --- trips ---------------------------------------------------------------------

    async def plan_trip(self, query: p.TripQuery) -> p.TripInfo:
        timeout = max(self.timeout, PLAN_TIMEOUT)
        return (await self._ask(p.PlanTrip(query=query), p.TripReply, timeout=timeout)).trip

    async def book_trip(self, query: p.TripQuery, plan_id: str = "") -> p.TripReply:
        request = p.BookTrip(query=query, plan_id=plan_id, key=new_key())
        return await self._ask(request, p.TripReply, timeout=max(self.timeout, BOOK_TIMEOUT))

    async def trips(self, *, include_cancelled: bool = False) -> list[p.TripInfo]:
        return (await self._ask(p.ListTrips(include_cancelled=include_cancelled), p.TripList)).trips

    async def cancel_trip(self, trip_id: str) -> p.TripReply:
        """The trip, and whether it was cancelled before (``unchanged``)."""
        request = p.CancelTrip(trip_id=trip_id, key=new_key())
        return await self._ask(request, p.TripReply, timeout=max(self.timeout, PLAN_TIMEOUT))

    # --- operators ------------------------------------------------------------------

    async def inspect(self) -> p.InspectResult:
        """The operator's whole state, one snapshot, fetched part by part if it is big."""
        result = await self.call(p.Inspect(), p.InspectResult)
        while result.more:
            part = await self.call(p.Inspect(cursor=result.more), p.InspectResult)
            result.stations += part.stations
            result.reservations += part.reservations
            result.trips += part.trips
            result.more = part.more
        return result

    async def settlement(self) -> p.Settlement:
        return await self._ask(p.GetSettlement(), p.Settlement)

    # --- charge points ----------------------------------------------------------------

    async def report_status(self, status: p.ReportedStatus, info: str = "") -> None:
        await self.call(p.StatusNotification(status=status, info=info), p.Ok)

    async def session_complete(self, reservation_id: str, kwh: float, reason: str = "") -> None:
        await self.call(p.SessionComplete(reservation_id=reservation_id, kwh=kwh, reason=reason), p.Ok)

    async def authorize(self, vehicle_id: str) -> p.ReservationInfo:
        """The reservation that lets this vehicle charge here now (else the reason as an error)."""
        return (await self.call(p.Authorize(vehicle_id=vehicle_id), p.ReservationReply)).reservation
