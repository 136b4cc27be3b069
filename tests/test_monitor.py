"""The live monitor follows pushes and renders the operator's state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.console import Console

from evcharge.apps.monitor import monitor_view
from evcharge.domain.world import load_world
from evcharge.links.feed import OperatorFeed

from .conftest import running_federation
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
