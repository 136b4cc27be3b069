"""The live monitor follows pushes and renders the operator's state."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from evcharge.apps.monitor import monitor_view
from evcharge.domain.world import load_world
from evcharge.links.feed import OperatorFeed
from evcharge.wire import protocol as p

from .conftest import REPO, ServerProcess, running_federation
from .test_federation import NATAL_TO_FEIRA, driver
from .test_server import run_charge_points, stop_all

pytestmark = pytest.mark.timeout(60)


async def test_monitor_follows_pushes_and_shows_stations_reservations_trips_peers(
    federated_world_path: Path, tmp_path: Path
) -> None:
    world = load_world(str(federated_world_path))
    async with running_federation(world, tmp_path / "data") as servers:
        server = servers["A"]
        feed = OperatorFeed(server.operator, "127.0.0.1", server.port)
        follower = asyncio.create_task(feed.run())
        _, stations = await run_charge_points(server, "NAT-CEN-1")
        try:
            seen = await feed.wait_change(0, timeout=10)
            assert feed.snapshot is not None and feed.connected
            async with driver(servers, "V01") as c:
                trip = (await c.book_trip(NATAL_TO_FEIRA)).trip
                r = await c.reserve("NAT-CEN-1", c.server_now(), 30)
            # The feed learns of it from the server's pushes (no polling).
            async with asyncio.timeout(10):
                while not any(x.id == r.id for x in feed.snapshot.reservations):
                    seen = await feed.wait_change(seen, timeout=5)
            console = Console(record=True, width=220, color_system=None)
            console.print(monitor_view(feed.snapshot, feed.now(), connected=True, rate=feed.request_rate))
            screen = console.export_text()
            for expected in (
                "Operator A",
                "connected",
                "Natal Ponta Negra",
                "Mossoró BR-304",
                "reserved",
                r.id,
                trip.id,
                "Peer links",
                "Feira de Santana" if False else "Caruaru (B)",
            ):
                assert expected in screen, f"{expected!r} not on the monitor:\n{screen}"
            assert "NAT-CEN-1 60kW reserved" in screen and "NAT-CEN-2 22kW offline" in screen
            # The monitor says when its server goes away.
            await server.stop()
            async with asyncio.timeout(10):
                while feed.connected:
                    seen = await feed.wait_change(seen, timeout=5)
            console = Console(record=True, width=220, color_system=None)
            console.print(monitor_view(feed.snapshot, feed.now(), connected=feed.connected))
            assert "DISCONNECTED" in console.export_text()
        finally:
            await stop_all(stations)
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


def test_q_quits_the_monitor(spawn_server, world_path: Path) -> None:
    """At a real terminal (a pty): the monitor draws, and `q` ends it with exit 0, the terminal restored."""
    server: ServerProcess = spawn_server("A")
    master, slave = os.openpty()
    argv = [sys.executable, "-m", "evcharge", "monitor", "--world", str(world_path), "--operator", "A"]
    proc = subprocess.Popen([*argv, "--server", server.address], stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    drawn = b""

    def read_until(done: Callable[[], bool], timeout: float) -> None:
        nonlocal drawn
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    drawn += os.read(master, 65536)
                except OSError:  # the monitor ended: its side of the terminal is closed
                    return

    try:
        read_until(lambda: b"q quits" in drawn and b"NAT-PN-1" in drawn, 20)
        assert b"NAT-PN-1" in drawn, drawn[-2000:]
        os.write(master, b"q")
        read_until(lambda: proc.poll() is not None, 10)
        assert proc.wait(timeout=5) == 0
        assert b"Traceback" not in drawn
    finally:
        proc.kill()
        proc.wait(timeout=10)
        os.close(master)


def test_the_monitor_says_what_reserved_means_and_which_clock_it_shows() -> None:
    now = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
    soon = p.Interval(now + timedelta(minutes=20), now + timedelta(minutes=50))
    cp = p.ChargePointInfo(id="NAT-PN-1", power_kw=150, connector="CCS2", price_per_kwh=2.29, status="reserved")
    cp.busy = [soon]
    station = p.StationInfo(id="NAT-PN", operator_id="A", name="Natal Ponta Negra", city="Natal", lat=-5.8, lon=-35.2)
    station.charge_points = [cp]
    seen = datetime.now(UTC) - timedelta(seconds=7)
    ended = p.TripStop(
        city="Recife", operator_id="A", station_id="REC-1", station_name="Recife", charge_point_id="REC-1-1",
        power_kw=150, drive_km=300, arrival=now - timedelta(hours=3), slot_start=now - timedelta(hours=3),
        slot_end=now - timedelta(hours=2), soc_in=20, soc_out=80, kwh=30, cost=60,
    )  # fmt: skip
    trip = p.TripInfo(
        id="A-T1", vehicle_id="V01", state="committed", origin="Natal", destination="Maceió",
        depart=now - timedelta(hours=6), arrival=now - timedelta(hours=1), distance_km=500, soc_at_arrival=30,
        total_kwh=30, total_cost=60, stops=[ended],
    )  # fmt: skip
    snapshot = p.InspectResult(
        operator_id="A",
        server_time=now,
        stations=[station],
        reservations=[],
        trips=[trip],
        peers=[p.PeerInfo(operator_id="B", address="127.0.0.1:7402", up=True, last_seen=seen)],
    )
    console = Console(record=True, width=220, color_system=None)
    console.print(monitor_view(snapshot, now, connected=True))
    screen = console.export_text()
    assert "NAT-PN-1 150kW reserved (free until 14:20Z)" in screen and "free now" not in screen
    assert "simulated time 2026-12-03 14:00Z" in screen
    assert "7 s ago" in screen or "8 s ago" in screen  # the peer's last answer, in real time
    assert "A-T1" in screen and "completed" in screen and "committed" not in screen  # its stops all ended
