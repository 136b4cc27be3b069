"""What the OCPI edge keeps across restarts: registered parties and their tokens, bookings, sessions seen.

A small SQLite file in the edge's data directory (WAL, ``synchronous=FULL``): each
write is committed before the request that made it is answered. Writes (and so their
fsync) run in one thread of their own, in the order they were asked for, never on the
event loop; those asked for while a transaction is on its way to the disk share the next
one (group commit). Reads are quick lookups on the loop and see every write awaited. Reservations
themselves live only in the operator's ledger; here are only OCPI's names for
them (a booking's id and request id, an eMSP's reservation id) and what was
pushed to whom.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Statement = tuple[str, Any]  # SQL and its parameters (a list of rows: executemany)

SCHEMA = """
CREATE TABLE IF NOT EXISTS used_registration_tokens (digest TEXT PRIMARY KEY, registration TEXT, at REAL);
CREATE TABLE IF NOT EXISTS registrations (
    id TEXT PRIMARY KEY, token_c TEXT UNIQUE, token_b TEXT, versions_url TEXT, endpoints TEXT, roles TEXT,
    created REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    party TEXT, uid TEXT, type TEXT, body TEXT, last_updated TEXT, PRIMARY KEY (party, uid, type)
);
CREATE TABLE IF NOT EXISTS drivers (
    driver TEXT PRIMARY KEY, token TEXT, auth_method TEXT, authorization_reference TEXT
);
CREATE TABLE IF NOT EXISTS reservation_ids (party TEXT, ocpi_id TEXT, reservation_id TEXT, driver TEXT,
    start TEXT, PRIMARY KEY (party, ocpi_id));
CREATE TABLE IF NOT EXISTS sessions (
    reservation_id TEXT PRIMARY KEY, started TEXT, ended TEXT, pushed TEXT DEFAULT '', cdr_pushed INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS evse_status (uid TEXT PRIMARY KEY, status TEXT, updated TEXT);
CREATE TABLE IF NOT EXISTS bookings (
    id TEXT PRIMARY KEY, party TEXT, request_id TEXT, request TEXT, reservation_id TEXT, driver TEXT,
    status TEXT, canceled TEXT, requests TEXT, received TEXT, last_updated TEXT, pushed TEXT DEFAULT '',
    evse_uid TEXT, UNIQUE (party, request_id)
);
"""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class Registration:
    """One party (or hub) registered with us through the credentials handshake."""

    id: str
    token_c: str  # SHA-256 (hex) of the token it uses with us: the token itself is kept nowhere
    token_b: str  # the token we use with it
    versions_url: str
    endpoints: dict[str, str]  # "<module>.<role>" -> url (their side)
    roles: list[dict[str, Any]]  # their credentials roles

    @property
    def parties(self) -> set[str]:
        """Its parties, "CC-PID" (a hub has many)."""
        return {f"{r['country_code'].upper()}-{r['party_id'].upper()}" for r in self.roles}

    def endpoint(self, module: str, role: str = "RECEIVER") -> str | None:
        return self.endpoints.get(f"{module}.{role}")


@dataclass(slots=True)
class BookingRow:
    id: str
    party: str
    request_id: str
    request: dict[str, Any]
    reservation_id: str
    driver: str
    status: str  # REJECTED / FAILED when refused; else derived from the reservation
    canceled: dict[str, Any] | None
    requests: list[dict[str, Any]]
    received: str
    last_updated: str
    pushed: str
    evse_uid: str  # the charge point booked (or the one asked for)


class EdgeStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writes = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._writes.execute("PRAGMA journal_mode=WAL")
        self._writes.execute("PRAGMA synchronous=FULL")
        self._writes.executescript(SCHEMA)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ocpi-store")  # one: writes stay in order
        self.db = sqlite3.connect(path, isolation_level=None)  # reads, on the loop
        self._drivers: dict[str, tuple[str, str, str, str | None]] = {}  # as last written
        # Writes asked for while one transaction is on its way to the disk go in the next, together.
        self._queued: list[tuple[tuple[Statement, ...], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)  # what was asked for is written first
        self._writer.shutdown(wait=True)
        self._writes.close()
        self.db.close()

    async def _commit(self, *statements: Statement) -> None:
        """``statements`` in one transaction (shared with other writes asked for meanwhile), done once on disk."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queued.append((statements, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await asyncio.shield(done)  # a caller that gives up does not take the write back

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await loop.run_in_executor(self._writer, self._transaction, [s for stmts, _ in batch for s in stmts])
            except Exception as exc:  # each writer hears it: nothing of the batch was stored
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)

    def _transaction(self, statements: list[Statement]) -> None:
        with self._writes:
            self._writes.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                if isinstance(args, list):
                    self._writes.executemany(sql, args)
                else:
                    self._writes.execute(sql, args)

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        await self._commit((sql, args))

    # --- registration ----------------------------------------------------------------------

    def registration_token_used(self, token: str) -> bool:
        row = self.db.execute("SELECT 1 FROM used_registration_tokens WHERE digest = ?", (digest(token),)).fetchone()
        return row is not None

    def registrations(self) -> list[Registration]:
        rows = self.db.execute(
            "SELECT id, token_c, token_b, versions_url, endpoints, roles FROM registrations"
        ).fetchall()
        return [Registration(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]

    async def save_registration(self, reg: Registration, token_a: str | None) -> None:
        """Store (or replace) it, and use up the registration token it came with, in one transaction."""
        row = (
            reg.id,
            reg.token_c,
            reg.token_b,
            reg.versions_url,
            json.dumps(reg.endpoints),
            json.dumps(reg.roles),
            time.time(),
        )
        statements: list[Statement] = [("INSERT OR REPLACE INTO registrations VALUES (?, ?, ?, ?, ?, ?, ?)", row)]
        if token_a is not None:
            used = (digest(token_a), reg.id, time.time())
            statements.append(("INSERT OR IGNORE INTO used_registration_tokens VALUES (?, ?, ?)", used))
        await self._commit(*statements)

    async def delete_registration(self, reg_id: str) -> None:
        await self._write("DELETE FROM registrations WHERE id = ?", (reg_id,))

    # --- tokens ----------------------------------------------------------------------------------

    async def put_token(self, party: str, uid: str, type_: str, body: dict[str, Any], last_updated: str) -> bool:
        """Store a token; True if it is new."""
        known = self.token(party, uid, type_) is not None
        await self._write(
            "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?)", (party, uid, type_, json.dumps(body), last_updated)
        )
        return not known

    def token(self, party: str, uid: str, type_: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT body FROM tokens WHERE party = ? AND uid = ? AND type = ?", (party, uid, type_)
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def token_any_type(self, party: str, uid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT body FROM tokens WHERE party = ? AND uid = ?", (party, uid)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    # --- drivers, reservations, sessions -----------------------------------------------------------

    async def remember_driver(
        self, driver: str, token: dict[str, Any], auth_method: str, reference: str | None
    ) -> None:
        """The token a driver came with (for its sessions' and CDRs' ``cdr_token``); written only when new."""
        row = (driver, json.dumps(token, sort_keys=True), auth_method, reference)
        if self._drivers.get(driver) == row:
            return  # each write is a commit (an fsync): a driver booking again writes nothing
        await self._write("INSERT OR REPLACE INTO drivers VALUES (?, ?, ?, ?)", row)
        self._drivers[driver] = row

    def driver(self, driver: str) -> tuple[dict[str, Any], str, str | None] | None:
        row = self.db.execute(
            "SELECT token, auth_method, authorization_reference FROM drivers WHERE driver = ?", (driver,)
        ).fetchone()
        return None if row is None else (dict(json.loads(row[0])), row[1], row[2])

    async def map_reservation(self, party: str, ocpi_id: str, reservation_id: str, driver: str, start: str) -> None:
        """An eMSP's reservation id: first its start (before asking), then ours (once booked)."""
        await self._write(
            "INSERT OR REPLACE INTO reservation_ids VALUES (?, ?, ?, ?, ?)",
            (party, ocpi_id, reservation_id, driver, start),
        )

    def reservation_of(self, party: str, ocpi_id: str) -> tuple[str, str, str] | None:
        """(our reservation id or "", driver, start) of an eMSP's reservation id."""
        row = self.db.execute(
            "SELECT reservation_id, driver, start FROM reservation_ids WHERE party = ? AND ocpi_id = ?",
            (party, ocpi_id),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def sessions(self) -> dict[str, tuple[str, str, str, bool]]:
        """reservation id -> (started, ended, status pushed, CDR pushed)."""
        rows = self.db.execute("SELECT reservation_id, started, ended, pushed, cdr_pushed FROM sessions").fetchall()
        return {r[0]: (r[1] or "", r[2] or "", r[3] or "", bool(r[4])) for r in rows}

    async def session_seen(self, reservation_id: str, *, started: str = "", ended: str = "") -> None:
        rid = reservation_id
        statements: list[Statement] = [("INSERT OR IGNORE INTO sessions (reservation_id) VALUES (?)", (rid,))]
        if started:
            sql = "UPDATE sessions SET started = ? WHERE reservation_id = ? AND started IS NULL"
            statements.append((sql, (started, rid)))
        if ended:
            sql = "UPDATE sessions SET ended = ? WHERE reservation_id = ? AND ended IS NULL"
            statements.append((sql, (ended, rid)))
        await self._commit(*statements)

    async def session_pushed(self, reservation_id: str, status: str) -> None:
        await self._write("UPDATE sessions SET pushed = ? WHERE reservation_id = ?", (status, reservation_id))

    async def cdr_pushed(self, reservation_id: str) -> None:
        await self._write("UPDATE sessions SET cdr_pushed = 1 WHERE reservation_id = ?", (reservation_id,))

    # --- EVSE status as last seen (a restarted edge pushes what changed while it was down) -----------------

    def evse_statuses(self) -> dict[str, tuple[str, str]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT uid, status, updated FROM evse_status")}

    async def save_evse_statuses(self, changed: list[tuple[str, str, str]]) -> None:
        """(uid, status, updated) of every EVSE that changed in one look: one transaction."""
        await self._commit(("INSERT OR REPLACE INTO evse_status VALUES (?, ?, ?)", changed))

    # --- bookings ----------------------------------------------------------------------------------

    async def put_booking(self, b: BookingRow) -> None:
        await self._write(
            "INSERT OR REPLACE INTO bookings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                b.id,
                b.party,
                b.request_id,
                json.dumps(b.request),
                b.reservation_id,
                b.driver,
                b.status,
                json.dumps(b.canceled) if b.canceled is not None else None,
                json.dumps(b.requests),
                b.received,
                b.last_updated,
                b.pushed,
                b.evse_uid,
            ),
        )

    def bookings(self) -> list[BookingRow]:
        rows = self.db.execute("SELECT * FROM bookings ORDER BY received, id").fetchall()
        return [
            BookingRow(
                r[0],
                r[1],
                r[2],
                json.loads(r[3]),
                r[4],
                r[5],
                r[6],
                json.loads(r[7]) if r[7] else None,
                json.loads(r[8]),
                r[9],
                r[10],
                r[11],
                r[12] or "",
            )
            for r in rows
        ]
