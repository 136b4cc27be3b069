"""What a charge point connection may do beyond the simulator's needs (what a gateway uses).

A station sees its own charge point's reservations and their changes, asks whether a driver
may charge now (Authorize), records a session it started itself, and may report itself out
of service (`unavailable`) as well as `faulted`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest

from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, NotFoundError, UnavailableError

from .conftest import operator, vehicle

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def station(server: Server, cp_id: str) -> AsyncIterator[Client]:
    cp = server.world.charge_point(cp_id)[1]
    async with connect("127.0.0.1", server.port, role="station", ident=cp.id, secret=cp.secret) as client:
        yield client


async def next_change(events: asyncio.Queue[p.Event]) -> p.ReservationChanged:
    while True:
        event = await asyncio.wait_for(events.get(), 5)
        if isinstance(event, p.ReservationChanged):
            return event


async def test_a_station_sees_its_own_reservations_and_their_changes(server: Server) -> None:
    async with station(server, "NAT-PN-1") as st, vehicle(server, "V01") as v:
        events: asyncio.Queue[p.Event] = asyncio.Queue()
        st.on_event.append(events.put_nowait)
        assert await st.reservations() == []
        mine = await v.reserve("NAT-PN-1", v.server_now() + timedelta(minutes=30), 30)
        other = await v.reserve("NAT-PN-2", v.server_now() + timedelta(minutes=30), 30)
        booked = await next_change(events)
        assert (booked.reservation.id, booked.reservation.state, booked.reason) == (mine.id, "booked", "booked")
        assert [r.id for r in await st.reservations()] == [mine.id]
        await v.cancel(mine.id)
        cancelled = await next_change(events)
        assert (cancelled.reservation.id, cancelled.reservation.state) == (mine.id, "cancelled")
        assert await st.reservations() == []
        assert [r.id for r in await st.reservations(include_past=True)] == [mine.id]
        await v.cancel(other.id)
        await st.heartbeat()  # anything pushed for NAT-PN-2 would have arrived before this reply
        rest = [events.get_nowait() for _ in range(events.qsize())]
        assert all(isinstance(e, p.ReservationChanged) and e.reservation.charge_point_id == "NAT-PN-1" for e in rest)


async def test_authorize_names_the_reservation_a_vehicle_may_start_here_now(server: Server) -> None:
    async with station(server, "NAT-PN-1") as st, vehicle(server, "V01") as v1, vehicle(server, "V04") as v4:
        now = v1.server_now()
        with pytest.raises(NotFoundError):
            await st.authorize("V01")
        later = await v1.reserve("NAT-PN-1", now + timedelta(hours=2), 30)
        with pytest.raises(ConflictError, match="too early"):
            await st.authorize("V01")
        current = await v1.reserve("NAT-PN-1", now, 30)
        assert (await st.authorize("V01")).id == current.id
        with pytest.raises(NotFoundError):
            await st.authorize("V04")  # not its reservation
        elsewhere = await v4.reserve("NAT-PN-2", now, 30)
        with pytest.raises(NotFoundError):
            await st.authorize("V04")  # its reservation is on another charge point
        with pytest.raises(NotFoundError):
            await st.start_charging(elsewhere.id)
        # The charge point starts the session itself: recorded, and no RemoteStart is sent
        # (this client answers none: one would fail the start).
        started = await st.start_charging(current.id)
        assert started.state == "charging"
        assert (await st.authorize("V01")).state == "charging"
        with pytest.raises(ConflictError):
            await st.start_charging(current.id)
        with pytest.raises(ConflictError, match="too early"):
            await st.start_charging(later.id)
        await st.session_complete(current.id, 4.5, "EVDisconnected")
        [session] = (await v1.history()).sessions
        assert (session.reservation_id, session.kwh) == (current.id, 4.5)


async def test_unavailable_is_out_of_service_but_not_a_fault(server: Server) -> None:
    async with station(server, "CGR-1-1") as st, vehicle(server, "V01") as v, operator(server) as op:
        r = await v.reserve("CGR-1-1", v.server_now(), 30)
        await st.start_charging(r.id)
        await st.report_status("unavailable", "maintenance")
        [ended] = await v.reservations(include_past=True)
        assert ended.state == "completed"
        statuses = {cp.id: cp.status for s in (await op.inspect()).stations for cp in s.charge_points}
        assert statuses["CGR-1-1"] == "unavailable"
        with pytest.raises(UnavailableError, match="unavailable"):
            await v.reserve("CGR-1-1", v.server_now() + timedelta(minutes=40), 30)
        await st.report_status("faulted", "ground fault")
        assert (await v.station_status("CGR-1")).charge_points[0].status == "faulted"
        await st.report_status("available")
        await v.reserve("CGR-1-1", v.server_now() + timedelta(minutes=40), 30)
        assert (await v.station_status("CGR-1")).charge_points[0].status == "available"
