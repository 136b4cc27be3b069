"""The interactive vehicle driven through prompt_toolkit's pipe input, against a real server."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import msgspec
import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from evcharge.apps.repl import VehicleRepl
from evcharge.domain.world import World
from evcharge.wire import protocol as p

from .conftest import running_server, vehicle
from .test_server import run_charge_points, stop_all

pytestmark = pytest.mark.timeout(60)


class Screen:
    """What the REPL printed so far."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.console = Console(file=self.buffer, width=160, highlight=False, color_system=None)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    async def wait_for(self, needle: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while needle not in self.text:
                await asyncio.sleep(0.02)


async def test_a_whole_session_of_commands(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        _, tasks = await run_charge_points(server, "NAT-PN-1", "NAT-PN-2")
        screen = Screen()
        try:
            with create_pipe_input() as keys:
                v = world.vehicle("V01")
                repl = VehicleRepl(
                    world,
                    v,
                    "127.0.0.1",
                    server.port,
                    start_soc=0.5,
                    console=screen.console,
                    input=keys,
                    output=DummyOutput(),
                    position_every=0.2,
                )
                session = asyncio.create_task(repl.run())
                await screen.wait_for("Type help")
                async with asyncio.timeout(10):
                    while repl.client is None:
                        await asyncio.sleep(0.02)

                async def type_line(line: str, expect: str) -> None:
                    keys.send_text(line + "\n")
                    await screen.wait_for(expect)

                await type_line("help", "Commands")
                await type_line("stations --city Natal", "Natal Ponta Negra")
                await type_line("nearest --near Natal --min-kw 100", "Nearest: Natal Ponta Negra")
                await type_line("reserve NAT-PN-1 --minutes 30", "Reserved NAT-PN-1")
                rid = next(r.id for r in server.books.reservations.values() if r.vehicle_id == "V01")
                await type_line("reserve NAT-PN-1 --minutes 30", "conflict: charge point NAT-PN-1 is taken")
                await type_line("reservations", rid)
                await type_line("bogus-command", "usage")
                await type_line("reserve", "usage")  # a missing argument is one line, not an exit
                # Charging: a live progress bar until 55%, then it releases by itself.
                await type_line(f"charge {rid} --to 55", "Released NAT-PN-1")
                assert "charging NAT-PN-1" in screen.text and repl.soc >= 0.55
                # The server's push about the completed reservation is shown as it happens.
                await screen.wait_for(f"reservation {rid} on NAT-PN-1: completed")
                await type_line("history", "Charging history")
                await type_line("costs", "Costs by operator and month")
                await type_line("soc", "Battery")
                # Position reports reach the server in the background.
                assert server.books.positions.get("V01") is not None
                keys.send_text("quit\n")
                assert await asyncio.wait_for(session, 10) == 0
        finally:
            await stop_all(tasks)
        assert "Traceback" not in screen.text


async def test_the_prompt_survives_a_server_restart(world: World, tmp_path: Path) -> None:
    screen = Screen()
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        port = server.port
        with create_pipe_input() as keys:
            repl = VehicleRepl(
                world,
                world.vehicle("V01"),
                "127.0.0.1",
                port,
                console=screen.console,
                input=keys,
                output=DummyOutput(),
            )
            session = asyncio.create_task(repl.run())
            async with asyncio.timeout(10):
                while repl.client is None:
                    await asyncio.sleep(0.02)
            await server.stop()
            await screen.wait_for("Connection to the server lost")
            keys.send_text("history\n")
            await screen.wait_for("unavailable: not connected")
            async with running_server(world, tmp_path / "data", time_scale=60.0, port=port):
                await screen.wait_for("Reconnected.")
                keys.send_text("history\n")
                await screen.wait_for("Charging history")
                keys.send_text("quit\n")
                assert await asyncio.wait_for(session, 10) == 0


async def test_book_after_plan_books_the_plan_shown(world: World, tmp_path: Path) -> None:
    screen = Screen()
    async with running_server(world, tmp_path / "data") as server:
        with create_pipe_input() as keys:
            repl = VehicleRepl(
                world,
                world.vehicle("V01"),
                "127.0.0.1",
                server.port,
                console=screen.console,
                input=keys,
                output=DummyOutput(),
            )
            session = asyncio.create_task(repl.run())
            async with asyncio.timeout(10):
                while repl.client is None:
                    await asyncio.sleep(0.02)
            trip = "--from Natal --to Recife --soc 30"  # only operator A's chargers: this server alone
            keys.send_text(f"plan {trip}\n")
            await screen.wait_for("--plan A-P")
            shown = await repl.client.plan_trip(p.TripQuery(origin="Natal", destination="Recife", soc_pct=30))
            stop = shown.stops[0]
            # Someone else takes the first stop's slot after the plan was shown...
            async with vehicle(server, "V04") as other:
                await other.reserve(stop.charge_point_id, stop.slot_start, 30)
            # ...so booking the plan as shown loses it and re-plans; a fresh plan would not.
            keys.send_text(f"book {trip}\n")
            await screen.wait_for("re-planned 1x")
            keys.send_text("quit\n")
            assert await asyncio.wait_for(session, 10) == 0


async def test_a_refused_vehicle_is_told_why_and_the_prompt_ends(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        screen = Screen()
        with create_pipe_input() as keys:
            v = msgspec.structs.replace(world.vehicle("V01"), token="not-the-token")
            repl = VehicleRepl(
                world, v, "127.0.0.1", server.port, console=screen.console, input=keys, output=DummyOutput()
            )
            async with asyncio.timeout(10):
                code = await repl.run()  # no retry can help: it ends by itself
        assert code == 1
        assert "unauthorized" in screen.text and "wrong credential" in screen.text
