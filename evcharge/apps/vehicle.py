"""What a vehicle can ask: the commands of ``evcharge vehicle COMMAND`` and of its interactive prompt.

One set of argparse definitions (``add_vehicle_commands``) and one way to run
them (``vehicle_command``), shared by the one-shot CLI and the REPL, so both
take the same options and print the same.
"""

from __future__ import annotations

import argparse
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from rich.console import Console

from evcharge.apps import render
from evcharge.domain import geo
from evcharge.domain.world import World
from evcharge.links.requests import Requests
from evcharge.wire import protocol as p

RESERVE_MINUTES = 30  # a reservation's length unless --minutes says otherwise
# The interactive vehicle's own defaults (``evcharge vehicle`` without a COMMAND).
START_SOC = 0.8  # state of charge at start, 0..1
POSITION_EVERY = 60.0  # real seconds between position reports


def _default(struct: type[msgspec.Struct], field: str) -> Any:
    """The protocol's default for a field, so an option's default is the server's."""
    (found,) = [f.default for f in msgspec.structs.fields(struct) if f.name == field]
    return found


class UsageError(Exception):
    """A command line that cannot be run as typed (a bad time, an unknown city...)."""


VEHICLE_EXAMPLES = """\
examples:
  evcharge vehicle --id V01 nearest --near Natal --min-kw 100
  evcharge vehicle --id V01 reserve NAT-PN-1 --in 10 --minutes 30
  evcharge vehicle --id V01 reserve FEC-1-2 --minutes 45    (operator C's: through your home operator)
  evcharge vehicle --id V01 plan --from Natal --to "Feira de Santana" --soc 80
  evcharge vehicle --id V01                       (the interactive prompt)

`evcharge vehicle --id V01 COMMAND --help` explains a command's options.
Ids and cities may be typed in any case ("nat-pn-1", "joao pessoa").
"""


def percent(text: str) -> float:
    """A percentage option (0-100), checked before anything is sent."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a percentage is between 0 and 100")
    return value


def at_least(low: float, kind: type[int] | type[float] = float) -> Any:
    """An option's argparse ``type=`` for a number of at least ``low``."""

    def parse(text: str) -> float:
        value = _number(text)
        if kind is int and value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low:g}")
        return kind(value)

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def add_vehicle_commands(vcmd: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The vehicle's commands: for `evcharge vehicle ... COMMAND` and the interactive REPL alike."""
    cmd = vcmd.add_parser("stations", help="every operator's stations and charge points, each naming its operator")
    cmd.add_argument("--city", nargs="+", help="only the stations in this city")
    cmd.add_argument("--near", nargs="+", help="CITY or LAT,LON: sort by distance from there")
    cmd.add_argument("--limit", type=at_least(1, int), help="at most this many stations")
    cmd = vcmd.add_parser("nearest", help="the nearest charge point available now, at any operator")
    cmd.add_argument("--near", nargs="+", required=True, help="CITY or LAT,LON (--near=-5.8,-35.2 for coordinates)")
    cmd.add_argument(
        "--min-kw",
        type=at_least(0),
        default=_default(p.FindNearest, "min_power_kw"),
        help="only charge points of at least this power (default: %(default)s)",
    )
    cmd = vcmd.add_parser(
        "status", help='a station\'s charge points (any operator): live status, "free in N min", taken slots'
    )
    cmd.add_argument("station", help="station id, e.g. NAT-PN")
    cmd = vcmd.add_parser(
        "reserve",
        help=f"reserve any operator's charge point, through your home operator "
        f"(default: from now, {RESERVE_MINUTES} min)",
    )
    cmd.add_argument("charge_point", help="charge point id, e.g. NAT-PN-1 (`stations` lists them)")
    when = cmd.add_mutually_exclusive_group()
    when.add_argument("--start", help="start at this ISO time, UTC if no offset (default: now)")
    when.add_argument(
        "--in", dest="in_minutes", type=at_least(0), help="start this many minutes from now (server time)"
    )
    cmd.add_argument(
        "--minutes",
        type=at_least(1, int),
        default=RESERVE_MINUTES,
        help="how long, in minutes (default: %(default)s)",
    )
    cmd = vcmd.add_parser("reservations", help="your reservations")
    cmd.add_argument("--all", action="store_true", help="include finished ones")
    for name, text in (
        ("cancel", "cancel one of your reservations"),
        ("charge", "start charging on a reservation, in its slot"),
        ("release", "stop charging and free the charge point"),
    ):
        vcmd.add_parser(name, help=text).add_argument("reservation", help="reservation id, e.g. A-1a2b3c4d5e")
    vcmd.add_parser("history", help="your charging sessions at every operator, with kWh and cost")
    vcmd.add_parser("costs", help="what you paid, by operator and month")
    for name, text in (
        ("plan", "plan an intercity trip over every operator's chargers and free slots"),
        ("book", "book every stop of a trip atomically (all or none): the plan shown, or a fresh one"),
    ):
        cmd = vcmd.add_parser(name, help=text)
        cmd.add_argument("--from", dest="origin", nargs="+", required=True, help="origin city")
        cmd.add_argument("--to", dest="destination", nargs="+", required=True, help="destination city")
        cmd.add_argument(
            "--soc",
            type=percent,
            default=_default(p.TripQuery, "soc_pct"),
            help="state of charge at departure, %% (default: %(default)s)",
        )
        cmd.add_argument("--depart", help="ISO departure time (default: now, server time)")
        cmd.add_argument(
            "--min-arrival-soc",
            type=percent,
            default=_default(p.TripQuery, "min_arrival_soc_pct"),
            help="never arrive below this %% (default: %(default)s)",
        )
        cmd.add_argument(
            "--max-charge-soc",
            type=percent,
            default=_default(p.TripQuery, "max_charge_soc_pct"),
            help="never charge above this %% (default: %(default)s)",
        )
        cmd.add_argument(
            "--prefer",
            choices=typing.get_args(p.Preference),
            default=_default(p.TripQuery, "prefer"),
            help="fast: arrive earliest; cheap: weigh money against time at the world's value of an hour "
            "(default: %(default)s)",
        )
    cmd.add_argument("--plan", default="", help="book this plan (its id from `plan`, same question) as it was shown")
    cmd = vcmd.add_parser("trips", help="your booked trips")
    cmd.add_argument("--all", action="store_true", help="include cancelled ones")
    cancel_trip = vcmd.add_parser("cancel-trip", help="release every stop of a trip, at every operator")
    cancel_trip.add_argument("trip", help="trip id, e.g. A-T1a2b3c4d5e")


def parse_position(text: str, cities: geo.Gazetteer = geo.NORTHEAST) -> tuple[float, float]:
    if "," in text:
        lat_text, lon_text = text.split(",", 1)
        try:
            lat, lon = float(lat_text), float(lon_text)
        except ValueError:
            pass
        else:
            if not -90 <= lat <= 90:
                raise UsageError(f"{text!r}: latitude must be between -90 and 90, not {lat:g}")
            if not -180 <= lon <= 180:
                raise UsageError(f"{text!r}: longitude must be between -180 and 180, not {lon:g}")
            return lat, lon
    return cities.find(city_name(text, cities))[1]


def city_name(text: str, cities: geo.Gazetteer = geo.NORTHEAST) -> str:
    """A city as the world spells it ("joao pessoa" is João Pessoa); ``UsageError`` if unknown."""
    try:
        return cities.find(text)[0]
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None


def check_command(args: argparse.Namespace, world: World) -> None:
    """What can be checked before asking anyone: cities and ids, as the world spells them.

    A mistake here is a ``UsageError`` (exit 2), whatever the command, before a connection is made.
    Places may be typed without quotes ("--to Feira de Santana": their options take several words).
    """
    for name in ("origin", "destination", "near", "city"):
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    cities = world.gazetteer()
    for name in ("origin", "destination"):
        if getattr(args, name, None) is not None:
            setattr(args, name, city_name(getattr(args, name), cities))
    if getattr(args, "origin", None) is not None and args.origin == args.destination:
        raise UsageError(f"--from and --to are both {args.origin}: there is no trip to plan")
    if getattr(args, "near", None) is not None:
        parse_position(args.near, cities)
    for name, known in (
        ("charge_point", [cp.id for s in world.stations for cp in s.charge_points]),
        ("station", [s.id for s in world.stations]),
    ):
        typed = getattr(args, name, None)
        if typed is not None and typed not in known:
            same = [k for k in known if k.casefold() == typed.casefold()]
            if len(same) == 1:
                setattr(args, name, same[0])


def trip_query(args: argparse.Namespace) -> p.TripQuery:
    depart = None
    if args.depart:
        try:
            depart = datetime.fromisoformat(args.depart)
        except ValueError:
            raise UsageError(f"--depart {args.depart!r} is not an ISO time (e.g. 2026-11-23T14:30)") from None
        depart = depart if depart.tzinfo else depart.replace(tzinfo=UTC)
    return p.TripQuery(
        origin=args.origin,
        destination=args.destination,
        soc_pct=args.soc,
        depart=depart,
        min_arrival_soc_pct=args.min_arrival_soc,
        max_charge_soc_pct=args.max_charge_soc,
        prefer=args.prefer,
    )


def _start_time(args: argparse.Namespace, now: datetime) -> datetime:
    if args.start:
        try:
            start = datetime.fromisoformat(args.start)
        except ValueError:
            raise UsageError(f"--start {args.start!r} is not an ISO time (e.g. 2026-11-23T14:30)") from None
        return start if start.tzinfo else start.replace(tzinfo=UTC)
    return now + timedelta(minutes=args.in_minutes or 0)


async def vehicle_command(
    c: Requests, args: argparse.Namespace, out: Console, cities: geo.Gazetteer = geo.NORTHEAST
) -> Any:
    """Run one command; ``cities`` (the world's) resolve a "near CITY"."""
    now = c.server_now()
    human = not args.json
    match args.command:
        case "stations":
            near = parse_position(args.near, cities) if args.near else None
            stations = await c.list_stations(city=args.city, near=near, limit=args.limit)
            if human:
                out.print(render.stations_table(stations, now))
            return {"stations": stations}
        case "nearest":
            lat, lon = parse_position(args.near, cities)
            found = await c.find_nearest(lat, lon, min_power_kw=args.min_kw)
            if human:
                cp = next(cp for cp in found.station.charge_points if cp.id == found.charge_point_id)
                out.print(
                    f"Nearest: [bold]{found.station.name}[/] ({found.station.city}), {found.distance_km:.1f} km — "
                    f"charge point [bold]{cp.id}[/] {cp.power_kw:g} kW {cp.connector}, R$ {cp.price_per_kwh:.2f}/kWh"
                )
            return {
                "station": found.station,
                "charge_point_id": found.charge_point_id,
                "distance_km": found.distance_km,
            }
        case "status":
            station = await c.station_status(args.station)
            if human:
                render.station_status(station, now, out)
            return {"station": station}
        case "reserve":
            r = await c.reserve(args.charge_point, _start_time(args, now), args.minutes)
            if human:
                out.print(
                    f"Reserved [bold]{r.charge_point_id}[/] {render.when(r.start, now)} until {r.end:%H:%M}Z "
                    f"— reservation [bold]{r.id}[/]"
                )
            return {"reservation": r}
        case "reservations":
            mine = await c.reservations(include_past=args.all)
            if human and mine:
                out.print(render.reservations_table(mine, now, title=f"Reservations of {args.id}"))
            elif human:
                out.print("No reservations." if args.all else "No reservations ahead (--all shows past ones).")
            return {"reservations": mine}
        case "cancel":
            cancelled = await c.cancel(args.reservation)
            r = cancelled.reservation
            if human and cancelled.unchanged:
                out.print(f"Reservation [bold]{r.id}[/] was {r.state} already; nothing to cancel")
            elif human:
                out.print(f"Reservation [bold]{r.id}[/] is {r.state}; {r.charge_point_id} is free again")
            return {"reservation": r, "unchanged": cancelled.unchanged}
        case "charge":
            r = await c.start_charging(args.reservation)
            if human:
                out.print(f"Charging on [bold]{r.charge_point_id}[/] until {r.end:%H:%M}Z (reservation {r.id})")
            return {"reservation": r}
        case "release":
            r = await c.stop_charging(args.reservation)
            if human:
                out.print(f"Released [bold]{r.charge_point_id}[/]: {r.kwh:.2f} kWh, R$ {r.cost:.2f}")
            return {"reservation": r}
        case "history":
            history = await c.history()
            if human and history.sessions:
                out.print(render.history_table(history))
            elif human:
                out.print("No charging sessions yet.")
            return {"sessions": history.sessions, "total_kwh": history.total_kwh, "total_cost": history.total_cost}
        case "costs":
            history = await c.history()
            if human:
                out.print(render.costs_table(history))
            return {"sessions": history.sessions, "total_kwh": history.total_kwh, "total_cost": history.total_cost}
        case "plan":
            trip = await c.plan_trip(trip_query(args))
            if human:
                render.trip(trip, out, title=f"Plan {trip.id}")
                if trip.stops:  # with none there is nothing to book
                    out.print(render.soc_chart(trip, args.soc))
                    out.print(f"Book it as shown: [bold]book[/] with the same question and [bold]--plan {trip.id}[/].")
            return {"trip": trip}
        case "book":
            booked = await c.book_trip(trip_query(args), args.plan)
            if human:
                note = f" (re-planned {booked.attempts - 1}x after losing slots)" if booked.attempts > 1 else ""
                if args.plan and booked.attempts == 1 and not booked.as_shown:
                    note = f" (a fresh plan: {args.plan} was not yours for this question, or its time had passed)"
                render.trip(booked.trip, out, title=f"Booked trip {booked.trip.id}{note}")
            return {"trip": booked.trip, "attempts": booked.attempts, "as_shown": booked.as_shown}
        case "trips":
            trips = await c.trips(include_cancelled=args.all)
            if human:
                for trip in trips:
                    render.trip(trip, out, title=f"Trip {trip.id} [{render.trip_state(trip, now)}]")
                if not trips:
                    out.print("No trips." if args.all else "No trips (--all shows cancelled ones too).")
            return {"trips": trips}
        case "cancel-trip":
            trip_cancelled = await c.cancel_trip(args.trip)
            trip = trip_cancelled.trip
            if human and trip_cancelled.unchanged:
                out.print(f"Trip [bold]{trip.id}[/] was cancelled already; nothing to cancel")
            elif human:
                out.print(f"Trip [bold]{trip.id}[/] is {trip.state}; its {len(trip.stops)} stops are released")
            return {"trip": trip, "unchanged": trip_cancelled.unchanged}
    raise UsageError(f"unknown command {args.command}")
