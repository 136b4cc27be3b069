"""Peer links through a misbehaving network (the chaos proxy between operators)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evcharge.domain.world import World, load_world
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError, UnavailableError
from tools.chaos_proxy import ChaosProxy

from .conftest import free_ports, operator, running_federation, vehicle, wait_until_federated
from .test_federation import NATAL_TO_FEIRA, check_invariants

pytestmark = pytest.mark.timeout(90)


def with_ports(world: World, ports: dict[str, int]) -> World:
    operators = [msgspec.structs.replace(op, host="127.0.0.1", port=ports[op.id]) for op in world.operators]
    return msgspec.structs.replace(world, operators=operators)


@asynccontextmanager
async def federation_behind_proxies(world: World, data_dir: Path, start: str = "ABC") -> AsyncIterator[dict[str, Any]]:
    """A, B and C in process; A reaches B and C only through proxies (B and C reach everyone directly).

    Only the operators in ``start`` are started; ``servers["start"](op)`` starts another one later.
    """
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    direct = dict(zip("ABC", free_ports(3), strict=True))
    proxies = {op: await ChaosProxy("127.0.0.1", direct[op], name=f"A->{op}").start() for op in "BC"}
    seen_by_a = {**direct, **{op: proxy.port for op, proxy in proxies.items()}}
    anchor = time.time()
    servers: dict[str, Server] = {}

    async def start_one(op: str) -> Server:
        own_world = with_ports(world, seen_by_a if op == "A" else direct)
        servers[op] = Server(own_world, op, data_dir / op, port=direct[op], time_scale=60.0, clock_anchor=anchor)
        await servers[op].start()
        return servers[op]

    try:
        for op in start:
            await start_one(op)
        await wait_until_federated(servers)
        yield {"servers": servers, "proxies": proxies, "start": start_one}
    finally:
        for server in servers.values():
            await server.stop()
        for proxy in proxies.values():
            await proxy.stop()
        loop.set_exception_handler(None)
    assert not unhandled, f"unhandled exceptions in the event loop: {unhandled}"


async def test_a_black_holed_peer_link_is_replaced_within_seconds(world: World, tmp_path: Path) -> None:
    """A link whose packets vanish (no FIN, no RST) must not fail every booking until a heartbeat is due."""
    async with federation_behind_proxies(world, tmp_path) as fed:
        servers: dict[str, Server] = fed["servers"]
        async with vehicle(servers["A"], "V01") as c:
            first = await c.book_trip(NATAL_TO_FEIRA)
            assert {s.operator_id for s in first.trip.stops} == {"A", "B", "C"}
            # From now on A's connection to B swallows everything, for longer than any test runs;
            # a new connection would go through.
            assert fed["proxies"]["B"].stall_all(stall_for=600) == 1
            began = time.monotonic()
            with pytest.raises(UnavailableError, match="operator B"):
                await c.book_trip(NATAL_TO_FEIRA)
            # The timeouts made A test the link at once: it is replaced, and B books again, well before
            # the next idle-link heartbeat (30 s) would have found it dead.
            booked = None
            while booked is None and time.monotonic() - began < 20.0:
                try:
                    booked = await c.book_trip(NATAL_TO_FEIRA)
                except EvchargeError:
                    await asyncio.sleep(0.5)
            assert booked is not None, "A kept using the black-holed link"
            assert time.monotonic() - began < 15.0
            assert servers["A"].federation is not None
            assert servers["A"].federation.peers.links["B"].connects == 2
        async with asyncio.timeout(20):
            while any(r.state == "held" for s in servers.values() for r in s.books.reservations.values()):
                await asyncio.sleep(0.2)
        states = {}
        for op, server in servers.items():
            async with operator(server) as c:
                states[op] = await c.inspect()
        check_invariants(states)


async def test_no_route_while_a_peer_is_unknown_is_unavailable_not_not_found(
    federated_world_path: Path, tmp_path: Path
) -> None:
    """A server that has never reached C does not know C's chargers: that is not 'no route'."""
    world = load_world(str(federated_world_path))
    anchor = time.time()
    async with (
        running_federation(world, tmp_path / "data", ("A", "B"), clock_anchor=anchor) as servers,
        vehicle(servers["A"], "V01") as c,
    ):
        with pytest.raises(UnavailableError, match="operator C"):
            await c.plan_trip(NATAL_TO_FEIRA)
        with pytest.raises(UnavailableError, match="operator C"):
            await c.book_trip(NATAL_TO_FEIRA)
        # A route that A and B can serve alone is planned as usual.
        trip = await c.plan_trip(p.TripQuery(origin="Arapiraca", destination="Natal", soc_pct=80))
        assert {s.operator_id for s in trip.stops} <= {"A", "B"}
        # Once C is there, the same trip is planned over its chargers too.
        late = Server(world, "C", tmp_path / "data" / "C", host="127.0.0.1", time_scale=60.0, clock_anchor=anchor)
        await late.start()
        try:
            async with asyncio.timeout(20):
                while servers["A"].federation is None or "C" not in servers["A"].federation.peers.catalogs:
                    await asyncio.sleep(0.05)
            assert "C" in {s.operator_id for s in (await c.plan_trip(NATAL_TO_FEIRA)).stops}
        finally:
            await late.stop()


async def test_a_catalog_arriving_during_planning_does_not_turn_the_answer_into_no_route(
    world: World, tmp_path: Path
) -> None:
    """The plan was made without C's chargers; that C's catalog came in meanwhile does not make it 'no route'."""
    async with federation_behind_proxies(world, tmp_path, start="AB") as fed:
        servers: dict[str, Server] = fed["servers"]
        federation = servers["A"].federation
        assert federation is not None and "C" not in federation.peers.catalogs
        async with vehicle(servers["A"], "V01") as c:
            # B's availability will take the whole peer timeout: the plan waits for it.
            fed["proxies"]["B"].stall_all(stall_for=600)
            planning = asyncio.ensure_future(c.plan_trip(NATAL_TO_FEIRA))
            await asyncio.sleep(0.5)
            await fed["start"]("C")
            async with asyncio.timeout(10):
                while "C" not in federation.peers.catalogs:
                    await asyncio.sleep(0.05)
            assert not planning.done()
            with pytest.raises(UnavailableError, match="operator C"):
                await planning
