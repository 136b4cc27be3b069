"""The interactive vehicle: a prompt that keeps living while you type.

Commands are the same as ``evcharge vehicle COMMAND`` (parsed by the same
argparse definitions), plus ``charge`` with a live progress bar, ``drive``,
``soc``, ``help`` and ``quit``. Meanwhile the vehicle lives: told
to ``drive --to`` a place, it moves there in simulated time and its battery
drains on the way (standing still it drains nothing), it warns when low and
offers the nearest charger, reports its position, and prints what the server
pushes. The prompt shows the battery and the link as they are now, redrawn
every second. A lost connection is said once and re-established with backoff;
the prompt stays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import ssl
import time
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from evcharge.apps.completion import VehicleCompleter
from evcharge.apps.vehicle import (
    POSITION_EVERY,
    START_SOC,
    UsageError,
    add_vehicle_commands,
    check_command,
    city_name,
    parse_position,
    percent,
    trip_query,
    vehicle_command,
)
from evcharge.domain import geo
from evcharge.domain.world import VehicleConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Link, world_fallbacks
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError, NotFoundError, UnavailableError

log = logging.getLogger(__name__)

DRIVING_SPEED_KMH = 80.0
LOW_SOC = 0.20
BATTERY_TICK = 1.0  # real seconds between battery updates
PROMPT_REFRESH = 1.0  # real seconds: the prompt's battery and link are redrawn this often
# The prompt's own commands, beside the one-shot ones (`charge` has a live bar here).
OWN_COMMANDS = ("charge", "drive", "soc", "help", "quit")

HELP = """\
[bold]Commands[/] (TAB completes; the same options as `evcharge vehicle COMMAND --help`):
  stations [--city C] [--near CITY]   nearest --near CITY [--min-kw KW]   status STATION
  reserve CP [--in MIN] [--minutes N] reservations [--all]               cancel RESERVATION
  plan --from A --to B [--soc PCT]    book --from A --to B [--soc PCT]   trips [--all]   cancel-trip TRIP
                                      (book after plan, same question: books the plan shown, if still free)
  charge RESERVATION [--to PCT]       live progress until the battery reaches PCT (default 80), then releases
  drive --to CITY|LAT,LON             drive there (the battery drains on the way); drive --stop to stand still
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
        self.cities = world.gazetteer()  # for "near CITY" and trips
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
            fallbacks=world_fallbacks(world.operator(vehicle.home), host, port),
        )
        self._was_up = False  # connected at least once (then a new connection is news)
        self._lost = False  # told the user the connection was lost, not yet that it is back
        self.refused = ""  # why the server refused this vehicle for good, if it did
        self.console = console or Console(highlight=False)
        self.soc = start_soc
        self.position = position or self._home_position()
        self.heading: tuple[str, tuple[float, float]] | None = None  # where it is driving to, if it is
        self.position_every = position_every
        self.charging: dict[str, tuple[float, float]] = {}  # reservation -> (soc at start, kWh so far)
        self._last_plan: tuple[p.TripQuery | None, str] = (None, "")  # the last question planned, its plan id
        self._progress: dict[str, asyncio.Event] = {}
        self._warned_low = False
        self._stop = asyncio.Event()
        self.reservations: dict[str, str] = {}  # this vehicle's reservations as last seen: id -> state
        self.trips: dict[str, str] = {}  # and its trips: id -> state
        self.parser = _ReplParser(prog="", add_help=False)
        commands = self.parser.add_subparsers(dest="command")
        add_vehicle_commands(commands)  # type: ignore[arg-type]
        self._charge_parser = _ReplParser(prog="charge", add_help=False)
        self._charge_parser.add_argument("reservation")
        self._charge_parser.add_argument("--to", type=percent, default=80.0)
        self._drive_parser = _ReplParser(prog="drive", add_help=False)
        whither = self._drive_parser.add_mutually_exclusive_group(required=True)
        whither.add_argument("--to", dest="near", nargs="+", help="CITY or LAT,LON")
        whither.add_argument("--stop", action="store_true")
        self.commands: dict[str, argparse.ArgumentParser | None] = {
            **commands.choices,
            **dict.fromkeys(OWN_COMMANDS),
            "charge": self._charge_parser,
            "drive": self._drive_parser,
        }
        self.prompt_session: PromptSession[str] = PromptSession(
            completer=self._completer(), input=input, output=output, complete_while_typing=False
        )

    def _home_position(self) -> tuple[float, float]:
        first = next((s for s in self.world.stations if s.operator == self.vehicle.home), None)
        return (first.lat, first.lon) if first else geo.CITIES["Natal"]

    def _completer(self) -> VehicleCompleter:
        everyone = self.world.stations  # a driver reserves at any operator, through its home
        live = ("held", "booked", "charging")
        return VehicleCompleter(
            self.commands,
            {
                "stations": lambda: [s.id for s in everyone],
                "charge_points": lambda: [cp.id for s in everyone for cp in s.charge_points],
                "cities": lambda: list(self.cities.cities),
                "reservations": lambda: [r for r, state in self.reservations.items() if state in live],
                "trips": lambda: [t for t, state in self.trips.items() if state == "committed"],
            },
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
                        line = await self.prompt_session.prompt_async(self._prompt, refresh_interval=PROMPT_REFRESH)
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
        driving = f" → {self.heading[0]}" if self.heading else ""
        return f"{self.vehicle.id} {self.soc:.0%}{driving}{link}> "

    def _redraw_prompt(self) -> None:
        if self.prompt_session.app.is_running:
            self.prompt_session.app.invalidate()

    async def execute(self, line: str) -> bool:
        """Run one command line; False when the user wants to quit."""
        try:
            words = shlex.split(line)
        except ValueError:
            self.say("[red]usage[/]: a quotation mark is not closed (try help)")  # a typo here, not the server's
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
                case "charge":
                    await self._charge(self._charge_parser.parse_args(words[1:]))
                case "drive":
                    args = self._drive_parser.parse_args(words[1:])
                    check_command(args, self.world)
                    self._drive(args)
                case _ if command not in self.commands:
                    raise UsageError(f"unknown command {command!r}; commands: {', '.join(sorted(self.commands))}")
                case _:
                    args = self.parser.parse_args(words)
                    args.json, args.id = False, self.vehicle.id
                    check_command(args, self.world)
                    shown = command == "book" and not args.plan and self._last_plan[0] == trip_query(args)
                    if shown:
                        args.plan = self._last_plan[1]  # the same question: book what was shown
                    try:
                        result = await vehicle_command(self._connected(), args, self.console, self.cities)
                    except NotFoundError:
                        if not shown:
                            raise
                        self.say(f"plan {args.plan} can no longer be booked as shown; booking a fresh plan")
                        args.plan = ""
                        result = await vehicle_command(self._connected(), args, self.console, self.cities)
                    self._learn(result)
                    if command == "plan":
                        self._last_plan = (trip_query(args), result["trip"].id)
        except EvchargeError as exc:
            self.say(f"[red]{exc.code}[/]: {exc.message}")
        except UsageError as exc:
            self.say(f"[red]usage[/]: {exc} (try help)")
        return True

    def _connected(self) -> Link:
        """The link, to ask over; a request whose reply is lost is asked again once it is back."""
        if self.client is None:
            raise UnavailableError("not connected to the server; reconnecting in the background")
        return self.link

    # --- commands of the REPL's own ------------------------------------------------------

    async def _charge(self, args: argparse.Namespace) -> None:
        target = args.to / 100
        if self.soc >= target:
            raise UsageError(f"the battery is at {self.soc:.0%} already: charge to more than that (--to PCT)")
        client = self._connected()
        r = await client.start_charging(args.reservation)
        if self.heading is not None:
            self.say(f"Stopped driving to {self.heading[0]} to charge.")
            self.heading = None
        start = self.soc
        self.charging[r.id] = (start, 0.0)
        done = self._progress[r.id] = asyncio.Event()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"))
        with Progress(*columns, console=self.console, transient=False) as bar:
            # The bar is the way from where the battery was to the target, not the battery out of 100 %.
            task = bar.add_task(
                f"charging {r.charge_point_id} {start:.0%} → {target:.0%}", total=target - start, detail=""
            )
            while self.soc < target and r.id in self.charging:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await done.wait()
                done.clear()
                kwh = self.charging.get(r.id, (0.0, 0.0))[1]
                cost = kwh * self._price(r.charge_point_id)
                detail = f"{kwh:.2f} kWh  SoC {self.soc:.0%}  R$ {cost:.2f}"
                bar.update(task, completed=min(self.soc, target) - start, detail=detail)
        self._progress.pop(r.id, None)
        if r.id in self.charging:
            released = await client.stop_charging(r.id)
            self.charging.pop(r.id, None)
            self.say(f"Released {released.charge_point_id}: {released.kwh:.2f} kWh, R$ {released.cost:.2f}")

    def _price(self, cp_id: str) -> float:
        return self.world.charge_point(cp_id)[1].price_per_kwh

    def _drive(self, args: argparse.Namespace) -> None:
        if args.stop:
            if self.heading is None:
                self.say("Standing still already.")
            else:
                self.say(f"Stopped on the way to {self.heading[0]}.")
                self.heading = None
            return
        if self.charging:
            raise UsageError("charging: release the charge point first")
        target = parse_position(args.near)
        name = args.near if "," in args.near else city_name(args.near)
        km = geo.road_km(*self.position, *target)
        self.heading = (name, target)
        self.say(f"Driving to {name}: {km:.0f} km at {DRIVING_SPEED_KMH:g} km/h (simulated time).")

    def _learn(self, result: object) -> None:
        """Keep the ids of this vehicle's reservations and trips that a command showed (for TAB)."""
        if not isinstance(result, dict):
            return
        for r in result.get("reservations", []) + ([result["reservation"]] if "reservation" in result else []):
            self.reservations[r.id] = r.state
        for trip in result.get("trips", []) + ([result["trip"]] if "trip" in result else []):
            if trip.state != "planned":
                self.trips[trip.id] = trip.state
            for stop in trip.stops if trip.state == "committed" else ():
                if stop.reservation_id:
                    self.reservations.setdefault(stop.reservation_id, "booked")

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
        self._redraw_prompt()  # "(offline)" goes now, not at the next key
        # What TAB offers: this vehicle's reservations and trips as they are now (a nicety: never a reason to drop).
        with contextlib.suppress(EvchargeError):
            self._learn({"reservations": await client.reservations(include_past=False)})
            self._learn({"trips": await client.trips(include_cancelled=False)})

    def _went_down(self, reason: str) -> None:
        if self._was_up and not self._lost:
            self.say("[yellow]Connection to the server lost; reconnecting...[/]")
            self._lost = True
        self._redraw_prompt()

    def _pushed(self, event: p.Event) -> None:
        match event:
            case p.ChargingProgress(reservation_id=rid, kwh=kwh):
                start_soc, _ = self.charging.get(rid, (self.soc, 0.0))
                self.charging[rid] = (start_soc, kwh)
                self.soc = min(1.0, start_soc + kwh / self.vehicle.battery_kwh)
                if rid in self._progress:
                    self._progress[rid].set()
            case p.TripChanged(trip=trip, reason=reason, offer=offer):
                self._learn({"trip": trip})
                route = " -> ".join(f"{s.city} ({s.operator_id})" for s in trip.stops) or "no stops"
                self.say(f"[cyan]*[/] trip {trip.id} {trip.origin} -> {trip.destination}: {reason}; {route}")
                if offer is not None:
                    self.say(f"  a new plan is offered: [bold]{book_command(offer)}[/] (then cancel-trip {trip.id})")
            case p.ReservationChanged(reservation=r, reason=reason):
                self.reservations[r.id] = r.state
                if r.state != "charging":
                    self.charging.pop(r.id, None)
                    if r.id in self._progress:
                        self._progress[r.id].set()
                why = "" if reason == r.state else f" ({reason})"
                self.say(f"[cyan]*[/] reservation {r.id} on {r.charge_point_id}: {r.state}{why}")

    async def _battery(self) -> None:
        """Drive on towards the place it heads for (simulated time), draining the battery; warn once when low."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(BATTERY_TICK)
            now = time.monotonic()
            scale = self.client.time_scale if self.client is not None else 1.0
            hours = (now - last) * scale / 3600
            last = now
            if self.heading is not None:
                self._drive_on(DRIVING_SPEED_KMH * hours)
            if self.soc >= LOW_SOC:
                self._warned_low = False
            elif not self._warned_low:
                self._warned_low = True
                await self._warn_low()

    def _drive_on(self, km: float) -> None:
        """Move up to ``km`` of road towards the place headed for; stop there, or where the battery is empty."""
        assert self.heading is not None
        name, (lat, lon) = self.heading
        left = geo.road_km(*self.position, lat, lon)
        range_km = self.soc * self.vehicle.battery_kwh / self.vehicle.consumption_kwh_per_km
        step = min(km, left, range_km)
        share = step / left if left > 0 else 1.0
        self.position = (
            self.position[0] + (lat - self.position[0]) * share,
            self.position[1] + (lon - self.position[1]) * share,
        )
        self.soc = max(0.0, self.soc - step * self.vehicle.consumption_kwh_per_km / self.vehicle.battery_kwh)
        if step >= left:
            self.heading = None
            self.say(f"[green]Arrived in {name}[/] with {self.soc:.0%}.")
        elif step >= range_km:
            self.heading = None
            self.say(f"[bold red]Battery empty[/]: stopped {left - step:.0f} km before {name}.")

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
