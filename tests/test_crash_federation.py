"""kill -9 in the middle of a trip booking: after restart every trip is whole or absent."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from evcharge.domain.world import World, load_world
from evcharge.links.client import connect
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError

from .conftest import NewStore, ServerProcess, store_args
from .test_federation import NATAL_TO_FEIRA, check_invariants

pytestmark = pytest.mark.timeout(120)


async def inspect(world: World, proc: ServerProcess) -> p.InspectResult:
    op = world.operator(proc.operator)
    async with connect("127.0.0.1", proc.port, role="operator", ident=op.id, secret=op.secret) as c:
        return await c.inspect()


async def wait_for(condition, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.2)


def start_operators(
    spawn_server, world_file: Path, crash: dict[str, str], new_store: NewStore
) -> dict[str, ServerProcess]:
    anchor = str(time.time())
    return {
        op: spawn_server(
            op,
            world=world_file,
            world_port=True,
            env={"EVCHARGE_CRASH_AT": crash[op]} if op in crash else None,
            extra=("--clock-anchor", anchor, *store_args(new_store())),
        )
        for op in ("A", "B", "C")
    }


async def all_linked(world: World, procs: dict[str, ServerProcess]) -> bool:
    try:
        states = [await inspect(world, proc) for proc in procs.values()]
    except EvchargeError:
        return False
    return all(peer.up for state in states for peer in state.peers)


async def settled(world: World, procs: dict[str, ServerProcess]) -> bool:
    """No operator holds anything and the coordinators have delivered every decision."""
    states = [await inspect(world, proc) for proc in procs.values()]
    return not any(r.state == "held" for s in states for r in s.reservations)


async def book(world: World, proc: ServerProcess) -> p.TripReply | EvchargeError:
    v = world.vehicle("V01")
    try:
        async with connect("127.0.0.1", proc.port, role="vehicle", ident=v.id, secret=v.token) as c:
            return await c.book_trip(NATAL_TO_FEIRA)
    except EvchargeError as exc:
        return exc


def stored_states(proc: ServerProcess) -> set[str]:
    """The states of the reservations in the store of a server that is not running (read from outside)."""
    if "--store" in proc.extra:
        import psycopg

        with psycopg.connect(proc.extra[proc.extra.index("--store") + 1]) as db:
            return {state for (state,) in db.execute("SELECT state FROM reservations")}
    with sqlite3.connect(proc.data_dir / f"{proc.operator}.sqlite3") as db:
        return {state for (state,) in db.execute("SELECT state FROM reservations")}


def restart(proc: ServerProcess) -> None:
    assert proc.proc is not None
    assert proc.proc.wait(timeout=20) == -9, "the crash point should have killed it"
    proc.env = None
    proc.start()


async def test_participant_killed_after_voting_yes(
    spawn_server, federated_world_path: Path, new_store: NewStore
) -> None:
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {"B": "participant-voted"}, new_store)
    await wait_for(lambda: all_linked(world, procs))
    outcome = await book(world, procs["A"])
    restart(procs["B"])
    await wait_for(lambda: all_linked(world, procs))
    await wait_for(lambda: settled(world, procs))
    state = {op: await inspect(world, proc) for op, proc in procs.items()}
    check_invariants(state)
    if isinstance(outcome, p.TripReply):
        # B's YES arrived before it died: the trip stands, B learnt the decision after restarting.
        assert [t.id for t in state["A"].trips] == [outcome.trip.id]
        assert any(r.trip_id == outcome.trip.id and r.state == "booked" for r in state["B"].reservations)
    else:
        assert state["A"].trips == []
        assert not any(r.state == "booked" for s in state.values() for r in s.reservations)


async def test_coordinator_killed_after_its_commit_record(
    spawn_server, federated_world_path: Path, new_store: NewStore
) -> None:
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {"A": "coordinator-committed"}, new_store)
    await wait_for(lambda: all_linked(world, procs))
    outcome = await book(world, procs["A"])
    assert isinstance(outcome, EvchargeError), "the coordinator died before it could answer"
    # Its own stops took the decision in the transaction that stored it: already booked on disk.
    assert stored_states(procs["A"]) == {"booked"}
    restart(procs["A"])
    await wait_for(lambda: all_linked(world, procs))
    await wait_for(lambda: settled(world, procs))
    state = {op: await inspect(world, proc) for op, proc in procs.items()}
    # The COMMIT record survived, so the trip is booked everywhere.
    [trip] = state["A"].trips
    assert trip.state == "committed" and {s.operator_id for s in trip.stops} == {"A", "B", "C"}
    check_invariants(state)
