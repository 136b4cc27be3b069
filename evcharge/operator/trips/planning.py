"""Planning trips: the best plan now, plans kept to be booked as shown, and claims.

Bookings this server is making hold nothing yet while they plan: each plan goes
around the slots *claimed* by the others, or concurrent bookings of one route
would all go for the same slots and all but one lose.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from evcharge.domain import planner
from evcharge.domain.clock import to_seconds
from evcharge.domain.ledger import Ledger
from evcharge.domain.world import VehicleConfig
from evcharge.operator.fair import FairQueue
from evcharge.operator.ids import new_id
from evcharge.operator.state import Books
from evcharge.operator.trips.peers import Peers
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, NotFoundError, UnavailableError

AVAILABILITY_WINDOW_S = 2 * 86400  # simulated seconds of slots a plan looks at
CLAIM_LINGER = 2.0  # real seconds a booked trip's claim outlives its booking
PLAN_TTL = 900.0  # real seconds a plan shown to a vehicle can be booked as shown
MAX_PLANS_SHOWN = 16  # plans kept per vehicle for booking as shown; the oldest go first
# Plans made at once: one searching while others ask the peers for their slots. Beyond that,
# vehicles take turns (a fair queue), so that one vehicle's flood cannot starve the others.
PLANS_AT_ONCE = 2
# Per vehicle; more are refused (unavailable). A waiting plan costs nothing but memory, while
# a refused one comes back at once: refusing early would turn a flood into a storm of retries.
MAX_PLANS_WAITING = 1024


@dataclass(slots=True)
class _ShownPlan:
    query: p.TripQuery
    plan: planner.Plan
    expires: float  # time.monotonic()


class Planning:
    def __init__(self, books: Books, peers: Peers) -> None:
        self.books = books
        self.operator_id = operator_id = books.operator_id
        self.rules = books.rules
        self.peers = peers
        self._shown: dict[str, OrderedDict[str, _ShownPlan]] = {}  # vehicle -> plan id -> plan, oldest first
        self._claims: dict[str, list[tuple[str, int, int]]] = {}  # trip id -> slots it is booking
        self._cities = books.world.gazetteer()
        self._network: planner.Network | None = None  # of the charge options below, built again when they change
        self._network_of: list[planner.ChargeOption] | None = None
        self._planning = asyncio.Lock()
        self._turns = FairQueue(PLANS_AT_ONCE, MAX_PLANS_WAITING, "trip plans")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"evcharge-planner-{operator_id}")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def plan(self, vehicle: VehicleConfig, query: p.TripQuery, claim: str = "") -> planner.Plan:
        """The best plan now; with ``claim`` (a booking's trip id), its slots are claimed for it.

        In the vehicle's turn: vehicles asking for many plans at once take turns with the others.
        """
        async with self._turns.turn(vehicle.id):
            return await self._plan(vehicle, query, claim)

    async def _plan(self, vehicle: VehicleConfig, query: p.TripQuery, claim: str) -> planner.Plan:
        try:
            origin_name, origin = self._cities.find(query.origin)
            dest_name, dest = self._cities.find(query.destination)
        except KeyError as exc:
            raise BadRequestError(str(exc.args[0])) from None
        now = int(self.books.clock.now())
        depart = to_seconds(query.depart) if query.depart else now
        if not now - 3600 <= depart <= now + self.rules.max_advance_days * 86400:
            raise BadRequestError(f"departure must be between an hour ago and {self.rules.max_advance_days} days ahead")
        request = planner.TripRequest(
            origin=planner.Place(origin_name, *origin),
            destination=planner.Place(dest_name, *dest),
            soc_start=query.soc_pct / 100,
            depart=depart,
            min_arrival_soc=query.min_arrival_soc_pct / 100,
            max_charge_soc=query.max_charge_soc_pct / 100,
            stop_overhead_s=self.rules.stop_overhead_min * 60,
            min_stop_soc=self.rules.min_stop_charge_pct / 100,
            value_of_hour=self.rules.cheap_hour_value if query.prefer == "cheap" else 0.0,
        )
        spec = planner.VehicleSpec(vehicle.battery_kwh, vehicle.consumption_kwh_per_km)
        # Whose chargers this plan goes without, as of now: a catalog arriving while we wait
        # below is not in `network`.
        unknown = self.peers.not_known_yet()
        network = await self._network_now()
        ledgers = await self.peers.availability(depart, depart + AVAILABILITY_WINDOW_S)
        # One plan at a time (held across the search only, never across I/O), so that each
        # sees the claims of those before it. A long search would stall every connection
        # of this server: it runs beside the loop, which keeps its share of the interpreter.
        async with self._planning:
            self._claims.pop(claim, None)  # a re-plan is free to take its own lost plan's slots
            for stops in self._claims.values():
                for cp, start, end in stops:
                    ledger = ledgers.setdefault(cp, Ledger())
                    if ledger.fits(start, end):  # not yet held (or not yet seen held)
                        ledger.add(start, end, "claimed")
            try:
                plan = await asyncio.get_running_loop().run_in_executor(
                    self._thread, planner.plan_trip, request, spec, network, planner.ledger_next_free(ledgers)
                )
            except planner.NoRouteError as exc:
                if unknown:
                    # Not a fact about the road: the chargers of an operator never reached since this
                    # server started might make the route. The vehicle should try again, not give up.
                    names = ", ".join(unknown)
                    raise UnavailableError(f"{exc}; the chargers of operator {names} are not known yet") from None
                raise NotFoundError(str(exc)) from None
            if claim:
                self.claim(claim, plan)
            return plan

    async def _network_now(self) -> planner.Network:
        """Every known charge point as the planner takes them; prepared again only when a catalog came in.

        Preparing measures the road between every two stations: beside the loop, like a search.
        """
        options = self.peers.charge_options()
        if self._network is None or options is not self._network_of:
            network = await asyncio.get_running_loop().run_in_executor(self._thread, planner.Network, options)
            self._network, self._network_of = network, options
        return self._network

    def claim(self, trip_id: str, plan: planner.Plan) -> None:
        self._claims[trip_id] = [(s.option.charge_point_id, s.slot_start, s.slot_end) for s in plan.stops]

    def unclaim(self, trip_id: str, *, later: bool = False) -> None:
        """Free a booking's slots for the next plans (``later``: once its holds surely show)."""
        if later:
            asyncio.get_running_loop().call_later(CLAIM_LINGER, self._claims.pop, trip_id, None)
        else:
            self._claims.pop(trip_id, None)

    def show(self, vehicle_id: str, query: p.TripQuery, plan: planner.Plan) -> str:
        """Keep a plan shown to a vehicle for a while, so that it can book exactly that plan."""
        # Per vehicle, so that nobody's plans push out anyone else's.
        mine = self._shown.setdefault(vehicle_id, OrderedDict())
        plan_id = new_id(f"{self.operator_id}-P", mine)
        mine[plan_id] = _ShownPlan(query, plan, time.monotonic() + PLAN_TTL)
        while len(mine) > MAX_PLANS_SHOWN:
            mine.popitem(last=False)
        return plan_id

    def shown_plan(self, vehicle_id: str, query: p.TripQuery, plan_id: str) -> planner.Plan:
        """The plan shown to this vehicle for this question; ``not_found`` if it cannot be booked as shown."""
        mine = self._shown.get(vehicle_id, OrderedDict())
        shown = mine.get(plan_id)
        if shown is None:
            raise NotFoundError(
                f"no plan {plan_id!r} of yours (plans are kept {PLAN_TTL / 60:.0f} minutes, "
                f"the last {MAX_PLANS_SHOWN}): plan again"
            )
        if shown.query != query:
            raise NotFoundError(f"plan {plan_id} was for another question (from, to, charge or departure): plan again")
        first = shown.plan.stops[0].slot_start if shown.plan.stops else shown.plan.depart + 3600
        if shown.expires < time.monotonic() or first <= self.books.clock.now():
            del mine[plan_id]  # its time has passed (the simulated clock may run fast)
            raise NotFoundError(f"plan {plan_id} has expired (its first stop is no longer ahead): plan again")
        return shown.plan
