"""One connected client after its handshake, and how each role's messages are handled.

Every request a client can send is handled in exactly one ``handle`` method
below, by a ``match`` on its type: ``VehicleHandler``, ``ChargePointHandler``
(the wire role ``station``: one charge point), ``OperatorToolHandler`` (the
operator's own monitor, dashboard and inspect) and ``PeerHandler`` (another
operator). What arrives is dispatched to them by ``Connection.serve``.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable
from datetime import timedelta

from evcharge.domain.clock import to_seconds
from evcharge.domain.model import Reservation
from evcharge.operator.crash_points import crash_point
from evcharge.operator.reservations import Cancelled
from evcharge.operator.services import Services
from evcharge.operator.state import Actor
from evcharge.operator.trips.coordinator import Booked, TripCancelled
from evcharge.operator.views import planned_trip_info
from evcharge.wire import protocol as p
from evcharge.wire.connection import MAX_IN_FLIGHT, Connection, Responder
from evcharge.wire.errors import BadRequestError, ConnectionLostError, ForbiddenError, NotFoundError, UnavailableError

log = logging.getLogger(__name__)

INSPECT_PART_BYTES = p.MAX_FRAME // 2  # room to spare under the frame cap
PUSH_BUFFER_LIMIT = 4 << 20  # a client this far behind on pushes is disconnected
COMMAND_TIMEOUT = 10.0  # real seconds a charge point has to answer a command
MAX_AVAILABILITY = timedelta(days=7)  # of slots a peer may ask about at once (a plan asks for two)


class RoleHandler(Responder):
    role: str = ""
    internal_error = "internal error; the operator's log has the details"

    def __init__(self, services: Services, conn: Connection, ident: str, *, idle_timeout: float | None) -> None:
        self.services = services
        self.conn = conn
        self.ident = ident
        self.actor = Actor(self.role, ident)
        self.idle_timeout = idle_timeout

    def __str__(self) -> str:
        return f"{self.role} {self.ident} ({self.conn.peername})"

    async def run(
        self, max_in_flight: int = MAX_IN_FLIGHT, closed: Callable[[RoleHandler], None] | None = None
    ) -> None:
        try:
            reason = await self.conn.serve(self, idle_timeout=self.idle_timeout, max_in_flight=max_in_flight)
            if reason != "closed":
                log.info("%s: %s; closing", self, reason)
        finally:
            if closed is not None:
                closed(self)

    def replied(self, request: p.Request, reply: p.Reply) -> None:
        self.services.counters.requests_served += 1
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
        if self.conn.buffered_out > self.services.push_buffer_limit:
            log.warning("%s is not reading its events; disconnecting", self)
            self.conn.abort()

    def drop(self) -> None:
        self.conn.abort()

    async def command(self, request: p.Request) -> p.Reply:
        raise ForbiddenError(f"a {self.role} takes no commands")

    async def handle(self, request: p.Request) -> p.Reply:
        """What every role may ask."""
        views = self.services.views
        match request:
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=self.services.books.clock.now_dt())
            case p.ListStations(city=city, lat=lat, lon=lon, limit=limit):
                near = (lat, lon) if lat is not None and lon is not None else None
                return p.StationList(stations=await views.list_stations(city, near, limit))
            case p.FindNearest(lat=lat, lon=lon, min_power_kw=min_kw):
                return await views.nearest_available(lat, lon, min_kw)
            case p.GetStationStatus(station_id=station_id):
                station = await views.station_status(station_id)
                return p.StationStatus(station=station, server_time=self.services.books.clock.now_dt())
        raise ForbiddenError(f"{type(request).__name__} is not a request a {self.role} may send")


async def act_for_vehicle(s: Services, me: Actor, request: p.RoamedRequest) -> p.Reply:
    """A vehicle's request about this operator's own chargers: its own, or forwarded by its home (``me.via``).

    Every change is done once per idempotency key (``outcomes``).
    """
    views = s.views

    def reservation_reply(r: Reservation) -> p.Reply:
        return p.ReservationReply(reservation=views.reservation_info(r))

    match request:
        case p.Reserve(charge_point_id=cp_id, start=start, minutes=minutes):
            return await s.outcomes.once(
                me,
                request,
                lambda keep: s.reservations.reserve(me, me.ident, cp_id, to_seconds(start), minutes, keep),
                reservation_reply,
            )
        case p.CancelReservation(reservation_id=rid):

            def cancelled(c: Cancelled) -> p.Reply:
                return p.ReservationReply(reservation=views.reservation_info(c.reservation), unchanged=c.already)

            return await s.outcomes.once(me, request, lambda keep: s.reservations.cancel(me, rid, keep), cancelled)
        case p.StartCharging(reservation_id=rid):
            return await s.outcomes.once(me, request, lambda keep: s.charging.start(me, rid, keep), reservation_reply)
        case p.StopCharging(reservation_id=rid):
            return await s.outcomes.once(me, request, lambda keep: s.charging.stop(me, rid, keep), reservation_reply)
        case p.ListReservations(include_past=include_past):
            return p.ReservationList(reservations=await views.reservations_of(me.ident, include_past))
    raise ForbiddenError(f"{type(request).__name__} is not a request a vehicle may send")


class VehicleHandler(RoleHandler):
    role = "vehicle"

    async def handle(self, request: p.Request) -> p.Reply:
        s, me = self.services, self.actor
        federation = s.federation
        match request:
            case p.Reserve() | p.CancelReservation() | p.StartCharging() | p.StopCharging():
                owner = federation.roaming.owner(request) if federation else None
                if owner is None:
                    return await act_for_vehicle(s, me, request)
                assert federation is not None
                return await federation.roaming.forward(owner, self.ident, request, p.ReservationReply)
            case p.ListReservations(include_past=include_past):
                mine = await s.views.reservations_of(self.ident, include_past)
                if federation is not None:
                    mine += await federation.roaming.reservations_elsewhere(self.ident, include_past)
                mine.sort(key=lambda r: (r.start, r.operator_id))
                return p.ReservationList(reservations=mine)
            case p.GetHistory():
                elsewhere = federation.records.sessions_elsewhere(self.ident) if federation else []
                return await s.views.history_of(self.ident, elsewhere)
            case p.ListStations(city=city, lat=lat, lon=lon, limit=limit) if federation is not None:
                near = (lat, lon) if lat is not None and lon is not None else None
                return p.StationList(stations=await federation.directory.list_stations(city, near, limit))
            case p.FindNearest(lat=lat, lon=lon, min_power_kw=min_kw) if federation is not None:
                return await federation.directory.nearest_available(lat, lon, min_kw)
            case p.GetStationStatus(station_id=station_id) if federation is not None:
                station = await federation.directory.station_status(station_id)
                return p.StationStatus(station=station, server_time=s.books.clock.now_dt())
            case p.UpdatePosition(lat=lat, lon=lon):
                s.books.positions[self.ident] = (lat, lon)
                return p.Ok()
            case p.PlanTrip(query=query):
                planning = s.federation_or_refuse().planning
                plan = await planning.plan(s.world.vehicle(self.ident), query)
                plan_id = planning.show(self.ident, query, plan)
                return p.TripReply(trip=planned_trip_info(plan_id, self.ident, s.operator.id, query, plan))
            case p.BookTrip(query=query, plan_id=plan_id):
                coordinator = s.federation_or_refuse().coordinator
                vehicle = s.world.vehicle(self.ident)

                def booked(b: Booked) -> p.Reply:
                    return p.TripReply(trip=b.trip, attempts=b.attempts, as_shown=b.as_shown)

                return await s.outcomes.once(
                    me, request, lambda keep: coordinator.book(vehicle, query, plan_id, keep), booked
                )
            case p.ListTrips(include_cancelled=include_cancelled):
                coordinator = s.federation_or_refuse().coordinator
                return p.TripList(trips=coordinator.trips_of(self.ident, include_cancelled))
            case p.CancelTrip(trip_id=trip_id):
                coordinator = s.federation_or_refuse().coordinator

                def trip_cancelled(c: TripCancelled) -> p.Reply:
                    return p.TripReply(trip=c.trip, unchanged=c.already)

                return await s.outcomes.once(
                    me, request, lambda keep: coordinator.cancel_trip(self.ident, trip_id, keep), trip_cancelled
                )
        return await super().handle(request)


class ChargePointHandler(RoleHandler):
    """One charge point (wire role ``station``); it speaks only for itself."""

    role = "station"

    async def handle(self, request: p.Request) -> p.Reply:
        s, me = self.services, self.actor
        match request:
            case p.StatusNotification(status=status, info=info):
                await s.charging.charge_point_reported(me, status, info)
                return p.Ok()
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=s.books.clock.now_dt())
            case p.SessionComplete(reservation_id=rid, kwh=kwh, reason=reason):
                await s.charging.complete(me, rid, kwh, reason or "completed by charge point")
                return p.Ok()
            case p.ListReservations(include_past=include_past):
                return p.ReservationList(reservations=await s.views.reservations_on(self.ident, include_past))
            case p.Authorize(vehicle_id=vehicle_id):
                r = await s.reservations.authorize(me, vehicle_id)
                return p.ReservationReply(reservation=s.views.reservation_info(r))
            case p.StartCharging(reservation_id=rid):
                r = await s.charging.started_by_charge_point(me, rid)
                return p.ReservationReply(reservation=s.views.reservation_info(r))
        raise ForbiddenError(f"{type(request).__name__} is not a request a charge point may send")

    def handle_event(self, event: p.Event) -> None:
        match event:
            case p.MeterValues(reservation_id=rid, kwh=kwh):
                self.services.charging.meter_value(self.ident, rid, kwh)
            case _:
                super().handle_event(event)

    async def command(self, request: p.Request) -> p.Reply:
        try:
            return await self.conn.request(request, timeout=COMMAND_TIMEOUT)
        except ConnectionLostError:
            raise UnavailableError(f"charge point {self.ident} went offline") from None


class OperatorToolHandler(RoleHandler):
    """The operator's own tools (inspect, monitor, dashboard): see and may cancel everything."""

    role = "operator"

    def __init__(self, services: Services, conn: Connection, ident: str, *, idle_timeout: float | None) -> None:
        super().__init__(services, conn, ident, idle_timeout=idle_timeout)
        self._inspect_cursor = ""  # names the snapshot whose parts are still to be fetched
        self._inspect_parts: collections.deque[p.InspectResult] = collections.deque()

    async def handle(self, request: p.Request) -> p.Reply:
        s = self.services
        match request:
            case p.Inspect(cursor=""):
                stations, reservations, trips = await s.views.snapshot()
                snapshot = p.InspectResult(
                    operator_id=s.operator.id,
                    server_time=s.books.clock.now_dt(),
                    stations=stations,
                    reservations=reservations,
                    trips=trips,
                    peers=s.federation.peers.infos() if s.federation else [],
                    requests_served=s.counters.requests_served,
                    connections=s.online.counts(),
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
                # A trip's stop is withdrawn (its charge point out of service), and its coordinator told.
                if rid in s.books.reservations and s.books.reservations[rid].trip_id is not None:
                    r = await s.participant.withdraw(self.actor, rid)
                    return p.ReservationReply(reservation=s.views.reservation_info(r))
                c = await s.reservations.cancel(self.actor, rid)
                return p.ReservationReply(reservation=s.views.reservation_info(c.reservation), unchanged=c.already)
            case p.GetSettlement():
                return s.federation_or_refuse().records.settlement()
            case p.Roam(vehicle_id=driver, request=asked):
                # The operator's OCPI edge, for a driver of a roaming platform: that driver owns its
                # reservations and keys as a vehicle does. No vehicle of the world can be spoken for.
                if not p.is_roaming_driver(driver) or s.home_of(driver) is not None:
                    raise ForbiddenError(
                        f"an operator speaks only for roaming drivers ({p.ROAMING_DRIVER_PREFIX}…), not {driver!r}"
                    )
                return await act_for_vehicle(s, Actor("vehicle", driver, via=self.ident), asked)
        return await super().handle(request)


class PeerHandler(RoleHandler):
    """Another operator: its catalog and availability requests, its trip bookings, its vehicles' requests."""

    role = "peer"

    def _not_for(self, item: p.TwoPhaseItem) -> ForbiddenError | None:
        """An operator books trips for its own vehicles only; it cannot speak for another's."""
        if isinstance(item, p.Prepare) and self.services.home_of(item.vehicle_id) != self.ident:
            return ForbiddenError(f"vehicle {item.vehicle_id!r} is not a vehicle of operator {self.ident}")
        return None

    def replied(self, request: p.Request, reply: p.Reply) -> None:
        super().replied(request, reply)
        if isinstance(reply, p.TwoPhaseResults) and any(isinstance(r, p.Vote) and r.yes for r in reply.results):
            crash_point("participant-voted")

    async def handle(self, request: p.Request) -> p.Reply:
        s, coordinator = self.services, self.ident
        match request:
            case p.GetCatalog():
                return p.Catalog(operator_id=s.operator.id, stations=await s.views.catalog())
            case p.Roam(vehicle_id=vehicle_id, request=asked):
                # An operator speaks for its own vehicles only; another's is not disclosed.
                if s.home_of(vehicle_id) != coordinator:
                    raise NotFoundError(f"no vehicle {vehicle_id!r} of operator {coordinator}")
                return await act_for_vehicle(s, Actor("vehicle", vehicle_id, via=coordinator), asked)
            case p.DeliverChargeRecord(record=record):
                await s.federation_or_refuse().records.receive(coordinator, record)
                return p.Ok()
            case p.GetAvailability(start=start, end=end):
                if end - start > MAX_AVAILABILITY:
                    raise BadRequestError(f"availability is given for at most {MAX_AVAILABILITY.days} days at a time")
                busy = await s.views.busy_between(to_seconds(start), to_seconds(end))
                return p.Availability(charge_points=busy)
            case p.Prepare():
                refused = self._not_for(request)
                if refused is not None:
                    raise refused
                return await s.participant.hold(coordinator, request)
            case p.TwoPhaseBatch(items=items):
                if len(items) > p.MAX_BATCH_ITEMS:
                    raise BadRequestError(f"{len(items)} items in one batch; at most {p.MAX_BATCH_ITEMS}")
                results = await s.participant.batch(coordinator, items, allowed=self._not_for)
                return p.TwoPhaseResults(results=results)
            case p.Decide(txn_id=txn_id, trip_id=trip_id, commit=commit):
                await s.participant.resolve(coordinator, txn_id, trip_id, commit)
                return p.Ok()
            case p.QueryDecision(txn_id=txn_id):
                outcome = s.federation_or_refuse().coordinator.outcome(txn_id, asker=self.ident)
                return p.Decision(txn_id=txn_id, outcome=outcome)
            case p.ReleaseTrip(trip_id=trip_id):
                await s.participant.release_trip(coordinator, trip_id)
                return p.Ok()
            case p.StopWithdrawn(trip_id=trip_id, reservation_id=rid, reason=reason):
                await s.federation_or_refuse().coordinator.stop_withdrawn(self.ident, trip_id, rid, reason)
                return p.Ok()
            case p.Heartbeat():
                return p.HeartbeatAck(server_time=s.books.clock.now_dt())
        raise ForbiddenError(f"{type(request).__name__} is not a request a peer may send")
