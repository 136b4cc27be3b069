"""The shipped worlds: brazil-northeast at real size, its generator, and the cities a world names."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from evcharge.domain import geo, planner
from evcharge.domain.world import World, load_world, resolve_world_path
from evcharge.links.client import connect
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError
from tools import make_world
from tools.harness import free_ports, write_world

from .conftest import running_federation

BIG = make_world.BIG_CITY
CAR = make_world.CHECK_CAR  # a 50 kWh car


@pytest.fixture(scope="module")
def world() -> World:
    return load_world("brazil-northeast")


def test_brazil_northeast_is_the_real_northeast(world: World) -> None:
    assert {c.state for c in world.cities} == {"AL", "BA", "CE", "MA", "PB", "PE", "PI", "RN", "SE"}
    assert len(world.cities) > 800 and min(c.population for c in world.cities) >= 15_000
    by_name = {c.name: c for c in world.cities}
    assert (by_name["Recife"].lat, by_name["Recife"].lon) == pytest.approx(geo.CITIES["Recife"], abs=0.02)
    assert {"Santa Rita (PB)", "Santa Rita (MA)"} <= set(by_name)  # alike names told apart by state
    assert sum(c.population >= BIG for c in world.cities) == 65
    points = [cp for s in world.stations for cp in s.charge_points]
    assert len(world.stations) == 300 and 900 <= len(points) <= 1200
    assert {op.id for op in world.operators} == set("ABCDE")
    assert all(s.city in by_name for s in world.stations)
    powers = Counter(cp.power_kw for cp in points)
    assert min(powers) == 22 and max(powers) == 350 and powers[22] < len(points) / 2
    # By population: the capitals have the most stations.
    per_city = Counter(s.city for s in world.stations)
    assert {"Salvador", "Fortaleza", "Recife"} <= {city for city, _ in per_city.most_common(6)}


def test_every_two_big_cities_have_a_route_for_a_50_kwh_car(world: World) -> None:
    """Checked for every pair by reach (times aside), independently of the planner; a sample planned too."""
    per_km = CAR.consumption_kwh_per_km / CAR.battery_kwh
    full, floor, least = 0.8, 0.1, world.rules.min_stop_charge_pct / 100
    leg = (full - floor) / per_km  # road km on one charge
    sip = least / per_km  # a stop this soon after a full charge charges too little
    sites = sorted({(s.lat, s.lon) for s in world.stations})
    hops = [
        {j for j, b in enumerate(sites) if sip <= geo.road_km(*a, *b) <= leg and j != i} for i, a in enumerate(sites)
    ]
    big = [c for c in world.cities if c.population >= BIG]
    for a in big:
        frontier = {i for i, s in enumerate(sites) if sip <= geo.road_km(a.lat, a.lon, *s) <= leg}
        reached = set(frontier)
        while frontier:
            frontier = set().union(*(hops[i] for i in frontier)) - reached
            reached |= frontier
        for b in big:
            if b is not a and geo.road_km(a.lat, a.lon, b.lat, b.lon) > leg:
                assert any(geo.road_km(*sites[i], b.lat, b.lon) <= leg for i in reached), f"{a.name} -> {b.name}"
    options = [
        planner.ChargeOption(s.operator, s.id, s.name, s.city, s.lat, s.lon, cp.id, cp.power_kw, cp.price_per_kwh)
        for s in world.stations
        for cp in s.charge_points
    ]
    network = planner.Network(options)
    for a, b in random.Random(16).sample(list(itertools.combinations(big, 2)), 12):
        request = planner.TripRequest(
            planner.Place(a.name, a.lat, a.lon),
            planner.Place(b.name, b.lat, b.lon),
            soc_start=full,
            depart=0,
            stop_overhead_s=world.rules.stop_overhead_min * 60,
            min_stop_soc=least,
        )
        plan = planner.plan_trip(request, CAR, network, planner.ledger_next_free({}))
        assert all(s.soc_out - s.soc_in >= least - 1e-9 for s in plan.stops)


def test_the_generator_writes_the_shipped_file(tmp_path: Path) -> None:
    cities, stations = make_world.build(make_world.SEED)
    out = tmp_path / "brazil-northeast.toml"
    make_world.write(out, cities, stations, make_world.SEED)
    assert out.read_bytes() == resolve_world_path("brazil-northeast").read_bytes()


def test_a_world_s_cities_are_found_by_name(world: World) -> None:
    cities = world.gazetteer()
    assert cities.find("caico")[0] == "Caicó"
    assert cities.find("Santa Rita (MA)")[0] == "Santa Rita (MA)"
    with pytest.raises(KeyError, match=r"more than one 'Santa Rita': say which, Santa Rita \(.*\) or Santa Rita"):
        cities.find("Santa Rita")
    with pytest.raises(KeyError, match=r"unknown city 'Caicoo'; did you mean Caicó"):
        cities.find("Caicoo")
    # A world without cities of its own (the demo's) has the Northeast's seventeen.
    assert load_world("northeast").gazetteer().find("joao pessoa") == ("João Pessoa", geo.CITIES["João Pessoa"])
    with pytest.raises(KeyError, match=r"unknown city 'Atlantis'; known: Natal, Mossoró"):
        geo.find_city("Atlantis")


@pytest.mark.timeout(120)
async def test_five_operators_plan_between_any_two_cities_under_the_rules(tmp_path: Path) -> None:
    """The large world's servers, federated: trips between its own cities, the world's rules in every stop."""
    operators = [op.id for op in load_world("brazil-northeast").operators]
    path = tmp_path / "world.toml"
    world = write_world(path, "brazil-northeast", ports=dict(zip(operators, free_ports(5), strict=True)))
    async with running_federation(world, tmp_path / "data", operators=tuple(operators)) as servers:
        v = world.vehicle("V01")  # 40 kWh, at home with A
        async with connect("127.0.0.1", servers[v.home].port, role="vehicle", ident=v.id, secret=v.token) as c:
            fast = await c.plan_trip(p.TripQuery(origin="Caico", destination="Juazeiro do Norte"))
            cheap = await c.plan_trip(p.TripQuery(origin="Caicó", destination="Juazeiro do Norte", prefer="cheap"))
            with pytest.raises(BadRequestError, match=r"Santa Rita \(PB\) or Santa Rita \(MA\)"):
                await c.plan_trip(p.TripQuery(origin="Santa Rita", destination="Recife"))
    assert fast.origin == "Caico" and fast.stops and cheap.stops
    assert cheap.total_cost < fast.total_cost and cheap.arrival >= fast.arrival
    for stop in fast.stops + cheap.stops:
        assert stop.soc_out - stop.soc_in >= world.rules.min_stop_charge_pct - 0.1  # percent, rounded to 0.1
        assert stop.slot_start >= stop.arrival + timedelta(minutes=world.rules.stop_overhead_min)


def test_a_test_world_may_give_one_operator_the_port_another_had(tmp_path: Path) -> None:
    """Ports were edited one operator at a time: A taking B's old port made B's line twice."""
    shipped = {op.id: op.port for op in load_world("northeast").operators}
    swapped = {"A": shipped["B"], "B": shipped["A"], "C": shipped["C"] + 1}
    world = write_world(tmp_path / "world.toml", "northeast", ports=swapped)
    assert {op.id: op.port for op in world.operators} == swapped
    assert {op.id: op.port for op in load_world(str(tmp_path / "world.toml")).operators} == swapped
