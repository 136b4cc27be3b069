"""Plan an intercity trip: which charge points to stop at, when, and for how long.

Pure computation: no I/O, no clock, no asyncio. Free slots come in through a
``next_free`` callable (``ledger_next_free`` builds one from ledgers), so the
same planner serves a server that plans over its own ledgers and its peers'
availability. The charge points come prepared as a ``Network`` (places and the
road between every two of them), built once and used for many plans.

The model
---------
*Driving* between two places (origin, a charge point's station, destination):
road km = great-circle km x ``ROAD_FACTOR`` (``geo.road_km``); driving time =
km / ``AVERAGE_SPEED_KMH``, rounded up to the whole second; energy = km x the
vehicle's consumption, so the state of charge (SoC, 0..1 of the battery) drops
by energy / battery. A leg is feasible only if the SoC on arrival is at least
``min_arrival_soc`` (at a stop as at the destination; a 1e-9 tolerance absorbs
float noise).

*Stopping* costs ``stop_overhead_s`` besides the charge (leaving the road,
parking, plugging in): the charging slot starts at the earliest that long after
the arrival, at the next whole minute.

*Charging* at a stop goes from ``soc_in`` up to
``target = min(max_charge_soc, max(need, soc_in + min_stop_soc))``, where
``need`` is the SoC that drives from there to the destination and arrives with
``min_arrival_soc``: the vehicle takes what it needs to finish, never less than
the minimum useful charge and never more than it may. A stop must charge at
least ``min_stop_soc`` and something at all (``soc_in < min(max_charge_soc,
need)``); any other stop is not allowed. Power = min(charge point power,
vehicle ``max_charge_kw``), halved for the part above ``TAPER_SOC``; energy in =
(target - soc_in) x battery (no losses). The slot lasts the charge time rounded
up to whole minutes (``SLOT_ROUNDING_S``, at least one); it starts at
``next_free(cp, that earliest start, duration)`` (if that is not on a whole
minute, the planner asks again from the next whole minute); the vehicle waits
for it if needed and leaves at the slot's end. Cost = energy x price per kWh,
rounded to cents (totals add the cents).

*Objective*: the earliest arrival at the destination (every stop's overhead is
in it). With ``value_of_hour`` > 0 (money per hour of the driver's time, what
``--prefer cheap`` sets) money weighs too: the least arrival + cost /
value_of_hour hours. Ties go to the cheapest, then to the fewest stops. A
direct drive is a plan.

The search
----------
An exact label-setting search (A*) over the places of every operator's charge
points. A label is a vehicle at a place: (time, SoC, cost, stops). Labels
leave the heap by (objective so far + a lower bound of what is still to come,
cost, stops). The bound never exceeds what the rest of any plan costs, so the
first label to reach the destination is optimal: the drive still ahead, one
overhead for every stop the missing energy takes at least (a stop adds at most
``max_charge_soc - min_arrival_soc``), and that energy priced at the least any
charge point asks for it, its charging time at full power and its money
weighed as the objective weighs them (less half a cent a stop for rounding).

Where one charge to ``max_charge_soc`` cannot finish the trip (a *far* place,
``need > max_charge_soc``), every stop's target is ``max_charge_soc``: a label
there that is no earlier, no more charged, no cheaper and with no fewer stops
than one kept is pruned (the kept one charges less, to the same target), and
so is a departure no earlier, no cheaper and with no more stops than one kept
(all leave with the same SoC). At the other places one charge finishes the
trip and the vehicle leaves with at least ``need``: driving straight on is its
best continuation (roads obey the triangle inequality), so each charge point
there gives a label at the destination at once. The pruning is exact when
``next_free`` is monotone (never earlier for a later start or a longer
duration), as ``Ledger.next_free`` is.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from evcharge.domain import geo
from evcharge.domain.ledger import Ledger

ROAD_FACTOR = geo.ROAD_FACTOR  # road km per great-circle km (documented in geo)
AVERAGE_SPEED_KMH = 80.0
TAPER_SOC = 0.80  # above this state of charge, charging power halves
SLOT_ROUNDING_S = 60  # slots start and last whole minutes

_SOC_EPS = 1e-9  # SoC tolerance for "arrives with at least min_arrival_soc" (and for "charges at least")
_MINUTE_EPS = 1e-9  # a charge time this close above a whole minute counts as that minute


@dataclass(frozen=True, slots=True)
class Place:
    name: str
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class VehicleSpec:
    battery_kwh: float
    consumption_kwh_per_km: float
    max_charge_kw: float = 150.0


@dataclass(frozen=True, slots=True)
class ChargeOption:
    """One charge point anywhere, of any operator."""

    operator_id: str
    station_id: str
    station_name: str
    city: str
    lat: float
    lon: float
    charge_point_id: str
    power_kw: float
    price_per_kwh: float


@dataclass(frozen=True, slots=True)
class TripRequest:
    origin: Place
    destination: Place
    soc_start: float  # 0..1
    depart: int  # epoch seconds
    min_arrival_soc: float = 0.10  # never arrive anywhere (stop or destination) below this
    max_charge_soc: float = 0.80  # never charge above this
    stop_overhead_s: int = 0  # what each stop costs besides charging (leaving the road, parking, plugging in)
    min_stop_soc: float = 0.0  # every stop charges at least this much (0..1 of the battery)
    value_of_hour: float = 0.0  # money an hour of the driver's time is worth; 0: time only, money breaks ties


# (charge_point_id, earliest_start, duration_s) -> slot start >= earliest_start
NextFree = Callable[[str, int, int], int]


@dataclass(frozen=True, slots=True)
class PlannedStop:
    option: ChargeOption
    drive_km: float  # road km from the previous place
    arrival: int
    slot_start: int
    slot_end: int
    soc_in: float
    soc_out: float
    kwh: float
    cost: float  # kwh * price, rounded to cents


@dataclass(frozen=True, slots=True)
class Plan:
    stops: tuple[PlannedStop, ...]
    depart: int
    arrival: int
    distance_km: float
    soc_at_arrival: float
    total_kwh: float
    total_cost: float


class NoRouteError(Exception):
    """No feasible route; the message names the stretch that cannot be covered."""


def ledger_next_free(ledgers: Mapping[str, Ledger]) -> NextFree:
    """A ``NextFree`` over ledgers by charge point id; a charge point without a ledger is always free."""

    def next_free(charge_point_id: str, earliest_start: int, duration_s: int) -> int:
        ledger = ledgers.get(charge_point_id)
        return earliest_start if ledger is None else ledger.next_free(earliest_start, duration_s)

    return next_free


class Network:
    """Every charge point a plan may use, by place, with the road between every two places.

    Built once for a set of charge options (a server builds it again only when a
    catalog arrives): the distances are what a plan would otherwise spend most
    of its time on.
    """

    def __init__(self, options: Sequence[ChargeOption]) -> None:
        for option in options:
            _check_option(option)
        self.options = tuple(options)
        index: dict[tuple[float, float], int] = {}
        self.positions: list[tuple[float, float]] = []
        self.at_place: list[list[int]] = []  # option indices at each place
        for i, o in enumerate(self.options):
            place = index.setdefault((o.lat, o.lon), len(self.positions))
            if place == len(self.positions):
                self.positions.append((o.lat, o.lon))
                self.at_place.append([])
            self.at_place[place].append(i)
        n = len(self.positions)
        self.km = [[0.0] * n for _ in range(n)]
        for a in range(n):
            for b in range(a + 1, n):
                self.km[a][b] = self.km[b][a] = geo.road_km(*self.positions[a], *self.positions[b])
        # Every other place from each place, nearest first: (place, km, driving seconds).
        self.roads = [_roads_from(self.km[a], skip=a) for a in range(n)]

    def km_from(self, lat: float, lon: float) -> list[float]:
        return [geo.road_km(lat, lon, a, b) for a, b in self.positions]


def plan_trip(
    request: TripRequest, vehicle: VehicleSpec, network: Network | Sequence[ChargeOption], next_free: NextFree
) -> Plan:
    """The best plan under the objective (see the module's docstring); ``NoRouteError`` if there is none."""
    _check(request, vehicle)
    if not isinstance(network, Network):
        network = Network(network)
    return _Search(request, vehicle, network, next_free).run()


# -- the search -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Trail:
    """The stops so far, newest first (shared between labels)."""

    stop: PlannedStop
    previous: _Trail | None


_ARRIVAL, _DEPARTURE, _DESTINATION = 0, 1, 2

# A label in the heap: (key, cents, stops, tie-breaker, what, place, time, soc, km so far, km of the last leg, trail).
# The key: time x time weight + cents x cent weight (the objective so far) + the bound of what is still to come.
_Entry = tuple[int, int, int, int, int, int, int, float, float, float, _Trail | None]


def _ceil_minute(t: int) -> int:
    return -(-t // SLOT_ROUNDING_S) * SLOT_ROUNDING_S


def _drive_seconds(km: float) -> int:
    return math.ceil(km * 3600.0 / AVERAGE_SPEED_KMH)


def _roads_from(km: Sequence[float], skip: int = -1) -> list[tuple[int, float, int]]:
    roads = [(b, d, _drive_seconds(d)) for b, d in enumerate(km) if b != skip]
    roads.sort(key=lambda road: road[1])
    return roads


def _charge_slot_seconds(soc_in: float, soc_out: float, battery_kwh: float, power_kw: float) -> int:
    below = max(0.0, min(soc_out, TAPER_SOC) - min(soc_in, TAPER_SOC))
    above = max(0.0, max(soc_out, TAPER_SOC) - max(soc_in, TAPER_SOC))
    hours = below * battery_kwh / power_kw + above * battery_kwh / (power_kw / 2)
    minutes = math.ceil(hours * 3600.0 / SLOT_ROUNDING_S - _MINUTE_EPS)
    return max(1, minutes) * SLOT_ROUNDING_S


def _dominated(kept: list[tuple[int, int, int]], a: int, b: int, c: int) -> bool:
    """Whether some kept label is at least as good in every criterion (all smaller-is-better).

    Written out per number of criteria: this and ``_dominated4`` are the planner's innermost loops.
    """
    for x, y, z in kept:  # noqa: SIM110 (a plain loop is twice as fast as any() over a generator here)
        if x <= a and y <= b and z <= c:
            return True
    return False


def _dominated4(kept: list[tuple[int, float, int, int]], a: int, b: float, c: int, d: int) -> bool:
    for w, x, y, z in kept:  # noqa: SIM110 (as in _dominated)
        if w <= a and x <= b and y <= c and z <= d:
            return True
    return False


class _Search:
    def __init__(self, request: TripRequest, vehicle: VehicleSpec, network: Network, next_free: NextFree) -> None:
        self.request = request
        self.vehicle = vehicle
        self.network = net = network
        self.next_free = next_free
        self.per_km = vehicle.consumption_kwh_per_km / vehicle.battery_kwh  # SoC per road km
        dest, origin = request.destination, request.origin
        self.to_dest = net.km_from(dest.lat, dest.lon)
        self.origin_km_to_dest = geo.road_km(origin.lat, origin.lon, dest.lat, dest.lon)
        self.origin_roads = _roads_from(net.km_from(origin.lat, origin.lon))
        floor, top = request.min_arrival_soc, request.max_charge_soc
        self.need = [floor + km * self.per_km for km in self.to_dest]
        self.worth = [min(top, need) for need in self.need]  # below this at a place, a stop there charges at all
        self.far = [need > top for need in self.need]  # one charge there does not finish the trip
        self.drive_left = [_drive_seconds(km) for km in self.to_dest]
        self.per_stop = top - floor  # the most one stop can add
        self.power = [min(o.power_kw, vehicle.max_charge_kw) for o in net.options]
        # The objective's weights: fast, time alone (money breaks ties); cheap, cents per hour of time.
        cents_per_hour = round(request.value_of_hour * 100)
        self.time_weight, self.cent_weight = (cents_per_hour, 3600) if cents_per_hour > 0 else (1, 0)
        # The bound's price of a unit of SoC charged: the least, over the charge points, of its charging
        # time (at its full power) and its money, weighed as the objective weighs them; less what rounding each
        # stop's cost may take off (half a cent a stop; an optimal plan uses each charge point at most once).
        self.per_soc = min(
            (
                vehicle.battery_kwh * (3600.0 / power * self.time_weight + o.price_per_kwh * 100 * self.cent_weight)
                for o, power in zip(net.options, self.power, strict=True)
            ),
            default=0.0,
        )
        self.rounding = len(net.options) / 2 * self.cent_weight
        # Departures from a far place all leave with max_charge_soc: their bound is the place's.
        self.departure_left = [self._left(p, top) if self.far[p] else 0 for p in range(len(self.need))]
        self.seq = itertools.count()
        self.heap: list[_Entry] = []
        places = len(self.need)
        self.arrivals: list[list[tuple[int, float, int, int]]] = [[] for _ in range(places)]  # (time, -soc, ¢, stops)
        self.departures: list[list[tuple[int, int, int]]] = [[] for _ in range(places)]  # (time, cents, stops)

    def _left(self, place: int, soc: float, stopping: bool = False) -> int:
        """A lower bound of the objective from ``place`` with ``soc`` to the destination (see the module).

        ``stopping``: a label that stops there (an arrival) takes at least one stop's overhead and charge.
        """
        missing = self.need[place] - soc - _SOC_EPS
        if missing <= 0 and not stopping:
            return self.drive_left[place] * self.time_weight
        stops = max(1, math.ceil(missing / self.per_stop)) if self.per_stop > 0 else 1
        charge = max(missing, self.request.min_stop_soc - _SOC_EPS, 0.0)
        seconds = self.drive_left[place] + stops * self.request.stop_overhead_s
        return seconds * self.time_weight + max(0, int(charge * self.per_soc - self.rounding))

    def run(self) -> Plan:
        req = self.request
        if req.soc_start < req.min_arrival_soc - _SOC_EPS:
            raise NoRouteError(
                f"no route from {req.origin.name} to {req.destination.name}: cannot get beyond {req.origin.name} "
                f"(state of charge {req.soc_start:.0%} at departure is below the minimum {req.min_arrival_soc:.0%})"
            )
        # Driving straight there, where the charge allows it, is the best plan: nothing else to search.
        if req.soc_start - self.origin_km_to_dest * self.per_km >= req.min_arrival_soc - _SOC_EPS:
            self._push_destination(req.depart, req.soc_start, 0, 0, 0.0, self.origin_km_to_dest, None)
        else:
            self._relax(self.origin_roads, req.depart, req.soc_start, 0, 0, 0.0, None)
        heap, seq, arrivals, departures = self.heap, self.seq, self.arrivals, self.departures
        while heap:
            _, cents, stops, _, what, place, time, soc, km_total, leg_km, trail = heapq.heappop(heap)
            if what == _DESTINATION:
                return self._plan(time, soc, km_total, cents, trail)
            if what == _DEPARTURE:
                if _dominated(departures[place], time, cents, stops):
                    continue
                departures[place].append((time, cents, stops))
                self._relax(self.network.roads[place], time, soc, cents, stops, km_total, trail)
                continue
            far = self.far[place]
            if far:
                if _dominated4(arrivals[place], time, -soc, cents, stops):
                    continue
                arrivals[place].append((time, -soc, cents, stops))
            target = min(req.max_charge_soc, max(self.need[place], soc + req.min_stop_soc))
            for option in self.network.at_place[place]:
                stop = self._charge(option, time, soc, target, leg_km)
                after = cents + round(stop.cost * 100)
                if far:
                    end = stop.slot_end
                    if not _dominated(departures[place], end, after, stops + 1):
                        key = end * self.time_weight + after * self.cent_weight + self.departure_left[place]
                        label = (key, after, stops + 1, next(seq), _DEPARTURE, place, end, target, km_total, 0.0)
                        heapq.heappush(heap, (*label, _Trail(stop, trail)))
                else:
                    km = self.to_dest[place]
                    self._push_destination(stop.slot_end, target, after, stops + 1, km_total, km, _Trail(stop, trail))
        raise NoRouteError(self._why())

    def _push_destination(
        self, depart: int, soc: float, cents: int, stops: int, km_total: float, km: float, trail: _Trail | None
    ) -> None:
        arrival = depart + _drive_seconds(km)
        key = arrival * self.time_weight + cents * self.cent_weight
        label = (key, cents, stops, next(self.seq), _DESTINATION, -1, arrival, soc - km * self.per_km, km_total + km)
        heapq.heappush(self.heap, (*label, km, trail))

    def _relax(
        self,
        roads: list[tuple[int, float, int]],
        depart: int,
        soc: float,
        cents: int,
        stops: int,
        km_total: float,
        trail: _Trail | None,
    ) -> None:
        """Push an arrival label at every place where a stop is allowed, left at ``depart`` with ``soc``."""
        req = self.request
        per_km, worth, far, arrivals = self.per_km, self.worth, self.far, self.arrivals
        heap, seq, time_weight, money = self.heap, self.seq, self.time_weight, cents * self.cent_weight
        reach = (soc - req.min_arrival_soc + _SOC_EPS) / per_km  # km
        fullest = req.max_charge_soc - req.min_stop_soc + _SOC_EPS  # above this, no stop charges enough
        for place, km, seconds in roads:
            if km > reach:
                break  # the roads are nearest first
            soc_in = soc - km * per_km
            if soc_in >= worth[place] or soc_in > fullest:
                continue  # a stop there would charge nothing, or less than the least useful charge
            arrival = depart + seconds
            if far[place] and _dominated4(arrivals[place], arrival, -soc_in, cents, stops):
                continue
            key = arrival * time_weight + money + self._left(place, soc_in, stopping=True)
            heapq.heappush(
                heap, (key, cents, stops, next(seq), _ARRIVAL, place, arrival, soc_in, km_total + km, km, trail)
            )

    def _charge(self, option_index: int, arrival: int, soc_in: float, soc_out: float, leg_km: float) -> PlannedStop:
        option = self.network.options[option_index]
        duration = _charge_slot_seconds(soc_in, soc_out, self.vehicle.battery_kwh, self.power[option_index])
        start = self._slot_start(option.charge_point_id, arrival + self.request.stop_overhead_s, duration)
        kwh = (soc_out - soc_in) * self.vehicle.battery_kwh
        return PlannedStop(
            option=option,
            drive_km=leg_km,
            arrival=arrival,
            slot_start=start,
            slot_end=start + duration,
            soc_in=soc_in,
            soc_out=soc_out,
            kwh=kwh,
            cost=round(kwh * option.price_per_kwh * 100) / 100,
        )

    def _slot_start(self, charge_point_id: str, ready: int, duration: int) -> int:
        earliest = _ceil_minute(ready)
        while True:
            start = self.next_free(charge_point_id, earliest, duration)
            if start < earliest:
                raise ValueError(f"next_free({charge_point_id!r}, {earliest}, {duration}) returned {start}, earlier")
            if start % SLOT_ROUNDING_S == 0:
                return start
            earliest = _ceil_minute(start)

    def _plan(self, arrival: int, soc: float, km_total: float, cents: int, trail: _Trail | None) -> Plan:
        stops: list[PlannedStop] = []
        while trail is not None:
            stops.append(trail.stop)
            trail = trail.previous
        stops.reverse()
        return Plan(
            stops=tuple(stops),
            depart=self.request.depart,
            arrival=arrival,
            distance_km=km_total,
            soc_at_arrival=soc,
            total_kwh=sum(s.kwh for s in stops),
            total_cost=cents / 100,
        )

    # -- why there is no route ----------------------------------------------------------------------------------------

    def _why(self) -> str:
        """Name the reached place nearest the destination, the gap ahead of it and the range there."""
        req = self.request
        origin = len(self.need)  # the origin's "place" in what follows
        best = self._best_departures()
        km_to_dest = [*self.to_dest, self.origin_km_to_dest]
        # The reached place nearest the destination (ties: the one leaving with more charge).
        stuck = min(best, key=lambda n: (km_to_dest[n], -best[n]))
        soc = best[stuck]
        range_km = max(0.0, (soc - req.min_arrival_soc) / self.per_km)
        left = km_to_dest[stuck]
        roads = self.origin_roads if stuck == origin else self.network.roads[stuck]
        gap = min((km for place, km, _ in roads if self.to_dest[place] < left), default=left)
        what = "next charger"
        if gap >= left:
            gap, what = left, "destination"
        name = req.origin.name if stuck == origin else self._name(stuck)
        return (
            f"no route from {req.origin.name} to {req.destination.name}: cannot get beyond {name} "
            f"({what} {math.ceil(gap)} km away, range {math.floor(range_km)} km at {soc:.0%})"
        )

    def _best_departures(self) -> dict[int, float]:
        """The most charge the vehicle can leave each place it reaches with, times and slots aside."""
        req = self.request
        origin = len(self.need)
        best = {origin: req.soc_start}
        todo = [origin]
        floor, least = req.min_arrival_soc - _SOC_EPS, req.min_stop_soc - _SOC_EPS
        while todo:
            here = todo.pop()
            roads = self.origin_roads if here == origin else self.network.roads[here]
            for place, km, _ in roads:
                soc_in = best[here] - km * self.per_km
                if soc_in < floor:
                    break
                target = min(req.max_charge_soc, max(self.need[place], soc_in + req.min_stop_soc))
                leave = target if soc_in < self.worth[place] and target - soc_in >= least else soc_in
                if leave > best.get(place, -1.0):
                    best[place] = leave
                    todo.append(place)
        return best

    def _name(self, place: int) -> str:
        option = self.network.options[self.network.at_place[place][0]]
        return option.city or option.station_name


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(request: TripRequest, vehicle: VehicleSpec) -> None:
    for name in ("battery_kwh", "consumption_kwh_per_km", "max_charge_kw"):
        value = getattr(vehicle, name)
        if not _finite(value) or value <= 0:
            raise ValueError(f"vehicle {name} must be a positive number, not {value!r}")
    for name in ("soc_start", "min_arrival_soc", "max_charge_soc", "min_stop_soc"):
        value = getattr(request, name)
        if not _finite(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, not {value!r}")
    if not isinstance(request.stop_overhead_s, int) or request.stop_overhead_s < 0:
        raise ValueError(f"stop_overhead_s must be a whole number of seconds >= 0, not {request.stop_overhead_s!r}")
    if not _finite(request.value_of_hour) or request.value_of_hour < 0:
        raise ValueError(f"value_of_hour must be a number >= 0, not {request.value_of_hour!r}")
    for place in (request.origin, request.destination):
        if not (_finite(place.lat) and _finite(place.lon) and -90 <= place.lat <= 90 and -180 <= place.lon <= 180):
            raise ValueError(f"{place.name}: bad position ({place.lat!r}, {place.lon!r})")


def _check_option(option: ChargeOption) -> None:
    if not _finite(option.power_kw) or option.power_kw <= 0:
        raise ValueError(f"charge point {option.charge_point_id}: power must be positive, not {option.power_kw!r}")
    if not _finite(option.price_per_kwh) or option.price_per_kwh < 0:
        raise ValueError(f"charge point {option.charge_point_id}: bad price {option.price_per_kwh!r}")
    if not (_finite(option.lat) and _finite(option.lon)):
        raise ValueError(f"charge point {option.charge_point_id}: bad position ({option.lat!r}, {option.lon!r})")
