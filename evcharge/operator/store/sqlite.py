"""Durability: an operator's state in SQLite (WAL, synchronous=FULL).

Memory is the truth for reads; the store is the truth after a crash. Every
change is a list of SQL statements handed to ``commit``, which returns a
future. One writer thread takes everything queued, runs it in one transaction
and commits once (group commit: one fsync for a whole batch), then resolves
the batch's futures. The caller acknowledges only after its future resolved.

If a commit fails (disk full, read-only file) the batch is rolled back and the
store turns ``failed``: it refuses everything queued behind it and every new
change, until the owner has re-read what is on disk (``reread``), found with
``probe`` that it can write again, and called ``resume``.

A store is never served from unchecked: ``open`` refuses (``DamagedStoreError``,
one sentence naming the file and what to do) a file whose pages or indexes are
damaged, one that cannot be read, and one that is not the store this data
directory had. The marker file beside it (``A.sqlite3.id``: the store's id and
how many rows it had) tells a new data directory from an emptied one: a
missing, empty or shrunken store next to a marker is refused, not started
afresh. ``backup`` copies a live store (SQLite's online backup), ``examine``
checks one without changing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from evcharge.operator.store.base import (
    FORGET_OUTCOMES,
    OP_COLUMNS,
    OP_TABLES,
    RECORD,
    TRIP_UNACKED,
    DamagedStoreError,
    Op,
    StoredState,
    StoreError,
    ThreadedStore,
    read_rows,
)

log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version (PRAGMA user_version).
MIGRATIONS: list[str] = [
    # 1: operator state of one server
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        charge_point_id TEXT NOT NULL,
        vehicle_id TEXT NOT NULL,
        start INTEGER NOT NULL,          -- simulated UTC epoch seconds, half-open
        "end" INTEGER NOT NULL,
        state TEXT NOT NULL,
        created INTEGER NOT NULL,
        trip_id TEXT,
        hold_deadline INTEGER
    );
    CREATE INDEX reservations_by_vehicle ON reservations(vehicle_id);
    CREATE INDEX reservations_by_trip ON reservations(trip_id) WHERE trip_id IS NOT NULL;
    CREATE TABLE charging_sessions (
        reservation_id TEXT PRIMARY KEY REFERENCES reservations(id),
        vehicle_id TEXT NOT NULL,
        charge_point_id TEXT NOT NULL,
        started INTEGER NOT NULL,
        ended INTEGER,
        kwh REAL NOT NULL,
        price_per_kwh REAL NOT NULL,
        cost REAL NOT NULL
    );
    CREATE VIEW reservations_readable AS
        SELECT id, charge_point_id, vehicle_id, state, trip_id,
               datetime(start, 'unixepoch') AS start_utc,
               datetime("end", 'unixepoch') AS end_utc
        FROM reservations ORDER BY start;
    """,
    # 2: federation: holds of trip bookings, and the trips this operator coordinates
    """
    ALTER TABLE reservations ADD COLUMN txn_id TEXT;
    ALTER TABLE reservations ADD COLUMN coordinator TEXT;
    CREATE INDEX reservations_held ON reservations(txn_id) WHERE state = 'held';
    CREATE TABLE trips (
        id TEXT PRIMARY KEY,
        vehicle_id TEXT NOT NULL,
        state TEXT NOT NULL,             -- committed | cancelled (no row: aborted)
        txn_id TEXT NOT NULL UNIQUE,
        participants TEXT NOT NULL,      -- JSON list of operator ids
        unacked TEXT NOT NULL,           -- JSON list: not yet told the latest decision
        info TEXT NOT NULL,              -- the trip with its stops, JSON
        created INTEGER NOT NULL
    );
    CREATE INDEX trips_by_vehicle ON trips(vehicle_id);
    """,
    # 3: roaming: outcomes of keyed requests, and charge records between operators
    """
    CREATE TABLE outcomes (
        scope TEXT NOT NULL,             -- who asked: keys are per client
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,       -- of the request the key was first used for
        reply BLOB NOT NULL,             -- the reply as sent (msgpack)
        created REAL NOT NULL,           -- real epoch seconds
        PRIMARY KEY (scope, key)
    );
    ALTER TABLE charging_sessions ADD COLUMN home TEXT;                       -- a visiting vehicle's operator
    ALTER TABLE charging_sessions ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;  -- its record reached home
    CREATE TABLE charge_records (        -- our vehicles' sessions at other operators' chargers
        reservation_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        vehicle_id TEXT NOT NULL,
        station_id TEXT NOT NULL,
        city TEXT NOT NULL,
        charge_point_id TEXT NOT NULL,
        started INTEGER NOT NULL,
        ended INTEGER NOT NULL,
        kwh REAL NOT NULL,
        price_per_kwh REAL NOT NULL,
        cost REAL NOT NULL
    );
    CREATE INDEX charge_records_by_vehicle ON charge_records(vehicle_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


# What an operator can do about a store refused at start.
RESTORE = "restore the latest backup (evcharge backup)"
SALVAGE = "or salvage what is left: sqlite3 {path} .recover | sqlite3 salvaged.sqlite3"
MARKER_SUFFIX = ".id"
BACKUP_TAKEN = "backup_taken"  # meta of a backup: when it was taken (cleared once it is started from)


def _connect(path: Path, max_bytes: int | None) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    if max_bytes is not None:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it started from."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema version {version} is newer than this evcharge ({SCHEMA_VERSION})")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version


def read_state(conn: sqlite3.Connection) -> StoredState:
    """Everything in the store, as stored; a trip row that cannot be read raises ``DamagedStoreError``."""
    return read_rows(conn.execute)


def _render(kind: str) -> str:
    if kind == FORGET_OUTCOMES:
        return "DELETE FROM outcomes WHERE created < ?"
    if kind == TRIP_UNACKED:
        return "UPDATE trips SET unacked = ? WHERE id = ?"
    columns = OP_COLUMNS[kind]
    verb = "INSERT OR IGNORE" if kind == RECORD else "INSERT OR REPLACE"
    names = ", ".join(f'"{c}"' if c == "end" else c for c in columns)
    return f"{verb} INTO {OP_TABLES[kind]} ({names}) VALUES ({', '.join('?' * len(columns))})"


# Each store-neutral write as SQLite's SQL (base.OP_KINDS).
SQLITE_OPS: dict[str, str] = {kind: _render(kind) for kind in (*OP_TABLES, FORGET_OUTCOMES, TRIP_UNACKED)}
_PROBE_SQL = "INSERT OR REPLACE INTO meta (key, value) VALUES ('write_probe', hex(randomblob(4096)))"


# --- the store's marker, integrity and identity ----------------------------------------------


def store_file(data_dir: Path, operator_id: str) -> Path:
    """Where ``evcharge server --data-dir DATA_DIR --operator OPERATOR`` keeps its store."""
    return data_dir / f"{operator_id}.sqlite3"


def marker_path(path: Path) -> Path:
    """The file beside a store that says books are kept there (its id, how many rows it had)."""
    return path.with_name(path.name + MARKER_SUFFIX)


@dataclass(frozen=True, slots=True)
class Marker:
    store_id: str
    reservations: int  # rows at the last start or clean stop: none is ever deleted, so there are never fewer
    sessions: int
    trips: int
    written: str  # when (UTC), for the operator reading a refusal

    def describe(self) -> str:
        return f"{self.reservations} reservations, {self.sessions} sessions and {self.trips} trips on {self.written}"


def read_marker(path: Path) -> Marker | None:
    """The marker of the store at ``path``, None if there is none (a new data directory)."""
    where = marker_path(path)
    try:
        fields = json.loads(where.read_text(encoding="utf-8"))
        return Marker(**fields)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        raise DamagedStoreError(
            f"{where} is not a store marker; if {path} is this data directory's store, delete {where} "
            "(it is written again at the next start)"
        ) from None


def write_marker(path: Path, store_id: str, conn: sqlite3.Connection) -> None:
    """Say beside the store at ``path`` that it is kept here, and how many rows it has now."""
    (reservations,) = conn.execute("SELECT count(*) FROM reservations").fetchone()
    (sessions,) = conn.execute("SELECT count(*) FROM charging_sessions").fetchone()
    (trips,) = conn.execute("SELECT count(*) FROM trips").fetchone()
    marker = Marker(store_id, reservations, sessions, trips, time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()))
    where = marker_path(path)
    tmp = where.with_name(where.name + ".tmp")
    try:
        tmp.write_text(json.dumps(dataclasses.asdict(marker)) + "\n", encoding="utf-8")
        os.replace(tmp, where)
    except OSError as exc:  # the store itself is fine: serve it, but say that it is unguarded
        log.warning("cannot write %s (%s): an emptied store would not be noticed", where, exc)


def damage(conn: sqlite3.Connection) -> list[str]:
    """What SQLite finds wrong with the file itself: damaged pages or indexes, dangling references."""
    found = [row[0] for row in conn.execute("PRAGMA integrity_check") if row[0] != "ok"]
    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check"):
        found.append(f"table {table}, row {rowid}: refers to a row missing from {parent}")
    return found


def stored_id(conn: sqlite3.Connection) -> str | None:
    """The store's id (None: a store from before ids, or no store at all yet)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    return None if row is None else str(row[0])


def identity_problem(path: Path, marker: Marker | None, store_id: str | None, state: StoredState | None) -> str:
    """Why the store at ``path`` is not the one its marker says was kept here, if it is not.

    A backup of this very store (``backup``) may hold fewer rows than the marker counted: it
    was put back on purpose.
    """
    if marker is None:
        return ""
    where = marker_path(path)
    again = f"{RESTORE} to {path}; to start with no books on purpose, delete {where}"
    if state is None:
        return f"store {path} is empty, but this data directory had {marker.describe()}: {again}"
    if store_id != marker.store_id:
        return (
            f"store {path} is not the store this data directory had (id {store_id or 'none'}, not "
            f"{marker.store_id}): put its own store back; to keep this one instead, delete {where}"
        )
    if state.meta.get(BACKUP_TAKEN):
        return ""
    for what, had, has in (
        ("reservations", marker.reservations, len(state.reservations)),
        ("sessions", marker.sessions, len(state.sessions)),
        ("trips", marker.trips, len(state.trips)),
    ):
        if has < had:
            return (
                f"store {path} has {has} {what}, but it had {had} when last started or stopped (rows deleted?): {again}"
            )
    return ""


# --- copies and checks from outside the server ---------------------------------------------------


def backup(path: Path, dest: Path) -> StoredState:
    """Copy the store at ``path`` to ``dest`` while its server may be running; what the copy holds.

    SQLite's online backup, in one step: one consistent snapshot under a read transaction, so
    the server goes on committing meanwhile. The copy is checked like a store at start before it
    takes ``dest``'s name, and marked as a backup, so that a server started from it after a loss
    accepts it although it holds fewer rows than the store had.
    """
    if not path.is_file() or path.stat().st_size == 0:
        raise StoreError(f"no store at {path}")
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source:
            found = damage(source)
            if found:
                raise DamagedStoreError(f"store {path} is damaged: {found[0]}: no backup made")
            with contextlib.closing(sqlite3.connect(part, isolation_level=None)) as copy:
                source.backup(copy)
                if copy.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    raise StoreError(
                        f"store {path} has an older schema: start its server once (it migrates), then back up"
                    )
                state = read_state(copy)
                when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
                copy.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (BACKUP_TAKEN, when))
                copy.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # one self-contained file
    except sqlite3.DatabaseError as exc:
        part.unlink(missing_ok=True)
        raise DamagedStoreError(f"store {path} is damaged ({exc}): no backup made") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    for leftover in (part.with_name(part.name + "-wal"), part.with_name(part.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(part, dest)
    return state


def examine(path: Path) -> tuple[StoredState | None, list[str]]:
    """Check a store without changing it (its server stopped, or running): what it holds, what is wrong.

    The same checks as a server's start, but every problem the file has, not the first one.
    """
    try:
        marker = read_marker(path)
    except DamagedStoreError as exc:
        return None, [str(exc)]
    if not path.is_file() or path.stat().st_size == 0:
        return None, [identity_problem(path, marker, None, None) if marker else f"no store at {path}"]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source:
            found = damage(source)
            if found:
                return None, [f"store {path} is damaged: {problem}" for problem in found]
            snapshot = sqlite3.connect(":memory:", isolation_level=None)
            source.backup(snapshot)  # read (and migrated, if older) as of one moment, apart from the file
        with contextlib.closing(snapshot):
            if marker is not None and snapshot.execute("PRAGMA user_version").fetchone()[0] == 0:
                return None, [identity_problem(path, marker, None, None)]
            store_id = stored_id(snapshot)
            migrate(snapshot)
            state = read_state(snapshot)
    except sqlite3.DatabaseError as exc:
        return None, [f"store {path} is damaged ({exc})"]
    except StoreError as exc:
        return None, [str(exc)]
    problem = identity_problem(path, marker, store_id, state)
    return state, [problem] if problem else []


class Store(ThreadedStore):
    """An operator's books in one SQLite file (WAL, ``synchronous=FULL``)."""

    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.where = str(path)
        self.max_bytes = max_bytes
        self._conn: sqlite3.Connection | None = None
        self._store_id: str | None = None  # once opened
        self._new_id = False
        self._backup_taken: str | None = None  # when the backup was taken, if the store is one
        self._marker: Marker | None = None

    def open(self) -> StoredState:
        """Check, create or migrate the file, and read everything in it (before serving).

        Raises ``DamagedStoreError`` (one sentence: the file, what is wrong, what to do) for a
        store that must not be served from: damaged, unreadable, emptied, or another's.
        """
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = read_marker(path)
        if marker is not None and (not path.exists() or path.stat().st_size == 0):
            raise DamagedStoreError(identity_problem(path, marker, None, None))
        try:
            self._conn = _connect(path, self.max_bytes)
            found = damage(self._conn)
            if found:
                more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
                raise DamagedStoreError(
                    f"store {path} is damaged: {found[0]}{more}: {RESTORE}, {SALVAGE.format(path=path)}"
                )
            if marker is not None and self._conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                raise DamagedStoreError(identity_problem(path, marker, None, None))  # before it gets tables
            store_id = stored_id(self._conn)
            old = migrate(self._conn)
            if old != SCHEMA_VERSION:
                log.info("store %s: schema %d -> %d", path, old, SCHEMA_VERSION)
            state = read_state(self._conn)
        except sqlite3.DatabaseError as exc:
            self._close_connection()
            raise DamagedStoreError(
                f"store {path} is damaged ({exc}): {RESTORE}, {SALVAGE.format(path=path)}"
            ) from None
        except BaseException:
            self._close_connection()
            raise
        problem = identity_problem(path, marker, store_id, state)
        if problem:
            self._close_connection()
            raise DamagedStoreError(problem)
        self._new_id = store_id is None  # a new store (or one from before ids): it gets its own at start
        self._store_id = store_id or secrets.token_hex(8)
        self._backup_taken = state.meta.pop(BACKUP_TAKEN, None)
        self._marker = marker
        return state

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start(self) -> None:
        """Serve from this store: its marker counts it, and the writer thread takes changes."""
        assert self._conn is not None and self._store_id is not None, "open() first"
        # Only now: a store refused after open (by the owner's checks of its rows) is left as it was.
        conn = self._conn
        if self._new_id:
            conn.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (self._store_id,))
        if self._backup_taken is not None:
            had = f"; the data directory had {self._marker.describe()}" if self._marker else ""
            log.warning("store %s: started from a backup taken at %s%s", self.path, self._backup_taken, had)
            conn.execute("DELETE FROM meta WHERE key = ?", (BACKUP_TAKEN,))
        write_marker(self.path, self._store_id, conn)
        self._start_thread()

    def abandon(self) -> None:
        """Give up an ``open`` still under way (nothing to wait for with SQLite)."""

    async def close(self) -> None:
        """Commit whatever is queued, stop the writer thread, and count the rows in the marker."""
        await self._stop_thread()
        if self._conn is not None and self._store_id is not None and self._loop is not None:  # served from
            try:
                write_marker(self.path, self._store_id, self._conn)
            except sqlite3.Error as exc:  # the books on disk are as committed; only the count is older
                log.warning("store %s: rows not counted at close: %s", self.path, exc)
        self._close_connection()

    # --- on the writer thread ---

    def _transaction(self, ops: list[Op]) -> Exception | None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, params in ops:
                conn.execute(SQLITE_OPS[kind], params)
            conn.execute("COMMIT")
            return None
        except Exception as exc:  # whatever it is, the batch fails and the thread lives on
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return StoreError(f"store write failed: {exc}")

    def _read(self) -> StoredState:
        assert self._conn is not None
        try:
            return read_state(self._conn)
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from None

    def _probe(self) -> bool:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_PROBE_SQL)
            conn.execute("DELETE FROM meta WHERE key = 'write_probe'")
            conn.execute("COMMIT")
            return True
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False
