"""An operator's store from outside its server: ``evcharge backup``, ``migrate-store``, ``check --data-dir``.

A backup is SQLite's online backup of the live store (the server goes on
serving meanwhile), checked before it is kept. The check of stores reads each
operator's file without changing it, whether or not its server runs: what the
server would refuse at start (a damaged file, an emptied or another's store,
rows that make no sense), then the design's invariants across every operator
found, from their books as stored. An operator whose books are in PostgreSQL
(``--store OPERATOR=URL``, or its world file's ``store``) is read from there.
``evcharge migrate-store`` copies an operator's books from its SQLite file into
an empty PostgreSQL database, and reads them back to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from evcharge.apps.invariants import summary, violations
from evcharge.domain.clock import SimClock
from evcharge.domain.world import World
from evcharge.operator.state import Books
from evcharge.operator.store import STORE_ENV, Store, StoredState, StoreError, is_postgresql
from evcharge.operator.store.base import rows_as_ops
from evcharge.operator.store.integrity import problems
from evcharge.operator.store.sqlite import backup, examine, marker_path, store_file
from evcharge.operator.views import Views
from evcharge.wire import protocol as p

DATA_DIR = Path("data")  # the server's default


def add_backup_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    cmd = sub.add_parser(
        "backup",
        parents=parents,
        help="copy an operator's store while its server runs",
        description="Copy an operator's store (DATA_DIR/OPERATOR.sqlite3) to a file, while its server may be "
        "running: one consistent snapshot (SQLite's online backup), checked before it is kept. To restore it, "
        "stop the server and copy the file over the store: the server starts from it although it holds fewer "
        "rows than the store it replaces (it refuses any other store that shrank).",
    )
    cmd.add_argument("--operator", required=True, help="operator id from the world file")
    cmd.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="the server's data directory (default: %(default)s)"
    )
    cmd.add_argument("--to", type=Path, help="the copy (default: OPERATOR-backup-<UTC time>.sqlite3 here)")
    cmd.set_defaults(run=run_backup)


def _postgresql_store(world: World, operator_id: str) -> str:
    """The PostgreSQL URL the operator's server keeps its books at by default, if it does."""
    spec = os.environ.get(STORE_ENV) or world.operator(operator_id).store
    return spec if is_postgresql(spec) else ""


async def run_backup(world: World, args: argparse.Namespace) -> int:
    op = world.operator(args.operator)
    if _postgresql_store(world, op.id):
        print(
            f"evcharge backup: operator {op.id} keeps its books in PostgreSQL; `evcharge backup` copies SQLite "
            "stores only: back a database up with pg_dump (or pg_basebackup, and a synchronous standby)",
            file=sys.stderr,
        )
        return 2
    source = store_file(args.data_dir, op.id)
    dest = args.to or Path(f"{op.id}-backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.sqlite3")
    try:
        state = backup(source, dest)
    except (StoreError, OSError) as exc:
        print(f"evcharge backup: {exc}", file=sys.stderr)
        return 1
    found = problems(state)
    if found:  # copied faithfully, but the server would refuse to start from it
        print(f"evcharge backup: {dest} holds rows that make no sense, the first: {found[0]}", file=sys.stderr)
        return 1
    print(
        f"backed up {source} to {dest}: {len(state.reservations)} reservations, "
        f"{len(state.sessions)} charging sessions, {len(state.trips)} trips"
    )
    return 0


def add_migrate_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    cmd = sub.add_parser(
        "migrate-store",
        parents=parents,
        help="copy an operator's books from its SQLite store to PostgreSQL",
        description="Copy an operator's books from DATA_DIR/OPERATOR.sqlite3 into an empty PostgreSQL database, "
        "in one transaction, then read them back and compare. Stop the operator's server first; afterwards "
        "start it with --store URL (and check with: evcharge check --data-dir DATA_DIR --store OPERATOR=URL).",
    )
    cmd.add_argument("--operator", required=True, help="operator id from the world file")
    cmd.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="the server's data directory (default: %(default)s)"
    )
    cmd.add_argument("--to", required=True, metavar="URL", help="postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    cmd.set_defaults(run=run_migrate)


async def run_migrate(world: World, args: argparse.Namespace) -> int:
    op = world.operator(args.operator)
    source = store_file(args.data_dir, op.id)
    if not is_postgresql(args.to):
        print(f"evcharge migrate-store: --to {args.to!r} is not a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        from evcharge.operator.store import postgresql
    except ImportError:
        print("evcharge migrate-store: needs psycopg: pip install 'evcharge[postgresql]'", file=sys.stderr)
        return 2
    state, found = examine(source)
    if state is not None:
        found += [f"store {source}: {problem}" for problem in problems(state)]
    if state is None or found:
        print(f"evcharge migrate-store: {found[0]}: nothing copied", file=sys.stderr)
        return 1
    where = postgresql.redacted(args.to)
    try:
        postgresql.copy_into(args.to, state, op.id)
        copied, errors = postgresql.examine(args.to)
    except StoreError as exc:
        print(f"evcharge migrate-store: {exc}", file=sys.stderr)
        return 1
    if copied is None or _without_sqlite_meta(copied) != _without_sqlite_meta(state):
        print(f"evcharge migrate-store: {where} does not read back as {source}: {errors or 'rows differ'}")
        return 1
    print(
        f"copied {source} to {where}: {len(state.reservations)} reservations, {len(state.sessions)} charging "
        f"sessions, {len(state.trips)} trips, {len(state.outcomes)} kept answers, {len(state.records)} charge "
        f"records; read back the same. Start the server with --store, and check with: evcharge check "
        f"--data-dir {args.data_dir} --store {op.id}=URL"
    )
    return 0


def _without_sqlite_meta(state: StoredState) -> list[object]:
    """The rows as writes, SQLite's own meta (its id, a backup's time) left out, in a stable order."""
    return sorted(
        (op for op in rows_as_ops(state) if not (op[0] == "meta" and op[1][0] in ("store_id", "backup_taken"))),
        key=repr,
    )


def _examine_postgresql(url: str) -> tuple[StoredState | None, list[str], str]:
    try:
        from evcharge.operator.store import postgresql
    except ImportError:
        return None, [f"store {url[:13]}...: reading PostgreSQL needs psycopg (evcharge[postgresql])"], url
    stored, found = postgresql.examine(url)
    return stored, found, postgresql.redacted(url)


async def check_stores(world: World, data_dir: Path, urls: dict[str, str] | None = None) -> int:
    """``evcharge check --data-dir``: each store as its server would judge it, then the invariants.

    ``urls``: the operators whose books are in PostgreSQL (else their world file's ``store``).
    """
    states: dict[str, p.InspectResult] = {}
    broken: list[str] = []
    for op in world.operators:
        url = (urls or {}).get(op.id) or (op.store if is_postgresql(op.store) else "")
        if url:
            stored, found, where = _examine_postgresql(url)
        else:
            path = store_file(data_dir, op.id)
            if not path.exists() and not marker_path(path).exists():
                continue  # this operator keeps its books elsewhere
            stored, found = examine(path)
            where = str(path)
        if stored is not None:
            found += [f"store {where}: {problem}" for problem in problems(stored)]
        broken += found
        if stored is not None and not found:
            states[op.id] = await _as_inspected(world, op.id, stored)
    if not states and not broken:
        print(f"no store of any operator of the world in {data_dir}")
        return 1
    # A stopped operator's holds are in doubt until it starts again and asks their coordinator.
    broken += violations(states, allow_holds=True)
    for problem in broken:
        print(f"VIOLATION: {problem}")
    held = sum(1 for state in states.values() for r in state.reservations if r.state == "held")
    if held:
        print(f"{held} holds of trip bookings in doubt: their servers ask the coordinators when they start")
    print(f"{summary(states)} (stored): {'invariants hold' if not broken else f'{len(broken)} violations'}")
    return 1 if broken else 0


async def _as_inspected(world: World, operator_id: str, stored: StoredState) -> p.InspectResult:
    """What ``inspect`` of this operator would show once its server started from these books."""
    books = Books(world, operator_id, Store(Path("unused")), SimClock())
    books.load(stored)
    stations, reservations, trips = await Views(books).snapshot()
    return p.InspectResult(
        operator_id=operator_id,
        server_time=books.clock.now_dt(),
        stations=stations,
        reservations=reservations,
        trips=trips,
    )
