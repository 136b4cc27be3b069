"""Who is connected right now, and the events pushed to them.

``Online`` is told of every durable change by the books (it is one of their
listeners) and of trips by the coordinator, and pushes each event to those it
concerns: the vehicle, the charge point (a gateway turns reservations into its
charge point's own), and every operator tool (monitor, dashboard, inspect).
"""

from __future__ import annotations

import logging
from typing import Protocol

from evcharge.domain.model import Reservation
from evcharge.operator.views import Views
from evcharge.wire import protocol as p
from evcharge.wire.connection import Connection

log = logging.getLogger(__name__)


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

    def __len__(self) -> int:
        return len(self.everyone)

    def add(self, client: Connected) -> None:
        self.everyone.add(client)
        match client.role:
            case "station":
                old = self.charge_points.get(client.ident)
                if old is not None:
                    log.info("%s replaces an older connection of the same charge point", client)
                    old.drop()
                self.charge_points[client.ident] = client
                self.views.books.set_online(client.ident, True)
            case "vehicle":
                self.vehicles.setdefault(client.ident, set()).add(client)
            case "operator":
                self.operator_tools.add(client)

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
        for client in self.vehicles.get(vehicle_id, ()):
            client.push(event)

    def to_operator_tools(self, event: p.Event) -> None:
        for client in self.operator_tools:
            client.push(event)

    def reservation_changed(self, reservation: Reservation, reason: str) -> None:
        event = p.ReservationChanged(reservation=self.views.reservation_info(reservation), reason=reason)
        self.to_vehicle(reservation.vehicle_id, event)
        charge_point = self.charge_points.get(reservation.charge_point_id)
        if charge_point is not None:  # a gateway turns these into its charge point's reservations
            charge_point.push(event)
        self.to_operator_tools(event)

    def charge_point_changed(self, cp_id: str) -> None:
        books = self.views.books
        cp = books.charge_points[cp_id]
        status = self.views.status_of(cp, books.clock.now())
        self.to_operator_tools(p.ChargePointChanged(station_id=cp.station.id, charge_point_id=cp_id, status=status))

    def trip_changed(self, trip: p.TripInfo, reason: str, offer: p.TripOffer | None = None) -> None:
        event = p.TripChanged(trip=trip, reason=reason, offer=offer)
        self.to_vehicle(trip.vehicle_id, event)
        self.to_operator_tools(event)
