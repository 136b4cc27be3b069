"""What a server acknowledged survives kill -9; a store that cannot write refuses changes."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from evcharge.domain.model import Reservation
from evcharge.domain.world import World
from evcharge.links.client import connect, open_client
from evcharge.operator import store as store_mod
from evcharge.operator.store import Store, StoreError, put_reservation
from evcharge.wire.errors import ConflictError, EvchargeError, UnavailableError

from .conftest import NewStore, ServerProcess, store_args

pytestmark = pytest.mark.timeout(120)


def _reservation(n: int) -> Reservation:
    return Reservation(f"r{n}", "CP", "V", n * 100, n * 100 + 50, "booked", 0)


async def test_group_commit_batches_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    assert store.open().reservations == []
    store.start()
    await asyncio.gather(*(store.commit([put_reservation(_reservation(n))]) for n in range(300)))
    commits = store.commits
    await store.close()
    # 300 changes queued in one loop turn share a handful of transactions, not 300.
    assert 1 <= commits <= 30
    reopened = Store(path)
    state = reopened.open()
    assert [r.id for r in state.reservations] == [f"r{n}" for n in range(300)]
    await reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM reservations_readable").fetchone()[0] == 300


async def test_full_store_fails_changes_then_recovers(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3", max_bytes=128 * 1024)
    store.open()
    store.start()
    acknowledged = 0
    with pytest.raises(StoreError):
        for n in range(10_000):
            await store.commit([put_reservation(_reservation(n))])
            acknowledged += 1
    assert store.failed
    with pytest.raises(StoreError):
        await store.commit([put_reservation(_reservation(99_999))])  # refused at once while failed
    assert len((await store.reread()).reservations) == acknowledged
    assert not await store.probe()  # still full
    await store.close()
    # Lift the cap: exactly the acknowledged changes are on disk, and it writes again.
    unlimited = Store(tmp_path / "s.sqlite3")
    assert len(unlimited.open().reservations) == acknowledged
    unlimited.start()
    assert await unlimited.probe()
    await unlimited.commit([put_reservation(_reservation(99_999))])
    await unlimited.close()


async def test_kill_9_keeps_every_acknowledged_reservation(spawn_server, world: World, new_store: NewStore) -> None:
    server: ServerProcess = spawn_server("A", extra=store_args(new_store()))
    cps = [cp.id for s in world.stations_of("A") for cp in s.charge_points]
    vehicles = [f"T{n:03d}" for n in range(1, 13)]
    acked: dict[str, tuple[str, str, datetime]] = {}
    asked: set[tuple[str, str, datetime]] = set()
    stop_at = time.monotonic() + 1.5

    async def stream(index: int, vehicle_id: str, base: datetime) -> None:
        v = world.vehicle(vehicle_id)
        try:
            async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as c:
                slot = 0
                while True:
                    start = base + timedelta(minutes=20 * slot)
                    cp = cps[(slot + index) % len(cps)]
                    slot += 1
                    asked.add((vehicle_id, cp, start))
                    try:
                        r = await c.reserve(cp, start, 15)
                    except ConflictError:
                        continue
                    acked[r.id] = (vehicle_id, cp, start)
                    if time.monotonic() > stop_at:
                        server.kill()  # mid-stream: other vehicles still have requests in flight
        except EvchargeError:
            return  # the server died under us

    v = world.vehicle("V01")
    async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as probe:
        base = (probe.server_now() + timedelta(hours=1)).replace(second=0, microsecond=0)
    async with asyncio.timeout(60):
        await asyncio.gather(*(stream(i, vid, base + timedelta(minutes=i)) for i, vid in enumerate(vehicles)))
    assert server.proc is not None and server.proc.returncode == -9
    assert len(acked) > 20

    server.start()  # same data dir
    op = world.operator("A")
    async with connect("127.0.0.1", server.port, role="operator", ident=op.id, secret=op.secret) as c:
        stored = {r.id: r for r in (await c.inspect()).reservations}
    missing = set(acked) - set(stored)
    assert not missing, f"acknowledged but lost: {missing}"
    for r in stored.values():
        assert (r.vehicle_id, r.charge_point_id, r.start) in asked, f"never asked for: {r}"
    by_cp: dict[str, list] = {}
    for r in stored.values():
        by_cp.setdefault(r.charge_point_id, []).append((r.start, r.end))
    for intervals in by_cp.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(intervals))


async def test_sigterm_finishes_cleanly_and_keeps_state(spawn_server, world: World, new_store: NewStore) -> None:
    server: ServerProcess = spawn_server("A", extra=store_args(new_store()))
    v = world.vehicle("V01")
    async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as c:
        r = await c.reserve("NAT-PN-3", c.server_now() + timedelta(minutes=30), 30)
    assert server.terminate() == 0
    assert "shutting down" in server.log_path.read_text()
    server.start()
    async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as c:
        assert [x.id for x in await c.reservations()] == [r.id]


async def test_server_with_a_full_store_refuses_changes_but_keeps_serving(spawn_server, world: World) -> None:
    server: ServerProcess = spawn_server("A", extra=("--store-limit-mb", "0.2"))
    v = world.vehicle("V01")
    acked: list[str] = []
    c = await open_client("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token)
    try:
        base = c.server_now() + timedelta(hours=1)
        with pytest.raises(UnavailableError, match="could not be stored"):
            for n in range(5000):
                acked.append((await c.reserve("FOR-1-1", base + timedelta(minutes=11 * n), 10)).id)
        assert acked, "the store should have taken some changes before filling up"
        # Reads still work, and memory holds exactly what was acknowledged.
        ours = [s for s in await c.list_stations() if s.operator_id == "A"]
        assert len(ours) == len(world.stations_of("A"))
        assert sorted(r.id for r in await c.reservations()) == sorted(acked)
    finally:
        await c.close()
    server.kill()
    restarted: ServerProcess = spawn_server("A", data_dir=server.data_dir)
    async with connect("127.0.0.1", restarted.port, role="vehicle", ident=v.id, secret=v.token) as c:
        assert sorted(r.id for r in await c.reservations()) == sorted(acked)


def test_a_store_from_a_newer_evcharge_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={store_mod.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(path).open()
