"""The interactive vehicle driven through prompt_toolkit's pipe input, against a real server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.data_structures import Size
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.output.vt100 import Vt100_Output
from rich.console import Console

from evcharge.apps.repl import VehicleRepl
from evcharge.domain import geo
from evcharge.domain.world import World
from evcharge.wire import protocol as p

from .conftest import free_ports, running_server, vehicle
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
                await screen.wait_for("No charging sessions yet.")
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


class Terminal(io.StringIO):
    """A terminal for prompt_toolkit to draw on; ``drawn`` is the prompt as last drawn on it."""

    def output(self) -> Vt100_Output:
        return Vt100_Output(self, lambda: Size(rows=40, columns=160), term="xterm")

    @staticmethod
    def drawn(repl: VehicleRepl) -> str:
        screen = repl.prompt_session.app.renderer._last_screen  # what was sent to the terminal, cell by cell
        if screen is None:
            return ""
        rows = [
            "".join(cell.char for _, cell in sorted(line.items())) for _, line in sorted(screen.data_buffer.items())
        ]
        return next((row.strip() for row in rows if row.startswith(f"{repl.vehicle.id} ")), "")

    async def wait_prompt(self, repl: VehicleRepl, ok: Callable[[str], bool], timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            while not ok(prompt := self.drawn(repl)):
                await asyncio.sleep(0.05)
        return prompt


@asynccontextmanager
async def prompt_of(world: World, port: int, vehicle_id: str = "V01", **options: Any) -> AsyncIterator[Session]:
    """A REPL of ``vehicle_id`` on the server at ``port``, typed into through a pipe; quit at the end."""
    screen, terminal = Screen(), Terminal()
    with create_pipe_input() as keys:
        repl = VehicleRepl(
            world,
            world.vehicle(vehicle_id),
            "127.0.0.1",
            port,
            console=screen.console,
            input=keys,
            output=terminal.output(),
            **options,
        )
        running = asyncio.create_task(repl.run())
        try:
            yield Session(repl, screen, terminal, keys, running)
            keys.send_text("quit\n")
            assert await asyncio.wait_for(running, 10) == 0
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert "Traceback" not in screen.text


@dataclass
class Session:
    repl: VehicleRepl
    screen: Screen
    terminal: Terminal
    keys: Any
    running: asyncio.Task[int]

    async def type(self, line: str, expect: str) -> None:
        self.keys.send_text(line + "\n")
        await self.screen.wait_for(expect)

    async def connected(self) -> None:
        async with asyncio.timeout(10):
            while self.repl.client is None:
                await asyncio.sleep(0.02)


async def test_the_prompt_shows_the_link_and_battery_as_they_are_without_a_key(world: World, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    async with prompt_of(world, port, start_soc=0.8) as s:
        await s.terminal.wait_prompt(s.repl, lambda text: text == "V01 80% (offline)>")  # no server yet
        async with running_server(world, tmp_path / "data", port=port, time_scale=600.0):
            await s.connected()
            # Drawn again once connected, with nobody pressing a key.
            await s.terminal.wait_prompt(s.repl, lambda text: text == "V01 80%>")
            # Standing still drains nothing...
            assert s.repl.soc == 0.8
            # ...driving does, and the prompt follows it, again with no key pressed.
            await s.type("drive --to Mossoró", "Driving to Mossoró")
            drawn = await s.terminal.wait_prompt(s.repl, lambda text: "→ Mossoró" in text and "80%" not in text)
            assert int(drawn.split()[1].rstrip("%")) < 80, drawn


async def test_driving_moves_the_vehicle_and_it_arrives(world: World, tmp_path: Path) -> None:
    async with (
        running_server(world, tmp_path / "data", time_scale=3600.0) as server,
        prompt_of(world, server.port, start_soc=0.9, position_every=0.1, position=geo.CITIES["Natal"]) as s,
    ):
        await s.connected()
        await s.type("drive --to joao pessoa", "Driving to João Pessoa")
        await s.screen.wait_for("Arrived in João Pessoa", timeout=20)
        assert geo.road_km(*s.repl.position, *geo.CITIES["João Pessoa"]) < 1
        v = world.vehicle("V01")
        used = (0.9 - s.repl.soc) * v.battery_kwh / v.consumption_kwh_per_km
        assert used == pytest.approx(geo.road_km(*geo.CITIES["Natal"], *geo.CITIES["João Pessoa"]), rel=0.05)
        await s.type("drive --stop", "Standing still already.")


async def test_mistakes_typed_at_the_prompt_are_the_users_not_the_servers(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data") as server, prompt_of(world, server.port) as s:
        await s.connected()
        await s.type('stations --city "Natal', "usage: a quotation mark is not closed")
        assert "bad_request" not in s.screen.text
        await s.type("bogus", "unknown command 'bogus'; commands:")
        said = " ".join(s.screen.text.split("unknown command 'bogus'")[-1].split())
        for command in ("costs", "soc", "help", "quit", "drive", "charge", "plan", "cancel-trip"):
            assert command in said, said
        await s.type("plan --from Natal --to natal", "usage: --from and --to are both Natal")
        await s.type("charge A-nope --to 10", "usage: the battery is at 80% already")


async def test_the_charging_bar_is_progress_to_the_target(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        _, tasks = await run_charge_points(server, "NAT-PN-1")
        try:
            async with prompt_of(world, server.port, start_soc=0.5) as s:
                await s.connected()
                await s.type("reserve NAT-PN-1 --minutes 30", "Reserved NAT-PN-1")
                rid = next(r.id for r in server.books.reservations.values() if r.vehicle_id == "V01")
                await s.type(f"charge {rid} --to 55", "Released NAT-PN-1")
                bar = next(line for line in s.screen.text.splitlines() if "charging NAT-PN-1" in line)
                assert "50% → 55%" in bar
                # At the end the bar is full: the target reached, though the battery is at 55 %, not 100 %.
                assert "━" in bar and "╺" not in bar and "╸" not in bar, bar
        finally:
            await stop_all(tasks)


def test_tab_completes_ids_with_dashes_reservations_trips_options_and_cities(world: World) -> None:
    repl = VehicleRepl(world, world.vehicle("V01"), "127.0.0.1", 1, output=DummyOutput())
    repl.reservations = {"A-1a2b3c4d5e": "booked", "A-9f9f9f9f9f": "cancelled"}
    repl.trips = {"A-T0123456789": "committed"}
    completer = repl.prompt_session.completer
    assert completer is not None

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]

    assert complete("res") == ["reservations", "reserve"]
    assert "NAT-PN-1" in complete("reserve NAT-P") and "NAT-CEN-1" not in complete("reserve NAT-P")
    assert complete("reserve nat-pn-") == ["NAT-PN-1", "NAT-PN-2", "NAT-PN-3"]  # any case, past the dash
    assert complete("status NAT-") == ["NAT-CEN", "NAT-PN"]
    assert complete("cancel A-") == ["A-1a2b3c4d5e"]  # live ones only
    assert complete("charge ") == ["A-1a2b3c4d5e"]
    assert complete("cancel-trip ") == ["A-T0123456789"]
    assert complete("reserve NAT-PN-1 --m") == ["--minutes"]
    assert complete("plan --from Natal --to jo") == ['"João Pessoa"']
    assert complete('plan --from "Feira d') == ['"Feira de Santana"']
    assert complete("drive --to Mos") == ["Mossoró"]
    assert complete("soc ") == []
