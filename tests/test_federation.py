"""Three operators on loopback: trips booked atomically across all of them."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from evcharge.apps.invariants import violations
from evcharge.domain.world import World
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
    EvchargeError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
)

from .conftest import NewStore, running_federation, wait_until_federated

pytestmark = pytest.mark.timeout(120)

NATAL_TO_FEIRA = p.TripQuery(origin="Natal", destination="Feira de Santana", soc_pct=80)


@pytest.fixture
async def servers(fed_world: World, tmp_path: Path, new_store: NewStore) -> AsyncIterator[dict[str, Server]]:
    """The three operators, on each store in turn (SQLite, PostgreSQL)."""
    async with running_federation(fed_world, tmp_path / "data", new_store=new_store) as running:
        yield running


def home(servers: dict[str, Server], vehicle_id: str) -> Server:
    return servers[servers["A"].world.vehicle(vehicle_id).home]


def driver(servers: dict[str, Server], vehicle_id: str):
    v = servers["A"].world.vehicle(vehicle_id)
    return connect("127.0.0.1", servers[v.home].port, role="vehicle", ident=v.id, secret=v.token)


async def inspect_all(servers: dict[str, Server]) -> dict[str, p.InspectResult]:
    results = {}
    for op_id, server in servers.items():
        op = server.operator
        async with connect("127.0.0.1", server.port, role="operator", ident=op.id, secret=op.secret) as c:
            results[op_id] = await c.inspect()
    return results


def check_invariants(state: dict[str, p.InspectResult]) -> None:
    """Design invariants 1 and 2, read from every operator's inspect."""
    broken = violations(state)
    assert not broken, "\n".join(broken)


async def test_a_trip_is_booked_at_all_three_operators(servers: dict[str, Server]) -> None:
    async with driver(servers, "V01") as c:
        pushed: list[p.Event] = []
        c.on_event.append(pushed.append)
        plan = await c.plan_trip(NATAL_TO_FEIRA)
        assert plan.state == "planned" and all(s.reservation_id is None for s in plan.stops)
        booked = await c.book_trip(NATAL_TO_FEIRA)
        trip = booked.trip
        assert trip.state == "committed" and booked.attempts == 1
        assert {s.operator_id for s in trip.stops} == {"A", "B", "C"}
        assert [s.city for s in trip.stops] == [s.city for s in plan.stops]
        assert [t.id for t in await c.trips()] == [trip.id]
        # The vehicle hears of its trip as a push, too (the REPL shows it).
        assert any(isinstance(e, p.TripChanged) and e.trip.id == trip.id and e.reason == "booked" for e in pushed)
    state = await inspect_all(servers)
    for op_id, result in state.items():
        mine = {(r.id, r.charge_point_id) for r in result.reservations}
        expected = {(s.reservation_id, s.charge_point_id) for s in trip.stops if s.operator_id == op_id}
        assert mine == expected
        assert {r.trip_id for r in result.reservations} == {trip.id}
        assert {r.state for r in result.reservations} == {"booked"}
    assert [t.id for t in state["A"].trips] == [trip.id] and state["B"].trips == []
    assert {peer.operator_id: peer.up for peer in state["A"].peers} == {"B": True, "C": True}
    check_invariants(state)
    # Who acknowledged the decision is stored after the reply: a restart then resends nothing.
    async with asyncio.timeout(10):
        while (stored := await servers["A"].store.reread()).trips[0].unacked:
            await asyncio.sleep(0.05)
    assert [t.id for t in stored.trips] == [trip.id]


def slots(trip: p.TripInfo) -> list[tuple[str, datetime, datetime]]:
    return [(s.charge_point_id, s.slot_start, s.slot_end) for s in trip.stops]


async def test_a_shown_plan_is_booked_as_shown_and_replanned_once_its_slots_are_gone(
    servers: dict[str, Server],
) -> None:
    async with driver(servers, "V01") as c, driver(servers, "V04") as other:
        first = await c.plan_trip(NATAL_TO_FEIRA)
        second = await c.plan_trip(NATAL_TO_FEIRA)
        assert first.id != second.id and first.id.startswith("A-P") and slots(first) == slots(second)
        booked = await c.book_trip(NATAL_TO_FEIRA, first.id)
        assert booked.attempts == 1 and booked.as_shown and slots(booked.trip) == slots(first)
        # The second plan shows the slots the first booking has just taken: booking it as
        # shown loses them, so the server re-plans (a server that ignored the id would not).
        again = await c.book_trip(NATAL_TO_FEIRA, second.id)
        assert again.attempts == 2 and not again.as_shown and not set(slots(again.trip)) & set(slots(first))
        # A plan is booked only by the vehicle it was shown to, for the same question; any
        # other id (a typo) books nothing at all.
        with pytest.raises(NotFoundError, match=f"no plan '{second.id}' of yours"):
            await other.book_trip(NATAL_TO_FEIRA, second.id)
        other_question = p.TripQuery(origin="Natal", destination="Feira de Santana", soc_pct=70)
        with pytest.raises(NotFoundError, match="was for another question"):
            await c.book_trip(other_question, second.id)
        with pytest.raises(NotFoundError, match="no plan 'A-Pbogus' of yours"):
            await c.book_trip(NATAL_TO_FEIRA, "A-Pbogus")
        assert [t.id for t in await c.trips()] == [booked.trip.id, again.trip.id]
        assert await other.trips() == []
    check_invariants(await inspect_all(servers))


async def test_a_shown_plan_whose_time_has_passed_books_nothing(servers: dict[str, Server]) -> None:
    async with driver(servers, "V01") as c:
        plan = await c.plan_trip(NATAL_TO_FEIRA)
        # Five simulated hours later (the clocks run fast): its first slot is in the past.
        for server in servers.values():
            server.clock.anchor_sim += 5 * 3600
        with pytest.raises(NotFoundError, match=f"plan {plan.id} has expired"):
            await c.book_trip(NATAL_TO_FEIRA, plan.id)
        assert await c.trips() == []
        booked = await c.book_trip(NATAL_TO_FEIRA)  # a fresh plan, asked for as such
        assert booked.trip.state == "committed" and not booked.as_shown and booked.attempts == 1
        assert booked.trip.stops[0].slot_start > plan.stops[0].slot_start


async def test_two_cancellations_of_one_trip_at_once_one_cancels_the_other_hears_it_was(
    servers: dict[str, Server],
) -> None:
    async with driver(servers, "V01") as c:
        trip = (await c.book_trip(NATAL_TO_FEIRA)).trip
        first, second = await asyncio.gather(c.cancel_trip(trip.id), c.cancel_trip(trip.id))
        assert sorted([first.unchanged, second.unchanged]) == [False, True]
        assert first.trip.state == second.trip.state == "cancelled"


async def test_cancel_trip_releases_every_stop_even_if_a_peer_is_briefly_down(
    servers: dict[str, Server], fed_world: World, tmp_path: Path
) -> None:
    async with driver(servers, "V01") as c, driver(servers, "V04") as other:
        trip = (await c.book_trip(NATAL_TO_FEIRA)).trip
        with pytest.raises(NotFoundError, match=f"no trip '{trip.id}'"):  # not even disclosed
            await other.cancel_trip(trip.id)
        with pytest.raises(ConflictError, match="cancel the trip"):
            await c.cancel(next(s.reservation_id for s in trip.stops if s.operator_id == "A"))
        await servers["B"].stop()  # B is down while the trip is cancelled
        cancelled = (await c.cancel_trip(trip.id)).trip
        assert cancelled.state == "cancelled"
        again = await c.cancel_trip(trip.id)
        assert again.trip.state == "cancelled" and again.unchanged  # idempotent, and says so
        assert await c.trips() == [] and [t.id for t in await c.trips(include_cancelled=True)] == [trip.id]
        # B comes back; the coordinator delivers the cancellation it still owes.
        servers["B"] = Server(
            fed_world,
            "B",
            tmp_path / "data" / "B",
            host="127.0.0.1",
            time_scale=60.0,
            clock_anchor=servers["A"].clock.anchor_real,
        )
        await servers["B"].start()
        await wait_until_federated(servers)
        async with asyncio.timeout(15):
            while any(r.state == "booked" for r in servers["B"].books.reservations.values()):
                await asyncio.sleep(0.1)
    state = await inspect_all(servers)
    assert all(r.state == "cancelled" for result in state.values() for r in result.reservations)
    check_invariants(state)


async def test_booking_with_a_peer_down_is_unavailable_and_holds_nothing(servers: dict[str, Server]) -> None:
    await servers["C"].stop()
    async with driver(servers, "V01") as c:
        began = time.monotonic()
        with pytest.raises(UnavailableError, match="operator C"):
            await c.book_trip(NATAL_TO_FEIRA)
        assert time.monotonic() - began < 15
        assert await c.trips() == []
    live = {op: s for op, s in servers.items() if op != "C"}
    state = await inspect_all(live)
    assert all(r.state == "aborted" for result in state.values() for r in result.reservations)
    check_invariants(state)


async def test_planning_errors_are_clear(servers: dict[str, Server]) -> None:
    async with driver(servers, "V01") as c:
        with pytest.raises(BadRequestError, match="unknown city"):
            await c.plan_trip(p.TripQuery(origin="Atlantis", destination="Recife"))
        with pytest.raises(NotFoundError, match="Natal"):
            await c.plan_trip(p.TripQuery(origin="Natal", destination="Salvador", soc_pct=5))
        direct = await c.plan_trip(p.TripQuery(origin="Natal", destination="João Pessoa", soc_pct=80))
        assert direct.stops == [] and direct.distance_km > 100


async def race(servers: dict[str, Server], racers: list[str]) -> tuple[list[p.TripReply], list[EvchargeError]]:
    """Every racer books the same route with the same departure, all at once."""
    async with driver(servers, racers[0]) as probe:
        depart = probe.server_now()
    query = p.TripQuery(origin="Natal", destination="Feira de Santana", soc_pct=80, depart=depart)

    async def book(vehicle_id: str) -> p.TripReply | EvchargeError:
        async with driver(servers, vehicle_id) as c:
            try:
                return await c.book_trip(query)
            except ConflictError as exc:
                return exc

    results = await asyncio.gather(*(book(v) for v in racers))
    booked = [r for r in results if isinstance(r, p.TripReply)]
    refused = [r for r in results if not isinstance(r, p.TripReply)]
    assert all(isinstance(r, ConflictError) and "no trip" in r.message for r in refused)
    # No two trips share a charge point at overlapping times (checked again from the owners below).
    slots = sorted((s.charge_point_id, s.slot_start, s.slot_end, r.trip.id) for r in booked for s in r.trip.stops)
    for a, b in itertools.pairwise(slots):
        if a[0] == b[0]:
            assert a[2] <= b[1], f"{a} overlaps {b}"
    check_invariants(await inspect_all(servers))
    return booked, refused


async def test_twenty_vehicles_of_one_home_race_for_the_same_route_and_all_get_a_trip(
    servers: dict[str, Server],
) -> None:
    booked, refused = await race(servers, [f"T{n:03d}" for n in range(1, 21)])
    # Their coordinator plans each booking around the slots the others are booking: nobody
    # loses a slot to a neighbour, so nobody re-plans.
    assert not refused and len(booked) == 20
    assert all(r.attempts == 1 for r in booked)


async def test_vehicles_of_three_homes_race_for_the_same_route(servers: dict[str, Server]) -> None:
    racers = [
        v
        for trio in zip(
            ["V01", "V04", "V07", "V10"], ["V02", "V05", "V08", "V11"], ["V03", "V06", "V09", "V12"], strict=True
        )
        for v in trio
    ]
    booked, _ = await race(servers, racers)
    assert len(booked) >= 3, "the network has room for more than one such trip"


async def test_random_bookings_and_cancels_keep_the_invariants(servers: dict[str, Server]) -> None:
    rng = random.Random(20261123)
    cities = ["Natal", "João Pessoa", "Recife", "Maceió", "Aracaju", "Feira de Santana", "Salvador", "Caruaru"]
    vehicles = [f"T{n:03d}" for n in range(21, 31)] + ["V02", "V03"]
    booked: dict[str, str] = {}  # trip id -> vehicle

    async def act(vehicle_id: str, client: Client) -> None:
        for _ in range(2):
            mine = [t for t, v in booked.items() if v == vehicle_id]
            if mine and rng.random() < 0.4:
                await client.cancel_trip(rng.choice(mine))
                continue
            a, b = rng.sample(cities, 2)
            try:
                reply = await client.book_trip(p.TripQuery(origin=a, destination=b, soc_pct=rng.uniform(30, 90)))
            except (ConflictError, NotFoundError):
                continue
            booked[reply.trip.id] = vehicle_id
        # Invariant 4: nobody cancels a trip that is not theirs.
        others = [t for t, v in booked.items() if v != vehicle_id]
        if others:
            with pytest.raises((ForbiddenError, NotFoundError)):
                await client.cancel_trip(others[0])

    async def run(vehicle_id: str) -> None:
        async with driver(servers, vehicle_id) as c:
            await act(vehicle_id, c)

    await asyncio.gather(*(run(v) for v in vehicles))
    assert booked
    check_invariants(await inspect_all(servers))


async def test_trip_rules_match_single_reservations_and_stops_are_cancelled_only_as_a_trip(
    servers: dict[str, Server],
) -> None:
    async with driver(servers, "V01") as c:
        now = c.server_now()
        for depart in (now - timedelta(days=365), now + timedelta(days=5 * 365), now.replace(year=9999)):
            query = p.TripQuery(origin="Natal", destination="Recife", depart=depart)
            with pytest.raises(BadRequestError, match="departure"):
                await c.book_trip(query)
        trip = (await c.book_trip(NATAL_TO_FEIRA)).trip
    stop = next(s for s in trip.stops if s.operator_id == "B")
    op = servers["B"].operator
    async with connect("127.0.0.1", servers["B"].port, role="operator", ident=op.id, secret=op.secret) as b:
        with pytest.raises(ConflictError, match="cancel the trip"):
            await b.cancel(stop.reservation_id)
    check_invariants(await inspect_all(servers))


async def test_a_quiet_peer_link_stays_up(fed_world: World, tmp_path: Path) -> None:
    # Servers close connections idle for longer than their idle timeout; heartbeats, paced by
    # the idle timeout each Welcome names, keep the peer links up (else each would drop and come back).
    async with running_federation(fed_world, tmp_path / "data", idle_timeout=0.6) as servers:
        await asyncio.sleep(2.0)
        links = [link for server in servers.values() for link in server.federation.peers.links.values()]
        assert all(link.up for link in links)
        assert [link.connects for link in links] == [1] * len(links)
