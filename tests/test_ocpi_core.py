"""The operator's OCPI edge acting for roaming drivers (``Roam`` on an operator connection), in the core.

A roaming driver (``ocpi:CC-PID:UID``) owns its reservations and its idempotency
keys as a vehicle does; no operator tool may speak for a vehicle of the world.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from evcharge.links.requests import new_key
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, ForbiddenError, NotFoundError

from .conftest import operator, vehicle

pytestmark = pytest.mark.timeout(30)

DRIVER = "ocpi:NL-EXA:TOKEN-1"
OTHER = "ocpi:NL-EXA:TOKEN-2"


async def test_a_roaming_driver_owns_its_reservations_and_keys(server: Server) -> None:
    start = server.clock.now_dt() + timedelta(hours=1)
    async with operator(server) as tool:
        reserve = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key=new_key())
        first = await tool.call(p.Roam(vehicle_id=DRIVER, request=reserve), p.ReservationReply)
        assert first.reservation.vehicle_id == DRIVER and first.reservation.state == "booked"
        again = await tool.call(p.Roam(vehicle_id=DRIVER, request=reserve), p.ReservationReply)
        assert again.reservation.id == first.reservation.id  # the same key: done once
        rid = first.reservation.id
        # Another driver (of the same eMSP or not) is nobody to this reservation.
        with pytest.raises(NotFoundError):
            cancel = p.CancelReservation(reservation_id=rid, key=new_key())
            await tool.call(p.Roam(vehicle_id=OTHER, request=cancel), p.ReservationReply)
        mine = await tool.call(p.Roam(vehicle_id=DRIVER, request=p.ListReservations()), p.ReservationList)
        assert [r.id for r in mine.reservations] == [rid]
        theirs = await tool.call(p.Roam(vehicle_id=OTHER, request=p.ListReservations()), p.ReservationList)
        assert theirs.reservations == []
    assert server.books.reservations[rid].state == "booked"


async def test_a_roaming_driver_and_a_vehicle_race_in_one_ledger(server: Server) -> None:
    start = server.clock.now_dt() + timedelta(hours=2)
    async with operator(server) as tool, vehicle(server, "T001") as car:
        reserve = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=60, key=new_key())
        await car.call(reserve, p.ReservationReply)
        with pytest.raises(ConflictError):
            overlapping = p.Reserve(charge_point_id="NAT-PN-1", start=start + timedelta(minutes=30), minutes=60)
            await tool.call(p.Roam(vehicle_id=DRIVER, request=overlapping), p.ReservationReply)


@pytest.mark.parametrize("who", ["T001", "NL-EXA:TOKEN-1", "ocpi:"])
async def test_an_operator_tool_speaks_for_no_vehicle(server: Server, who: str) -> None:
    start = server.clock.now_dt() + timedelta(hours=1)
    before = dict(server.books.reservations)
    async with operator(server) as tool:
        reserve = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key=new_key())
        with pytest.raises(ForbiddenError):
            await tool.call(p.Roam(vehicle_id=who, request=reserve), p.ReservationReply)
    assert server.books.reservations == before


async def test_a_vehicle_cannot_roam_for_anyone(server: Server) -> None:
    start = server.clock.now_dt() + timedelta(hours=1)
    async with vehicle(server, "T001") as car:
        reserve = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30)
        with pytest.raises(ForbiddenError):
            await car.call(p.Roam(vehicle_id=DRIVER, request=reserve), p.ReservationReply)
