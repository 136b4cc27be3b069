"""A damaged, emptied or foreign store is refused at start in one line; backups and offline checks.

Operator C is stopped with five booked reservations, then its store is damaged the ways
an attack (or a failing disk, or a hurried operator) did: emptied, deleted, a page
overwritten, cut in half, a row with a state nobody writes, overlapping or backwards
rows, rows deleted, another store put in its place. ``evcharge server`` must refuse
each in one line naming the file and what to do, without a traceback, and serve
nothing; ``evcharge check --data-dir`` must find the same; ``evcharge backup`` of the
running server must give a store the server starts from after a loss.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from pathlib import Path

import pytest

from evcharge.domain.world import World
from evcharge.links.client import Client, connect
from evcharge.operator.store.sqlite import marker_path

from .conftest import ServerProcess, run_cli

pytestmark = pytest.mark.timeout(120)

OPERATOR = "C"
BOOKED = 5


def store_of(data_dir: Path) -> Path:
    return data_dir / f"{OPERATOR}.sqlite3"


def book_five(server: ServerProcess, world: World, hours_ahead: int = 2) -> list[str]:
    """Five booked reservations at C, made by its vehicle V03 through the running server."""
    cps = [cp.id for s in world.stations_of(OPERATOR) for cp in s.charge_points]

    async def book() -> list[str]:
        async with as_v03(server, world) as c:
            start = c.server_now() + timedelta(hours=hours_ahead)
            return [(await c.reserve(cps[n], start + timedelta(minutes=n), 30)).id for n in range(BOOKED)]

    return asyncio.run(book())


def as_v03(server: ServerProcess, world: World) -> AbstractAsyncContextManager[Client]:
    v = world.vehicle("V03")
    return connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token)


def reservations_at(server: ServerProcess, world: World) -> list[str]:
    async def listed() -> list[str]:
        async with as_v03(server, world) as c:
            return [r.id for r in await c.reservations()]

    return asyncio.run(listed())


@pytest.fixture
def stopped_c(spawn_server, world: World, tmp_path: Path) -> tuple[Path, list[str]]:
    """C's data directory after a clean stop with five booked reservations; the ids."""
    data = tmp_path / "data-C"
    server: ServerProcess = spawn_server(OPERATOR, data_dir=data)
    ids = book_five(server, world)
    assert server.terminate() == 0
    assert marker_path(store_of(data)).exists()
    return data, ids


def start_server(
    world_path: Path, data: Path, tmp_path: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``evcharge server`` on ``data``: it must exit by itself (refused), not start serving."""
    ready = tmp_path / "refused.ready"
    ready.unlink(missing_ok=True)
    try:
        return run_cli(
            "server",
            "--world",
            str(world_path),
            "--operator",
            OPERATOR,
            "--data-dir",
            str(data),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            timeout=timeout,
        )
    finally:
        assert not ready.exists(), "the server started serving from a store it should have refused"


def sql(data: Path, *statements: str) -> None:
    with sqlite3.connect(store_of(data)) as db:
        for statement in statements:
            db.execute(statement)


def overwrite_page(path: Path, table: str) -> None:
    """The page that holds ``table``'s rows, overwritten with garbage (a bad sector, a stray write)."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(os.urandom(page_size))


def first_row(data: Path) -> str:
    with sqlite3.connect(store_of(data)) as db:
        return str(db.execute("SELECT id FROM reservations ORDER BY start LIMIT 1").fetchone()[0])


DAMAGE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "emptied to 0 bytes": (lambda d: store_of(d).write_bytes(b""), ("is empty", "5 reservations", ".sqlite3.id")),
    "deleted": (lambda d: store_of(d).unlink(), ("is empty", "had 5 reservations")),
    "a page overwritten": (lambda d: overwrite_page(store_of(d), "reservations"), ("is damaged", ".recover")),
    "cut in half": (lambda d: os.truncate(store_of(d), store_of(d).stat().st_size // 2), ("is damaged",)),
    "header overwritten": (
        lambda d: store_of(d).write_bytes(b"x" * 4096),
        ("is damaged", "file is not a database", "backup"),
    ),
    "a bogus state": (
        lambda d: sql(d, f"UPDATE reservations SET state = 'bogus' WHERE id = '{first_row(d)}'"),
        ("table reservations, row", "'bogus'", "sqlite3"),
    ),
    "overlapping rows": (
        lambda d: sql(d, "UPDATE reservations SET charge_point_id = (SELECT min(charge_point_id) FROM reservations)"),
        ("table reservations, rows", "at once"),
    ),
    "end before start": (
        lambda d: sql(d, f"UPDATE reservations SET \"end\" = start - 60 WHERE id = '{first_row(d)}'"),
        ("ends", "before it starts"),
    ),
    "rows deleted": (
        lambda d: sql(d, "DELETE FROM reservations WHERE rowid IN (SELECT rowid FROM reservations LIMIT 3)"),
        ("has 2 reservations", "had 5 when last"),
    ),
    "a session of no reservation": (
        lambda d: sql(
            d,
            "PRAGMA foreign_keys=OFF",
            "INSERT INTO charging_sessions VALUES ('C-gone', 'V03', 'X', 0, NULL, 1.0, 1.0, 1.0, NULL, 0)",
        ),
        ("charging_sessions", "missing from reservations"),
    ),
    "a bad clock": (lambda d: sql(d, "UPDATE meta SET value = 'soon' WHERE key = 'time_scale'"), ("'time_scale'",)),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_or_emptied_store_is_refused_in_one_line(
    stopped_c: tuple[Path, list[str]], world_path: Path, tmp_path: Path, damage: str
) -> None:
    data, _ = stopped_c
    spoil, expected = DAMAGE[damage]
    for stale in data.glob("*.sqlite3-*"):  # the WAL goes with its store: damage the file a server would open
        stale.unlink()
    spoil(data)
    result = start_server(world_path, data, tmp_path)
    assert result.returncode == 1, result
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("evcharge server: ") and str(store_of(data)) in last, last
    for words in expected:
        assert words in last, (words, last)
    checked = run_cli("check", "--world", str(world_path), "--data-dir", str(data))
    assert checked.returncode == 1 and "VIOLATION" in checked.stdout, checked
    assert "Traceback" not in checked.stdout + checked.stderr


def test_another_operators_or_another_directorys_store_is_refused(
    stopped_c: tuple[Path, list[str]], spawn_server, world: World, world_path: Path, tmp_path: Path
) -> None:
    data, _ = stopped_c
    other = tmp_path / "data-other"
    spawn_server(OPERATOR, data_dir=other).terminate()  # another store of C's, empty
    shutil.copy(store_of(other), store_of(data))
    result = start_server(world_path, data, tmp_path)
    assert result.returncode == 1 and "not the store this data directory had" in result.stderr, result
    # A's store under C's name, in a directory of its own: the books are not C's.
    a_dir = tmp_path / "data-A"
    spawn_server("A", data_dir=a_dir).terminate()
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(a_dir / "A.sqlite3", store_of(lone))
    result = start_server(world_path, lone, tmp_path)
    assert result.returncode == 1 and "holds the books of operator A, not C" in result.stderr, result


def test_a_new_data_directory_starts_and_an_emptied_one_only_on_purpose(
    stopped_c: tuple[Path, list[str]], spawn_server, world: World, tmp_path: Path
) -> None:
    fresh: ServerProcess = spawn_server(OPERATOR, data_dir=tmp_path / "brand-new")  # nothing there: a new one
    assert marker_path(store_of(fresh.data_dir)).exists()
    fresh.kill()
    data, _ = stopped_c
    store_of(data).unlink()
    marker_path(store_of(data)).unlink()  # what the refusal says to do, to start with no books on purpose
    restarted: ServerProcess = spawn_server(OPERATOR, data_dir=data)
    assert reservations_at(restarted, world) == []


def test_an_online_backup_restores_what_a_lost_store_had(
    spawn_server, world: World, world_path: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data-C"
    server: ServerProcess = spawn_server(OPERATOR, data_dir=data)
    ids = book_five(server, world)
    copy = tmp_path / "C-backup.sqlite3"
    made = run_cli(
        "backup", "--world", str(world_path), "--operator", OPERATOR, "--data-dir", str(data), "--to", str(copy)
    )
    assert made.returncode == 0 and "5 reservations" in made.stdout, made
    later = book_five(server, world, hours_ahead=5)  # the server went on; the backup is of the moment it was taken
    server.kill()
    for lost in data.glob(f"{OPERATOR}.sqlite3*"):
        if lost.name.endswith(".sqlite3") or "-" in lost.name:
            lost.unlink()
    result = start_server(world_path, data, tmp_path)
    assert result.returncode == 1 and "is empty" in result.stderr, "a lost store is noticed"
    checked = run_cli("check", "--world", str(world_path), "--data-dir", str(data))
    assert checked.returncode == 1 and "is empty" in checked.stdout, checked
    shutil.copy(copy, store_of(data))  # restored: fewer rows than the marker counted, and that is fine
    restarted: ServerProcess = spawn_server(OPERATOR, data_dir=data)
    assert sorted(reservations_at(restarted, world)) == sorted(ids), "the backup's books, not the later ones"
    assert not set(later) & set(reservations_at(restarted, world))
    assert "started from a backup taken at" in restarted.log_path.read_text()
    restarted.terminate()
    checked = run_cli("check", "--world", str(world_path), "--data-dir", str(data))
    assert checked.returncode == 0 and "invariants hold" in checked.stdout, checked


def test_check_of_a_sound_stopped_store_passes_and_names_what_it_holds(
    stopped_c: tuple[Path, list[str]], world_path: Path
) -> None:
    data, _ = stopped_c
    checked = run_cli("check", "--world", str(world_path), "--data-dir", str(data))
    assert checked.returncode == 0, checked
    assert "5 live reservations" in checked.stdout and "invariants hold" in checked.stdout, checked
    missing = run_cli("check", "--world", str(world_path), "--data-dir", str(data / "nowhere"))
    assert missing.returncode == 1 and "no store" in missing.stdout, missing


def test_a_refused_store_is_left_as_it_was_and_starts_once_repaired(
    stopped_c: tuple[Path, list[str]], spawn_server, world: World, world_path: Path, tmp_path: Path
) -> None:
    """Chaos found it: a start refused for its rows had counted them in the marker (and the
    repaired store, with one row fewer, was then refused as shrunk)."""
    data, ids = stopped_c
    marker = marker_path(store_of(data)).read_text()
    sql(data, "INSERT INTO reservations SELECT id || '-twin', charge_point_id, vehicle_id, start, \"end\", state, "
        "created, trip_id, hold_deadline, txn_id, coordinator FROM reservations LIMIT 1")  # fmt: skip
    assert start_server(world_path, data, tmp_path).returncode == 1
    assert marker_path(store_of(data)).read_text() == marker, "a refused store is not counted"
    with sqlite3.connect(store_of(data)) as db:  # nor written to
        assert db.execute("SELECT count(*) FROM reservations").fetchone()[0] == BOOKED + 1
        assert db.execute("SELECT count(*) FROM meta WHERE key = 'operator_id'").fetchone()[0] == 1
    sql(data, "DELETE FROM reservations WHERE id LIKE '%-twin'")
    repaired: ServerProcess = spawn_server(OPERATOR, data_dir=data)
    assert sorted(reservations_at(repaired, world)) == sorted(ids)
