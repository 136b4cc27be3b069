"""One vehicle's flood of trip plans does not starve everyone else's planning.

V01 with 8 connections x 64 PlanTrip in flight raised V04's plan latency from 8.7 ms to
4.8 s: plans were served first come first served. Plans are now taken in turns, one
vehicle after another. Nothing here measures speed (that is the bench's noisy
neighbour row): the tests look at the order in which answers come.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from evcharge.domain.world import World, load_world
from evcharge.links.client import Client, connect
from evcharge.operator.fair import FairQueue
from evcharge.operator.server import Server
from evcharge.operator.trips.planning import PLANS_AT_ONCE
from evcharge.wire import protocol as p
from evcharge.wire.errors import UnavailableError

from .conftest import running_federation

pytestmark = pytest.mark.timeout(120)

ROUTE = p.TripQuery(origin="Natal", destination="Feira de Santana", soc_pct=80)


async def test_waiters_take_turns_by_identity_and_cancelled_ones_give_theirs_up() -> None:
    queue = FairQueue(concurrency=1, max_waiting=10)
    order: list[str] = []
    release = asyncio.Event()

    async def work(identity: str, label: str) -> None:
        async with queue.turn(identity):
            order.append(label)
            await release.wait()

    first = asyncio.create_task(work("flood", "flood-0"))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(work("flood", f"flood-{n}")) for n in range(1, 6)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(work("quiet", "quiet"))
    gone = asyncio.create_task(work("gone", "gone"))
    await asyncio.sleep(0)
    gone.cancel()  # a request whose client went away never takes a turn
    release.set()
    await asyncio.gather(first, quiet, *tasks)
    assert order[:3] == ["flood-0", "flood-1", "quiet"], order
    assert "gone" not in order and queue.running == 0
    with pytest.raises(UnavailableError, match="2 requests waiting already"):
        small = FairQueue(concurrency=1, max_waiting=2)
        async with small.turn("x"):
            waiting = [asyncio.create_task(work_in(small, "x")) for _ in range(2)]
            await asyncio.sleep(0)
            try:
                async with small.turn("x"):
                    pass
            finally:
                for t in waiting:
                    t.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)


async def work_in(queue: FairQueue, identity: str) -> None:
    async with queue.turn(identity):
        await asyncio.sleep(0)


@pytest.fixture
async def servers(federated_world_path: Path, tmp_path: Path) -> AsyncIterator[dict[str, Server]]:
    world = load_world(str(federated_world_path))
    async with running_federation(world, tmp_path / "data") as running:
        yield running


def as_vehicle(server: Server, world: World, vehicle_id: str) -> Client:
    v = world.vehicle(vehicle_id)
    return connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token, timeout=60.0)


async def test_another_vehicles_plan_is_answered_amid_a_flood(servers: dict[str, Server]) -> None:
    a = servers["A"]
    floods = 32  # V01's plans in flight
    async with (
        as_vehicle(a, a.world, "V01") as flood_1,
        as_vehicle(a, a.world, "V01") as flood_2,
        as_vehicle(a, a.world, "V04") as quiet,
    ):
        answered: list[str] = []

        async def plan(c: Client, who: str) -> None:
            await c.plan_trip(ROUTE)
            answered.append(who)

        flood = [asyncio.create_task(plan((flood_1, flood_2)[n % 2], "V01")) for n in range(floods)]
        async with asyncio.timeout(30):  # every one of them is in the server's hands (or answered) before V04 asks
            while sum(session.conn.in_flight for session in a.online.vehicles.get("V01", ())) + len(answered) < floods:
                await asyncio.sleep(0.001)
        done_before = len(answered)  # plans are fast: some of V01's may be answered already
        await plan(quiet, "V04")
        before = answered.index("V04") - done_before
        await asyncio.gather(*flood)
    # First come first served, V04 came after all of V01's; in turns, after those running (and
    # the one or two that finish while V04's request is on its way).
    assert before <= 2 * PLANS_AT_ONCE + 2, f"{before} of V01's {floods} plans were answered before V04's"
