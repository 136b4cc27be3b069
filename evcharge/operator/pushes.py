"""Who is connected right now, and the events pushed to them.

``Online`` is told of every durable change by the books (it is one of their
listeners) and of trips by the coordinator, and pushes each event to those it
concerns: the vehicle (a visiting vehicle through its home operator), the
charge point (a gateway turns reservations into its charge point's own), every
operator tool (monitor, dashboard, inspect), and -- a moment later, one push per
changed station however many changes there were -- the other operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from evcharge.domain.model import Reservation
from evcharge.operator.views import Views
from evcharge.wire import protocol as p
from evcharge.wire.connection import Connection
from evcharge.wire.errors import ConflictError, ConnectionLostError

log = logging.getLogger(__name__)

# Why a trip's stop changes by its two-phase commit (participant.py): the trip's own news.
_TRIP_DECISIONS = frozenset({"held", "booked", "aborted", "trip cancelled"})
STATION_NEWS_DELAY = 0.2  # real seconds a station's changes are gathered into one push to the peers


class Connected(Protocol):
    """A client's connection as pushes see it (the role handlers)."""

    role: str
    ident: str
    conn: Connection

    def push(self, event: p.Event) -> None: ...

    async def command(self, request: p.Request) -> p.Reply: ...

    def drop(self) -> None: ...


class Online:
    def __init__(self, views: Views) -> None:
        self.views = views
        self.everyone: set[Connected] = set()
        self.charge_points: dict[str, Connected] = {}  # one connection per charge point: the newest
        self.vehicles: dict[str, set[Connected]] = {}  # a vehicle may be connected several times
        self.operator_tools: set[Connected] = set()  # monitors and inspectors get every push
        self.peers: dict[str, set[Connected]] = {}  # other operators' links to us
        books = views.books
        self._home_of = {v.id: v.home for v in books.world.vehicles if v.home != books.operator_id}
        self._changed_stations: set[str] = set()
        self._news_due: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()  # replaced connections being closed

    def __len__(self) -> int:
        return len(self.everyone)

    def add(self, client: Connected) -> None:
        self.everyone.add(client)
        match client.role:
            case "station":
                old = self.charge_points.get(client.ident)
                if old is not None:
                    self._replace(old, client)
                self.charge_points[client.ident] = client
                self.views.books.set_online(client.ident, True)
            case "vehicle":
                self.vehicles.setdefault(client.ident, set()).add(client)
            case "operator":
                self.operator_tools.add(client)
            case "peer":
                self.peers.setdefault(client.ident, set()).add(client)

    def _replace(self, old: Connected, new: Connected) -> None:
        """One connection per charge point: the newest wins, and the older one is told why it is closed."""
        why = (
            f"charge point {new.ident} connected again from {new.conn.peername}, so this connection "
            f"(from {old.conn.peername}) is closed: is another simulator or gateway speaking for it?"
        )
        log.warning("%s replaces the connection from %s of the same charge point", new, old.conn.peername)
        with contextlib.suppress(ConnectionLostError):
            old.conn.write_nowait(ConflictError(why).to_reply(0))
        closing = asyncio.get_running_loop().create_task(old.conn.close())  # bounded by the close grace
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def remove(self, client: Connected) -> bool:
        """Forget a closed connection; True if it was its charge point's current one."""
        self.everyone.discard(client)
        match client.role:
            case "station" if self.charge_points.get(client.ident) is client:
                del self.charge_points[client.ident]
                self.views.books.set_online(client.ident, False)
                return True
            case "operator":
                self.operator_tools.discard(client)
            case "peer":
                self.peers.get(client.ident, set()).discard(client)
            case "vehicle":
                mine = self.vehicles.get(client.ident)
                if mine is not None:
                    mine.discard(client)
                    if not mine:
                        del self.vehicles[client.ident]
        return False

    def counts(self) -> dict[str, int]:
        """Connected clients by role."""
        counts: dict[str, int] = {}
        for client in self.everyone:
            counts[client.role] = counts.get(client.role, 0) + 1
        return counts

    # --- pushes -------------------------------------------------------------------------

    def to_vehicle(self, vehicle_id: str, event: p.Event) -> None:
        home = self._home_of.get(vehicle_id)
        if home is not None:  # a visiting vehicle hears it from its home operator
            if isinstance(event, p.ReservationChanged | p.ChargingProgress):
                for client in self.peers.get(home, ()):
                    client.push(p.ForVehicle(vehicle_id=vehicle_id, event=event))
            return
        for client in self.vehicles.get(vehicle_id, ()):
            client.push(event)

    def to_operator_tools(self, event: p.Event) -> None:
        for client in self.operator_tools:
            client.push(event)

    def reservation_changed(self, reservation: Reservation, reason: str) -> None:
        # A trip's stops change by its two-phase commit only with their trip, and the vehicle
        # hears of that from its home (TripChanged, with every stop): the same news per stop
        # would only be more frames, across operators even (ForVehicle).
        to_vehicle = reservation.trip_id is None or reason not in _TRIP_DECISIONS
        charge_point = self.charge_points.get(reservation.charge_point_id)
        if to_vehicle or charge_point is not None or self.operator_tools:  # else nobody hears: nothing to build
            event = p.ReservationChanged(reservation=self.views.reservation_info(reservation), reason=reason)
            if to_vehicle:
                self.to_vehicle(reservation.vehicle_id, event)
            if charge_point is not None:  # a gateway turns these into its charge point's reservations
                charge_point.push(event)
            self.to_operator_tools(event)
        self._station_news(reservation.charge_point_id)

    def charge_point_changed(self, cp_id: str) -> None:
        books = self.views.books
        cp = books.charge_points[cp_id]
        status = self.views.status_of(cp, books.clock.now())
        self.to_operator_tools(p.ChargePointChanged(station_id=cp.station.id, charge_point_id=cp_id, status=status))
        self._station_news(cp_id)

    def close(self) -> None:
        if self._news_due is not None:
            self._news_due.cancel()
            self._news_due = None

    def _station_news(self, cp_id: str) -> None:
        """Tell the other operators, soon, how this charge point's station is now."""
        cp = self.views.books.charge_points.get(cp_id)
        if cp is None or not any(self.peers.values()):
            return
        self._changed_stations.add(cp.station.id)
        if self._news_due is None:
            self._news_due = asyncio.get_running_loop().call_later(STATION_NEWS_DELAY, self._send_station_news)

    def _send_station_news(self) -> None:
        self._news_due = None
        books = self.views.books
        now = books.clock.now()
        # Built in one callback: nothing changes the books meanwhile.
        events = [
            p.StationChanged(station=self.views.station_info(books.stations[sid], now, with_busy=True))
            for sid in sorted(self._changed_stations)
        ]
        self._changed_stations.clear()
        for clients in self.peers.values():
            for client in clients:
                for event in events:
                    client.push(event)

    def trip_changed(self, trip: p.TripInfo, reason: str, offer: p.TripOffer | None = None) -> None:
        event = p.TripChanged(trip=trip, reason=reason, offer=offer)
        self.to_vehicle(trip.vehicle_id, event)
        self.to_operator_tools(event)
