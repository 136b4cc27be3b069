"""The trip planner, checked against a brute force over every simple path, and on the real map."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Sequence
from fractions import Fraction

import networkx as nx
import pytest

from evcharge.domain.geo import CITIES
from evcharge.domain.geo import road_km as geo_road_km
from evcharge.domain.ledger import Ledger
from evcharge.domain.planner import (
    AVERAGE_SPEED_KMH,
    SLOT_ROUNDING_S,
    TAPER_SOC,
    ChargeOption,
    NoRouteError,
    Place,
    Plan,
    TripRequest,
    VehicleSpec,
    ledger_next_free,
    plan_trip,
)
from evcharge.domain.world import load_world

EPS = 1e-9  # the model's documented tolerance (SoC, and "a whole minute")
T0 = 1_767_225_600 + 17  # some departure, deliberately not on a whole minute


@functools.cache
def road_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """``geo.road_km``, remembered: the brute force asks for the same legs over and over."""
    return geo_road_km(lat1, lon1, lat2, lon2)


# -- an independent evaluator of one route, under the documented model ----------------------------------------------


def evaluate(
    route: Sequence[ChargeOption], request: TripRequest, vehicle: VehicleSpec, ledgers: dict[str, Ledger]
) -> dict | None:
    """Drive origin -> route... -> destination; None if some leg or stop breaks a rule, else what happens."""
    soc_per_km = vehicle.consumption_kwh_per_km / vehicle.battery_kwh
    dest = request.destination
    here = (request.origin.lat, request.origin.lon)
    t, soc = request.depart, request.soc_start
    if soc < request.min_arrival_soc - EPS:
        return None
    stops, cents, km_total = [], 0, 0.0
    for option in route:
        km = road_km(*here, option.lat, option.lon)
        km_total += km
        t += math.ceil(km / AVERAGE_SPEED_KMH * 3600)
        soc -= km * soc_per_km
        if soc < request.min_arrival_soc - EPS:
            return None
        need = request.min_arrival_soc + road_km(option.lat, option.lon, dest.lat, dest.lon) * soc_per_km
        if soc >= min(request.max_charge_soc, need):
            return None  # a pointless stop
        target = min(request.max_charge_soc, max(need, soc + request.min_stop_soc))
        if target - soc < request.min_stop_soc - EPS:
            return None  # less than the least useful charge
        power = min(option.power_kw, vehicle.max_charge_kw)
        seconds = 0.0
        if soc < TAPER_SOC:
            seconds += (min(target, TAPER_SOC) - soc) * vehicle.battery_kwh / power * 3600
        if target > TAPER_SOC:
            seconds += (target - max(soc, TAPER_SOC)) * vehicle.battery_kwh / (power / 2) * 3600
        duration = max(1, math.ceil(seconds / 60 - EPS)) * 60
        start = -(-(t + request.stop_overhead_s) // 60) * 60
        ledger = ledgers.get(option.charge_point_id, Ledger())
        while (free := ledger.next_free(start, duration)) % 60:
            start = -(-free // 60) * 60
        start = free
        kwh = (target - soc) * vehicle.battery_kwh
        stops.append({"cp": option.charge_point_id, "arrival": t, "slot_start": start, "slot_end": start + duration})
        stops[-1] |= {"soc_in": soc, "soc_out": target, "kwh": kwh, "drive_km": km}
        cents += round(kwh * option.price_per_kwh * 100)
        t, soc, here = start + duration, target, (option.lat, option.lon)
    km = road_km(*here, dest.lat, dest.lon)
    km_total += km
    t += math.ceil(km / AVERAGE_SPEED_KMH * 3600)
    soc -= km * soc_per_km
    if soc < request.min_arrival_soc - EPS:
        return None
    return {"key": objective(request, t, cents, len(route)), "stops": stops, "soc": soc, "km": km_total}


def objective(request: TripRequest, arrival: int, cents: int, stops: int) -> tuple[Fraction, int, int]:
    """What the planner minimises: the arrival (plus money at the driver's value of an hour), then cents, stops."""
    money = Fraction(cents * 36) / Fraction(request.value_of_hour) if request.value_of_hour else 0  # seconds
    return (arrival + money, cents, stops)


def brute_force(
    request: TripRequest, vehicle: VehicleSpec, options: Sequence[ChargeOption], ledgers: dict[str, Ledger]
) -> tuple[tuple[Fraction, int, int] | None, int]:
    """The best ``objective`` over every simple path origin -> ... -> destination, and how many paths."""
    graph = nx.complete_graph(["origin", "destination", *range(len(options))], create_using=nx.DiGraph)
    best, paths = None, 0
    for path in nx.all_simple_paths(graph, "origin", "destination"):
        paths += 1
        result = evaluate([options[i] for i in path[1:-1]], request, vehicle, ledgers)
        if result is not None and (best is None or result["key"] < best):
            best = result["key"]
    return best, paths


# -- checks every plan must pass ---------------------------------------------------------------------------------------


def assert_valid(plan: Plan, request: TripRequest, vehicle: VehicleSpec, ledgers: dict[str, Ledger]) -> None:
    soc_per_km = vehicle.consumption_kwh_per_km / vehicle.battery_kwh
    replay = evaluate([s.option for s in plan.stops], request, vehicle, ledgers)
    assert replay is not None, "the plan breaks a rule of the model"
    assert replay["key"] == objective(request, plan.arrival, round(plan.total_cost * 100), len(plan.stops))
    assert plan.depart == request.depart
    assert plan.distance_km == pytest.approx(replay["km"])
    assert plan.soc_at_arrival == pytest.approx(replay["soc"])
    assert plan.soc_at_arrival >= request.min_arrival_soc - EPS
    left, soc = request.depart, request.soc_start
    for stop, expected in zip(plan.stops, replay["stops"], strict=True):
        assert stop.option.charge_point_id == expected["cp"]
        assert (stop.arrival, stop.slot_start, stop.slot_end) == (
            expected["arrival"],
            expected["slot_start"],
            expected["slot_end"],
        )
        assert stop.drive_km == pytest.approx(expected["drive_km"])
        assert stop.soc_in == pytest.approx(soc - stop.drive_km * soc_per_km)
        assert left < stop.arrival <= stop.slot_start < stop.slot_end, "stops out of order"
        assert stop.slot_start % SLOT_ROUNDING_S == 0 and stop.slot_end % SLOT_ROUNDING_S == 0
        assert request.min_arrival_soc - EPS <= stop.soc_in < stop.soc_out <= request.max_charge_soc + EPS
        assert stop.soc_out - stop.soc_in >= request.min_stop_soc - EPS, "less than the least useful charge"
        assert stop.slot_start >= stop.arrival + request.stop_overhead_s
        assert stop.kwh == pytest.approx((stop.soc_out - stop.soc_in) * vehicle.battery_kwh)
        assert stop.cost == round(stop.kwh * stop.option.price_per_kwh, 2)
        ledger = ledgers.get(stop.option.charge_point_id)
        assert ledger is None or ledger.fits(stop.slot_start, stop.slot_end), "slot overlaps a reservation"
        left, soc = stop.slot_end, stop.soc_out
    assert plan.arrival >= left
    assert plan.total_kwh == pytest.approx(sum(s.kwh for s in plan.stops))
    assert plan.total_cost == pytest.approx(sum(s.cost for s in plan.stops))


# -- the oracle: random small instances --------------------------------------------------------------------------------


def random_instance(rng: random.Random) -> tuple[TripRequest, VehicleSpec, list[ChargeOption], dict[str, Ledger]]:
    lat0, lon0 = rng.uniform(-13, -4), rng.uniform(-41, -35)
    bearing, great_circle = rng.uniform(0, 2 * math.pi), rng.uniform(120, 450)
    dlat = great_circle / 111.2 * math.cos(bearing)
    dlon = great_circle / 111.2 * math.sin(bearing) / math.cos(math.radians(lat0))
    origin, destination = Place("Origem", lat0, lon0), Place("Destino", lat0 + dlat, lon0 + dlon)
    lo_lat, hi_lat = sorted((lat0, lat0 + dlat))
    lo_lon, hi_lon = sorted((lon0, lon0 + dlon))
    options: list[ChargeOption] = []
    for i in range(rng.randint(3, 7)):
        if options and rng.random() < 0.2:  # another charge point of an existing station
            site = rng.choice(options)
            station, name, city, lat, lon = site.station_id, site.station_name, site.city, site.lat, site.lon
        else:
            station, name, city = f"S{i}", f"Station {i}", f"Cidade {i}"
            lat = rng.uniform(lo_lat - 0.5, hi_lat + 0.5)
            lon = rng.uniform(lo_lon - 0.5, hi_lon + 0.5)
        power = rng.choice([11, 22, 50, 60, 100, 150, 350])
        price = rng.randint(90, 300) / 100
        options.append(ChargeOption(rng.choice("ABC"), station, name, city, lat, lon, f"CP{i}", power, price))
    vehicle = VehicleSpec(
        battery_kwh=rng.choice([40, 50, 60, 75, 82, 100]),
        consumption_kwh_per_km=rng.uniform(0.12, 0.22),
        max_charge_kw=rng.choice([50, 100, 150, 250]),
    )
    request = TripRequest(
        origin,
        destination,
        soc_start=rng.uniform(0.1, 1.0),
        depart=T0 + rng.randint(0, 3600),
        min_arrival_soc=rng.choice([0.0, 0.05, 0.10, 0.15, 0.2]),
        max_charge_soc=rng.choice([0.6, 0.8, 0.9, 1.0]),
        stop_overhead_s=rng.choice([0, 60, 300, 300, 1200, 3600]),
        min_stop_soc=rng.choice([0.0, 0.05, 0.10, 0.10, 0.2]),
        value_of_hour=rng.choice([0.0, 0.0, 0.0, 5.0, 20.0, 80.0]),
    )
    ledgers: dict[str, Ledger] = {}
    minute = -(-request.depart // 60) * 60
    for option in options:
        if rng.random() < 0.7:
            ledger = ledgers[option.charge_point_id] = Ledger()
            for n in range(rng.randint(1, 6)):
                unit = 60 if rng.random() < 0.8 else 1  # mostly whole minutes; some not, to exercise re-asking
                start = minute + rng.randint(0, 12 * 3600 // unit) * unit
                length = rng.randint(10, 180) * 60 + (0 if unit == 60 else rng.randint(1, 59))
                if ledger.fits(start, start + length):
                    ledger.add(start, start + length, f"r{n}")
    return request, vehicle, options, ledgers


BATCHES, PER_BATCH = 6, 40


@pytest.mark.parametrize("batch", range(BATCHES))
def test_plan_equals_brute_force_over_every_simple_path(batch: int) -> None:
    for seed in range(batch * PER_BATCH, (batch + 1) * PER_BATCH):
        request, vehicle, options, ledgers = random_instance(random.Random(seed))
        best, paths = brute_force(request, vehicle, options, ledgers)
        assert paths == sum(math.perm(len(options), k) for k in range(len(options) + 1))
        if best is None:
            with pytest.raises(NoRouteError, match=r"^no route from Origem to Destino: cannot get beyond "):
                plan_trip(request, vehicle, options, ledger_next_free(ledgers))
            continue
        plan = plan_trip(request, vehicle, options, ledger_next_free(ledgers))
        # The same objective (time, or time and money), then cheapest, then fewest stops: the brute force's best.
        assert objective(request, plan.arrival, round(plan.total_cost * 100), len(plan.stops)) == best, f"seed {seed}"
        assert_valid(plan, request, vehicle, ledgers)


def test_oracle_instances_are_varied() -> None:
    """The random instances cover direct drives, one stop, several stops, waiting, no route at all, and every rule
    of the objective at work: stops that charge the least useful charge beyond what they need, plans that the
    minimum useful charge, the stop overhead or the weight on money change."""
    kinds = dict.fromkeys(["none", "0", "1", "2+", "waits", "tops up", "by min charge", "by overhead", "by money"], 0)
    for seed in range(BATCHES * PER_BATCH):
        request, vehicle, options, ledgers = random_instance(random.Random(seed))
        next_free = ledger_next_free(ledgers)
        try:
            plan = plan_trip(request, vehicle, options, next_free)
        except NoRouteError:
            kinds["none"] += 1
            continue
        kinds[str(len(plan.stops)) if len(plan.stops) < 2 else "2+"] += 1
        kinds["waits"] += any(s.slot_start > -(-(s.arrival + request.stop_overhead_s) // 60) * 60 for s in plan.stops)
        kinds["tops up"] += any(
            request.min_stop_soc > 0 and s.soc_out == pytest.approx(s.soc_in + request.min_stop_soc) for s in plan.stops
        )
        if request.min_stop_soc:
            kinds["by min charge"] += (
                plan_trip(dataclasses.replace(request, min_stop_soc=0.0), vehicle, options, next_free) != plan
            )
        if request.stop_overhead_s:
            free_stops = plan_trip(dataclasses.replace(request, stop_overhead_s=0), vehicle, options, next_free)
            kinds["by overhead"] += [s.option for s in free_stops.stops] != [s.option for s in plan.stops]
        if request.value_of_hour:
            fast = plan_trip(dataclasses.replace(request, value_of_hour=0.0), vehicle, options, next_free)
            kinds["by money"] += fast.total_cost > plan.total_cost
    assert all(count >= (3 if kind == "by overhead" else 10) for kind, count in kinds.items()), str(kinds)


def test_a_later_arrival_with_more_charge_can_leave_earlier() -> None:
    """Why labels are Pareto sets: reaching X directly is earlier but emptier, and its long slot does not fit."""
    # Along the equator: origin, Y 14 km on, X 139 km on, destination 139 km beyond X.
    request = TripRequest(Place("O", 0.0, 0.0), Place("D", 0.0, 2.0), soc_start=0.7, depart=T0)
    vehicle = VehicleSpec(battery_kwh=50, consumption_kwh_per_km=0.2)
    y = ChargeOption("A", "Y", "Y", "Ypsilon", 0.0, 0.1, "Y-1", 150, 2.0)
    x = ChargeOption("B", "X", "X", "Xis", 0.0, 1.0, "X-1", 50, 1.5)
    direct, via_y = evaluate([x], request, vehicle, {}), evaluate([y, x], request, vehicle, {})
    assert direct is not None and via_y is not None
    assert direct["stops"][0]["arrival"] < via_y["stops"][1]["arrival"]
    assert direct["stops"][0]["slot_end"] > via_y["stops"][1]["slot_end"]
    # X is booked from the moment the via-Y charge would end: the direct arrival's longer charge no longer fits.
    busy = Ledger()
    busy.add(via_y["stops"][1]["slot_end"], via_y["stops"][1]["slot_end"] + 3 * 3600, "taken")
    plan = plan_trip(request, vehicle, [y, x], ledger_next_free({"X-1": busy}))
    assert [s.option.station_id for s in plan.stops] == ["Y", "X"]
    assert plan.arrival == via_y["key"][0]
    assert_valid(plan, request, vehicle, {"X-1": busy})


# -- the real map ------------------------------------------------------------------------------------------------------


def northeast_options() -> list[ChargeOption]:
    world = load_world("northeast")
    return [
        ChargeOption(s.operator, s.id, s.name, s.city, s.lat, s.lon, cp.id, cp.power_kw, cp.price_per_kwh)
        for s in world.stations
        for cp in s.charge_points
    ]


def city(name: str) -> Place:
    return Place(name, *CITIES[name])


FREE: dict[str, Ledger] = {}
CAR = VehicleSpec(battery_kwh=60, consumption_kwh_per_km=0.16)


def test_natal_to_joao_pessoa_needs_no_stop() -> None:
    request = TripRequest(city("Natal"), city("João Pessoa"), soc_start=0.8, depart=T0)
    plan = plan_trip(request, CAR, northeast_options(), ledger_next_free(FREE))
    km = road_km(*CITIES["Natal"], *CITIES["João Pessoa"])
    assert plan.stops == ()
    assert plan.distance_km == pytest.approx(km)
    assert plan.arrival == T0 + math.ceil(km / AVERAGE_SPEED_KMH * 3600)
    assert plan.soc_at_arrival == pytest.approx(0.8 - km * 0.16 / 60)
    assert (plan.total_kwh, plan.total_cost) == (0, 0)


def test_natal_to_feira_de_santana_crosses_operators() -> None:
    request = TripRequest(city("Natal"), city("Feira de Santana"), soc_start=0.8, depart=T0)
    plan = plan_trip(request, CAR, northeast_options(), ledger_next_free(FREE))
    assert len(plan.stops) >= 2
    assert len({s.option.operator_id for s in plan.stops}) >= 2
    assert_valid(plan, request, CAR, FREE)


def test_no_route_names_the_stretch_that_cannot_be_covered() -> None:
    # Along the equator (one degree = 139 road km): chargers 1 and 2 degrees on, the destination at 4 degrees.
    request = TripRequest(Place("Início", 0.0, 0.0), Place("Fim", 0.0, 4.0), soc_start=0.8, depart=T0)
    options = [
        ChargeOption("A", "S1", "Um BR-101", "Um", 0.0, 1.0, "S1-1", 150, 2.0),
        ChargeOption("B", "S2", "Dois BR-101", "Dois", 0.0, 2.0, "S2-1", 150, 2.0),
    ]
    with pytest.raises(NoRouteError) as caught:
        plan_trip(request, CAR, options, ledger_next_free(FREE))
    assert str(caught.value) == (
        "no route from Início to Fim: cannot get beyond Dois (destination 278 km away, range 262 km at 80%)"
    )
    # A charger 1.9 degrees (264.1 km) past Dois is still out of reach; one 1.8 degrees past it is not.
    far = ChargeOption("C", "S3", "Três BR-101", "Três", 0.0, 3.9, "S3-1", 150, 2.0)
    with pytest.raises(NoRouteError) as caught:
        plan_trip(request, CAR, [*options, far], ledger_next_free(FREE))
    assert str(caught.value) == (
        "no route from Início to Fim: cannot get beyond Dois (next charger 265 km away, range 262 km at 80%)"
    )
    near = ChargeOption("C", "S3", "Três BR-101", "Três", 0.0, 3.8, "S3-1", 150, 2.0)
    plan = plan_trip(request, CAR, [*options, near], ledger_next_free(FREE))
    assert [s.option.city for s in plan.stops] == ["Um", "Dois", "Três"]
    assert_valid(plan, request, CAR, FREE)


def test_natal_to_maceio_with_defaults() -> None:
    request = TripRequest(city("Natal"), city("Maceió"), soc_start=0.8, depart=T0)
    plan = plan_trip(request, CAR, northeast_options(), ledger_next_free(FREE))
    assert len(plan.stops) >= 1
    assert_valid(plan, request, CAR, FREE)


@pytest.mark.parametrize("booked_hours", [1, 6])
def test_a_booked_charger_delays_or_diverts_the_plan(booked_hours: int) -> None:
    request = TripRequest(city("Natal"), city("Maceió"), soc_start=0.8, depart=T0)
    options = northeast_options()
    free_plan = plan_trip(request, CAR, options, ledger_next_free(FREE))
    best = free_plan.stops[0]
    ledger = Ledger()
    busy_from = best.arrival // 60 * 60 - 3600
    busy_until = busy_from + 3600 + booked_hours * 3600
    ledger.add(busy_from, busy_until, "someone-else")
    ledgers = {best.option.charge_point_id: ledger}
    plan = plan_trip(request, CAR, options, ledger_next_free(ledgers))
    assert_valid(plan, request, CAR, ledgers)
    assert plan.arrival >= free_plan.arrival
    used = [s for s in plan.stops if s.option.charge_point_id == best.option.charge_point_id]
    assert not used or all(s.slot_start >= busy_until for s in used), "charges while booked"
    assert plan != free_plan


def test_waits_for_the_only_charger() -> None:
    request = TripRequest(Place("O", 0.0, 0.0), Place("D", 0.0, 3.0), soc_start=0.8, depart=T0)
    vehicle = VehicleSpec(battery_kwh=60, consumption_kwh_per_km=0.16)
    only = ChargeOption("A", "M", "Meio", "Meio", 0.0, 1.5, "M-1", 150, 2.0)
    free = plan_trip(request, vehicle, [only], ledger_next_free({}))
    ledger = Ledger()
    ledger.add(free.stops[0].slot_start - 600, free.stops[0].slot_start + 2 * 3600, "taken")
    busy = plan_trip(request, vehicle, [only], ledger_next_free({"M-1": ledger}))
    assert busy.stops[0].arrival == free.stops[0].arrival
    assert busy.stops[0].slot_start == free.stops[0].slot_start + 2 * 3600
    assert busy.arrival == free.arrival + 2 * 3600
    assert busy.total_cost == free.total_cost


def test_tiny_battery_names_the_origin() -> None:
    request = TripRequest(city("Natal"), city("Feira de Santana"), soc_start=0.8, depart=T0)
    tiny = VehicleSpec(battery_kwh=5, consumption_kwh_per_km=0.16)
    with pytest.raises(NoRouteError, match=r"^no route from Natal to Feira de Santana: cannot get beyond Natal \("):
        plan_trip(request, tiny, northeast_options(), ledger_next_free(FREE))


def test_starting_below_the_minimum_is_no_route() -> None:
    request = TripRequest(city("Natal"), city("João Pessoa"), soc_start=0.05, depart=T0)
    with pytest.raises(NoRouteError, match=r"cannot get beyond Natal \(state of charge 5% at departure"):
        plan_trip(request, CAR, northeast_options(), ledger_next_free(FREE))


def test_ledger_next_free() -> None:
    ledger = Ledger()
    ledger.add(1000, 2000, "r")
    next_free = ledger_next_free({"cp": ledger})
    assert next_free("cp", 900, 60) == 900
    assert next_free("cp", 900, 200) == 2000
    assert next_free("other", 900, 10_000) == 900


@pytest.mark.parametrize(
    ("vehicle", "soc"),
    [(VehicleSpec(0, 0.16), 0.8), (VehicleSpec(60, -1), 0.8), (VehicleSpec(60, 0.16), 1.5), (CAR, math.nan)],
)
def test_nonsense_inputs_are_refused(vehicle: VehicleSpec, soc: float) -> None:
    request = TripRequest(city("Natal"), city("Recife"), soc_start=soc, depart=T0)
    with pytest.raises(ValueError):
        plan_trip(request, vehicle, northeast_options(), ledger_next_free(FREE))


# -- plans a driver would accept (issue 16) --------------------------------------------------------------------


def driver_request(origin: str, destination: str, depart: int = T0, **rules: float) -> TripRequest:
    """A trip under the northeast world's rules (overhead, least useful charge), as its servers plan it."""
    world_rules = load_world("northeast").rules
    return TripRequest(
        city(origin),
        city(destination),
        soc_start=0.8,
        depart=depart,
        stop_overhead_s=world_rules.stop_overhead_min * 60,
        min_stop_soc=world_rules.min_stop_charge_pct / 100,
        **rules,
    )


def test_no_stop_for_a_sip() -> None:
    """Natal -> Feira de Santana used to end with a 3-minute stop at Estância for 2.8 kWh (64 -> 68 %)."""
    car = VehicleSpec(battery_kwh=82, consumption_kwh_per_km=0.19)
    request = driver_request("Natal", "Feira de Santana")
    plan = plan_trip(request, car, northeast_options(), ledger_next_free(FREE))
    assert_valid(plan, request, car, FREE)
    assert all(s.soc_out - s.soc_in >= 0.10 - EPS for s in plan.stops), [(s.soc_in, s.soc_out) for s in plan.stops]
    assert all(s.slot_start >= s.arrival + 300 for s in plan.stops)


def test_a_race_gives_sane_plans() -> None:
    """Thirty vehicles plan Natal -> Feira de Santana one after the other, each around the slots of those before
    (as a race's losers are re-planned): no stop charges less than the least useful charge, and nobody stops twice
    running in one city (V09 and V12 once stopped at REC-CEN-1, then at REC-BV-4)."""
    world = load_world("northeast")
    options = northeast_options()
    ledgers: dict[str, Ledger] = {}
    for vehicle in world.vehicles:
        car = VehicleSpec(vehicle.battery_kwh, vehicle.consumption_kwh_per_km)
        request = driver_request("Natal", "Feira de Santana")
        plan = plan_trip(request, car, options, ledger_next_free(ledgers))
        assert_valid(plan, request, car, ledgers)
        cities = [s.option.city for s in plan.stops]
        assert all(a != b for a, b in itertools.pairwise(cities)), f"{vehicle.id}: {cities}"
        assert all(s.soc_out - s.soc_in >= 0.10 - EPS for s in plan.stops), vehicle.id
        assert len(plan.stops) <= 7, f"{vehicle.id}: {cities}"  # the 50 kWh cars need 7 on this chain of cities
        for s in plan.stops:
            ledgers.setdefault(s.option.charge_point_id, Ledger()).add(s.slot_start, s.slot_end, vehicle.id)


def test_the_overhead_saves_a_stop() -> None:
    """A sip at a fast charger shortens the charge at a slow one: worth it, until every stop costs its overhead."""
    # Along the equator (one degree = 139 road km): a 150 kW charger 20 km on, a 50 kW one half way to the
    # destination 300 km away, which a full charge (262 km) does not reach.
    request = TripRequest(Place("O", 0.0, 0.0), Place("D", 0.0, 2.158), soc_start=0.8, depart=T0)
    fast = ChargeOption("A", "F", "F", "Efe", 0.0, 0.144, "F-1", 150, 2.0)
    slow = ChargeOption("B", "S", "S", "Esse", 0.0, 1.079, "S-1", 50, 2.0)
    no_overhead = plan_trip(request, CAR, [fast, slow], ledger_next_free(FREE))
    assert [s.option for s in no_overhead.stops] == [fast, slow]
    overhead = dataclasses.replace(request, stop_overhead_s=300)
    with_overhead = plan_trip(overhead, CAR, [fast, slow], ledger_next_free(FREE))
    assert [s.option for s in with_overhead.stops] == [slow]
    # Counted the same way (five minutes a stop), the plan with the overhead is the earlier one.
    assert with_overhead.arrival < no_overhead.arrival + 300 * len(no_overhead.stops)
    assert_valid(with_overhead, overhead, CAR, FREE)


def test_prefer_cheap_trades_time_for_money() -> None:
    request = driver_request("Natal", "Maceió")
    options = northeast_options()
    fast = plan_trip(request, CAR, options, ledger_next_free(FREE))
    cheap = plan_trip(dataclasses.replace(request, value_of_hour=20.0), CAR, options, ledger_next_free(FREE))
    assert cheap.total_cost < fast.total_cost and cheap.arrival > fast.arrival
    # Worth it at R$ 20 an hour: what it saves pays more than the time it takes.
    assert (fast.total_cost - cheap.total_cost) / 20.0 * 3600 >= cheap.arrival - fast.arrival
