"""The books as the wire shows them: every domain → protocol message is built here.

Queries take the reader side of the books' lock; the ``*_info`` builders run
under a lock their caller holds (or on records nobody changes meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from evcharge.domain import planner
from evcharge.domain.clock import to_datetime
from evcharge.domain.geo import great_circle_km
from evcharge.domain.model import ChargingSession, Reservation, Trip
from evcharge.domain.world import ChargePointConfig, StationConfig
from evcharge.operator.state import MIN, Books, ChargePointState
from evcharge.wire import protocol as p
from evcharge.wire.errors import NotFoundError

_trip_json = msgspec.json.Encoder()
_trip_decoder = msgspec.json.Decoder(p.TripInfo)


class Views:
    def __init__(self, books: Books) -> None:
        self.books = books
        self.rules = books.rules

    # --- charge points and stations ---------------------------------------------------

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

    def charge_point_info(self, cp: ChargePointState, now: float, *, with_busy: bool = False) -> p.ChargePointInfo:
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
        cps = self.books.charge_points
        return p.StationInfo(
            id=station.id,
            operator_id=station.operator,
            name=station.name,
            city=station.city,
            lat=station.lat,
            lon=station.lon,
            charge_points=[self.charge_point_info(cps[c.id], now, with_busy=with_busy) for c in station.charge_points],
        )

    async def list_stations(
        self, city: str | None, near: tuple[float, float] | None, limit: int | None
    ) -> list[p.StationInfo]:
        books = self.books
        async with books.lock.reader_lock:
            now = books.clock.now()
            chosen: Iterable[StationConfig] = books.stations.values()
            if city:
                wanted = city.casefold()  # once: the city asked for may be as long as a frame
                chosen = [s for s in chosen if s.city.casefold() == wanted]
            infos = [self.station_info(s, now) for s in chosen]
        if near is not None:
            for info in infos:
                info.distance_km = round(great_circle_km(near[0], near[1], info.lat, info.lon), 1)
            infos.sort(key=lambda i: i.distance_km or 0.0)
        return infos[:limit] if limit else infos

    async def nearest_available(self, lat: float, lon: float, min_power_kw: float) -> p.NearestResult:
        books = self.books
        async with books.lock.reader_lock:
            now = books.clock.now()
            best: tuple[float, StationConfig, ChargePointConfig] | None = None
            for station in books.stations.values():
                distance = great_circle_km(lat, lon, station.lat, station.lon)
                if best is not None and distance >= best[0]:
                    continue
                usable = [
                    c
                    for c in station.charge_points
                    if c.power_kw >= min_power_kw and self.status_of(books.charge_points[c.id], now) == "available"
                ]
                if usable:
                    best = (distance, station, max(usable, key=lambda c: c.power_kw))
            if best is None:
                raise NotFoundError(f"no available charge point of at least {min_power_kw:g} kW right now")
            distance, station, cp = best
            return p.NearestResult(
                station=self.station_info(station, now), charge_point_id=cp.id, distance_km=round(distance, 1)
            )

    async def station_status(self, station_id: str) -> p.StationInfo:
        books = self.books
        async with books.lock.reader_lock:
            station = books.stations.get(station_id)
            if station is None:
                raise NotFoundError(f"no station {station_id!r} at operator {books.operator_id}")
            return self.station_info(station, books.clock.now(), with_busy=True)

    async def catalog(self) -> list[p.StationInfo]:
        """Every station with live status and busy slots: what the other operators keep of ours."""
        books = self.books
        async with books.lock.reader_lock:
            now = books.clock.now()
            return [self.station_info(s, now, with_busy=True) for s in books.stations.values()]

    async def busy_between(self, start: int, end: int) -> list[p.CpBusy]:
        """Taken slots per charge point; one out of service is taken throughout (plans go around it)."""
        async with self.books.lock.reader_lock:
            return [
                p.CpBusy(
                    cp_id,
                    [p.Interval(to_datetime(start), to_datetime(end))]
                    if cp.out_of_service
                    else [p.Interval(to_datetime(s), to_datetime(e)) for s, e in cp.ledger.busy(start, end)],
                )
                for cp_id, cp in self.books.charge_points.items()
            ]

    # --- reservations and sessions ------------------------------------------------------

    def reservation_info(self, r: Reservation) -> p.ReservationInfo:
        books = self.books
        cp = books.charge_points.get(r.charge_point_id)
        session = books.sessions.get(r.id)
        return p.ReservationInfo(
            id=r.id,
            operator_id=books.operator_id,
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
        async with self.books.lock.reader_lock:
            mine = self.books.by_vehicle.get(vehicle_id, [])
            return [self.reservation_info(r) for r in mine if include_past or r.live]

    async def reservations_on(self, cp_id: str, include_past: bool) -> list[p.ReservationInfo]:
        """A charge point's reservations, by start: the live ones (or every one)."""
        books = self.books
        async with books.lock.reader_lock:
            cp = books.charge_point(cp_id)
            if include_past:
                found = [r for r in books.reservations.values() if r.charge_point_id == cp_id]
                found.sort(key=lambda r: r.start)
            else:
                found = [books.reservations[rid] for _, _, rid in cp.ledger.intervals()]
            return [self.reservation_info(r) for r in found]

    async def history_of(self, vehicle_id: str, elsewhere: Iterable[p.SessionInfo] = ()) -> p.History:
        """A vehicle's finished sessions: here, and ``elsewhere`` (the charge records of other operators)."""
        books = self.books
        async with books.lock.reader_lock:
            sessions = list(elsewhere)
            for r in books.by_vehicle.get(vehicle_id, []):
                s = books.sessions.get(r.id)
                if s is None or s.ended is None:
                    continue
                sessions.append(session_info(books, s))
        sessions.sort(key=lambda s: s.started)
        return p.History(
            sessions=sessions,
            total_kwh=round(sum(s.kwh for s in sessions), 4),
            total_cost=round(sum(s.cost for s in sessions), 2),
        )

    async def snapshot(self) -> tuple[list[p.StationInfo], list[p.ReservationInfo], list[p.TripInfo]]:
        """Every station, reservation and trip of this operator, as of one moment."""
        books = self.books
        async with books.lock.reader_lock:
            now = books.clock.now()
            stations = [self.station_info(s, now, with_busy=True) for s in books.stations.values()]
            reservations = sorted(
                (self.reservation_info(r) for r in books.reservations.values()),
                key=lambda r: (r.start, r.charge_point_id),
            )
            trips = [trip_info(t) for t in books.trips.values()]
        return stations, reservations, trips


# --- trips ------------------------------------------------------------------------------


def session_info(books: Books, s: ChargingSession) -> p.SessionInfo:
    """One of this operator's charging sessions, ended (or as of its start), as the wire shows it."""
    cp = books.charge_points.get(s.charge_point_id)
    return p.SessionInfo(
        reservation_id=s.reservation_id,
        operator_id=books.operator_id,
        station_id=cp.station.id if cp else "",
        city=cp.station.city if cp else "",
        charge_point_id=s.charge_point_id,
        started=to_datetime(s.started),
        ended=to_datetime(s.ended if s.ended is not None else s.started),
        kwh=s.kwh,
        price_per_kwh=s.price_per_kwh,
        cost=s.cost,
    )


def trip_info(trip: Trip) -> p.TripInfo:
    """A stored trip as the vehicle sees it (its row keeps the TripInfo it was booked as)."""
    info = _trip_decoder.decode(trip.info)
    info.state = trip.state  # type: ignore[assignment]
    return info


def trip_json(info: p.TripInfo) -> bytes:
    return _trip_json.encode(info)


def planned_trip_info(
    trip_id: str,
    vehicle_id: str,
    home: str,
    query: p.TripQuery,
    plan: planner.Plan,
    reservation_of: dict[int, str] | None = None,
    state: p.TripState = "planned",
) -> p.TripInfo:
    """A plan (``state`` "planned", with a plan id) or a booked trip (with the stops' reservations)."""
    reservation_of = reservation_of or {}
    return p.TripInfo(
        id=trip_id,
        vehicle_id=vehicle_id,
        state=state,
        origin=query.origin,
        destination=query.destination,
        depart=to_datetime(plan.depart),
        arrival=to_datetime(plan.arrival),
        distance_km=round(plan.distance_km, 1),
        soc_at_arrival=round(plan.soc_at_arrival * 100, 1),
        total_kwh=round(plan.total_kwh, 2),
        total_cost=round(plan.total_cost, 2),
        home_operator_id=home,
        stops=[
            p.TripStop(
                city=s.option.city,
                operator_id=s.option.operator_id,
                station_id=s.option.station_id,
                station_name=s.option.station_name,
                charge_point_id=s.option.charge_point_id,
                power_kw=s.option.power_kw,
                drive_km=round(s.drive_km, 1),
                arrival=to_datetime(s.arrival),
                slot_start=to_datetime(s.slot_start),
                slot_end=to_datetime(s.slot_end),
                soc_in=round(s.soc_in * 100, 1),
                soc_out=round(s.soc_out * 100, 1),
                kwh=round(s.kwh, 2),
                cost=round(s.cost, 2),
                reservation_id=reservation_of.get(i),
            )
            for i, s in enumerate(plan.stops)
        ],
    )
