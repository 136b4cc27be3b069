"""Two clients for one charge point: the newest wins, the older is told who replaced it and stops.

Before, two simulators for NAT-PN-1 (or the README's OCPP example and `evcharge station`)
took the charge point from each other forever. `evcharge station --except` leaves some out.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evcharge.apps.simulator import ChargePointSim, run_stations
from evcharge.domain.world import World
from evcharge.operator.server import Server

from .conftest import REPO, ServerProcess

pytestmark = pytest.mark.timeout(60)


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_replaced_simulator_says_who_replaced_it_and_stops(world: World, server: Server) -> None:
    _, cp = world.charge_point("NAT-PN-1")
    first, second = ChargePointSim(cp, "127.0.0.1", server.port), ChargePointSim(cp, "127.0.0.1", server.port)
    first_run = asyncio.ensure_future(first.run())
    second_run: asyncio.Future[None] | None = None
    try:
        await until(lambda: first.link.up)
        second_run = asyncio.ensure_future(second.run())
        async with asyncio.timeout(15):
            await first_run  # it ends by itself, instead of taking the charge point back
        assert "charge point NAT-PN-1 connected again from 127.0.0.1:" in first.replaced
        assert "is another simulator or gateway speaking for it?" in first.replaced
        await until(lambda: second.link.up)
        assert second.link.connects == 1 and server.online.charge_points["NAT-PN-1"].conn.closed is False
        assert server.connection_counts().get("station") == 1
    finally:
        for task in (first_run, second_run):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await first.link.close()
        await second.link.close()


async def test_station_except_leaves_out_the_charge_points_named(world: World, server: Server) -> None:
    every = {cp.id for s in world.stations_of("A") for cp in s.charge_points}
    stations = asyncio.ensure_future(
        run_stations(world, "A", host="127.0.0.1", port=server.port, skip=["NAT-PN-1", "NAT-PN-2"])
    )
    try:
        await until(lambda: set(server.online.charge_points) == every - {"NAT-PN-1", "NAT-PN-2"})
    finally:
        stations.cancel()
        await asyncio.gather(stations, return_exceptions=True)


def test_evcharge_station_whose_only_charge_point_is_taken_over_exits_1_saying_why(
    spawn_server, world_path: Path, tmp_path: Path
) -> None:
    server: ServerProcess = spawn_server("A")
    argv = [sys.executable, "-m", "evcharge", "station", "--world", str(world_path), "--operator", "A"]
    argv += ["--server", server.address, "--id", "NAT-PN-1"]
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    procs = [subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO) for log in logs]
    try:
        # Whichever connected first is replaced by the other: it ends, and the other stays.
        deadline = time.monotonic() + 30
        while (ended := next((i for i, proc in enumerate(procs) if proc.poll() is not None), None)) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ended is not None, [log.read_text() for log in logs]
        assert procs[ended].returncode == 1
        said = logs[ended].read_text()
        assert "nothing left to simulate, every charge point was taken over" in said and "Traceback" not in said
        assert "leave it out with --except NAT-PN-1" in said
        assert procs[1 - ended].poll() is None, logs[1 - ended].read_text()
        assert "replaces the connection from" in server.log_path.read_text()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
