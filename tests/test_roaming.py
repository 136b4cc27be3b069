"""A driver's whole day across operators, through the home operator only: find, reserve, charge, pay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from evcharge.apps.simulator import ChargePointSim
from evcharge.domain.world import World
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, NotFoundError, UnavailableError

from .conftest import running_federation, wait_until_federated

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


@pytest.fixture
async def servers(fed_world: World, tmp_path: Path) -> AsyncIterator[dict[str, Server]]:
    async with running_federation(fed_world, tmp_path / "data") as running:
        yield running


def driver(servers: dict[str, Server], vehicle_id: str):
    v = servers["A"].world.vehicle(vehicle_id)
    return connect("127.0.0.1", servers[v.home].port, role="vehicle", ident=v.id, secret=v.token)


@asynccontextmanager
async def charge_points(servers: dict[str, Server], *cp_ids: str) -> AsyncIterator[list[ChargePointSim]]:
    """Simulated charge points, each connected to its owner, until the block ends."""
    world = servers["A"].world
    sims = []
    for cp_id in cp_ids:
        station, cp = world.charge_point(cp_id)
        sims.append(ChargePointSim(cp, "127.0.0.1", servers[station.operator].port, heartbeat_s=5))
    tasks = [asyncio.create_task(sim.run()) for sim in sims]
    try:
        await eventually(
            lambda: all(servers[world.charge_point(c)[0].operator].books.charge_points[c].online for c in cp_ids)
        )
        yield sims
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 15.0) -> T:
    """The first true answer of ``check`` (polled), or the test fails."""
    async with asyncio.timeout(timeout):
        while True:
            answer = check()
            if isinstance(answer, Awaitable):
                answer = await answer
            if answer:
                return answer  # type: ignore[return-value]
            await asyncio.sleep(0.05)


def cp_of(station: p.StationInfo, cp_id: str) -> p.ChargePointInfo:
    return next(cp for cp in station.charge_points if cp.id == cp_id)


async def test_a_driver_finds_and_sees_every_operators_chargers_live(
    servers: dict[str, Server], tmp_path: Path
) -> None:
    async with charge_points(servers, "REC-BV-1", "JPA-1-1", "FEC-1-1"), driver(servers, "V01") as c:
        # Recife has B's chargers: the nearest is there, not 103 km away in João Pessoa.
        recife = servers["A"].world.stations_of("B")[0]

        async def nearest_recife() -> p.NearestResult | None:  # once B's news of its charge point is in
            found = await c.find_nearest(recife.lat, recife.lon, min_power_kw=100)
            return found if found.station.operator_id == "B" else None

        found = await eventually(nearest_recife)
        assert (found.station.operator_id, found.charge_point_id, found.distance_km) == ("B", "REC-BV-1", 0.0)
        feira = next(s for s in servers["A"].world.stations if s.city == "Feira de Santana")
        found = await c.find_nearest(feira.lat, feira.lon, min_power_kw=100)
        assert (found.station.operator_id, found.charge_point_id) == ("C", "FEC-1-1")
        # Every operator's stations, each naming its operator; the live status of B's.
        stations = await c.list_stations()
        assert {s.operator_id for s in stations} == {"A", "B", "C"}
        assert {s.id for s in stations} == {s.id for s in servers["A"].world.stations}
        in_recife = await c.list_stations(city="recife")
        assert {(s.id, s.operator_id) for s in in_recife} == {("REC-BV", "B"), ("REC-CEN", "B")}
        status = await c.station_status("REC-BV")
        assert status.operator_id == "B" and status.as_of is None
        assert cp_of(status, "REC-BV-1").status == "available" and cp_of(status, "REC-BV-2").status == "offline"

        # Someone of B's own reserves REC-BV-1 from now: A hears it by a push, not by asking.
        async with driver(servers, "V02") as b_driver:
            r = await b_driver.reserve("REC-BV-1", b_driver.server_now(), 60)

        async def reserved() -> p.StationInfo | None:
            seen = await c.station_status("REC-BV")
            return seen if cp_of(seen, "REC-BV-1").status == "reserved" else None

        seen = await eventually(reserved)
        assert cp_of(seen, "REC-BV-1").free_at == r.end
        assert [(i.start, i.end) for i in cp_of(seen, "REC-BV-1").busy] == [(r.start, r.end)]

        # B goes down: its stations are still shown, as last heard and saying since when.
        await servers["B"].stop()
        down = await eventually(lambda: _as_of(c, "REC-BV"))
        assert cp_of(down, "REC-BV-1").status == "reserved"
        # Not offered as free now: nobody knows that it is.
        found = await c.find_nearest(recife.lat, recife.lon, min_power_kw=100)
        assert (found.station.operator_id, found.charge_point_id) == ("A", "JPA-1-1")
        await restart(servers, "B", tmp_path)
        back = await eventually(lambda: _live(c, "REC-BV"))
        assert [(i.start, i.end) for i in cp_of(back, "REC-BV-1").busy] == [(r.start, r.end)]


async def _as_of(c: Client, station_id: str) -> p.StationInfo | None:
    seen = await c.station_status(station_id)
    return seen if seen.as_of is not None else None


async def _live(c: Client, station_id: str) -> p.StationInfo | None:
    seen = await c.station_status(station_id)
    return seen if seen.as_of is None else None


async def restart(servers: dict[str, Server], op: str, tmp_path: Path) -> Server:
    """The operator's server again, on its port, with its store."""
    server = Server(
        servers["A"].world,
        op,
        tmp_path / "data" / op,
        host="127.0.0.1",
        time_scale=60.0,
        clock_anchor=servers["A"].clock.anchor_real,
    )
    await server.start()
    servers[op] = server
    await wait_until_federated(servers)
    return server


async def test_a_driver_reserves_charges_and_pays_at_another_operator(
    servers: dict[str, Server], tmp_path: Path
) -> None:
    async with (
        charge_points(servers, "FEC-1-2", "NAT-PN-1"),
        driver(servers, "V01") as c,
        driver(servers, "V04") as v04,
    ):
        pushed: list[p.Event] = []
        c.on_event.append(pushed.append)
        r = await c.reserve("FEC-1-2", c.server_now(), 60)  # C's charger, through A
        assert r.id.startswith("C-") and r.operator_id == "C" and r.state == "booked"
        assert servers["C"].books.reservations[r.id].vehicle_id == "V01"  # committed by the owner
        mine = await c.reservations()
        assert [(x.id, x.operator_id) for x in mine] == [(r.id, "C")]
        # C's rules hold for A's driver too: the slot is taken, whoever asks.
        with pytest.raises(ConflictError, match="FEC-1-2 is taken then"):
            await v04.reserve("FEC-1-2", c.server_now(), 30)
        # Someone else's reservation, at any operator: not found, in the same words.
        with pytest.raises(NotFoundError, match=f"^no reservation '{r.id}'$"):
            await v04.cancel(r.id)
        async with driver(servers, "V02") as b_driver:  # another operator's driver
            with pytest.raises(NotFoundError, match=f"^no reservation '{r.id}'$"):
                await b_driver.cancel(r.id)

        charging = await c.start_charging(r.id)
        assert charging.state == "charging"
        await eventually(lambda: any(isinstance(e, p.ChargingProgress) and e.reservation_id == r.id for e in pushed))
        released = await c.stop_charging(r.id)
        assert released.state == "completed" and released.kwh > 0
        reasons = [e.reason for e in pushed if isinstance(e, p.ReservationChanged) and e.reservation.id == r.id]
        assert reasons == ["booked", "charging", "stopped by vehicle"]

        # One history, one bill: the session at C is at A, with C's price, exactly once.
        async def at_home() -> p.History | None:
            history = await c.history()
            return history if history.sessions else None

        history = await eventually(at_home)
        (session,) = history.sessions
        price = servers["A"].world.charge_point("FEC-1-2")[1].price_per_kwh
        assert (session.reservation_id, session.operator_id, session.city) == (r.id, "C", "Feira de Santana")
        assert (session.kwh, session.price_per_kwh, session.cost) == (released.kwh, price, released.cost)
        # A session at home is there too, in the same list.
        own = await c.reserve("NAT-PN-1", c.server_now(), 30)
        await c.start_charging(own.id)
        await asyncio.sleep(1.2)  # some meter values
        await c.stop_charging(own.id)
        history = await c.history()
        assert [s.operator_id for s in history.sessions] == ["C", "A"]
        assert history.total_cost == round(sum(s.cost for s in history.sessions), 2)

    # Settlement: what C charged A's vehicles is what A was charged by C.
    async with operator_tool(servers, "C") as tool_c, operator_tool(servers, "A") as tool_a:
        charged = await eventually(lambda: _delivered(tool_c))
        received = (await tool_a.settlement()).received
        assert [(x.session.reservation_id, x.session.cost, x.home_operator_id) for x in charged] == [
            (r.id, released.cost, "A")
        ]
        assert [(x.session.reservation_id, x.session.cost) for x in received] == [(r.id, released.cost)]

    # Delivered once, kept once: a restart of either side sends nothing twice.
    for op in ("A", "C"):
        await servers[op].stop()
        await restart(servers, op, tmp_path)
    async with driver(servers, "V01") as c:
        assert [s.reservation_id for s in (await c.history()).sessions].count(r.id) == 1


@asynccontextmanager
async def operator_tool(servers: dict[str, Server], op_id: str) -> AsyncIterator[Client]:
    op = servers[op_id].operator
    async with connect("127.0.0.1", servers[op_id].port, role="operator", ident=op.id, secret=op.secret) as c:
        yield c


async def _delivered(tool: Client) -> list[p.ChargeRecordInfo]:
    charged = (await tool.settlement()).charged
    return charged if charged and all(x.delivered for x in charged) else []


async def test_cancelling_at_another_operator_twice_says_it_was_cancelled_already(servers: dict[str, Server]) -> None:
    async with driver(servers, "V01") as c:
        r = await c.reserve("REC-BV-2", c.server_now() + timedelta(hours=1), 30)
        first = await c.cancel(r.id)
        assert first.reservation.state == "cancelled" and not first.unchanged
        again = await c.cancel(r.id)
        assert again.reservation.state == "cancelled" and again.unchanged
        assert await c.reservations() == []
        assert [x.id for x in await c.reservations(include_past=True)] == [r.id]
        await servers["B"].stop()
        with pytest.raises(UnavailableError, match=r"operator B cannot be reached now.*nothing was done"):
            await c.reserve("REC-BV-2", c.server_now() + timedelta(hours=1), 30)


async def test_a_driver_is_reminded_of_a_reservation_at_another_operator(servers: dict[str, Server]) -> None:
    soon = servers["A"].world.rules.reserved_soon_min
    async with driver(servers, "V01") as c:
        pushed: list[p.Event] = []
        c.on_event.append(pushed.append)
        # Starts just past the reminder window: in a few real seconds (60x) the reminder is due.
        r = await c.reserve("AJU-1-1", c.server_now() + timedelta(minutes=soon + 3), 30)

        def reminders() -> list[str]:
            return [
                e.reason
                for e in pushed
                if isinstance(e, p.ReservationChanged) and e.reservation.id == r.id and e.reason.startswith("reminder")
            ]

        (reminder,) = await eventually(reminders)
        assert reminder.startswith("reminder: starts in ")
        await asyncio.sleep(1.0)
        assert len(reminders()) == 1  # once


async def test_a_peer_speaks_only_for_its_own_stations_of_the_world_file(servers: dict[str, Server]) -> None:
    """A catalog lacking a station made its status an internal error; one adding stations listed them."""
    directory = servers["A"].federation.directory
    async with driver(servers, "V01") as c:
        rec_bv = await c.station_status("REC-BV")
        made_up = msgspec.structs.replace(rec_bv, id="B-NOWHERE", name="Nowhere")
        not_bs = next(s for s in await c.list_stations() if s.operator_id == "C")
        directory.catalog("B", [made_up, msgspec.structs.replace(not_bs, operator_id="B")])
        directory.station_changed("B", made_up)
        listed = {s.id for s in await c.list_stations()}
        assert "B-NOWHERE" not in listed and listed == {s.id for s in servers["A"].world.stations}
        # REC-BV is not in that catalog: shown as never heard of, not an error.
        status = await c.station_status("REC-BV")
        assert {cp.status for cp in status.charge_points} == {"unknown"}
