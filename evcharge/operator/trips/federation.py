"""Operators working together: peer links, catalogs, and atomic trip booking.

A vehicle's home server *coordinates* the booking of a trip whose stops belong
to several operators, each a *participant* (the home server is one too, for
its own stops). Two-phase commit with presumed abort:

1. PREPARE goes to every owner in parallel; each checks and holds all its
   stops in one writer section, stores the holds, and votes YES (or NO with the
   conflicting stops). Holds carry a deadline.
2. All YES before the deadline: the coordinator stores the trip row (that row
   *is* the COMMIT record) and only then tells everyone. Anything else: ABORT.
   No row for a transaction means it aborted.
3. A participant that voted YES never decides alone: once the deadline has
   passed it asks the coordinator (``QueryDecision``) until it gets an answer.
   A coordinator that restarts re-sends the decisions its store says are not
   yet acknowledged.
4. On NO the coordinator re-plans around the conflicts and tries again
   (``MAX_ATTEMPTS``), so the losers of a race still get a trip if one exists.

Deadlines here are real (wall-clock) seconds: they are about the network, not
about the simulated road.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from evcharge.domain import geo, planner
from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.ledger import Ledger
from evcharge.domain.model import Trip
from evcharge.domain.world import OperatorConfig, VehicleConfig
from evcharge.links.client import Client
from evcharge.links.link import Backoff, Link
from evcharge.operator.crash_points import crash_point
from evcharge.operator.store import StoreError, put_trip
from evcharge.wire import protocol as p
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
    EvchargeError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
)

if TYPE_CHECKING:
    from evcharge.operator.server import Server

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p.Reply)

PREPARE_TIMEOUT = 5.0  # real seconds from PREPARE to decision
DECIDE_TIMEOUT = 3.0  # how long a booking or cancellation waits for the owners to take the decision
PEER_TIMEOUT = 5.0  # any other request to a peer
PEER_HEARTBEAT = 30.0  # real seconds of silence on a peer link before we ask if it is still there
MAX_ATTEMPTS = 4  # plans tried per booking
RETRY_JITTER = 0.1  # seconds (times the attempt) of random delay before re-planning
RESOLVE_INTERVAL = 0.5  # real seconds between background passes
AVAILABILITY_WINDOW_S = 2 * 86400  # simulated seconds of slots a plan looks at
CLAIM_LINGER = 2.0  # real seconds a booked trip's claim outlives its booking
PLAN_TTL = 900.0  # real seconds a plan shown to a vehicle can be booked as shown
MAX_PLANS_SHOWN = 16  # plans kept per vehicle for booking as shown; the oldest go first

_trip_json = msgspec.json.Encoder()
_trip_decoder = msgspec.json.Decoder(p.TripInfo)


class PeerLink(Link):
    """Our link to one other operator (mutual TLS if it asks for it)."""

    def __init__(
        self,
        me: OperatorConfig,
        peer: OperatorConfig,
        on_up: Callable[[PeerLink, Client], Awaitable[None]],
        on_change: Callable[[PeerLink], None],
        ssl_context: ssl.SSLContext | None = None,
    ):
        host, port = peer.peer_address
        super().__init__(
            host,
            port,
            role="peer",
            ident=me.id,
            secret=me.secret,
            ssl_context=ssl_context if peer.peer_tls else None,
            server_hostname=peer.certificate_name,
            timeout=PEER_TIMEOUT,
            heartbeat=PEER_HEARTBEAT,
            backoff=Backoff(first=0.1),
            on_up=self._came_up,
            on_down=lambda _reason: on_change(self),
            retry_refused=True,  # its operator may fix its side while we wait
            name=f"peer link to {peer.id}",
            what=f"operator {peer.id}",
        )
        self.peer = peer
        self._on_up, self._on_change = on_up, on_change

    async def _came_up(self, client: Client) -> None:
        self._on_change(self)
        await self._on_up(self, client)

    def info(self) -> p.PeerInfo:
        return p.PeerInfo(
            operator_id=self.peer.id,
            address=self.address + (" (tls)" if self.ssl_context else ""),
            up=self.up,
            last_seen=to_datetime(self.last_seen) if self.last_seen else None,
            last_error="" if self.up else self.last_error,
        )


@dataclass(slots=True)
class _Txn:
    """A booking this coordinator has not decided yet."""

    state: str  # preparing | committing | committed | aborted
    deadline: float


@dataclass(slots=True)
class _ShownPlan:
    query: p.TripQuery
    plan: planner.Plan
    expires: float  # time.monotonic()


@dataclass(slots=True)
class _Outcome:
    trip: p.TripInfo | None = None
    conflicts: str = ""


class Federation:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = server.registry
        self.store = server.store
        self.world = server.world
        self.me = server.operator
        self.links = {
            op.id: PeerLink(self.me, op, self._link_up, self._link_changed, server.peer_ssl)
            for op in self.world.operators
            if op.id != self.me.id
        }
        self.catalogs: dict[str, list[p.StationInfo]] = {}
        self._options: list[planner.ChargeOption] | None = None  # cache of _charge_options()
        self._shown: dict[str, OrderedDict[str, _ShownPlan]] = {}  # vehicle -> plan id -> plan, oldest first
        self._claims: dict[str, list[tuple[str, int, int]]] = {}  # trip id -> slots it is booking
        self._planning = asyncio.Lock()
        self.trips: dict[str, Trip] = {}
        self.trips_by_txn: dict[str, Trip] = {}
        self.active: dict[str, _Txn] = {}
        self._sending: set[str] = set()  # trips whose decision is being delivered now
        self._background: set[asyncio.Task[None]] = set()  # acknowledgements being stored
        self._storing_acks: set[str] = set()  # trips whose acknowledgements are being stored
        self._stopping = False
        self._trip_locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._planner_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"evcharge-planner-{self.me.id}")

    # --- lifecycle ------------------------------------------------------------------

    def load(self, trips: list[Trip]) -> None:
        self.trips = {}
        self.trips_by_txn = {}
        for trip in trips:
            self._remember(trip)

    def _remember(self, trip: Trip) -> None:
        self.trips[trip.id] = trip
        self.trips_by_txn[trip.txn_id] = trip

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(link.run()) for link in self.links.values()]
        self._tasks.append(loop.create_task(self._resolve_forever()))

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.links.values():
            if link.client is not None:
                await link.client.close()
        self._planner_thread.shutdown(wait=False, cancel_futures=True)

    async def _link_up(self, link: PeerLink, client: Client) -> None:
        catalog = await client.call(p.GetCatalog(), p.Catalog, timeout=PEER_TIMEOUT)
        self.catalogs[link.peer.id] = catalog.stations
        self._options = None
        log.info("catalog of %s: %d stations", link.peer.id, len(catalog.stations))

    def _link_changed(self, link: PeerLink) -> None:
        self.server.push_to_operators(p.PeerChanged(peer=link.info()))

    def peers(self) -> list[p.PeerInfo]:
        return [link.info() for link in self.links.values()]

    # --- planning -------------------------------------------------------------------

    async def plan(self, vehicle: VehicleConfig, query: p.TripQuery, claim: str = "") -> planner.Plan:
        """The best plan now; with ``claim`` (a booking's trip id), its slots are claimed for it.

        Bookings this server is making hold nothing yet while they plan: each plan goes
        around the slots claimed by the others, or concurrent bookings of one route
        would all go for the same slots and all but one lose.
        """
        try:
            origin_name, origin = geo.find_city(query.origin)
            dest_name, dest = geo.find_city(query.destination)
        except KeyError as exc:
            raise BadRequestError(str(exc.args[0])) from None
        now = int(self.server.clock.now())
        depart = to_seconds(query.depart) if query.depart else now
        if not now - 3600 <= depart <= now + self.world.rules.max_advance_days * 86400:
            raise BadRequestError(
                f"departure must be between an hour ago and {self.world.rules.max_advance_days} days ahead"
            )
        request = planner.TripRequest(
            origin=planner.Place(origin_name, *origin),
            destination=planner.Place(dest_name, *dest),
            soc_start=query.soc_pct / 100,
            depart=depart,
            min_arrival_soc=query.min_arrival_soc_pct / 100,
            max_charge_soc=query.max_charge_soc_pct / 100,
        )
        spec = planner.VehicleSpec(vehicle.battery_kwh, vehicle.consumption_kwh_per_km)
        # Whose chargers this plan goes without, as of now: a catalog arriving while we wait
        # below is not in `options`.
        unknown = sorted(op for op in self.links if op not in self.catalogs)
        options = self._charge_options()
        ledgers = await self._availability(depart, depart + AVAILABILITY_WINDOW_S)
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
                    self._planner_thread, planner.plan_trip, request, spec, options, planner.ledger_next_free(ledgers)
                )
            except planner.NoRouteError as exc:
                if unknown:
                    # Not a fact about the road: the chargers of an operator never reached since this
                    # server started might make the route. The vehicle should try again, not give up.
                    names = ", ".join(unknown)
                    raise UnavailableError(f"{exc}; the chargers of operator {names} are not known yet") from None
                raise NotFoundError(str(exc)) from None
            if claim:
                self._claim(claim, plan)
            return plan

    def _claim(self, trip_id: str, plan: planner.Plan) -> None:
        self._claims[trip_id] = [(s.option.charge_point_id, s.slot_start, s.slot_end) for s in plan.stops]

    def _charge_options(self) -> list[planner.ChargeOption]:
        """Every known charge point, built again only when a catalog arrived (they are static)."""
        if self._options is None:
            own = [self.registry.station_info(s, 0) for s in self.registry.stations.values()]
            everyone = own + [s for stations in self.catalogs.values() for s in stations]
            self._options = self._options_of(everyone)
        return self._options

    @staticmethod
    def _options_of(stations: list[p.StationInfo]) -> list[planner.ChargeOption]:
        return [
            planner.ChargeOption(
                operator_id=s.operator_id,
                station_id=s.id,
                station_name=s.name,
                city=s.city,
                lat=s.lat,
                lon=s.lon,
                charge_point_id=cp.id,
                power_kw=cp.power_kw,
                price_per_kwh=cp.price_per_kwh,
            )
            for s in stations
            for cp in s.charge_points
        ]

    async def _availability(self, start: int, end: int) -> dict[str, Ledger]:
        """Taken slots of every known charge point, fresh from each owner."""
        request = p.GetAvailability(start=to_datetime(start), end=to_datetime(end))
        peers = [link for link in self.links.values() if link.peer.id in self.catalogs]
        answers = await asyncio.gather(
            self.registry.busy_between(start, end),
            *(link.call(request, p.Availability) for link in peers),
            return_exceptions=True,
        )
        ledgers: dict[str, Ledger] = {}
        for source, answer in zip(["local", *(link.peer.id for link in peers)], answers, strict=True):
            if isinstance(answer, BaseException):
                # Plan as if free: PREPARE re-checks at the owner anyway.
                log.warning("availability of %s unknown: %s", source, answer)
                continue
            busy = answer if isinstance(answer, list) else answer.charge_points
            for cp in busy:
                ledger = ledgers.setdefault(cp.charge_point_id, Ledger())
                for n, interval in enumerate(cp.busy):
                    ledger.add(to_seconds(interval.start), to_seconds(interval.end), f"busy-{n}")
        return ledgers

    # --- booking (coordinator) ---------------------------------------------------------

    def show(self, vehicle_id: str, query: p.TripQuery, plan: planner.Plan) -> str:
        """Keep a plan shown to a vehicle for a while, so that it can book exactly that plan."""
        plan_id = f"{self.me.id}-P{secrets.token_hex(5)}"
        # Per vehicle, so that nobody's plans push out anyone else's.
        mine = self._shown.setdefault(vehicle_id, OrderedDict())
        mine[plan_id] = _ShownPlan(query, plan, time.monotonic() + PLAN_TTL)
        while len(mine) > MAX_PLANS_SHOWN:
            mine.popitem(last=False)
        return plan_id

    def _shown_plan(self, vehicle_id: str, query: p.TripQuery, plan_id: str) -> planner.Plan | None:
        """The plan shown to this vehicle for this question, if it can still be booked as shown."""
        mine = self._shown.get(vehicle_id, {})
        shown = mine.get(plan_id)
        if shown is None or shown.query != query:
            return None
        first = shown.plan.stops[0].slot_start if shown.plan.stops else shown.plan.depart + 3600
        if shown.expires < time.monotonic() or first <= self.server.clock.now():
            del mine[plan_id]  # its time has passed (the simulated clock may run fast)
            return None
        return shown.plan

    async def book(self, vehicle: VehicleConfig, query: p.TripQuery, plan_id: str = "") -> tuple[p.TripInfo, int, bool]:
        """The trip booked, the plans tried, and whether it is the plan shown as ``plan_id``."""
        trip_id = f"{self.me.id}-T{secrets.token_hex(5)}"
        conflicts = ""
        shown = self._shown_plan(vehicle.id, query, plan_id) if plan_id else None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            as_shown = shown is not None
            if shown is not None:
                plan = shown
                self._claim(trip_id, plan)
            else:
                plan = await self.plan(vehicle, query, claim=trip_id)
            shown = None  # a plan that lost its slots is re-planned, not retried
            try:
                outcome = await self._two_phase(trip_id, f"{trip_id}.{attempt}", vehicle.id, query, plan)
            except BaseException:
                self._claims.pop(trip_id, None)
                raise
            if outcome.trip is not None:
                # Plans whose availability was read before these holds were placed still
                # need the claim for a moment.
                asyncio.get_running_loop().call_later(CLAIM_LINGER, self._claims.pop, trip_id, None)
                return outcome.trip, attempt, as_shown
            self._claims.pop(trip_id, None)
            conflicts = outcome.conflicts
            log.info("trip %s attempt %d lost a race (%s); re-planning", trip_id, attempt, conflicts)
            # The losers of one race would all re-plan onto the same next-best slots at once:
            # a little random delay lets the winners' holds show in the next availability.
            await asyncio.sleep(random.uniform(0, RETRY_JITTER * attempt))
        raise ConflictError(f"no trip: every plan lost its slots to other bookings ({MAX_ATTEMPTS} tries; {conflicts})")

    async def _two_phase(
        self, trip_id: str, txn_id: str, vehicle_id: str, query: p.TripQuery, plan: planner.Plan
    ) -> _Outcome:
        by_owner: dict[str, list[int]] = {}
        for i, stop in enumerate(plan.stops):
            by_owner.setdefault(stop.option.operator_id, []).append(i)
        deadline = time.time() + PREPARE_TIMEOUT
        txn = _Txn("preparing", deadline)
        self.active[txn_id] = txn
        try:
            owners = list(by_owner)
            votes = await asyncio.gather(
                *(
                    self._prepare_at(owner, txn_id, trip_id, vehicle_id, plan, by_owner[owner], deadline)
                    for owner in owners
                ),
                return_exceptions=True,
            )
            failed = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, BaseException)}
            noes = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, p.Vote) and not v.yes}
            yes = {o: v for o, v in zip(owners, votes, strict=True) if isinstance(v, p.Vote) and v.yes}
            if not failed and not noes and txn.state == "preparing" and time.time() < deadline:
                txn.state = "committing"
                trip = await self._commit(trip_id, txn_id, vehicle_id, query, plan, by_owner, yes)
                txn.state = "committed"
                return _Outcome(trip=trip)
            txn.state = "aborted"
            # Everyone, not only those that said YES: a late PREPARE may still place holds.
            await self._tell_abort(txn_id, trip_id, owners)
            for exc in failed.values():
                if not isinstance(exc, EvchargeError):
                    raise exc
            if failed:
                names = ", ".join(f"{o} ({e})" for o, e in failed.items())
                raise UnavailableError(f"trip not booked: operator {names}; nothing was held")
            if any(not v.conflicts for v in noes.values()):
                reasons = "; ".join(f"{o}: {v.reason}" for o, v in noes.items())
                raise ConflictError(f"trip not booked: {reasons}")
            return _Outcome(
                conflicts=", ".join(f"{c.charge_point_id}@{o}" for o, v in noes.items() for c in v.conflicts)
            )
        except BaseException:
            if txn.state in ("preparing", "committing"):
                txn.state = "aborted"
            raise
        finally:
            self.active.pop(txn_id, None)

    async def _prepare_at(
        self,
        owner: str,
        txn_id: str,
        trip_id: str,
        vehicle_id: str,
        plan: planner.Plan,
        indexes: list[int],
        deadline: float,
    ) -> p.Vote:
        stops = [
            p.StopRequest(
                charge_point_id=plan.stops[i].option.charge_point_id,
                start=to_datetime(plan.stops[i].slot_start),
                end=to_datetime(plan.stops[i].slot_end),
            )
            for i in indexes
        ]
        prepare = p.Prepare(txn_id=txn_id, trip_id=trip_id, vehicle_id=vehicle_id, stops=stops, deadline=deadline)
        if owner == self.me.id:
            return await self.registry.hold(self.me.id, prepare)
        link = self.links.get(owner)
        if link is None:
            raise UnavailableError(f"operator {owner} is not in this federation")
        return await link.call(prepare, p.Vote, timeout=deadline - time.time())

    async def _commit(
        self,
        trip_id: str,
        txn_id: str,
        vehicle_id: str,
        query: p.TripQuery,
        plan: planner.Plan,
        by_owner: dict[str, list[int]],
        votes: dict[str, p.Vote],
    ) -> p.TripInfo:
        reservation_of: dict[int, str] = {}
        for owner, indexes in by_owner.items():
            reservation_of.update(zip(indexes, votes[owner].reservation_ids, strict=True))
        info = _trip_info(trip_id, vehicle_id, self.me.id, query, plan, reservation_of)
        trip = Trip(
            id=trip_id,
            vehicle_id=vehicle_id,
            state="committed",
            txn_id=txn_id,
            participants=list(by_owner),
            unacked=[owner for owner in by_owner if owner != self.me.id],  # ours decide with the row
            info=_trip_json.encode(info),
            created=int(self.server.clock.now()),
        )
        try:
            await self._store_decision(trip)  # the COMMIT record: durable before anyone hears of it
        except (StoreError, UnavailableError):
            await self._tell_abort(txn_id, trip_id, list(by_owner))
            raise UnavailableError("the trip could not be stored; it was not booked") from None
        self._remember(trip)
        crash_point("coordinator-committed")
        self.server.trip_changed(info, "booked")
        log.info(
            "trip %s committed for vehicle %s: %d stops at %s", trip_id, vehicle_id, len(plan.stops), trip.participants
        )
        # Booked from here on, whatever happens to the messages. The reply waits (a little)
        # for the other owners too, so that a booked trip is booked everywhere when the
        # vehicle hears of it; the resolver keeps telling those that did not answer.
        await self._deliver(trip, wait=DECIDE_TIMEOUT)
        return info

    async def _store_decision(self, trip: Trip) -> None:
        """Store a trip's row (its decision); our own stops take the decision in the same transaction."""
        also_store = (put_trip(trip),)
        if self.me.id not in trip.participants:
            await self.store.commit(list(also_store))
        elif trip.state == "committed":
            await self.registry.resolve(self.me.id, trip.txn_id, trip.id, commit=True, also_store=also_store)
        else:
            await self.registry.release_trip(self.me.id, trip.id, also_store=also_store)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the request that started it; ``stop`` cancels what is left."""
        if self._stopping:  # nobody would wait for it; what it would store is redone after a restart
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def _tell(self, owner: str, trip_id: str, txn_id: str, decision: str) -> str:
        """Deliver one decision ("commit", "abort" or "release") to one owner; returns the owner."""
        if owner == self.me.id:
            if decision == "release":
                await self.registry.release_trip(self.me.id, trip_id)
            else:
                await self.registry.resolve(self.me.id, txn_id, trip_id, commit=decision == "commit")
        elif decision == "release":
            await self.links[owner].call(p.ReleaseTrip(trip_id=trip_id), p.Ok)
        else:
            await self.links[owner].call(p.Decide(txn_id=txn_id, trip_id=trip_id, commit=decision == "commit"), p.Ok)
        return owner

    async def _tell_abort(self, txn_id: str, trip_id: str, owners: list[str]) -> None:
        """Best effort: a participant not reached asks us after its deadline."""
        results = await asyncio.gather(
            *(self._tell(o, trip_id, txn_id, "abort") for o in owners), return_exceptions=True
        )
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, BaseException):
                log.info("abort of %s not delivered to %s (it will ask): %s", txn_id, owner, result)

    async def _deliver(self, trip: Trip, wait: float | None = None) -> None:
        """Tell the participants not yet told the trip's latest decision; store who acknowledged.

        Who acknowledged is stored after this returns: a booking need not wait for that
        write, since a decision sent again (after a crash, or by the resolver before the
        write) is acknowledged again: deciding is idempotent.
        """
        if trip.id in self._sending or not trip.unacked:
            return
        self._sending.add(trip.id)
        try:
            decision = "commit" if trip.state == "committed" else "release"
            pending = [asyncio.ensure_future(self._tell(o, trip.id, trip.txn_id, decision)) for o in trip.unacked]
            try:
                done, _ = await asyncio.wait(pending, timeout=wait)
            finally:  # whatever did not answer in time (or if we are cancelled) is retried later
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            acked = {t.result() for t in done if not t.cancelled() and t.exception() is None}
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.info("trip %s: decision not delivered yet: %s", trip.id, t.exception())
            if acked:
                self._storing_acks.add(trip.id)
                self._spawn(self._store_acks(trip, acked))
        finally:
            self._sending.discard(trip.id)

    async def _store_acks(self, trip: Trip, acked: set[str]) -> None:
        def without_acked(current: Trip) -> Trip | None:
            if current.state != trip.state:  # a newer decision is delivered afresh
                return None
            return replace(current, unacked=[o for o in current.unacked if o not in acked])

        try:
            await self._update_trip(trip.id, without_acked)
        except StoreError as exc:
            log.warning("trip %s: could not store acknowledgements: %s", trip.id, exc)
        finally:
            self._storing_acks.discard(trip.id)

    async def _update_trip(
        self,
        trip_id: str,
        change: Callable[[Trip], Trip | None],
        write: Callable[[Trip], Awaitable[None]] | None = None,
    ) -> Trip:
        """Store a change of a trip's row (with ``write``, by default the row alone), from its latest version.

        The per-trip lock orders the writes of that one row (a cancellation must not be
        overwritten by a late acknowledgement computed before it); nothing else waits on it.
        """
        async with self._trip_locks.setdefault(trip_id, asyncio.Lock()):
            current = self.trips[trip_id]
            updated = change(current)
            if updated is None:
                return current
            if write is None:
                await self.store.commit([put_trip(updated)])
            else:
                await write(updated)
            self._remember(updated)
            return updated

    def outcome(self, txn_id: str) -> p.Outcome:
        """What a participant in doubt is told (presumed abort)."""
        if txn_id in self.trips_by_txn:
            return "commit"
        txn = self.active.get(txn_id)
        if txn is None:
            return "abort"
        if txn.state == "preparing" and time.time() >= txn.deadline:
            txn.state = "aborted"  # too late: it can no longer commit
        return {"preparing": "pending", "committing": "pending", "committed": "commit"}.get(txn.state, "abort")

    # --- trips as the vehicle sees them -------------------------------------------------

    def trip_info(self, trip: Trip) -> p.TripInfo:
        info = _trip_decoder.decode(trip.info)
        info.state = trip.state  # type: ignore[assignment]
        return info

    def trips_of(self, vehicle_id: str, include_cancelled: bool) -> list[p.TripInfo]:
        return [
            self.trip_info(t)
            for t in self.trips.values()
            if t.vehicle_id == vehicle_id and (include_cancelled or t.state != "cancelled")
        ]

    async def cancel_trip(self, vehicle_id: str, trip_id: str) -> p.TripInfo:
        trip = self.trips.get(trip_id)
        if trip is None:
            raise NotFoundError(f"no trip {trip_id!r}")
        if trip.vehicle_id != vehicle_id:
            raise ForbiddenError(f"trip {trip_id} belongs to another vehicle")
        self._claims.pop(trip_id, None)  # its slots are free again for the next plans
        if trip.state != "cancelled":

            def cancelled(current: Trip) -> Trip | None:
                if current.state == "cancelled":
                    return None
                # Our own stops are released in the transaction that stores the cancellation.
                unacked = [owner for owner in current.participants if owner != self.me.id]
                return replace(current, state="cancelled", unacked=unacked)

            try:
                trip = await self._update_trip(trip_id, cancelled, write=self._store_decision)
            except (StoreError, UnavailableError):
                raise UnavailableError("the cancellation could not be stored; the trip stands") from None
            log.info("trip %s cancelled by vehicle %s", trip_id, vehicle_id)
            self.server.trip_changed(self.trip_info(trip), "cancelled")
            await self._deliver(trip, wait=DECIDE_TIMEOUT)
        return self.trip_info(self.trips[trip_id])

    # --- background: deliver decisions, resolve holds in doubt ---------------------------

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(RESOLVE_INTERVAL)
            try:
                await self.resolve_once()
            except EvchargeError as exc:
                log.warning("resolver: %s", exc)

    async def resolve_once(self) -> None:
        # A trip whose acknowledgements are being stored looks undelivered until they are.
        busy = self._sending | self._storing_acks
        undelivered = [t for t in self.trips.values() if t.unacked and t.id not in busy]
        in_doubt = self.registry.overdue_holds(time.time())
        await asyncio.gather(
            *(self._deliver(t, wait=PEER_TIMEOUT) for t in undelivered),
            *(self._ask(txn, coordinator, trip) for txn, (coordinator, trip) in in_doubt.items()),
            return_exceptions=True,
        )

    async def _ask(self, txn_id: str, coordinator: str, trip_id: str) -> None:
        """A hold past its deadline: ask its coordinator, never decide alone."""
        if coordinator == self.me.id:
            outcome = self.outcome(txn_id)
        else:
            link = self.links.get(coordinator)
            if link is None:
                log.error("hold of %s names unknown coordinator %s", txn_id, coordinator)
                return
            outcome = (await link.call(p.QueryDecision(txn_id=txn_id), p.Decision)).outcome
        if outcome != "pending":
            log.info("in-doubt %s resolved by asking %s: %s", txn_id, coordinator, outcome)
            await self.registry.resolve(coordinator, txn_id, trip_id, commit=outcome == "commit")


def _trip_info(
    trip_id: str,
    vehicle_id: str,
    home: str,
    query: p.TripQuery,
    plan: planner.Plan,
    reservation_of: dict[int, str],
    state: p.TripState = "committed",
) -> p.TripInfo:
    return p.TripInfo(
        id=trip_id,
        vehicle_id=vehicle_id,
        state=state,
        origin=query.origin,
        destination=query.destination,
        depart=to_datetime(plan.depart),
        arrival=to_datetime(plan.arrival),
        distance_km=round(plan.distance_km, 1),
        soc_at_arrival=round(plan.soc_at_arrival * 100, 1),
        total_kwh=round(plan.total_kwh, 2),
        total_cost=round(plan.total_cost, 2),
        home_operator_id=home,
        stops=[
            p.TripStop(
                city=s.option.city,
                operator_id=s.option.operator_id,
                station_id=s.option.station_id,
                station_name=s.option.station_name,
                charge_point_id=s.option.charge_point_id,
                power_kw=s.option.power_kw,
                drive_km=round(s.drive_km, 1),
                arrival=to_datetime(s.arrival),
                slot_start=to_datetime(s.slot_start),
                slot_end=to_datetime(s.slot_end),
                soc_in=round(s.soc_in * 100, 1),
                soc_out=round(s.soc_out * 100, 1),
                kwh=round(s.kwh, 2),
                cost=round(s.cost, 2),
                reservation_id=reservation_of.get(i),
            )
            for i, s in enumerate(plan.stops)
        ],
    )


def plan_info(plan_id: str, vehicle_id: str, home: str, query: p.TripQuery, plan: planner.Plan) -> p.TripInfo:
    return _trip_info(plan_id, vehicle_id, home, query, plan, {}, state="planned")
