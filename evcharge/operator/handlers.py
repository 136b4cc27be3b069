"""One connected peer after its handshake, and how each role's messages are handled.

Every request a client can send is handled in exactly one ``handle`` method
below, by a ``match`` on its type: ``VehicleSession.handle``,
``StationSession.handle`` and ``OperatorSession.handle``.
"""

from __future__ import annotations

import collections
import logging
import secrets
from typing import TYPE_CHECKING

from evcharge.domain.clock import to_seconds
from evcharge.operator.crash_points import crash_point
from evcharge.operator.registry import Actor
from evcharge.operator.trips.federation import plan_info
from evcharge.wire import protocol as p
from evcharge.wire.connection import Connection, Responder
from evcharge.wire.errors import (
    BadRequestError,
    ConnectionLostError,
    ForbiddenError,
    UnavailableError,
)

if TYPE_CHECKING:
    from evcharge.operator.server import Server

log = logging.getLogger(__name__)

INSPECT_PART_BYTES = p.MAX_FRAME // 2  # room to spare under the frame cap
PUSH_BUFFER_LIMIT = 4 << 20  # a client this far behind on pushes is disconnected
STATION_COMMAND_TIMEOUT = 10.0


class Session(Responder):
    role: str = ""
    internal_error = "internal error; the operator's log has the details"

    def __init__(self, server: Server, conn: Connection, ident: str) -> None:
        self.server = server
        self.registry = server.registry
        self.conn = conn
        self.ident = ident
        self.actor = Actor(self.role, ident)
        self.idle_timeout: float | None = server.idle_timeout

    def __str__(self) -> str:
        return f"{self.role} {self.ident} ({self.conn.peername})"

    async def run(self) -> None:
        try:
            reason = await self.conn.serve(
                self, idle_timeout=self.idle_timeout, max_in_flight=self.server.max_in_flight
            )
            if reason != "closed":
                log.info("%s: %s; closing", self, reason)
        finally:
            self.closed()

    def replied(self, request: p.Request, reply: p.Reply) -> None:
        self.server.requests_served += 1
        if isinstance(reply, p.Vote) and reply.yes:
            crash_point("participant-voted")

    def push(self, event: p.Event) -> None:
        """Send an event without waiting; a client that does not keep up is dropped."""
        if self.conn.closed:
            return
        try:
            self.conn.write_nowait(event)
        except ConnectionLostError:
            return
        if self.conn.buffered_out > self.server.push_buffer_limit:
            log.warning("%s is not reading its events; disconnecting", self)
            self.conn.abort()

    async def handle(self, request: p.Request) -> p.Reply:
        match request:
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=self.server.clock.now_dt())
            case p.ListStations(city=city, lat=lat, lon=lon, limit=limit):
                near = (lat, lon) if lat is not None and lon is not None else None
                return p.StationList(stations=await self.registry.list_stations(city, near, limit))
            case p.FindNearest(lat=lat, lon=lon, min_power_kw=min_kw):
                station, cp_id, distance = await self.registry.nearest_available(lat, lon, min_kw)
                return p.NearestResult(station=station, charge_point_id=cp_id, distance_km=distance)
            case p.GetStationStatus(station_id=station_id):
                station = await self.registry.station_status(station_id)
                return p.StationStatus(station=station, server_time=self.server.clock.now_dt())
        raise ForbiddenError(f"{type(request).__name__} is not a request a {self.role} may send")

    def closed(self) -> None:
        self.server.forget(self)


class VehicleSession(Session):
    role = "vehicle"

    async def handle(self, request: p.Request) -> p.Reply:
        registry, me = self.registry, self.actor
        match request:
            case p.Reserve(charge_point_id=cp_id, start=start, minutes=minutes):
                r = await registry.reserve(me, self.ident, cp_id, to_seconds(start), minutes)
                return p.ReservationReply(reservation=registry.reservation_info(r))
            case p.ListReservations(include_past=include_past):
                return p.ReservationList(reservations=await registry.reservations_of(self.ident, include_past))
            case p.CancelReservation(reservation_id=rid):
                r = await registry.cancel(me, rid)
                return p.ReservationReply(reservation=registry.reservation_info(r))
            case p.StartCharging(reservation_id=rid):
                return p.ReservationReply(reservation=await self.server.start_charging(me, rid))
            case p.StopCharging(reservation_id=rid):
                return p.ReservationReply(reservation=await self.server.stop_charging(me, rid))
            case p.GetHistory():
                sessions = await registry.history_of(self.ident)
                return p.History(
                    sessions=sessions,
                    total_kwh=round(sum(s.kwh for s in sessions), 4),
                    total_cost=round(sum(s.cost for s in sessions), 2),
                )
            case p.UpdatePosition(lat=lat, lon=lon):
                registry.positions[self.ident] = (lat, lon)
                return p.Ok()
            case p.PlanTrip(query=query):
                federation = self.server.federation_or_refuse()
                vehicle = self.server.world.vehicle(self.ident)
                plan = await federation.plan(vehicle, query)
                plan_id = federation.show(self.ident, query, plan)
                return p.TripReply(trip=plan_info(plan_id, self.ident, self.server.operator.id, query, plan))
            case p.BookTrip(query=query, plan_id=plan_id):
                federation = self.server.federation_or_refuse()
                vehicle = self.server.world.vehicle(self.ident)
                trip, attempts, as_shown = await federation.book(vehicle, query, plan_id)
                return p.TripReply(trip=trip, attempts=attempts, as_shown=as_shown)
            case p.ListTrips(include_cancelled=include_cancelled):
                federation = self.server.federation_or_refuse()
                return p.TripList(trips=federation.trips_of(self.ident, include_cancelled))
            case p.CancelTrip(trip_id=trip_id):
                trip = await self.server.federation_or_refuse().cancel_trip(self.ident, trip_id)
                return p.TripReply(trip=trip)
        return await super().handle(request)


class StationSession(Session):
    """One charge point; it speaks only for itself."""

    role = "station"

    async def handle(self, request: p.Request) -> p.Reply:
        match request:
            case p.StatusNotification(status=status, info=info):
                await self.server.charge_point_reported(self.actor, status, info)
                return p.Ok()
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=self.server.clock.now_dt())
            case p.SessionComplete(reservation_id=rid, kwh=kwh, reason=reason):
                await self.registry.complete_charging(self.actor, rid, kwh, reason or "completed by charge point")
                return p.Ok()
            case p.ListReservations(include_past=include_past):
                return p.ReservationList(reservations=await self.registry.reservations_on(self.ident, include_past))
            case p.Authorize(vehicle_id=vehicle_id):
                r = await self.registry.authorize(self.actor, vehicle_id)
                return p.ReservationReply(reservation=self.registry.reservation_info(r))
            case p.StartCharging(reservation_id=rid):
                return p.ReservationReply(reservation=await self.server.charging_started(self.actor, rid))
        raise ForbiddenError(f"{type(request).__name__} is not a request a charge point may send")

    def handle_event(self, event: p.Event) -> None:
        match event:
            case p.MeterValues(reservation_id=rid, kwh=kwh):
                self.server.meter_value(self.ident, rid, kwh)
            case _:
                super().handle_event(event)

    async def command(self, request: p.Request) -> p.Reply:
        try:
            return await self.conn.request(request, timeout=STATION_COMMAND_TIMEOUT)
        except ConnectionLostError:
            raise UnavailableError(f"charge point {self.ident} went offline") from None


class OperatorSession(Session):
    """The operator's own tools (inspect, monitor): sees and may cancel everything."""

    role = "operator"

    def __init__(self, server: Server, conn: Connection, ident: str) -> None:
        super().__init__(server, conn, ident)
        self._inspect_cursor = ""  # names the snapshot whose parts are still to be fetched
        self._inspect_parts: collections.deque[p.InspectResult] = collections.deque()

    async def handle(self, request: p.Request) -> p.Reply:
        match request:
            case p.Inspect(cursor=""):
                stations, reservations = await self.registry.snapshot()
                federation = self.server.federation
                snapshot = p.InspectResult(
                    operator_id=self.registry.operator_id,
                    server_time=self.server.clock.now_dt(),
                    stations=stations,
                    reservations=reservations,
                    trips=[federation.trip_info(t) for t in federation.trips.values()] if federation else [],
                    peers=federation.peers() if federation else [],
                    requests_served=self.server.requests_served,
                    connections=self.server.connection_counts(),
                )
                # One consistent snapshot, handed out in parts that fit in a frame each; the
                # parts wait here, one snapshot per connection, until asked for.
                first, *rest = p.split_to_fit(snapshot, INSPECT_PART_BYTES)
                self._inspect_cursor = secrets.token_hex(8) if rest else ""
                self._inspect_parts = collections.deque(rest)
                first.more = self._inspect_cursor
                return first
            case p.Inspect(cursor=cursor):
                if cursor != self._inspect_cursor or not self._inspect_parts:
                    raise BadRequestError("no such inspect cursor (a newer Inspect replaces it): start again")
                part = self._inspect_parts.popleft()
                part.more = cursor if self._inspect_parts else ""
                return part
            case p.CancelReservation(reservation_id=rid):
                r = await self.registry.cancel(self.actor, rid)
                return p.ReservationReply(reservation=self.registry.reservation_info(r))
        return await super().handle(request)


class PeerSession(Session):
    """Another operator: its catalog and availability requests, and its trip bookings."""

    role = "peer"

    async def handle(self, request: p.Request) -> p.Reply:
        registry, coordinator = self.registry, self.ident
        match request:
            case p.GetCatalog():
                stations = await registry.list_stations(None, None, None)
                return p.Catalog(operator_id=registry.operator_id, stations=stations)
            case p.GetAvailability(start=start, end=end):
                busy = await registry.busy_between(to_seconds(start), to_seconds(end))
                return p.Availability(charge_points=busy)
            case p.Prepare(vehicle_id=vehicle_id):
                # An operator books trips for its own vehicles only; it cannot speak for another's.
                if not any(v.id == vehicle_id and v.home == coordinator for v in self.server.world.vehicles):
                    raise ForbiddenError(f"vehicle {vehicle_id!r} is not a vehicle of operator {coordinator}")
                return await registry.hold(coordinator, request)
            case p.Decide(txn_id=txn_id, trip_id=trip_id, commit=commit):
                await registry.resolve(coordinator, txn_id, trip_id, commit)
                return p.Ok()
            case p.QueryDecision(txn_id=txn_id):
                return p.Decision(txn_id=txn_id, outcome=self.server.federation_or_refuse().outcome(txn_id))
            case p.ReleaseTrip(trip_id=trip_id):
                await registry.release_trip(coordinator, trip_id)
                return p.Ok()
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=self.server.clock.now_dt())
        raise ForbiddenError(f"{type(request).__name__} is not a request a peer may send")
