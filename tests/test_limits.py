"""Connection limits: idle clients are closed, and a full server says so instead of hanging."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from evcharge.errors import UnavailableError
from evcharge.world import World

from .conftest import running_server, vehicle

pytestmark = pytest.mark.timeout(30)


async def test_a_silent_client_is_closed_after_the_idle_timeout(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", idle_timeout=0.5) as server, vehicle(server, "V01") as c:
        await c.heartbeat()  # activity keeps it open...
        async with asyncio.timeout(5):
            await c.closed.wait()  # ...silence does not
        assert not server.vehicles_online


async def test_connections_beyond_the_maximum_are_refused_with_a_clear_error(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", max_connections=2) as server:
        async with vehicle(server, "V01"), vehicle(server, "V04"):
            with pytest.raises(UnavailableError, match="too many connections"):
                async with vehicle(server, "V07"):
                    pass
        # Once the others have gone, there is room again.
        async with asyncio.timeout(5):
            while server.sessions:
                await asyncio.sleep(0.02)
        async with vehicle(server, "V07") as c:
            assert await c.heartbeat()
