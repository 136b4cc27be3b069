"""Plan quality: the same random trips planned under the old objective and the driver's.

    python -m tools.plan_quality [--world brazil-northeast] [--trips 200] [--seed 16] [--json FILE]

The *old* objective is the earliest arrival with stops free of cost and of any size (what the
planner did before issue 16); the *driver's* adds the world's rules: every stop costs
``stop_overhead_min`` besides charging and charges at least ``min_stop_charge_pct``; *cheap*
is the driver's with money weighed at ``cheap_hour_value``. Each trip goes between two random
cities of the world, in a random vehicle of it, leaving with 80 %, every charger free. Total
time of an old plan is also given with the overhead it does not count (its stops take that
long too), so that the two compare like for like. Prints a Markdown table (as in
docs/performance.md); ``tools.bench`` uses the same trips for its in-process planning rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evcharge.domain import planner
from evcharge.domain.world import World, load_world

DEPART = 1_767_268_800  # 2026-01-01 12:00 UTC
START_SOC = 0.80
OBJECTIVES = ("old", "driver", "cheap")
BIG_CITY = 100_000  # people: the cities the bench plans between


@dataclass(frozen=True)
class Trip:
    origin: planner.Place
    destination: planner.Place
    vehicle: planner.VehicleSpec


def network_of(world: World) -> planner.Network:
    return planner.Network(
        [
            planner.ChargeOption(s.operator, s.id, s.name, s.city, s.lat, s.lon, cp.id, cp.power_kw, cp.price_per_kwh)
            for s in world.stations
            for cp in s.charge_points
        ]
    )


def random_trips(world: World, count: int, seed: int, min_population: int = 0) -> list[Trip]:
    """``count`` trips between two different random cities (of at least ``min_population``) in random vehicles."""
    rng = random.Random(seed)
    cities = sorted(world.gazetteer().cities.items())
    if min_population and world.cities:
        big = {c.name for c in world.cities if c.population >= min_population}
        cities = [c for c in cities if c[0] in big]
    trips = []
    for _ in range(count):
        (a, pa), (b, pb) = rng.sample(cities, 2)
        v = rng.choice(world.vehicles)
        spec = planner.VehicleSpec(v.battery_kwh, v.consumption_kwh_per_km)
        trips.append(Trip(planner.Place(a, *pa), planner.Place(b, *pb), spec))
    return trips


def request(world: World, trip: Trip, objective: str) -> planner.TripRequest:
    old = planner.TripRequest(trip.origin, trip.destination, soc_start=START_SOC, depart=DEPART)
    if objective == "old":
        return old
    rules = world.rules
    driver = dataclasses.replace(
        old, stop_overhead_s=rules.stop_overhead_min * 60, min_stop_soc=rules.min_stop_charge_pct / 100
    )
    return dataclasses.replace(driver, value_of_hour=rules.cheap_hour_value) if objective == "cheap" else driver


def plan(world: World, network: planner.Network, trip: Trip, objective: str) -> tuple[planner.Plan | None, float]:
    """The plan (None: no route) and the seconds the search took."""
    started = time.perf_counter()
    try:
        found = planner.plan_trip(request(world, trip, objective), trip.vehicle, network, planner.ledger_next_free({}))
    except planner.NoRouteError:
        found = None
    return found, time.perf_counter() - started


def quality(world: World, trips: list[Trip]) -> dict[str, dict[str, Any]]:
    network = network_of(world)
    overhead_s = world.rules.stop_overhead_min * 60
    least = world.rules.min_stop_charge_pct / 100
    plans = {objective: [plan(world, network, t, objective)[0] for t in trips] for objective in OBJECTIVES}
    both = [i for i in range(len(trips)) if all(plans[o][i] is not None for o in OBJECTIVES)]
    out: dict[str, dict[str, Any]] = {}
    for objective in OBJECTIVES:
        found = [plans[objective][i] for i in both]
        stops = [s for p in found if p for s in p.stops]
        charge_min = sorted((s.slot_end - s.slot_start) / 60 for s in stops)
        hours = [(p.arrival - p.depart) / 3600 for p in found if p]
        counted = [(p.arrival - p.depart + overhead_s * len(p.stops)) / 3600 for p in found if p]
        out[objective] = {
            "trips": len(trips),
            "without_route": sum(p is None for p in plans[objective]),
            "compared": len(both),
            "stops_per_trip": round(statistics.mean(len(p.stops) for p in found if p), 2) if found else 0,
            "max_stops": max((len(p.stops) for p in found if p), default=0),
            "total_hours": round(statistics.mean(hours), 2) if hours else 0,
            # What the trip takes once each stop's overhead is counted (already in for the driver's).
            "total_hours_with_overhead": round(statistics.mean(counted if objective == "old" else hours), 2)
            if hours
            else 0,
            "charge_min_per_stop_min": charge_min[0] if charge_min else 0,
            "charge_min_per_stop_median": statistics.median(charge_min) if charge_min else 0,
            "stops_under_least_charge": sum(s.soc_out - s.soc_in < least - 1e-9 for s in stops),
            "trips_with_two_stops_in_one_city": sum(
                any(a.option.city == b.option.city for a, b in itertools.pairwise(p.stops)) for p in found if p
            ),
            "total_cost": round(statistics.mean(p.total_cost for p in found if p), 2) if found else 0,
        }
    pairs = [(o, n) for o, n in zip(plans["old"], plans["driver"], strict=True) if o is not None and n is not None]
    late = [n.arrival - o.arrival - overhead_s * len(o.stops) for o, n in pairs]
    sips = [any(s.soc_out - s.soc_in < least - 1e-9 for s in o.stops) for o, _ in pairs]
    out["driver"] |= {
        "fewer_stops_than_old": sum(len(n.stops) < len(o.stops) for o, n in pairs),
        "more_stops_than_old": sum(len(n.stops) > len(o.stops) for o, n in pairs),
        # Later than the old plan with its overhead counted: the least useful charge costs time.
        "later_than_old_with_overhead": sum(x > 0 for x in late),
        "minutes_later_than_old_median": round(statistics.median([x for x in late if x > 0] or [0]) / 60, 1),
        "minutes_later_than_old_max": round(max(late, default=0) / 60, 1),
        # ... which only a plan that stops for less than the least useful charge is (none other is faster).
        "later_than_old_without_a_sip": sum(x > 0 and not sip for x, sip in zip(late, sips, strict=True)),
    }
    return out


ROWS = [
    ("trips without a route", "without_route", "{}"),
    ("stops per trip (mean)", "stops_per_trip", "{:.2f}"),
    ("most stops in a trip", "max_stops", "{}"),
    ("total time, h (mean, as planned)", "total_hours", "{:.2f}"),
    ("total time, h (mean, every stop's overhead counted)", "total_hours_with_overhead", "{:.2f}"),
    ("minutes of charging per stop (min)", "charge_min_per_stop_min", "{:g}"),
    ("minutes of charging per stop (median)", "charge_min_per_stop_median", "{:g}"),
    ("stops charging less than the least useful charge", "stops_under_least_charge", "{}"),
    ("trips with two stops running in one city", "trips_with_two_stops_in_one_city", "{}"),
    ("cost per trip, R$ (mean)", "total_cost", "{:.2f}"),
]


def markdown(result: dict[str, dict[str, Any]]) -> str:
    head = "| over the same trips | old objective | driver's (fast) | driver's, `--prefer cheap` |"
    lines = [head, "|---|---|---|---|"]
    for label, key, form in ROWS:
        lines.append(f"| {label} | " + " | ".join(form.format(result[o][key]) for o in OBJECTIVES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plan_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="brazil-northeast", help="world name or file (default: %(default)s)")
    parser.add_argument("--trips", type=int, default=200, help="random trips (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=16, help="random seed (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    world = load_world(args.world)
    result = quality(world, random_trips(world, args.trips, args.seed))
    d = result["driver"]
    print(f"{args.trips} random trips of {args.world} ({d['compared']} with a route under every objective)\n")
    print(markdown(result))
    print(
        f"\nThe driver's plan has fewer stops than the old in {d['fewer_stops_than_old']} trips, more in "
        f"{d['more_stops_than_old']}; it arrives later than the old plan with its overhead counted in "
        f"{d['later_than_old_with_overhead']} (by {d['minutes_later_than_old_median']:g} minutes median, "
        f"{d['minutes_later_than_old_max']:g} at most), of which {d['later_than_old_without_a_sip']} where the "
        "old plan had no stop under the least useful charge."
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
