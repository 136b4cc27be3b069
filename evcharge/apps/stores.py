"""An operator's store from outside its server: ``evcharge backup``, and ``evcharge check --data-dir``.

A backup is SQLite's online backup of the live store (the server goes on
serving meanwhile), checked before it is kept. The check of stores reads each
operator's file without changing it, whether or not its server runs: what the
server would refuse at start (a damaged file, an emptied or another's store,
rows that make no sense), then the design's invariants across every operator
found, from their books as stored.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evcharge.apps.invariants import summary, violations
from evcharge.domain.clock import SimClock
from evcharge.domain.world import World
from evcharge.operator.state import Books
from evcharge.operator.store import Store, StoredState, StoreError
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


async def run_backup(world: World, args: argparse.Namespace) -> int:
    op = world.operator(args.operator)
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


async def check_stores(world: World, data_dir: Path) -> int:
    """``evcharge check --data-dir``: each store as its server would judge it, then the invariants."""
    states: dict[str, p.InspectResult] = {}
    broken: list[str] = []
    for op in world.operators:
        path = store_file(data_dir, op.id)
        if not path.exists() and not marker_path(path).exists():
            continue  # this operator keeps its books elsewhere
        stored, found = examine(path)
        if stored is not None:
            found += [f"store {path}: {problem}" for problem in problems(stored)]
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
