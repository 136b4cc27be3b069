"""One operator's server over real sockets: reservations, conflicts, charging, expiry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evcharge.apps.simulator import ChargePointSim
from evcharge.domain.world import World
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    UnavailableError,
)

from .conftest import NewStore, operator, running_server, vehicle

pytestmark = pytest.mark.timeout(60)


def soon(client, minutes: float = 5):
    return client.server_now() + timedelta(minutes=minutes)


async def test_fifty_vehicles_race_for_one_slot_exactly_one_wins(
    world: World, tmp_path: Path, new_store: NewStore
) -> None:
    async with running_server(world, tmp_path / "data", time_scale=60.0, store=new_store()) as server:
        await _race_for_one_slot(server)


async def _race_for_one_slot(server: Server) -> None:
    racers = [f"T{n:03d}" for n in range(1, 51)]
    async with vehicle(server, racers[0]) as probe:
        start = soon(probe, 30).replace(microsecond=0)

    async def attempt(vehicle_id: str):
        async with vehicle(server, vehicle_id) as c:
            try:
                return await c.reserve("NAT-PN-1", start, 45)
            except ConflictError as exc:
                return exc

    results = await asyncio.gather(*(attempt(v) for v in racers))
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, ConflictError)]
    assert len(winners) == 1 and len(losers) == 49
    # Every loser is told when the charge point is free for the same duration.
    assert {e.next_free for e in losers} == {start + timedelta(minutes=45)}
    async with operator(server) as op:
        live = [r for r in (await op.inspect()).reservations if r.state == "booked"]
    assert [(r.vehicle_id, r.charge_point_id) for r in live] == [(winners[0].vehicle_id, "NAT-PN-1")]


async def test_intervals_are_half_open(server: Server) -> None:
    async with vehicle(server, "V01") as a, vehicle(server, "V04") as b:
        t0 = soon(a, 60).replace(second=0, microsecond=0)
        first = await a.reserve("NAT-CEN-1", t0, 30)
        # Adjacent on both sides: fine.
        await b.reserve("NAT-CEN-1", t0 + timedelta(minutes=30), 30)
        await b.reserve("NAT-CEN-1", t0 - timedelta(minutes=30), 30)
        # Overlapping by one minute at either end: conflict naming the next free start.
        with pytest.raises(ConflictError) as late:
            await b.reserve("NAT-CEN-1", t0 + timedelta(minutes=29), 10)
        assert late.value.next_free == t0 + timedelta(minutes=60)
        with pytest.raises(ConflictError):
            await b.reserve("NAT-CEN-1", t0 - timedelta(minutes=1), 2)
        # Another charge point of the same station is unaffected.
        await b.reserve("NAT-CEN-2", t0, 30)
        assert first.state == "booked" and first.end - first.start == timedelta(minutes=30)


async def test_only_the_owner_cancels_and_the_slot_frees(server: Server) -> None:
    async with vehicle(server, "V01") as owner, vehicle(server, "V04") as other, operator(server) as op:
        start = soon(owner, 20)
        r = await owner.reserve("MOS-1-1", start, 30)
        with pytest.raises(NotFoundError, match=f"no reservation '{r.id}'"):  # not even disclosed
            await other.cancel(r.id)
        with pytest.raises(ConflictError):
            await other.reserve("MOS-1-1", start, 30)
        first = await owner.cancel(r.id)
        assert first.reservation.state == "cancelled" and not first.unchanged
        again = await owner.cancel(r.id)
        assert again.reservation.state == "cancelled" and again.unchanged  # idempotent, and says so
        taken = await other.reserve("MOS-1-1", start, 30)
        # The operator may cancel anyone's reservation.
        assert (await op.cancel(taken.id)).reservation.state == "cancelled"
        with pytest.raises(NotFoundError):
            await owner.cancel("A-doesnotexist")
        assert [x.id for x in await other.reservations()] == []
        assert {x.id for x in await other.reservations(include_past=True)} == {taken.id}


async def test_reservation_input_is_checked(server: Server) -> None:
    async with vehicle(server, "V01") as c:
        with pytest.raises(NotFoundError):
            await c.reserve("NOPE-1", soon(c), 30)
        with pytest.raises(UnavailableError, match=r"operator B cannot be reached now.*nothing was done"):
            await c.reserve("REC-BV-1", soon(c), 30)  # another operator's, and it is not running
        with pytest.raises(BadRequestError):
            await c.reserve("NAT-PN-1", soon(c), 0)
        with pytest.raises(BadRequestError):
            await c.reserve("NAT-PN-1", soon(c), 100_000)
        with pytest.raises(BadRequestError):
            await c.reserve("NAT-PN-1", c.server_now() - timedelta(hours=2), 30)
        with pytest.raises(BadRequestError):
            await c.update_position(123.0, 0.0)
        assert await c.reservations() == []


async def run_charge_points(server: Server, *cp_ids: str) -> tuple[list[ChargePointSim], list[asyncio.Task[None]]]:
    sims = [
        ChargePointSim(server.world.charge_point(cp_id)[1], "127.0.0.1", server.port, heartbeat_s=5) for cp_id in cp_ids
    ]
    tasks = [asyncio.create_task(sim.run()) for sim in sims]
    async with asyncio.timeout(10):
        while not all(server.books.charge_points[cp].online for cp in cp_ids):
            await asyncio.sleep(0.02)
    return sims, tasks


async def stop_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_nearest_and_live_status(server: Server) -> None:
    natal = (-5.7945, -35.2110)
    async with vehicle(server, "V01") as c:
        with pytest.raises(NotFoundError):
            await c.find_nearest(*natal)  # nothing is online yet
        _, tasks = await run_charge_points(server, "NAT-CEN-1", "NAT-PN-1")
        try:
            found = await c.find_nearest(*natal)
            assert (found.station.id, found.charge_point_id) == ("NAT-CEN", "NAT-CEN-1")
            assert found.distance_km < 1
            found = await c.find_nearest(*natal, min_power_kw=100)
            assert found.charge_point_id == "NAT-PN-1"
            with pytest.raises(NotFoundError):
                await c.find_nearest(*natal, min_power_kw=200)

            r = await c.reserve("NAT-CEN-1", soon(c, 10), 40)
            status = {cp.id: cp for cp in (await c.station_status("NAT-CEN")).charge_points}
            assert status["NAT-CEN-1"].status == "reserved"
            assert status["NAT-CEN-2"].status == "offline"
            assert [(i.start, i.end) for i in status["NAT-CEN-1"].busy] == [(r.start, r.end)]
            # Free now (the reservation starts in 10 min), so no "free in" yet...
            assert status["NAT-CEN-1"].free_at is None
            # ...until the slot begins: then it is free again at the reservation's end.
            await c.reserve("NAT-CEN-1", c.server_now() - timedelta(seconds=30), 10)
            status = {cp.id: cp for cp in (await c.station_status("NAT-CEN")).charge_points}
            assert status["NAT-CEN-1"].free_at == r.end
            # The nearest *available* charge point is now the next one out.
            assert (await c.find_nearest(*natal)).charge_point_id == "NAT-PN-1"
        finally:
            await stop_all(tasks)


async def test_charging_meters_kwh_and_cost_into_history(server: Server) -> None:
    sims, tasks = await run_charge_points(server, "NAT-PN-1")
    events = []
    try:
        async with vehicle(server, "V01") as c, vehicle(server, "V04") as other:
            c.on_event.append(events.append)
            later = await c.reserve("NAT-PN-1", soon(c, 120), 30)
            with pytest.raises(ConflictError, match="too early"):
                await c.start_charging(later.id)
            r = await c.reserve("NAT-PN-1", c.server_now(), 30)
            with pytest.raises(NotFoundError):
                await other.start_charging(r.id)
            charging = await c.start_charging(r.id)
            assert charging.state == "charging"
            with pytest.raises(ConflictError):
                await c.start_charging(r.id)
            await asyncio.sleep(1.5)  # 1.5 simulated minutes at 150 kW: ~3.75 kWh
            done = await c.stop_charging(r.id)
            assert done.state == "completed"
            assert done.kwh == pytest.approx(sims[0].kwh, abs=1e-3)
            assert 2.0 < done.kwh < 8.0
            assert done.cost == pytest.approx(round(done.kwh * 2.29, 2))
            history = await c.history()
            assert [s.reservation_id for s in history.sessions] == [r.id]
            assert history.total_kwh == pytest.approx(done.kwh) and history.total_cost == done.cost
            assert history.sessions[0].city == "Natal"
            assert (await other.history()).sessions == []
        progress = [e for e in events if type(e).__name__ == "ChargingProgress"]
        assert progress and progress[-1].kwh <= done.kwh
    finally:
        await stop_all(tasks)


async def test_a_vanished_charge_point_ends_its_session(server: Server) -> None:
    _sims, tasks = await run_charge_points(server, "NAT-PN-2")
    async with vehicle(server, "V01") as c:
        r = await c.reserve("NAT-PN-2", c.server_now(), 30)
        await c.start_charging(r.id)
        await asyncio.sleep(0.7)
        await stop_all(tasks)  # the charge point disappears mid-session
        async with asyncio.timeout(5):
            while (await c.reservations(include_past=True))[0].state == "charging":
                await asyncio.sleep(0.05)
        [ended] = await c.reservations(include_past=True)
        assert ended.state == "completed" and ended.kwh > 0
        # Its slot is free again, but nobody can charge on it while it is offline.
        r2 = await c.reserve("NAT-PN-2", c.server_now(), 10)
        with pytest.raises(UnavailableError, match="offline"):
            await c.start_charging(r2.id)


async def test_no_show_expires_and_frees_the_slot(world: World, tmp_path: Path) -> None:
    # x600: the 15-minute grace period passes in 1.5 s.
    async with running_server(world, tmp_path / "data", time_scale=600.0) as srv, vehicle(srv, "V01") as c:
        pushed = []
        c.on_event.append(pushed.append)
        # The server's own clock, half a simulated minute ahead: at x600 a client's estimate from
        # its handshake, or a reply delayed 0.1 s on a busy machine, is a minute off.
        r = await c.reserve("FOR-1-1", datetime.fromtimestamp(srv.clock.now() + 30, UTC), 60)
        async with asyncio.timeout(10):
            while (await c.reservations(include_past=True))[0].state == "booked":
                await asyncio.sleep(0.1)
        [expired] = await c.reservations(include_past=True)
        assert expired.state == "expired"
        assert any(getattr(e, "reason", "") == "no-show" and e.reservation.id == r.id for e in pushed)
        async with vehicle(srv, "V04") as other:
            await other.reserve("FOR-1-1", r.start + timedelta(minutes=20), 30)


async def test_pipelined_requests_on_one_connection(server: Server) -> None:
    async with vehicle(server, "V01") as c:
        start = soon(c, 10)
        cps = [cp.id for s in server.world.stations_of("A") for cp in s.charge_points]
        replies = await asyncio.gather(*(c.reserve(cp, start, 30) for cp in cps))
        assert sorted(r.charge_point_id for r in replies) == sorted(cps)
        statuses = await asyncio.gather(*(c.station_status(s.id) for s in server.world.stations_of("A")))
        assert all(cp.free_at is not None or cp.status == "offline" for s in statuses for cp in s.charge_points)


async def test_state_survives_a_clean_restart(world: World, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_server(world, data, time_scale=60.0) as srv, vehicle(srv, "V01") as c:
        r = await c.reserve("JPA-1-1", soon(c, 30), 30)
        now_before = c.server_now()
    async with running_server(world, data, time_scale=60.0) as srv, vehicle(srv, "V01") as c:
        assert [x.id for x in await c.reservations()] == [r.id]
        # Simulated time carried on instead of jumping back to the wall clock.
        assert c.server_now() >= now_before
        with pytest.raises(ConflictError):
            await c.reserve("JPA-1-1", r.start, 30)


async def test_position_is_reported_periodically(server: Server) -> None:
    route = iter([(-5.79, -35.21), (-6.5, -35.0), (-7.12, -34.85)])
    async with vehicle(server, "V01") as c:
        c.report_position(lambda: next(route), every=0.1)
        async with asyncio.timeout(5):
            while server.books.positions.get("V01") != (-7.12, -34.85):
                await asyncio.sleep(0.02)


async def test_charge_point_reports_completion_and_faults(server: Server) -> None:
    sims, tasks = await run_charge_points(server, "CGR-1-1")
    try:
        async with vehicle(server, "V01") as c:
            r = await c.reserve("CGR-1-1", c.server_now(), 30)
            await c.start_charging(r.id)
            await asyncio.sleep(0.6)
            # The charge point ends the session itself (the car is full).
            station = sims[0].client
            assert station is not None
            await station.session_complete(r.id, 12.5, "vehicle full")
            [done] = await c.reservations(include_past=True)
            assert (done.state, done.kwh, done.cost) == ("completed", 12.5, round(12.5 * 1.95, 2))
            # A charge point cannot end a session that is not on it.
            other = await c.reserve("CGR-1-2", c.server_now(), 30)
            with pytest.raises(NotFoundError):
                await station.session_complete(other.id, 1.0)
            # A fault makes it unusable until it says it is available again.
            await station.report_status("faulted", "ground fault")
            status = {cp.id: cp.status for cp in (await c.station_status("CGR-1")).charge_points}
            assert status["CGR-1-1"] == "faulted"
            with pytest.raises(UnavailableError, match="faulted"):
                await c.reserve("CGR-1-1", c.server_now() + timedelta(minutes=40), 30)
            await station.report_status("available")
            await c.reserve("CGR-1-1", c.server_now() + timedelta(minutes=40), 30)
    finally:
        await stop_all(tasks)


async def test_one_request_object_may_be_in_flight_on_many_connections(server: Server) -> None:
    # Regression: the connection used to stamp its id on the caller's object, so a second
    # connection sending the same object made the first forget another request's reply.
    async with vehicle(server, "V01") as a, vehicle(server, "V04") as b:
        shared = p.ListStations(city="Natal")
        replies = await asyncio.gather(
            *(c.conn.request(shared) for _ in range(20) for c in (a, b)), a.heartbeat(), b.heartbeat()
        )
        assert all(isinstance(r, p.StationList) for r in replies[:-2])
        assert shared.id == 0
        assert not a.conn._pending and not b.conn._pending


async def test_the_simulator_reports_a_session_when_its_slot_ends(server: Server) -> None:
    sims, tasks = await run_charge_points(server, "FOR-1-1")
    try:
        async with vehicle(server, "V01") as c:
            r = await c.reserve("FOR-1-1", c.server_now(), 2)  # 2 simulated minutes = 2 real seconds
            await c.start_charging(r.id)
            async with asyncio.timeout(10):
                while (await c.reservations(include_past=True))[0].state == "charging":
                    await asyncio.sleep(0.1)
            [done] = await c.reservations(include_past=True)
            # 150 kW for (at most) the two minutes of the slot: about 5 kWh, at R$ 2.39.
            assert done.state == "completed" and 3.0 < done.kwh <= 5.5
            assert done.cost == pytest.approx(round(done.kwh * 2.39, 2))
            assert sims[0].sessions_completed == 1 and sims[0].charging is None
    finally:
        await stop_all(tasks)


async def test_early_start_never_takes_a_slot_that_is_still_someone_elses(server: Server) -> None:
    _, tasks = await run_charge_points(server, "JPA-1-2")
    try:
        async with vehicle(server, "V01") as first, vehicle(server, "V04") as second:
            now = first.server_now()
            await first.reserve("JPA-1-2", now, 8)
            mine = await second.reserve("JPA-1-2", now + timedelta(minutes=8), 30)
            # 8 minutes early is allowed in general (early_start_min = 10), but not over V01's slot.
            with pytest.raises(ConflictError, match="reserved by someone else"):
                await second.start_charging(mine.id)
    finally:
        await stop_all(tasks)


async def test_a_second_start_of_the_same_reservation_does_not_stop_the_first(server: Server) -> None:
    sims, tasks = await run_charge_points(server, "JPA-1-1")
    try:
        async with vehicle(server, "V01") as c:
            r = await c.reserve("JPA-1-1", c.server_now(), 30)
            results = await asyncio.gather(c.start_charging(r.id), c.start_charging(r.id), return_exceptions=True)
            assert sorted(type(x).__name__ for x in results) == ["ConflictError", "ReservationInfo"]
            await asyncio.sleep(0.3)  # any compensating stop would have reached the charge point by now
            assert sims[0].charging == r.id
            assert (await c.reservations())[0].state == "charging"
    finally:
        await stop_all(tasks)
