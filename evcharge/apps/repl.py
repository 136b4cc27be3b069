"""The interactive vehicle: a prompt that keeps living while you type.

Commands are the same as ``evcharge vehicle COMMAND`` (parsed by the same
argparse definitions), plus ``charge`` with a live progress bar, ``costs``,
``soc``, ``help`` and ``quit``. Meanwhile the vehicle drives (its battery
drains in simulated time and it warns when low, offering the nearest
charger), reports its position, and prints what the server pushes. A lost
connection is said once and re-established with backoff; the prompt stays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import ssl
import time
from collections import defaultdict
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import NestedCompleter
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from evcharge.apps.vehicle import (
    POSITION_EVERY,
    START_SOC,
    UsageError,
    add_vehicle_commands,
    trip_query,
    vehicle_command,
)
from evcharge.domain import geo
from evcharge.domain.world import VehicleConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Link
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError, UnavailableError

log = logging.getLogger(__name__)

DRIVING_SPEED_KMH = 80.0
LOW_SOC = 0.20
BATTERY_TICK = 1.0  # real seconds between battery updates

HELP = """\
[bold]Commands[/] (TAB completes; the same options as `evcharge vehicle COMMAND --help`):
  stations [--city C] [--near CITY]   nearest --near CITY [--min-kw KW]   status STATION
  reserve CP [--in MIN] [--minutes N] reservations [--all]               cancel RESERVATION
  plan --from A --to B [--soc PCT]    book --from A --to B [--soc PCT]   trips [--all]   cancel-trip TRIP
                                      (book after plan, same question: books the plan shown, if still free)
  charge RESERVATION [--to PCT]       live progress until the battery reaches PCT (default 80), then releases
  release RESERVATION                 history   costs (totals by operator and month)   soc   help   quit"""


def book_command(offer: p.TripOffer) -> str:
    """The prompt's command that books an offered plan as shown (its question, word for word)."""
    q = offer.query
    words = ["book", "--from", q.origin, "--to", q.destination, "--soc", str(q.soc_pct)]
    if q.depart is not None:
        words += ["--depart", q.depart.isoformat()]
    words += ["--min-arrival-soc", str(q.min_arrival_soc_pct), "--max-charge-soc", str(q.max_charge_soc_pct)]
    return shlex.join([*words, "--plan", offer.plan.id])


class _ReplParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never exit the REPL on a typo
        raise UsageError(message)


class VehicleRepl:
    def __init__(
        self,
        world: World,
        vehicle: VehicleConfig,
        host: str,
        port: int,
        *,
        start_soc: float = START_SOC,
        position: tuple[float, float] | None = None,
        position_every: float = POSITION_EVERY,
        console: Console | None = None,
        input: Input | None = None,
        output: Output | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.world = world
        self.vehicle = vehicle
        self.link = Link(
            host,
            port,
            role="vehicle",
            ident=vehicle.id,
            secret=vehicle.token,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            on_up=self._came_up,
            on_down=self._went_down,
            name=f"vehicle {vehicle.id}",
        )
        self._was_up = False  # connected at least once (then a new connection is news)
        self._lost = False  # told the user the connection was lost, not yet that it is back
        self.refused = ""  # why the server refused this vehicle for good, if it did
        self.console = console or Console(highlight=False)
        self.soc = start_soc
        self.position = position or self._home_position()
        self.position_every = position_every
        self.charging: dict[str, tuple[float, float]] = {}  # reservation -> (soc at start, kWh so far)
        self._last_plan: tuple[p.TripQuery | None, str] = (None, "")  # the last question planned, its plan id
        self._progress: dict[str, asyncio.Event] = {}
        self._warned_low = False
        self._stop = asyncio.Event()
        self.parser = _ReplParser(prog="", add_help=False)
        add_vehicle_commands(self.parser.add_subparsers(dest="command"))  # type: ignore[arg-type]
        self.prompt_session: PromptSession[str] = PromptSession(
            completer=self._completer(), input=input, output=output, complete_while_typing=False
        )

    def _home_position(self) -> tuple[float, float]:
        first = next((s for s in self.world.stations if s.operator == self.vehicle.home), None)
        return (first.lat, first.lon) if first else geo.CITIES["Natal"]

    def _completer(self) -> NestedCompleter:
        stations = {s.id: None for s in self.world.stations if s.operator == self.vehicle.home}
        cps = {cp.id: None for s in self.world.stations if s.operator == self.vehicle.home for cp in s.charge_points}
        cities = {city: None for city in geo.CITIES}
        trip = {"--from": cities, "--to": cities, "--soc": None, "--depart": None}
        return NestedCompleter.from_nested_dict(
            {
                "stations": {"--city": cities, "--near": cities, "--limit": None},
                "nearest": {"--near": cities, "--min-kw": None},
                "status": stations,
                "reserve": cps,
                "reservations": {"--all": None},
                "cancel": None,
                "charge": None,
                "release": None,
                "history": None,
                "costs": None,
                "plan": trip,
                "book": trip,
                "trips": {"--all": None},
                "cancel-trip": None,
                "soc": None,
                "help": None,
                "quit": None,
            }
        )

    def say(self, text: str) -> None:
        self.console.print(text)

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> int:
        background = [
            asyncio.ensure_future(self._stay_connected()),
            asyncio.ensure_future(self._battery()),
        ]
        self.say(f"Vehicle [bold]{self.vehicle.id}[/] (home operator {self.vehicle.home}). Type [bold]help[/].")
        try:
            with patch_stdout(raw=True):
                while not self._stop.is_set():
                    try:
                        line = await self.prompt_session.prompt_async(self._prompt)
                    except (EOFError, KeyboardInterrupt):
                        break
                    if not await self.execute(line):
                        break
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.link.close()
        if self.refused:
            return 1
        self.say("Bye.")
        return 0

    def _prompt(self) -> str:
        link = "" if self.client is not None else " (offline)"
        return f"{self.vehicle.id} {self.soc:.0%}{link}> "

    async def execute(self, line: str) -> bool:
        """Run one command line; False when the user wants to quit."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.say(f"[red]bad_request[/]: {exc}")
            return True
        if not words:
            return True
        command = words[0]
        if command in ("quit", "exit"):
            return False
        try:
            match command:
                case "help":
                    self.say(HELP)
                case "soc":
                    self.say(f"Battery {self.soc:.0%} of {self.vehicle.battery_kwh:g} kWh")
                case "costs":
                    await self._costs()
                case "charge":
                    await self._charge(words[1:])
                case _:
                    args = self.parser.parse_args(words)
                    args.json, args.id = False, self.vehicle.id
                    if command == "book" and not args.plan and self._last_plan[0] == trip_query(args):
                        args.plan = self._last_plan[1]  # the same question: book what was shown
                    result = await vehicle_command(self._connected(), args, self.console)
                    if command == "plan":
                        self._last_plan = (trip_query(args), result["trip"].id)
        except EvchargeError as exc:
            self.say(f"[red]{exc.code}[/]: {exc.message}")
        except UsageError as exc:
            self.say(f"[red]usage[/]: {exc} (try help)")
        return True

    def _connected(self) -> Client:
        if self.client is None:
            raise UnavailableError("not connected to the server; reconnecting in the background")
        return self.client

    # --- commands of the REPL's own ------------------------------------------------------

    async def _costs(self) -> None:
        history = await self._connected().history()
        totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for s in history.sessions:
            entry = totals[(s.operator_id, f"{s.started:%Y-%m}")]
            entry[0] += s.kwh
            entry[1] += s.cost
            entry[2] += 1
        table = Table(title="Costs by operator and month", title_justify="left")
        for column in ("operator", "month", "sessions", "kWh", "R$"):
            table.add_column(column, justify="right" if column in ("sessions", "kWh", "R$") else "left")
        for (operator, month), (kwh, cost, count) in sorted(totals.items()):
            table.add_row(operator, month, str(int(count)), f"{kwh:.2f}", f"{cost:.2f}")
        table.add_row("all", "", str(len(history.sessions)), f"{history.total_kwh:.2f}", f"{history.total_cost:.2f}")
        self.console.print(table)

    async def _charge(self, words: list[str]) -> None:
        parser = _ReplParser(prog="charge", add_help=False)
        parser.add_argument("reservation")
        parser.add_argument("--to", type=float, default=80.0)
        args = parser.parse_args(words)
        target = min(1.0, args.to / 100)
        client = self._connected()
        r = await client.start_charging(args.reservation)
        self.charging[r.id] = (self.soc, 0.0)
        done = self._progress[r.id] = asyncio.Event()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"))
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(f"charging {r.charge_point_id}", total=100, completed=round(self.soc * 100), detail="")
            while self.soc < target and r.id in self.charging:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await done.wait()
                done.clear()
                kwh = self.charging.get(r.id, (0.0, 0.0))[1]
                cost = kwh * self._price(r.charge_point_id)
                bar.update(task, completed=self.soc * 100, detail=f"{kwh:.2f} kWh  SoC {self.soc:.0%}  R$ {cost:.2f}")
        self._progress.pop(r.id, None)
        if r.id in self.charging:
            released = await client.stop_charging(r.id)
            self.charging.pop(r.id, None)
            self.say(f"Released {released.charge_point_id}: {released.kwh:.2f} kWh, R$ {released.cost:.2f}")

    def _price(self, cp_id: str) -> float:
        return self.world.charge_point(cp_id)[1].price_per_kwh

    # --- living in the background -----------------------------------------------------------

    @property
    def client(self) -> Client | None:
        return self.link.client

    async def _stay_connected(self) -> None:
        try:
            await self.link.run()
        except EvchargeError as exc:
            # Wrong token, or not this operator's vehicle: no retry helps, so say it and end.
            self.refused = f"{exc.code}: {exc.message}"
            self.say(f"[red]{exc.code}[/]: {exc.message}")
            self._stop.set()
            if self.prompt_session.app.is_running:
                self.prompt_session.app.exit(exception=EOFError())

    async def _came_up(self, client: Client) -> None:
        client.on_event.append(self._pushed)
        client.report_position(lambda: self.position, every=self.position_every)
        if self._lost:
            self.say("[green]Reconnected.[/]")
        self._was_up, self._lost = True, False

    def _went_down(self, reason: str) -> None:
        if self._was_up and not self._lost:
            self.say("[yellow]Connection to the server lost; reconnecting...[/]")
            self._lost = True

    def _pushed(self, event: p.Event) -> None:
        match event:
            case p.ChargingProgress(reservation_id=rid, kwh=kwh):
                start_soc, _ = self.charging.get(rid, (self.soc, 0.0))
                self.charging[rid] = (start_soc, kwh)
                self.soc = min(1.0, start_soc + kwh / self.vehicle.battery_kwh)
                if rid in self._progress:
                    self._progress[rid].set()
            case p.TripChanged(trip=trip, reason=reason, offer=offer):
                route = " -> ".join(f"{s.city} ({s.operator_id})" for s in trip.stops) or "no stops"
                self.say(f"[cyan]*[/] trip {trip.id} {trip.origin} -> {trip.destination}: {reason}; {route}")
                if offer is not None:
                    self.say(f"  a new plan is offered: [bold]{book_command(offer)}[/] (then cancel-trip {trip.id})")
            case p.ReservationChanged(reservation=r, reason=reason):
                if r.state != "charging":
                    self.charging.pop(r.id, None)
                    if r.id in self._progress:
                        self._progress[r.id].set()
                why = "" if reason == r.state else f" ({reason})"
                self.say(f"[cyan]*[/] reservation {r.id} on {r.charge_point_id}: {r.state}{why}")

    async def _battery(self) -> None:
        """Drain the battery while driving (simulated time); warn once when low."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(BATTERY_TICK)
            now = time.monotonic()
            scale = self.client.time_scale if self.client is not None else 1.0
            hours = (now - last) * scale / 3600
            last = now
            if not self.charging:
                used = DRIVING_SPEED_KMH * hours * self.vehicle.consumption_kwh_per_km
                self.soc = max(0.0, self.soc - used / self.vehicle.battery_kwh)
            if self.soc >= LOW_SOC:
                self._warned_low = False
            elif not self._warned_low:
                self._warned_low = True
                await self._warn_low()

    async def _warn_low(self) -> None:
        self.say(f"[bold red]Battery low: {self.soc:.0%}.[/]")
        if self.client is None:
            return
        try:
            found = await self.client.find_nearest(*self.position)
        except EvchargeError as exc:
            self.say(f"  no charger to offer: {exc.message}")
            return
        self.say(
            f"  Nearest available: {found.station.name} ({found.station.city}), {found.distance_km:.1f} km, "
            f"charge point {found.charge_point_id}: [bold]reserve {found.charge_point_id}[/]"
        )
