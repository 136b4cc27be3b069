"""No outcome guessed: a reply lost to a crash is asked for again with its key, and the truth reported.

Real server processes, the real CLI, ``kill -9`` by crash point between the
change being stored and its reply being sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from evcharge.domain.world import World, load_world
from evcharge.links.client import connect
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError, RequestTimeoutError
from tools.harness import evcharge_command

from .conftest import REPO, ServerProcess

pytestmark = pytest.mark.timeout(150)


def start_operators(spawn_server, world_file: Path, crash: dict[str, str]) -> dict[str, ServerProcess]:
    anchor = str(time.time())
    return {
        op: spawn_server(
            op,
            world=world_file,
            world_port=True,
            env={"EVCHARGE_CRASH_AT": crash[op]} if op in crash else None,
            extra=("--clock-anchor", anchor),
        )
        for op in ("A", "B", "C")
    }


async def linked(world: World, procs: dict[str, ServerProcess]) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                states = [await inspect(world, proc) for proc in procs.values()]
                if all(peer.up for state in states for peer in state.peers):
                    return
            except EvchargeError:
                pass
            await asyncio.sleep(0.2)


async def inspect(world: World, proc: ServerProcess) -> p.InspectResult:
    op = world.operator(proc.operator)
    async with connect("127.0.0.1", proc.port, role="operator", ident=op.id, secret=op.secret) as c:
        return await c.inspect()


async def cli(world_file: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *evcharge_command("vehicle", "--world", str(world_file), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, COLUMNS="200"),
    )


async def finished(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, Any, str]:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    text = out.decode()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    assert proc.returncode is not None
    return proc.returncode, parsed, err.decode()


async def died_and_restarted(server: ServerProcess) -> None:
    """The crash point killed it (as ``kill -9``); start it again on its data, without the crash point."""
    assert server.proc is not None
    async with asyncio.timeout(60):
        while server.proc.poll() is None:
            await asyncio.sleep(0.05)
    assert server.proc.returncode == -9, "the crash point should have killed it"
    server.env = None
    await server.start_async()


def reservations_in_store(server: ServerProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(server.data_dir / f"{server.operator}.sqlite3") as db:
        return list(db.execute("SELECT id, vehicle_id, state FROM reservations ORDER BY id"))


@pytest.mark.parametrize(
    ("crashing", "charge_point"),
    [("A", "NAT-PN-1"), ("C", "FEC-1-2")],
    ids=["home-dies-before-its-reply", "owner-dies-before-its-reply-to-the-home"],
)
async def test_a_reservation_whose_reply_was_lost_is_reported_as_committed(
    spawn_server, federated_world_path: Path, crashing: str, charge_point: str
) -> None:
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {crashing: "change-stored"})
    await linked(world, procs)
    reserving = await cli(federated_world_path, "--id", "V01", "--json", "reserve", charge_point, "--minutes", "20")
    await died_and_restarted(procs[crashing])
    rc, out, err = await finished(reserving)
    assert rc == 0, (out, err)
    r = out["reservation"]
    assert r["charge_point_id"] == charge_point and r["state"] == "booked"
    # Done once: the one reservation the driver was told of, and no other.
    assert reservations_in_store(procs[crashing]) == [(r["id"], "V01", "booked")]


async def test_a_trip_whose_reply_was_lost_is_reported_as_booked(spawn_server, federated_world_path: Path) -> None:
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {"A": "coordinator-committed"})
    await linked(world, procs)
    booking = await cli(
        federated_world_path, "--id", "V01", "--json", "book", "--from", "Natal", "--to", "Feira de Santana"
    )
    await died_and_restarted(procs["A"])
    rc, out, err = await finished(booking)
    assert rc == 0, (out, err)
    trip = out["trip"]
    assert trip["state"] == "committed"
    state = await inspect(world, procs["A"])
    assert [t.id for t in state.trips] == [trip["id"]]  # booked once, and it is the one reported


async def test_outcome_unknown_only_past_the_deadline_and_says_how_to_settle_it(spawn_server, world_path: Path) -> None:
    home = spawn_server("A", env={"EVCHARGE_CRASH_AT": "change-stored"})
    server = f"127.0.0.1:{home.port}"
    began = time.monotonic()
    proc = await cli(world_path, "--id", "V01", "--server", server, "--answer-within", "2", "reserve", "NAT-PN-1")
    rc, out, err = await finished(proc)
    assert rc == 3, (out, err)
    assert "outcome unknown" in out and "evcharge vehicle --id V01 reservations --all" in out
    assert time.monotonic() - began >= 2
    # The truth, once the server is back: it was done (stored before the crash).
    home.env = None
    await home.start_async()
    proc = await cli(world_path, "--id", "V01", "--server", f"127.0.0.1:{home.port}", "--json", "reservations")
    rc, listed, err = await finished(proc)
    assert rc == 0, err
    assert [x["charge_point_id"] for x in listed["reservations"]] == ["NAT-PN-1"]


def records_in_store(server: ServerProcess) -> list[tuple[str, str, float]]:
    with sqlite3.connect(server.data_dir / f"{server.operator}.sqlite3") as db:
        return list(db.execute("SELECT reservation_id, owner, cost FROM charge_records"))


def sessions_in_store(server: ServerProcess) -> list[tuple[str, str | None, int | None, int]]:
    with sqlite3.connect(server.data_dir / f"{server.operator}.sqlite3") as db:
        return list(db.execute("SELECT reservation_id, home, ended, delivered FROM charging_sessions"))


async def until(check, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)


async def test_a_charge_record_survives_kill_9_of_home_and_owner_and_arrives_once(
    spawn_server, federated_world_path: Path
) -> None:
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {})
    await linked(world, procs)
    station = await asyncio.create_subprocess_exec(
        *evcharge_command("station", "--world", str(federated_world_path), "--operator", "C", "--id", "FEC-1-2"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        rc, out, err = await finished(
            await cli(federated_world_path, "--id", "V01", "--json", "reserve", "FEC-1-2", "--minutes", "3")
        )
        assert rc == 0, err
        rid = out["reservation"]["id"]
        for _ in range(100):  # until the charge point is online at C
            rc, _, err = await finished(await cli(federated_world_path, "--id", "V01", "--json", "charge", rid))
            if rc == 0:
                break
            await asyncio.sleep(0.2)
        assert rc == 0, err
        # The home dies while its vehicle charges; the slot ends at C (3 minutes = 3 s at 60x),
        # whose charge point reports the session: C keeps the record and cannot deliver it.
        procs["A"].kill()
        await until(
            lambda: [(r, h, e is not None, d) for r, h, e, d in sessions_in_store(procs["C"])] == [(rid, "A", True, 0)]
        )
        procs["C"].kill()  # the owner dies with the record undelivered
        await procs["C"].start_async()
        await procs["A"].start_async()
        await until(lambda: [r for r, _, _ in records_in_store(procs["A"])] == [rid])
        await until(lambda: [d for _, _, _, d in sessions_in_store(procs["C"])] == [1])
        procs["A"].kill()  # and once more: what the home stored stays, once
        await procs["A"].start_async()
        await linked(world, procs)
        rc, history, err = await finished(await cli(federated_world_path, "--id", "V01", "--json", "history"))
        assert rc == 0, err
        assert [(s["reservation_id"], s["operator_id"]) for s in history["sessions"]] == [(rid, "C")]
        check = await asyncio.create_subprocess_exec(
            *evcharge_command("check", "--world", str(federated_world_path)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        rc, said, err = await finished(check)
        assert rc == 0, (said, err)
        assert "invariants hold" in said
    finally:
        station.kill()
        await station.wait()


async def test_a_request_without_a_key_whose_reply_was_lost_is_not_called_nothing_done(
    spawn_server, federated_world_path: Path
) -> None:
    """Without a key the home cannot ask again; the owner died after its change: not known, not unavailable."""
    world = load_world(str(federated_world_path))
    procs = start_operators(spawn_server, federated_world_path, {"C": "change-stored"})
    await linked(world, procs)
    v = world.vehicle("V01")
    async with connect("127.0.0.1", procs["A"].port, role="vehicle", ident=v.id, secret=v.token) as c:
        reserve = p.Reserve(charge_point_id="FEC-1-2", start=c.server_now() + timedelta(hours=1), minutes=20)
        with pytest.raises(RequestTimeoutError, match="whether it was done is not known"):
            await c.call(reserve, p.ReservationReply, timeout=30)
    await died_and_restarted(procs["C"])
    assert [(vehicle, state) for _, vehicle, state in reservations_in_store(procs["C"])] == [("V01", "booked")]
