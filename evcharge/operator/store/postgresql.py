"""Durability in PostgreSQL: the same schema and semantics as SQLite, for operators on more than one machine.

The driver is psycopg 3 (sync API, ``psycopg[binary]``: libpq comes in the wheel). The
engine is SQLite's (``base.ThreadedStore``): one writer thread, one connection, one
transaction per batch, the batch's statements and its COMMIT sent in one pipeline (one
round trip), ``synchronous_commit = on`` so the reply waits for the commit to be flushed
(and, with a synchronous standby configured in PostgreSQL, for the standby too).

**One active server per operator.** That writer connection holds a session-level
advisory lock on the operator (``pg_try_advisory_lock``) from ``open`` to ``close``.
A second ``evcharge server`` for the same operator on the same database waits in
``open`` (it polls the lock; it does not listen yet) and takes over as soon as the
active server's session ends: a ``kill -9`` closes its socket and PostgreSQL drops the
lock at once; a machine that vanishes is noticed by TCP keepalives within ~15 s. Every
write goes through the session that holds the lock, so a server that lost it cannot
write: when its connection breaks it reconnects and asks for the lock again, and if
another server has it, it stops serving (``StoreLost``).

**A second guard against overlaps.** Live reservations of one charge point may not
overlap: an exclusion constraint (``btree_gist``, ``tstzrange(start, end, '[)') WITH &&``)
says so in the database too. Memory already refuses them, so a violation is a bug of
ours: it is logged as critical and the change that made it is refused (the other
changes of its group commit are committed one by one), and memory is re-read.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from evcharge.operator.store.base import (
    FORGET_OUTCOMES,
    OP_COLUMNS,
    OP_TABLES,
    PRIMARY_KEYS,
    RECORD,
    TRIP_UNACKED,
    DamagedStoreError,
    Op,
    StoredState,
    StoreError,
    StoreInDoubt,
    StoreLost,
    ThreadedStore,
    _Batch,
    read_rows,
    rows_as_ops,
)

log = logging.getLogger(__name__)

LOCK_CLASS = 0x45564348  # "EVCH": the first key of our advisory locks; the second is the operator's
LOCK_POLL = 0.25  # seconds between a standby's tries for the lock
# libpq settings unless the URL has its own: every wait on the network has a deadline.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms: data sent but not acknowledged for this long breaks the connection
}
STATEMENT_TIMEOUT_MS = 30_000
SERVER_KEEPALIVES = (
    "tcp_keepalives_idle = 5",
    "tcp_keepalives_interval = 2",
    "tcp_keepalives_count = 3",
    "tcp_user_timeout = 10000",
)

# Each entry upgrades the schema by one version, as SQLite's MIGRATIONS do (same tables, same
# columns in the same order; tests/test_store_schema.py checks both against base.TABLES).
MIGRATIONS: list[str] = [
    # 1: operator state of one server, and the database's own guard against overlaps
    """
    CREATE EXTENSION IF NOT EXISTS btree_gist;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        charge_point_id TEXT NOT NULL,
        vehicle_id TEXT NOT NULL,
        start BIGINT NOT NULL,           -- simulated UTC epoch seconds, half-open
        "end" BIGINT NOT NULL,
        state TEXT NOT NULL,
        created BIGINT NOT NULL,
        trip_id TEXT,
        hold_deadline DOUBLE PRECISION,
        CONSTRAINT reservations_live_never_overlap EXCLUDE USING gist (
            charge_point_id WITH =,
            tstzrange(to_timestamp(start), to_timestamp("end"), '[)') WITH &&
        ) WHERE (state IN ('held', 'booked', 'charging'))
    );
    CREATE INDEX reservations_by_vehicle ON reservations(vehicle_id);
    CREATE INDEX reservations_by_trip ON reservations(trip_id) WHERE trip_id IS NOT NULL;
    CREATE TABLE charging_sessions (
        reservation_id TEXT PRIMARY KEY REFERENCES reservations(id),
        vehicle_id TEXT NOT NULL,
        charge_point_id TEXT NOT NULL,
        started BIGINT NOT NULL,
        ended BIGINT,
        kwh DOUBLE PRECISION NOT NULL,
        price_per_kwh DOUBLE PRECISION NOT NULL,
        cost DOUBLE PRECISION NOT NULL
    );
    CREATE VIEW reservations_readable AS
        SELECT id, charge_point_id, vehicle_id, state, trip_id,
               to_timestamp(start) AT TIME ZONE 'UTC' AS start_utc,
               to_timestamp("end") AT TIME ZONE 'UTC' AS end_utc
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
        state TEXT NOT NULL,
        txn_id TEXT NOT NULL UNIQUE,
        participants TEXT NOT NULL,
        unacked TEXT NOT NULL,
        info TEXT NOT NULL,
        created BIGINT NOT NULL
    );
    CREATE INDEX trips_by_vehicle ON trips(vehicle_id);
    """,
    # 3: roaming: outcomes of keyed requests, and charge records between operators
    """
    CREATE TABLE outcomes (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        reply BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, key)
    );
    ALTER TABLE charging_sessions ADD COLUMN home TEXT;
    ALTER TABLE charging_sessions ADD COLUMN delivered BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE charge_records (
        reservation_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        vehicle_id TEXT NOT NULL,
        station_id TEXT NOT NULL,
        city TEXT NOT NULL,
        charge_point_id TEXT NOT NULL,
        started BIGINT NOT NULL,
        ended BIGINT NOT NULL,
        kwh DOUBLE PRECISION NOT NULL,
        price_per_kwh DOUBLE PRECISION NOT NULL,
        cost DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX charge_records_by_vehicle ON charge_records(vehicle_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def redacted(url: str) -> str:
    """The URL as shown to a person: without its password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    host = params.get("host", "localhost")
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    user = params.get("user")
    return f"postgresql://{f'{user}@' if user else ''}{where}/{params.get('dbname', '')}"


def lock_key(operator_id: str) -> int:
    """The advisory lock's second key: the operator's id as a signed 32-bit number."""
    return zlib.crc32(operator_id.encode()) - (1 << 31)


def connect(url: str, application: str = "evcharge") -> psycopg.Connection[Any]:
    """A connection with our deadlines (unless the URL says otherwise) and ``synchronous_commit = on``."""
    params: dict[str, Any] = {**CONNECTION_DEFAULTS, "application_name": application}
    try:
        params.update(conninfo_to_dict(url))
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"--store {redacted(url)}: not a PostgreSQL URL ({exc})") from None
    try:
        conn = psycopg.connect(make_conninfo(**params), autocommit=False)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {redacted(url)}: {_first_line(exc)}") from None
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = on")
        cur.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        # The database's side of the socket too: a server whose machine vanished must not keep
        # the operator's lock for the kernel's default two hours.
        for setting in SERVER_KEEPALIVES:
            cur.execute(f"SET {setting}")
    conn.commit()
    return conn


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('evcharge_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute("SELECT version FROM evcharge_schema").fetchone()
    return 0 if found is None else int(found[0])


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema up to date (one transaction per version); returns the version it started from."""
    version = schema_version(conn)
    conn.commit()
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema version {version} is newer than this evcharge ({SCHEMA_VERSION})")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS evcharge_schema (version INTEGER NOT NULL)")
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("DELETE FROM evcharge_schema")
            conn.execute("INSERT INTO evcharge_schema (version) VALUES (%s)", (target,))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return version


def read_state(conn: psycopg.Connection[Any]) -> StoredState:
    """Everything in the store, read in one snapshot."""
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return read_rows(lambda sql: conn.execute(sql).fetchall())
    finally:
        conn.rollback()


def _render(kind: str) -> str:
    if kind == FORGET_OUTCOMES:
        return "DELETE FROM outcomes WHERE created < %s"
    if kind == TRIP_UNACKED:
        return "UPDATE trips SET unacked = %s WHERE id = %s"
    table = OP_TABLES[kind]
    columns = OP_COLUMNS[kind]
    names = ", ".join(f'"{c}"' for c in columns)
    keys = ", ".join(PRIMARY_KEYS[table])
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
    if kind == RECORD:
        return f"{insert} ON CONFLICT ({keys}) DO NOTHING"
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c not in PRIMARY_KEYS[table])
    return f"{insert} ON CONFLICT ({keys}) DO UPDATE SET {updates}"


# Each store-neutral write as PostgreSQL's SQL (base.OP_KINDS).
POSTGRES_OPS: dict[str, str] = {kind: _render(kind) for kind in (*OP_TABLES, FORGET_OUTCOMES, TRIP_UNACKED)}


class _Overlap(StoreError):
    """The database refused two live reservations at once on a charge point: a bug of ours."""


class PostgresStore(ThreadedStore):
    """An operator's books in a PostgreSQL database; the active server holds the operator's advisory lock."""

    def __init__(self, url: str, operator_id: str) -> None:
        super().__init__()
        self.url = url
        self.operator_id = operator_id
        self.where = redacted(url)
        self.path = self.where  # named in messages, as SQLite's file is
        self.lock_key = lock_key(operator_id)
        self.waited_s = 0.0  # how long open() waited for another server to let go (a standby)
        self._conn: psycopg.Connection[Any] | None = None
        self._broken = False  # the writer connection failed: reconnect (and take the lock again) first
        self._abandoned = threading.Event()

    # --- open, start, close ---

    def open(self) -> StoredState:
        """Connect, take the operator's lock (waiting while another server has it), migrate, read.

        Runs in a thread of its own (``asyncio.to_thread``): a standby waits here, not listening.
        """
        began = time.monotonic()
        announced = False
        while True:
            if self._abandoned.is_set():
                self._close_connection()
                raise StoreError(f"store {self.where}: given up before the lock was free")
            try:
                if self._conn is None:
                    self._conn = connect(self.url, f"evcharge-{self.operator_id}")
                if self._try_lock(self._conn):
                    break
                if not announced:
                    log.warning(
                        "store %s: operator %s is served by %s; standing by until it lets go",
                        self.where,
                        self.operator_id,
                        self._holder(self._conn),
                    )
                    announced = True
            except psycopg.OperationalError as exc:  # the database went away: wait for it like for the lock
                log.warning("store %s: %s; trying again", self.where, _first_line(exc))
                self._close_connection()
            except psycopg.Error as exc:  # not allowed, say: no use waiting
                self._close_connection()
                raise StoreError(f"store {self.where}: {_first_line(exc)}") from None
            except StoreError as exc:
                if not announced:
                    raise
                log.warning("%s; trying again", exc)
            self._abandoned.wait(LOCK_POLL)
        self.waited_s = time.monotonic() - began
        if announced:
            log.warning(
                "store %s: operator %s taken over after %.1f s standing by", self.where, self.operator_id, self.waited_s
            )
        conn = self._conn
        try:
            old = migrate(conn)
            if old != SCHEMA_VERSION:
                log.info("store %s: schema %d -> %d", self.where, old, SCHEMA_VERSION)
            return read_state(conn)
        except DamagedStoreError:
            self._close_connection()
            raise
        except (psycopg.Error, StoreError) as exc:
            self._close_connection()
            raise StoreError(f"store {self.where}: {_first_line(exc)}") from None

    def abandon(self) -> None:
        """Stop an ``open`` that waits for the lock (the server is being stopped)."""
        self._abandoned.set()

    def start(self) -> None:
        assert self._conn is not None, "open() first"
        self._start_thread()

    async def close(self) -> None:
        """Commit whatever is queued, stop the writer thread, let go of the lock (closing the session)."""
        self._abandoned.set()
        await self._stop_thread()
        self._close_connection()

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    # --- the lock ---

    def _try_lock(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, self.lock_key)).fetchone()
        conn.commit()
        return bool(row and row[0])

    def _holder(self, conn: psycopg.Connection[Any]) -> str:
        """Who holds the operator's lock, in words."""
        row = conn.execute(
            "SELECT a.pid, a.application_name, a.client_addr FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.classid::bigint = %s::bigint & 4294967295 "
            "AND l.objid::bigint = %s::bigint & 4294967295 AND l.granted",
            (LOCK_CLASS, self.lock_key),
        ).fetchone()
        conn.commit()
        if row is None:
            return "another server"
        pid, application, address = row
        return f"another server ({application or 'session'} from {address or 'a local socket'}, backend pid {pid})"

    def _writer(self) -> psycopg.Connection[Any]:
        """The connection that holds the lock; after a failure, a new one that took it again."""
        if self._conn is not None and not self._broken and not self._conn.closed:
            return self._conn
        self._close_connection()
        conn = connect(self.url, f"evcharge-{self.operator_id}")
        try:
            taken = self._try_lock(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"store {self.where}: {_first_line(exc)}") from None
        if not taken:
            conn.close()
            log.critical(
                "store %s: operator %s is now served by another server: this one stops serving",
                self.where,
                self.operator_id,
            )
            raise StoreLost(f"store {self.where}: another server of operator {self.operator_id} took over")
        self._conn, self._broken = conn, False
        log.warning("store %s: reconnected, still the server of operator %s", self.where, self.operator_id)
        return conn

    # --- on the writer thread ---

    def _transaction(self, ops: list[Op]) -> Exception | None:
        try:
            conn = self._writer()
        except StoreError as exc:
            return exc
        try:
            # One round trip: the batch's statements and its COMMIT in one pipeline.
            with conn.pipeline():
                cur = conn.cursor()
                for kind, params in ops:
                    cur.execute(POSTGRES_OPS[kind], params)
                conn.commit()
            return None
        except pg_errors.ExclusionViolation as exc:
            _rollback(conn)
            diag = exc.diag.message_detail or _first_line(exc)
            log.critical(
                "BUG: store %s refused overlapping live reservations (%s); the change is refused", self.where, diag
            )
            return _Overlap(f"two live reservations would overlap: {diag}")
        except psycopg.OperationalError as exc:  # the connection (or the server) went away
            self._broken = True
            # The COMMIT went out with the batch: the database may have made it before the loss.
            return StoreInDoubt(f"store write may or may not have been made: {_first_line(exc)}")
        except Exception as exc:  # whatever it is, the batch fails and the thread lives on
            _rollback(conn)
            if conn.closed or conn.broken:
                self._broken = True
            return StoreError(f"store write failed: {_first_line(exc)}")

    def _batches_failed(self, batches: list[_Batch], error: Exception) -> list[Exception | None]:
        if not isinstance(error, _Overlap) or len(batches) == 1:
            return [error] * len(batches)
        # Only the change that made the overlap is refused: the others are committed one by one.
        return [self._transaction(b.ops) for b in batches]

    def _read(self) -> StoredState:
        conn = self._writer()
        try:
            return read_state(conn)
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self._broken = True
            raise StoreError(f"store read failed: {_first_line(exc)}") from None

    def _probe(self) -> bool:
        try:
            conn = self._writer()
        except StoreLost:
            raise
        except StoreError:
            return False
        try:
            conn.execute("INSERT INTO meta (key, value) VALUES ('write_probe', 'x') ON CONFLICT (key) DO NOTHING")
            conn.execute("DELETE FROM meta WHERE key = 'write_probe'")
            conn.commit()
            return True
        except psycopg.Error:
            _rollback(conn)
            if conn.closed or conn.broken:
                self._broken = True
            return False


def _rollback(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.rollback()
    except psycopg.Error:
        pass


# --- from outside the server: copies and checks ------------------------------------------------


def examine(url: str) -> tuple[StoredState | None, list[str]]:
    """What the database holds (read in one snapshot, changing nothing), and what is wrong with it."""
    where = redacted(url)
    try:
        conn = connect(url, "evcharge-check")
    except StoreError as exc:
        return None, [str(exc)]
    try:
        version = schema_version(conn)
        conn.commit()
        if version == 0:
            return None, [f"no store at {where}"]
        if version != SCHEMA_VERSION:
            return None, [f"store {where} has schema version {version}, this evcharge {SCHEMA_VERSION}"]
        return read_state(conn), []
    except DamagedStoreError as exc:
        return None, [f"store {where}: {exc}"]
    except psycopg.Error as exc:
        return None, [f"store {where}: {_first_line(exc)}"]
    finally:
        conn.close()


def copy_into(url: str, state: StoredState, operator_id: str) -> None:
    """Write ``state`` into the (new or empty) store at ``url``, in one transaction, its server not running.

    Refused if the database already holds books, or if an ``evcharge server`` of the operator
    holds its lock.
    """
    where = redacted(url)
    conn = connect(url, "evcharge-migrate")
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key(operator_id))).fetchone()
        conn.commit()
        if not (row and row[0]):
            raise StoreError(f"store {where}: a server of operator {operator_id} is running on it: stop it first")
        migrate(conn)
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM trips) "
            "+ (SELECT count(*) FROM charging_sessions) + (SELECT count(*) FROM charge_records)"
        ).fetchone()
        conn.commit()
        if counts is not None and counts[0]:
            raise StoreError(f"store {where} already holds books ({counts[0]} rows): copy only into an empty database")
        try:
            with conn.pipeline():
                cur = conn.cursor()
                for kind, params in rows_as_ops(state):
                    if kind == "meta" and params[0] in ("store_id", "backup_taken"):
                        continue  # SQLite's own
                    cur.execute(POSTGRES_OPS[kind], params)
            conn.commit()
        except psycopg.Error as exc:
            _rollback(conn)
            raise StoreError(f"store {where}: the copy failed, nothing was written: {_first_line(exc)}") from None
    finally:
        conn.close()
