"""What every store has in common: the rows, the store-neutral writes, and the group-commit engine.

A write is an ``Op``: the kind of row (``reservation``, ``trip``, ``meta`` ...)
and its values, in the columns' order of ``TABLES``. Each backend renders a
kind as its own SQL (SQLite's ``INSERT OR REPLACE``, PostgreSQL's ``ON
CONFLICT``), so the server never knows which store it has.

``ThreadedStore`` is the engine both backends share: ``commit`` queues a
batch and returns a future; one writer thread takes everything queued, runs
it in one transaction and commits once (group commit), then resolves the
batch's futures. A commit that fails turns the store ``failed`` until the owner
re-read it (``reread``), found it writable (``probe``) and called ``resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evcharge.domain.model import ChargeRecord, ChargingSession, Outcome, Reservation, Trip

log = logging.getLogger(__name__)

Op = tuple[str, tuple[Any, ...]]  # (kind, values): rendered as SQL by each backend

# The kinds of write, each rendered by every backend (``SQLITE_OPS``, ``POSTGRES_OPS``).
RESERVATION = "reservation"  # upsert by id
SESSION = "session"  # upsert by reservation id
TRIP = "trip"  # upsert by id
TRIP_UNACKED = "trip_unacked"  # update a stored trip's unacked (the only column acknowledgements change)
OUTCOME = "outcome"  # upsert by (scope, key)
FORGET_OUTCOMES = "forget_outcomes"  # delete outcomes created before (real seconds)
RECORD = "record"  # insert; the same charge record again changes nothing
META = "meta"  # upsert by key
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
OP_KINDS = (RESERVATION, SESSION, TRIP, TRIP_UNACKED, OUTCOME, FORGET_OUTCOMES, RECORD, META)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # int | real | text | bytes
    nullable: bool = False


def _cols(spec: str) -> tuple[Column, ...]:
    """``"id text, trip_id text?"``: name and type, ``?`` when it may be NULL."""
    out = []
    for part in spec.split(","):
        name, kind = part.split()
        out.append(Column(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(out)


# The schema every backend's migrations build (tests/test_store_schema.py checks both), the
# columns in their order; the primary key of each table is named in ``PRIMARY_KEYS``.
TABLES: dict[str, tuple[Column, ...]] = {
    "meta": _cols("key text, value text"),
    "reservations": _cols(
        "id text, charge_point_id text, vehicle_id text, start int, end int, state text, created int, "
        "trip_id text?, hold_deadline real?, txn_id text?, coordinator text?"
    ),
    "charging_sessions": _cols(
        "reservation_id text, vehicle_id text, charge_point_id text, started int, ended int?, kwh real, "
        "price_per_kwh real, cost real, home text?, delivered int"
    ),
    "trips": _cols(
        "id text, vehicle_id text, state text, txn_id text, participants text, unacked text, info text, created int"
    ),
    "outcomes": _cols("scope text, key text, fingerprint text, reply bytes, created real"),
    "charge_records": _cols(
        "reservation_id text, owner text, vehicle_id text, station_id text, city text, charge_point_id text, "
        "started int, ended int, kwh real, price_per_kwh real, cost real"
    ),
}
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "meta": ("key",),
    "reservations": ("id",),
    "charging_sessions": ("reservation_id",),
    "trips": ("id",),
    "outcomes": ("scope", "key"),
    "charge_records": ("reservation_id",),
}
# Which columns each kind of write fills, in order (the rest keep their defaults).
OP_COLUMNS: dict[str, tuple[str, ...]] = {
    RESERVATION: tuple(c.name for c in TABLES["reservations"]),
    SESSION: tuple(c.name for c in TABLES["charging_sessions"]),
    TRIP: tuple(c.name for c in TABLES["trips"]),
    OUTCOME: tuple(c.name for c in TABLES["outcomes"]),
    RECORD: tuple(c.name for c in TABLES["charge_records"]),
    META: ("key", "value"),
}
OP_TABLES = {
    RESERVATION: "reservations",
    SESSION: "charging_sessions",
    TRIP: "trips",
    OUTCOME: "outcomes",
    RECORD: "charge_records",
    META: "meta",
}


class StoreError(Exception):
    """The change could not be made durable; it was not acknowledged."""


class DamagedStoreError(StoreError):
    """The store is damaged, emptied or another's: nobody may be served from it."""


class StoreInDoubt(StoreError):
    """The connection broke while the commit was under way: the change may or may not have been made."""


class StoreLost(StoreError):
    """Another server of this operator took the store over: this one must stop serving."""


@dataclass
class StoredState:
    reservations: list[Reservation] = field(default_factory=list)
    sessions: list[ChargingSession] = field(default_factory=list)
    trips: list[Trip] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    records: list[ChargeRecord] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


# --- the writes, store-neutral ---------------------------------------------------------------


def put_reservation(r: Reservation) -> Op:
    return (
        RESERVATION,
        (
            r.id,
            r.charge_point_id,
            r.vehicle_id,
            r.start,
            r.end,
            r.state,
            r.created,
            r.trip_id,
            r.hold_deadline,
            r.txn_id,
            r.coordinator,
        ),
    )


def put_trip(t: Trip) -> Op:
    return (
        TRIP,
        (
            t.id,
            t.vehicle_id,
            t.state,
            t.txn_id,
            json.dumps(t.participants),
            json.dumps(t.unacked),
            t.info.decode(),
            t.created,
        ),
    )


def put_trip_unacked(t: Trip) -> Op:
    """Who has not acknowledged the decision yet, for a trip whose row is stored already."""
    return (TRIP_UNACKED, (json.dumps(t.unacked), t.id))


def put_session(s: ChargingSession) -> Op:
    return (
        SESSION,
        (
            s.reservation_id,
            s.vehicle_id,
            s.charge_point_id,
            s.started,
            s.ended,
            s.kwh,
            s.price_per_kwh,
            s.cost,
            s.home,
            int(s.delivered),
        ),
    )


def put_outcome(o: Outcome) -> Op:
    return (OUTCOME, (o.scope, o.key, o.fingerprint, o.reply, o.created))


def forget_outcomes(before: float) -> Op:
    return (FORGET_OUTCOMES, (before,))


def put_record(r: ChargeRecord) -> Op:
    """A charge record received from its owner; the same one again changes nothing."""
    return (
        RECORD,
        (
            r.reservation_id,
            r.owner,
            r.vehicle_id,
            r.station_id,
            r.city,
            r.charge_point_id,
            r.started,
            r.ended,
            r.kwh,
            r.price_per_kwh,
            r.cost,
        ),
    )


def put_meta(key: str, value: str) -> Op:
    return (META, (key, value))


def rows_as_ops(state: StoredState) -> list[Op]:
    """Every row of ``state`` as the writes that put it into an empty store (a copy between stores)."""
    return [
        *(put_meta(k, v) for k, v in state.meta.items()),
        *map(put_reservation, state.reservations),
        *map(put_session, state.sessions),
        *map(put_trip, state.trips),
        *map(put_outcome, state.outcomes),
        *map(put_record, state.records),
    ]


# --- reading, the same SQL for every backend --------------------------------------------------

Run = Callable[[str], Iterable[Sequence[Any]]]


def read_rows(run: Run) -> StoredState:
    """Everything in a store, as stored; ``run(sql)`` gives the rows of one query."""
    state = StoredState()
    for row in run(
        'SELECT id, charge_point_id, vehicle_id, start, "end", state, created, trip_id, hold_deadline, '
        "txn_id, coordinator FROM reservations ORDER BY start, id"
    ):
        state.reservations.append(Reservation(*row))
    for row in run(
        "SELECT reservation_id, vehicle_id, charge_point_id, started, price_per_kwh, ended, kwh, home, delivered "
        "FROM charging_sessions ORDER BY started, reservation_id"
    ):
        rid, vehicle, cp_id, started, price, ended, kwh, home, delivered = row
        state.sessions.append(ChargingSession(rid, vehicle, cp_id, started, price, ended, kwh, home, bool(delivered)))
    for row in run(
        "SELECT id, vehicle_id, state, txn_id, participants, unacked, info, created FROM trips ORDER BY created, id"
    ):
        tid, vehicle, trip_state, txn, participants, unacked, info, created = row
        try:
            trip = Trip(
                tid, vehicle, trip_state, txn, json.loads(participants), json.loads(unacked), info.encode(), created
            )
        except (ValueError, TypeError, AttributeError):
            raise DamagedStoreError(
                f"table trips, row {tid!r}: participants, unacked or info is not text of JSON"
            ) from None
        state.trips.append(trip)
    for scope, key, fingerprint, reply, created in run(
        "SELECT scope, key, fingerprint, reply, created FROM outcomes ORDER BY scope, key"
    ):
        state.outcomes.append(Outcome(scope, key, fingerprint, bytes(reply), created))
    for row in run(
        "SELECT reservation_id, owner, vehicle_id, station_id, city, charge_point_id, started, ended, kwh, "
        "price_per_kwh, cost FROM charge_records ORDER BY started, reservation_id"
    ):
        state.records.append(ChargeRecord(*row))
    state.meta = {str(k): str(v) for k, v in run("SELECT key, value FROM meta")}
    return state


# --- the group-commit engine ---------------------------------------------------------------

_STOP = object()


class _Batch:
    __slots__ = ("future", "ops")

    def __init__(self, ops: list[Op], future: asyncio.Future[None]) -> None:
        self.ops = ops
        self.future = future


class ThreadedStore:
    """One writer thread, one transaction per batch; the backend gives ``_transaction``, ``_read``, ``_probe``."""

    where: str  # the store as named to a person (a file, a database without its password)

    def __init__(self) -> None:
        self.failed = False
        self.on_failure: Callable[[], object] | None = None  # called on the loop when a commit fails
        self.on_lost: Callable[[], object] | None = None  # called on the loop when another server took over
        self.commits = 0  # transactions committed (for benchmarks and tests)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- what a backend provides: open, start, abandon, close (on the loop); the rest on the writer thread ---

    def open(self) -> StoredState:
        """Check, create or migrate the store and read everything in it (before serving; blocking)."""
        raise NotImplementedError

    def start(self) -> None:
        """Serve from this store: the writer thread takes changes."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Give up an ``open`` that still waits (for another server to let go of the store)."""

    async def close(self) -> None:
        """Commit whatever is queued, stop the writer thread, let go of the store."""
        raise NotImplementedError

    def _transaction(self, ops: list[Op]) -> Exception | None:
        """Run ``ops`` in one transaction and commit; the error instead, rolled back."""
        raise NotImplementedError

    def _read(self) -> StoredState:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    def _batches_failed(self, batches: list[_Batch], error: Exception) -> list[Exception | None]:
        """The error of each batch of a failed group: by default, the group's for all of them."""
        return [error] * len(batches)

    # --- the loop's side ---

    def _start_thread(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="evcharge-store", daemon=True)
        self._thread.start()

    def commit(self, ops: list[Op]) -> asyncio.Future[None]:
        """Queue ``ops`` for the next group commit; the future resolves once durable."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(StoreError("the store is closed"))
        elif self.failed:
            future.set_exception(StoreError("the store cannot be written"))
        else:
            self._queue.put(_Batch(ops, future))
        return future

    async def reread(self) -> StoredState:
        """What is stored, read after everything queued before this call."""
        state: StoredState = await self._ask_thread("reread")
        return state

    async def probe(self) -> bool:
        """Whether a write goes through now."""
        writable: bool = await self._ask_thread("probe")
        return writable

    def resume(self) -> None:
        """Accept changes again (the owner's memory matches the store)."""
        self.failed = False

    async def _ask_thread(self, what: str) -> Any:
        assert self._loop is not None
        if self._thread is None or not self._thread.is_alive():
            raise StoreError("the store is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((what, future))
        return await future

    async def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # --- the writer thread ---

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[_Batch] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Batch):
                    batch.append(item)
                else:
                    self._flush(batch)
                    batch = []
                    self._answer(*item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._flush(batch)
            if stop:
                return

    def _flush(self, batch: list[_Batch]) -> None:
        if not batch:
            return
        errors: list[Exception | None]
        if self.failed:
            errors = [StoreError("the store cannot be written")] * len(batch)
        else:
            error = self._transaction([op for b in batch for op in b.ops])
            if error is None:
                self.commits += 1
                errors = [None] * len(batch)
            else:
                errors = self._batches_failed(batch, error)
                if any(e is not None for e in errors):
                    self.failed = True
                    log.error("store %s: commit failed, refusing changes until it recovers: %s", self.where, error)
        self._call_loop(_resolve_batch, batch, errors)
        if self.failed and self.on_failure is not None:
            self._call_loop(self.on_failure)
        lost = next((e for e in errors if isinstance(e, StoreLost)), None)
        if lost is not None and self.on_lost is not None:
            self._call_loop(self.on_lost)

    def _answer(self, what: str, future: asyncio.Future[Any]) -> None:
        try:
            result = self._read() if what == "reread" else self._probe()
        except StoreLost as exc:
            self._call_loop(_set_exception, future, exc)
            if self.on_lost is not None:
                self._call_loop(self.on_lost)
            return
        except Exception as exc:  # the thread lives on; the owner tries again
            self._call_loop(_set_exception, future, StoreError(f"store read failed: {exc}"))
            return
        self._call_loop(_set_result, future, result)

    def _call_loop(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self._loop.call_soon_threadsafe(fn, *args)


def _resolve_batch(batch: list[_Batch], errors: list[Exception | None]) -> None:
    for item, error in zip(batch, errors, strict=True):
        if item.future.done():
            continue
        if error is None:
            item.future.set_result(None)
        else:
            item.future.set_exception(error if isinstance(error, StoreError) else StoreError(str(error)))


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
