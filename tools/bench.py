"""Benchmarks: real server processes on loopback, driven by concurrent clients.

    python -m tools.bench [--quick] [--out bench/results.json] [--scenarios a,b,...]

Every scenario starts its own servers (``python -m evcharge server``) as child
processes in a fresh data directory and drives them with the same load
generator: C connections (``evcharge.links.client.Client``), each keeping one request
in flight (closed loop) for a fixed time after a short warm-up; every request's
latency is taken with ``time.perf_counter``. The first scenario, *ceiling*, runs
an echo server with exactly our framing and codec on uvloop, driven by the same
clients: the most any request/response can do on this machine. The echo server
stays up all run and a ceiling window is measured right before every other
closed-loop scenario, whose throughput is reported as a ratio to that window
(the machine is shared and noisy). Nothing here asserts a speed: the numbers go
to a table and a JSON file.

Scenarios: ceiling, status, reserve, trips, planning, noisy, contention, scale (see
docs/performance.md for what each measures and how).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from rich.console import Console
from rich.table import Table

from evcharge.apps.invariants import violations
from evcharge.apps.simulator import ChargePointSim
from evcharge.domain import geo
from evcharge.domain.model import LIVE_STATES, Reservation
from evcharge.domain.world import ChargePointConfig, StationConfig, World, load_world
from evcharge.links.client import Client, open_client
from evcharge.operator.trips.planning import MAX_PLANS_SHOWN
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, ConnectionLostError, EvchargeError
from tools import plan_quality
from tools.harness import (
    HOST,
    ROOT,
    ROUTES,
    SPANNING_ROUTE,
    Child,
    HarnessError,
    OcpiEdgeProcess,
    ServerProcess,
    bench_vehicle_id,
    bench_vehicles,
    free_ports,
    inspect_operators,
    read_json,
    seed_store,
    sigterm_cancels,
    tail,
    wait_federated,
    write_atomically,
    write_json,
    write_world,
)
from tools.postgres import PostgresServer

SCENARIOS = (
    "ceiling",
    "status",
    "reserve",
    "trips",
    "postgresql",
    "planning",
    "noisy",
    "contention",
    "scale",
    "ocpi",
)
LARGE_WORLD = "brazil-northeast"  # the planning scenario's: real size
SCALE_PREFIX = "SC"  # generated stations of the scale world
GRID_S = 120  # reservation grid: preloaded reservations take [cell, cell+60), the benchmark's [cell+60, cell+120)
GRID_DAYS = 26
CONTENTION_ROUTE = SPANNING_ROUTE  # every operator has stops on it


@dataclass(frozen=True)
class Settings:
    quick: bool
    connections: int
    duration: float  # seconds measured per closed-loop run
    warmup: float
    trip_duration: float  # bookings take tens to hundreds of ms: a longer window even when quick
    flood_connections: int  # the noisy neighbour's connections, each with flood_in_flight plans at once
    flood_in_flight: int
    contention_vehicles: int
    scale_charge_points: int
    heartbeat_interval: float
    heartbeat_warmup: float
    heartbeat_duration: float
    heartbeat_processes: int
    ledger_sizes: tuple[int, ...]
    ledger_rounds: int
    server_log_level: str

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            connections=args.connections or (4 if quick else 32),
            duration=args.duration or (0.7 if quick else 5.0),
            warmup=0.3 if quick else 1.0,
            trip_duration=max(2.0, args.duration or 0.0) if quick else (args.duration or 5.0),
            flood_connections=2 if quick else 8,
            flood_in_flight=16 if quick else 64,
            contention_vehicles=100,
            scale_charge_points=args.charge_points or (200 if quick else 10_000),
            heartbeat_interval=0.5 if quick else 5.0,
            heartbeat_warmup=0.5 if quick else 5.0,
            heartbeat_duration=1.0 if quick else 10.0,
            heartbeat_processes=1 if quick else 2,
            ledger_sizes=(1_000,) if quick else (1_000, 10_000, 100_000),
            ledger_rounds=1 if quick else 3,
            server_log_level=args.server_log_level,
        )


class BenchError(HarnessError):
    pass


# --- statistics ------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    ms = 1000.0
    return {
        "count": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered) * ms, 3) if ordered else 0.0,
        "p50_ms": round(percentile(ordered, 0.50) * ms, 3),
        "p90_ms": round(percentile(ordered, 0.90) * ms, 3),
        "p99_ms": round(percentile(ordered, 0.99) * ms, 3),
        "max_ms": round((ordered[-1] if ordered else 0.0) * ms, 3),
    }


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used in the window, per process
    raw: LoadResult | None = None  # of a ceiling window: the raw window measured just before it


Op = Callable[[int, Counter[str]], Awaitable[dict[str, float] | None]]


async def closed_loop(
    workers: int, op: Op, duration: float, warmup: float, pids: dict[str, int] | None = None
) -> LoadResult:
    """``workers`` loops, each with one request in flight, for ``warmup`` + ``duration`` seconds.

    An operation counts when it completes within the measured window (so the
    throughput is completions per second); ``op`` may return the latencies of
    its parts (e.g. reserve and cancel) and count notes (e.g. re-planned
    trips). The CPU time of ``pids`` (the servers) and of this process (the
    clients) over the window goes to ``cpu``.
    """
    result = LoadResult(seconds=duration)
    begin = time.perf_counter() + warmup
    end = begin + duration

    async def worker(i: int) -> None:
        notes: Counter[str] = Counter()  # one per worker, emptied per operation: a new one costs as much as an echo
        while time.perf_counter() < end:
            notes.clear()
            t0 = time.perf_counter()
            try:
                parts = await op(i, notes)
            except ConnectionLostError:
                raise
            except EvchargeError as exc:
                if begin <= time.perf_counter() <= end:
                    result.errors[exc.code] += 1
                await asyncio.sleep(0.001)
                continue
            t1 = time.perf_counter()
            if begin <= t1 <= end:
                result.latencies.append(t1 - t0)
                if notes:
                    result.notes.update(notes)
                if parts:
                    for name, seconds in parts.items():
                        result.parts[name].append(seconds)

    async def sample() -> None:
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        before = cpu_times(pids or {})
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        after = cpu_times(pids or {})
        result.cpu = {name: round(after[name] - before[name], 3) for name in after}

    await asyncio.gather(sample(), *(worker(i) for i in range(workers)))
    return result


class RawEchoClient(asyncio.Protocol):
    """The raw ceiling's client: our framing and codec driven from ``data_received``.

    One request in flight, as the closed loop's clients keep, but no task, future,
    timeout or request id table per request: what any client of this framing could
    at most do on this machine.
    """

    def __init__(self, begin: float, end: float, latencies: list[float], done: asyncio.Future[None]) -> None:
        self.frames = p.FrameBuffer()
        self.begin, self.end = begin, end
        self.latencies = latencies
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.next_id = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        hello = p.Hello(version=p.PROTOCOL_VERSION, role="vehicle", ident="raw", credential="echo-secret", id=1)
        transport.write(p.encode_frame(hello))  # type: ignore[attr-defined]

    def _send(self) -> None:
        assert self.transport is not None
        self.next_id += 1
        self.sent_at = time.perf_counter()
        self.transport.write(p.encode_frame(p.Heartbeat(id=self.next_id)))

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        while (body := self.frames.next_body()) is not None:
            message = p.decode_body(body)
            now = time.perf_counter()
            if isinstance(message, p.HeartbeatAck) and self.begin <= now <= self.end:
                self.latencies.append(now - self.sent_at)
            if now < self.end:
                self._send()
            elif not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def raw_window(
    host: str, port: int, connections: int, duration: float, warmup: float, pids: dict[str, int] | None = None
) -> LoadResult:
    """The raw ceiling: ``connections`` callback clients (``RawEchoClient``) against the echo server."""
    loop = asyncio.get_running_loop()
    result = LoadResult(seconds=duration)
    begin = time.perf_counter() + warmup
    end = begin + duration
    per_client: list[list[float]] = [[] for _ in range(connections)]
    dones: list[asyncio.Future[None]] = [loop.create_future() for _ in range(connections)]
    transports: list[asyncio.BaseTransport] = []
    for i in range(connections):
        client = RawEchoClient(begin, end, per_client[i], dones[i])
        opened, _ = await loop.create_connection(lambda client=client: client, host, port)  # type: ignore[misc]
        transports.append(opened)
    try:
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        before = cpu_times(pids or {})
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        after = cpu_times(pids or {})
        result.cpu = {name: round(after[name] - before[name], 3) for name in after}
        async with asyncio.timeout(10):
            await asyncio.gather(*dones)
    finally:
        for each in transports:
            each.close()
    result.latencies = [x for mine in per_client for x in mine]
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    times = {name: cpu_seconds(pid) for name, pid in pids.items()}
    times["client"] = time.process_time()
    return times


def row(
    scenario: str,
    connections: int,
    operations: int,
    seconds: float,
    latencies: list[float],
    *,
    closed_loop: bool = True,
    rss: dict[str, float] | None = None,
    cpu: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    cpu = cpu or {}
    server_cpu = sum(v for k, v in cpu.items() if k != "client")
    return {
        "scenario": scenario,
        "connections": connections,
        "operations": operations,
        "seconds": round(seconds, 3),
        "ops_per_s": round(operations / seconds, 1) if seconds > 0 else 0.0,
        **latency_stats(latencies),
        "closed_loop": closed_loop,
        "ratio_to_ceiling": None,
        "p50_ratio_to_ceiling": None,
        "rss_mb": rss or {},
        # CPU cores busy during the window (server processes, and "client": this process)
        "cpu_util": {k: round(v / seconds, 2) for k, v in cpu.items()} if seconds > 0 else {},
        "server_cpu_ms_per_op": round(server_cpu / operations * 1000, 4) if operations and cpu else None,
        **extra,
    }


def load_row(
    scenario: str, connections: int, load: LoadResult, *, ops: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    """A closed-loop result as a row.

    By default each ``op`` call is one operation; ``ops`` names the parts that
    count as operations instead (each reserve and each cancel is a request, as
    each heartbeat of the ceiling is).
    """
    latencies = [x for name in ops for x in load.parts.get(name, [])] if ops else load.latencies
    parts = {name: latency_stats(values) for name, values in load.parts.items()}
    notes: dict[str, Any] = {"notes": dict(load.notes)} if load.notes else {}
    return row(
        scenario,
        connections,
        len(latencies),
        load.seconds,
        latencies,
        cpu=load.cpu,
        errors=dict(load.errors),
        parts=parts,
        **notes,
        **extra,
    )


# --- processes --------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return 0.0


class Fleet:
    """Every child process of a run; ``stop_all`` ends each of them, whatever happened."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[Child] = []

    def spawn(self, name: str, args: list[str]) -> Child:
        child = Child(name, self.work / f"{name}.log")
        self.children.append(child)
        child.launch(args)
        return child

    async def start_server(self, server: ServerProcess, timeout: float = 120.0) -> ServerProcess:
        self.children.append(server)
        return await server.start_async(timeout)

    def stop(self, child: Child, grace: float = 5.0) -> None:
        child.stop(grace)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in list(self.children):
            with contextlib.suppress(Exception):
                child.kill()
        self.children.clear()


# --- bench worlds -----------------------------------------------------------------------


def bench_world(
    path: Path,
    *,
    operators: tuple[str, ...],
    ports: dict[str, int] | None = None,
    vehicles_per_operator: int = 0,
    scale_charge_points: int = 0,
    seed: int = 1,
) -> World:
    """The shipped world cut to ``operators``, plus bench vehicles and generated charge points."""
    stations: list[StationConfig] = []
    if scale_charge_points:
        rng = random.Random(seed)
        cities = list(geo.CITIES.items())
        per_station = 4
        for n in range(1, math.ceil(scale_charge_points / per_station) + 1):
            city, (lat, lon) = cities[n % len(cities)]
            sid = f"{SCALE_PREFIX}{n:05d}"
            cps = [
                ChargePointConfig(
                    f"{sid}-{k}", float(rng.choice((22, 50, 150, 350))), "CCS2", 1.99, f"bench-cp-{sid}-{k}-secret"
                )
                for k in range(1, per_station + 1)
            ]
            stations.append(
                StationConfig(
                    sid,
                    operators[0],
                    f"Bench site {n}",
                    city,
                    round(lat + rng.uniform(-0.3, 0.3), 5),
                    round(lon + rng.uniform(-0.3, 0.3), 5),
                    cps,
                )
            )
    return write_world(
        path,
        operators=operators,
        ports=ports,
        vehicles=bench_vehicles(operators, vehicles_per_operator),
        stations=stations,
    )


def scale_charge_points(world: World) -> list[Any]:
    return [cp for s in world.stations if s.id.startswith(SCALE_PREFIX) for cp in s.charge_points]


async def preload_reservations(data_dir: Path, operator: str, charge_points: list[str], count: int, base: int) -> None:
    """Put ``count`` booked reservations into the operator's store before it starts.

    They take the first half of consecutive grid cells, round robin over
    ``charge_points``, so the benchmark's own reservations (second halves) fit
    between them and every conflict check bisects ledgers of count/len(cps).
    """
    now = int(time.time())
    reservations = []
    for j in range(count):
        start = base + (j // len(charge_points)) * GRID_S
        reservations.append(
            Reservation(
                id=f"{operator}-pre{j:07d}",
                charge_point_id=charge_points[j % len(charge_points)],
                vehicle_id=f"PRELOAD{j % 100:02d}",
                start=start,
                end=start + GRID_S // 2,
                state="booked",
                created=now,
            )
        )
    await seed_store(data_dir, operator, reservations)


# --- the run -----------------------------------------------------------------------------


@dataclass
class ReserveTarget:
    server: ServerProcess
    clients: list[Client]
    op: Op
    startup: float  # seconds from spawn to listening (loads the store)
    existing: int  # reservations preloaded


def disjoint_plans(shown: list[list[tuple[p.TripQuery, p.TripInfo]]]) -> list[list[tuple[p.TripQuery, p.TripInfo]]]:
    """Each connection's plans, less those sharing a slot with another connection's.

    A connection books its plans one after the other (each cancelled before the next), so
    only plans of different connections could take each other's slots: the measured
    bookings then do not race, as the contention scenario does on purpose. A connection
    left with none keeps its first: it will lose and re-plan (counted as re-planned).
    """
    taken: defaultdict[str, list[tuple[int, datetime, datetime]]] = defaultdict(list)  # by charge point
    kept: list[list[tuple[p.TripQuery, p.TripInfo]]] = [[] for _ in shown]
    for i, mine in enumerate(shown):
        for query, plan in mine:
            clash = any(
                j != i and s.slot_start < end and start < s.slot_end
                for s in plan.stops
                for j, start, end in taken[s.charge_point_id]
            )
            if not clash:
                kept[i].append((query, plan))
                for s in plan.stops:
                    taken[s.charge_point_id].append((i, s.slot_start, s.slot_end))
        if not kept[i] and mine:
            kept[i].append(mine[0])
    return kept


def merge_loads(loads: list[LoadResult]) -> LoadResult:
    merged = LoadResult(seconds=sum(x.seconds for x in loads))
    for x in loads:
        merged.latencies += x.latencies
        for name, values in x.parts.items():
            merged.parts[name] += values
        merged.errors.update(x.errors)
        merged.notes.update(x.notes)
        for name, seconds in x.cpu.items():
            merged.cpu[name] = round(merged.cpu.get(name, 0.0) + seconds, 3)
    return merged


class Bench:
    def __init__(self, settings: Settings, work: Path, console: Console) -> None:
        self.settings = settings
        self.work = work
        self.console = console
        self.fleet = Fleet(work)
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._counter = 0
        self.echo: Child | None = None
        self.echo_clients: list[Client] = []
        self.ceilings: list[float] = []  # ops/s of every ceiling window of the run
        self.raw_ceilings: list[float] = []  # ops/s of every raw ceiling window of the run
        self.last_raw: LoadResult | None = None
        # Reservations of the benchmark go on a grid of cells from the day after tomorrow on.
        self.grid_base = (int(time.time()) // 86400 + 2) * 86400
        self.postgres: PostgresServer | None = None  # while the postgresql scenario runs: its servers' store

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]==>[/] {text}")

    def fresh(self, name: str) -> Path:
        self._counter += 1
        path = self.work / f"{self._counter:02d}-{name}"
        path.mkdir(parents=True)
        return path

    # --- servers ---------------------------------------------------------------------

    async def start_server(
        self,
        world_path: Path,
        operator: str,
        data_dir: Path,
        *,
        world_port: bool = False,
        clock_anchor: float | None = None,
    ) -> tuple[ServerProcess, float]:
        name = f"{data_dir.parent.name}-server-{operator}"
        store = () if self.postgres is None else ("--store", self.postgres.fresh_database(f"bench_{operator}"))
        server = ServerProcess(
            world_path,
            operator,
            data_dir,
            self.work / f"{name}.log",
            name=name,
            time_scale=1.0,
            log_level=self.settings.server_log_level,
            clock_anchor=clock_anchor,
            world_port=world_port,
            extra=store,
        )
        await self.fleet.start_server(server, timeout=120.0)
        return server, server.startup_s

    async def start_federation(self, name: str, vehicles_per_operator: int) -> tuple[World, dict[str, ServerProcess]]:
        base = self.fresh(name)
        ports = dict(zip("ABC", free_ports(3), strict=True))
        world_path = base / "world.toml"
        world = bench_world(
            world_path, operators=("A", "B", "C"), ports=ports, vehicles_per_operator=vehicles_per_operator
        )
        anchor = time.time()
        servers: dict[str, ServerProcess] = {}
        for op in "ABC":
            servers[op], _ = await self.start_server(
                world_path, op, base / "data", world_port=True, clock_anchor=anchor
            )
        await self.wait_federated(world, servers)
        return world, servers

    async def wait_federated(self, world: World, servers: dict[str, ServerProcess], timeout: float = 60.0) -> None:
        await wait_federated(world, {op: child.port for op, child in servers.items()}, timeout)

    def rss_of(self, servers: dict[str, ServerProcess]) -> dict[str, float]:
        return {op: rss_mb(child.pid) for op, child in servers.items()}

    def stop_servers(self, servers: dict[str, ServerProcess]) -> None:
        for child in servers.values():
            self.fleet.stop(child)

    async def vehicle_clients(self, world: World, servers: dict[str, ServerProcess], ids: list[str]) -> list[Client]:
        async def one(vehicle_id: str) -> Client:
            v = world.vehicle(vehicle_id)
            return await open_client(HOST, servers[v.home].port, role="vehicle", ident=v.id, secret=v.token)

        return list(await asyncio.gather(*(one(v) for v in ids)))

    async def inspect_all(self, world: World, servers: dict[str, ServerProcess]) -> dict[str, p.InspectResult]:
        return await inspect_operators(world, {op: child.port for op, child in servers.items()}, timeout=60)

    def add(self, key: str, result: dict[str, Any], *rows: dict[str, Any]) -> None:
        self.results[key] = result
        self.rows.extend(rows or (result,))

    # --- 1. ceiling ----------------------------------------------------------------------

    async def start_echo(self) -> Child:
        """The echo server and its clients stay up all run: every scenario gets a ceiling window next to it."""
        if self.echo is None:
            base = self.fresh("ceiling")
            ready = base / "echo.ready"
            self.echo = self.fleet.spawn(
                f"{base.name}-echo-server",
                [sys.executable, "-m", "tools.bench", "--echo-server", "--port", "0", "--ready-file", str(ready)],
            )
            await self.echo.wait_ready_async(ready)
            for i in range(self.settings.connections):
                self.echo_clients.append(
                    await open_client(HOST, self.echo.port, role="vehicle", ident=f"echo-{i}", secret="echo-secret")
                )
        return self.echo

    async def stop_echo(self) -> None:
        await asyncio.gather(*(c.close() for c in self.echo_clients))
        self.echo_clients = []
        if self.echo is not None:
            self.fleet.stop(self.echo)
            self.echo = None

    async def ceiling_window(self) -> LoadResult:
        """One closed-loop window against the echo server, with the same clients and load as the scenarios.

        A raw window (``raw_window``: the same echo server, a callback client) is measured
        right before it, so that every scenario also has its ratio to the raw ceiling.
        """
        s = self.settings
        echo = await self.start_echo()
        clients = self.echo_clients
        self.last_raw = await raw_window(HOST, echo.port, s.connections, s.duration, s.warmup, {"echo": echo.pid})
        self.raw_ceilings.append(len(self.last_raw.latencies) / self.last_raw.seconds)

        async def op(i: int, _notes: Counter[str]) -> None:
            await clients[i].heartbeat()

        load = await closed_loop(s.connections, op, s.duration, s.warmup, {"echo": echo.pid})
        self.ceilings.append(len(load.latencies) / load.seconds)
        load.raw = self.last_raw
        return load

    @staticmethod
    def pair(result: dict[str, Any], ceiling: LoadResult) -> None:
        """Remember the ceilings measured right next to this result (the machine is shared and noisy)."""
        result["paired_ceiling_ops_per_s"] = round(len(ceiling.latencies) / ceiling.seconds, 1)
        result["paired_ceiling_p50_ms"] = latency_stats(ceiling.latencies)["p50_ms"]
        if ceiling.raw is not None:
            result["paired_raw_ops_per_s"] = round(len(ceiling.raw.latencies) / ceiling.raw.seconds, 1)

    async def ceiling(self) -> None:
        s = self.settings
        self.say(f"ceiling: echo server (our framing and codec, uvloop), {s.connections} connections")
        load = await self.ceiling_window()
        assert self.echo is not None and load.raw is not None
        rss = {"echo": rss_mb(self.echo.pid)}
        raw = load_row("raw ceiling (echo, callback client)", s.connections, load.raw, rss=rss)
        ours = load_row("ceiling (echo)", s.connections, load, rss=rss)
        self.pair(ours, load)
        self.add("raw_ceiling", raw, raw)
        self.add("ceiling", ours, ours)

    # --- 2. status queries ------------------------------------------------------------------

    async def single_operator(self, name: str, *, vehicles: int, scale_cps: int = 0) -> tuple[World, Path, Path]:
        base = self.fresh(name)
        world_path = base / "world.toml"
        world = bench_world(world_path, operators=("A",), vehicles_per_operator=vehicles, scale_charge_points=scale_cps)
        return world, world_path, base / "data"

    async def status(self) -> None:
        s = self.settings
        world, world_path, data = await self.single_operator("status", vehicles=s.connections)
        server, _ = await self.start_server(world_path, "A", data)
        servers = {"A": server}
        sims = [
            ChargePointSim(cp, HOST, server.port, heartbeat_s=world.rules.heartbeat_s)
            for st in world.stations_of("A")
            for cp in st.charge_points
        ]
        sim_tasks = [asyncio.ensure_future(sim.run()) for sim in sims]
        clients: list[Client] = []
        try:
            clients = await self.vehicle_clients(
                world, servers, [bench_vehicle_id("A", n + 1) for n in range(s.connections)]
            )
            await self._until_online(clients[0], len(sims))
            self.say(f"status: station status + nearest on one operator, {s.connections} connections")
            stations = [st.id for st in world.stations_of("A")]
            places = list(geo.CITIES.values())
            rng = random.Random(2)

            async def op(i: int, _notes: Counter[str]) -> dict[str, float]:
                c = clients[i]
                t0 = time.perf_counter()
                if rng.random() < 0.5:
                    await c.station_status(rng.choice(stations))
                    return {"station_status": time.perf_counter() - t0}
                lat, lon = rng.choice(places)
                await c.find_nearest(lat, lon, min_power_kw=rng.choice((0.0, 50.0)))
                return {"find_nearest": time.perf_counter() - t0}

            ceiling = await self.ceiling_window()
            load = await closed_loop(s.connections, op, s.duration, s.warmup, {"A": server.pid})
            rss = self.rss_of(servers)
        finally:
            for task in sim_tasks:
                task.cancel()
            await asyncio.gather(*sim_tasks, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in clients))
            self.stop_servers(servers)
        main = load_row("status queries", s.connections, load, rss=rss)
        self.pair(main, ceiling)
        self.add("status", main, main, *self.part_rows(main, load))

    async def _until_online(self, client: Client, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stations = await client.list_stations()
            online = sum(1 for st in stations for cp in st.charge_points if cp.status != "offline")
            if online >= count:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"only {online} of {count} charge points came online")
            await asyncio.sleep(0.05)

    def part_rows(self, main: dict[str, Any], load: LoadResult) -> list[dict[str, Any]]:
        return [
            row(f"  └ {name}", main["connections"], len(values), load.seconds, values, part=True)
            for name, values in sorted(load.parts.items())
        ]

    # --- 3. single reservations (and 6b: with a ledger of n) ------------------------------

    def reserve_op(self, clients: list[Client], charge_points: list[str], seed: int) -> Op:
        """Reserve a free grid slot (second half of a cell only this worker uses), then cancel it."""
        cells = GRID_DAYS * 86400 // GRID_S
        workers = len(clients)
        rng = random.Random(seed)

        async def op(i: int, _notes: Counter[str]) -> dict[str, float]:
            cell = rng.randrange(cells // workers) * workers + i
            start = datetime.fromtimestamp(self.grid_base + cell * GRID_S + GRID_S // 2, UTC)
            c = clients[i]
            t0 = time.perf_counter()
            r = await c.reserve(rng.choice(charge_points), start, 1)
            t1 = time.perf_counter()
            await c.cancel(r.id)
            return {"reserve": t1 - t0, "cancel": time.perf_counter() - t1}

        return op

    async def reserve_target(self, name: str, preload: int = 0) -> ReserveTarget:
        """Operator A alone (its store preloaded with ``preload`` reservations), and connected vehicles."""
        s = self.settings
        world, world_path, data = await self.single_operator(name, vehicles=s.connections)
        charge_points = [cp.id for st in world.stations_of("A") for cp in st.charge_points]
        if preload:
            await preload_reservations(data, "A", charge_points, preload, self.grid_base)
        server, startup = await self.start_server(world_path, "A", data)
        clients = await self.vehicle_clients(
            world, {"A": server}, [bench_vehicle_id("A", n + 1) for n in range(s.connections)]
        )
        return ReserveTarget(server, clients, self.reserve_op(clients, charge_points, 3 + preload), startup, preload)

    async def close_target(self, target: ReserveTarget) -> None:
        await asyncio.gather(*(c.close() for c in target.clients))
        self.fleet.stop(target.server)

    async def reserve(self, store: str = "") -> None:
        s = self.settings
        on = f", {store}" if store else ""
        self.say(f"reserve: reserve + cancel on one operator, durable, {s.connections} connections{on}")
        target = await self.reserve_target(f"reserve{'-' + store if store else ''}")
        try:
            ceiling = await self.ceiling_window()
            load = await closed_loop(s.connections, target.op, s.duration, s.warmup, {"A": target.server.pid})
            rss = {"A": rss_mb(target.server.pid)}
        finally:
            await self.close_target(target)
        main = load_row(
            f"single reservations{on}",
            s.connections,
            load,
            ops=("reserve", "cancel"),
            rss=rss,
            existing_reservations=0,
            store=store or "sqlite",
        )
        self.pair(main, ceiling)
        self.add(f"reserve{'_' + store if store else ''}", main, main, *self.part_rows(main, load))

    async def ledger(self) -> list[dict[str, Any]]:
        """Scenario 3 with 1k, 10k, 100k existing reservations, in interleaved rounds (noise hits all alike)."""
        s = self.settings
        targets: list[ReserveTarget] = []
        loads: dict[int, list[LoadResult]] = defaultdict(list)
        ceilings: list[LoadResult] = []
        try:
            for size in s.ledger_sizes:
                targets.append(await self.reserve_target(f"ledger-{size}", preload=size))
            sizes = ", ".join(f"{size:,}" for size in s.ledger_sizes)
            self.say(f"scale: reserve + cancel with {sizes} existing reservations, {s.ledger_rounds} rounds")
            for k in range(s.ledger_rounds):
                ceilings.append(await self.ceiling_window())
                for t in targets[k % len(targets) :] + targets[: k % len(targets)]:
                    loads[t.existing].append(
                        await closed_loop(s.connections, t.op, s.duration, s.warmup, {"A": t.server.pid})
                    )
            rss = {t.existing: rss_mb(t.server.pid) for t in targets}
        finally:
            for t in targets:
                await self.close_target(t)
        rows = []
        for t in targets:
            rounds = loads[t.existing]
            r = load_row(
                f"reservations @ {t.existing / 1000:g}k existing",
                s.connections,
                merge_loads(rounds),
                ops=("reserve", "cancel"),
                rss={"A": rss[t.existing]},
                existing_reservations=t.existing,
                server_startup_s=round(t.startup, 2),
                rounds=len(rounds),
                ops_per_s_by_round=[round(2 * len(x.latencies) / x.seconds, 1) for x in rounds],
            )
            self.pair(r, merge_loads(ceilings))
            rows.append(r)
        return rows

    # --- 4. trip bookings ----------------------------------------------------------------

    async def postgresql(self) -> None:
        """Reservations and trip bookings again, every operator's books in PostgreSQL (a server of its own)."""
        self.say("postgresql: the same reservations and trip bookings, stores in PostgreSQL (fsync, synchronous)")
        self.postgres = await asyncio.to_thread(PostgresServer().start)
        try:
            await self.reserve(store="postgresql")
            await self.trips(store="postgresql")
        finally:  # its servers are stopped by their scenarios (the echo server stays up)
            pg, self.postgres = self.postgres, None
            await asyncio.to_thread(pg.stop)
        sqlite = {k: self.results.get(k) for k in ("reserve", "trips")}
        for key in ("reserve", "trips"):
            base, on_pg = sqlite[key], self.results.get(f"{key}_postgresql")
            if base and on_pg and base["ops_per_s"]:
                on_pg["vs_sqlite"] = round(on_pg["ops_per_s"] / base["ops_per_s"], 2)

    async def trips(self, store: str = "") -> None:
        """Plan trips (a row of its own), then book the plans as shown, each then cancelled.

        A driver plans, looks, and books what was shown: the booking is the two-phase commit,
        the planning is the search, and the two are measured apart.
        """
        s = self.settings
        per_op = math.ceil(s.connections / 3)
        on = f", {store}" if store else ""
        world, servers = await self.start_federation(f"trips{'-' + store if store else ''}", per_op)
        clients: list[Client] = []
        try:
            ids = [bench_vehicle_id("ABC"[n % 3], n // 3 + 1) for n in range(s.connections)]
            clients = await self.vehicle_clients(world, servers, ids)
            self.say(f"trips: 3-5-stop trips across A, B, C (2PC, fsync each step), {s.connections} connections")
            rng = random.Random(4)
            now = clients[0].server_now()
            pids = {op_id: child.pid for op_id, child in servers.items()}
            shown: list[list[tuple[p.TripQuery, p.TripInfo]]] = [[] for _ in clients]

            async def plan_op(i: int, _notes: Counter[str]) -> dict[str, float]:
                origin, destination, soc = rng.choice(ROUTES)
                depart = now + timedelta(minutes=rng.randrange(60, 20 * 24 * 60))
                query = p.TripQuery(origin=origin, destination=destination, soc_pct=soc, depart=depart)
                t0 = time.perf_counter()
                shown[i].append((query, await clients[i].plan_trip(query)))
                return {"plan_trip": time.perf_counter() - t0}

            planning_ceiling = await self.ceiling_window()
            planning = await closed_loop(s.connections, plan_op, s.trip_duration, max(s.warmup, 0.5), pids)
            # The server keeps each vehicle's latest plans only: book those.
            plans = disjoint_plans([mine[-MAX_PLANS_SHOWN:] for mine in shown])
            stops: Counter[int] = Counter()
            turn = [0] * len(clients)  # each connection books its own plans in turn

            async def book_op(i: int, notes: Counter[str]) -> dict[str, float]:
                query, plan = plans[i][turn[i] % len(plans[i])]
                turn[i] += 1
                c = clients[i]
                t0 = time.perf_counter()
                booked = await c.book_trip(query, plan.id)
                t1 = time.perf_counter()
                await c.cancel_trip(booked.trip.id)
                stops[len(booked.trip.stops)] += 1
                if booked.attempts > 1:
                    notes["replanned"] += 1
                if not booked.as_shown:
                    notes["not_as_shown"] += 1
                if {st.operator_id for st in booked.trip.stops} == {"A", "B", "C"}:
                    notes["spans_all_operators"] += 1
                return {"book_trip": t1 - t0, "cancel_trip": time.perf_counter() - t1}

            ceiling = await self.ceiling_window()
            load = await closed_loop(s.connections, book_op, s.trip_duration, max(s.warmup, 0.5), pids)
            rss = self.rss_of(servers)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            self.stop_servers(servers)
        plan_row = load_row("trip planning", s.connections, planning, ops=("plan_trip",), rss=rss)
        self.pair(plan_row, planning_ceiling)
        main = load_row(
            f"trip bookings{on}",
            s.connections,
            load,
            ops=("book_trip",),
            rss=rss,
            stops_per_trip=dict(sorted(stops.items())),
            plans_booked=sum(len(mine) for mine in plans),
            store=store or "sqlite",
        )
        self.pair(main, ceiling)
        cancel = row("  └ cancel_trip", s.connections, *self._part(load, "cancel_trip"), part=True)
        if not store:  # planning touches no store: measured once
            self.add("trip_planning", plan_row)
        self.add(f"trips{'_' + store if store else ''}", main, main, cancel)

    # --- 5. planning at real size ---------------------------------------------------------

    async def planning(self) -> None:
        """Plans in this process on the demo world and on the large one, then plans/s through the large one's servers.

        In process: the search alone (``plan_trip`` over a prepared ``Network``, every charger free), for random
        trips of the world's vehicles between its cities (on the large world, cities of >= 100k people), under the
        world's rules. Through the servers: every operator of the large world federated, vehicles at home at each,
        each loop asking ``plan_trip`` for a random trip between big cities (availability from every peer, the
        search, the reply).
        """
        s = self.settings
        count = 30 if s.quick else 300
        for name in ("northeast", LARGE_WORLD):
            t0 = time.perf_counter()
            world = load_world(name)
            t1 = time.perf_counter()
            network = plan_quality.network_of(world)
            t2 = time.perf_counter()
            trips = plan_quality.random_trips(world, count, seed=5, min_population=plan_quality.BIG_CITY)
            self.say(f"planning: {count} plans in process on {name} ({len(network.options)} charge points)")
            timed = [plan_quality.plan(world, network, trip, "driver") for trip in trips]
            latencies = [seconds for _, seconds in timed]
            r = row(
                f"planning in process: {name}",
                1,
                len(latencies),
                sum(latencies),
                latencies,
                closed_loop=False,
                rss={"bench": rss_mb(os.getpid())},
                charge_points=len(network.options),
                world_load_s=round(t1 - t0, 3),
                network_prepare_s=round(t2 - t1, 3),
                no_route=sum(found is None for found, _ in timed),
                stops_per_plan=round(sum(len(f.stops) for f, _ in timed if f) / max(1, len(timed)), 2),
            )
            self.add(f"planning_{name}", r)
        operators = [op.id for op in load_world(LARGE_WORLD).operators]
        base = self.fresh("planning")
        ports = dict(zip(operators, free_ports(len(operators)), strict=True))
        per_op = math.ceil(s.connections / len(operators))
        world = write_world(base / "world.toml", LARGE_WORLD, ports=ports, vehicles=bench_vehicles(operators, per_op))
        anchor = time.time()
        servers: dict[str, ServerProcess] = {}
        clients: list[Client] = []
        try:
            for op_id in operators:
                servers[op_id], _ = await self.start_server(
                    base / "world.toml", op_id, base / "data", world_port=True, clock_anchor=anchor
                )
            await self.wait_peers_up(world, servers)
            ids = [
                bench_vehicle_id(operators[n % len(operators)], n // len(operators) + 1) for n in range(s.connections)
            ]
            clients = await self.vehicle_clients(world, servers, ids)
            big = [c.name for c in world.cities if c.population >= plan_quality.BIG_CITY]
            rng = random.Random(6)
            now = clients[0].server_now()
            self.say(
                f"planning: plans through {len(operators)} federated servers of {LARGE_WORLD}, {s.connections} conns"
            )

            async def op(i: int, _notes: Counter[str]) -> None:
                origin, destination = rng.sample(big, 2)
                depart = now + timedelta(minutes=rng.randrange(60, 20 * 24 * 60))
                await clients[i].plan_trip(p.TripQuery(origin=origin, destination=destination, depart=depart))

            pids = {op_id: child.pid for op_id, child in servers.items()}
            ceiling = await self.ceiling_window()
            load = await closed_loop(s.connections, op, s.trip_duration, max(s.warmup, 0.5), pids)
            rss = self.rss_of(servers)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            self.stop_servers(servers)
        r = load_row(f"trip planning: {LARGE_WORLD}", s.connections, load, rss=rss)
        self.pair(r, ceiling)
        self.add("planning_servers", r)

    async def wait_peers_up(self, world: World, servers: dict[str, ServerProcess], timeout: float = 60.0) -> None:
        """Until every operator has its links to all others up and their catalogs (a plan uses every one's)."""
        deadline = time.monotonic() + timeout
        while True:
            states = await self.inspect_all(world, servers)
            if all(peer.up for state in states.values() for peer in state.peers):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the operators of {LARGE_WORLD} did not link up within {timeout:g} s")
            await asyncio.sleep(0.2)
        # A link is up just before its catalog is asked for: plan once at each operator, as far as the world goes,
        # until no operator's chargers are "not known yet".
        for op_id, server in servers.items():
            v = world.vehicle(bench_vehicle_id(op_id, 1))
            c = await open_client(HOST, server.port, role="vehicle", ident=v.id, secret=v.token)
            try:
                while True:
                    try:
                        await c.plan_trip(p.TripQuery(origin="São Luís", destination="Teixeira de Freitas"))
                        break
                    except EvchargeError as exc:
                        if exc.code != "unavailable" or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
            finally:
                await c.close()

    @staticmethod
    def _part(load: LoadResult, name: str) -> tuple[int, float, list[float]]:
        values = load.parts.get(name, [])
        return len(values), load.seconds, values

    # --- 4b. a noisy neighbour -----------------------------------------------------------------

    async def noisy(self) -> None:
        """One vehicle's plans while another floods its home with plans: alone, then amid the flood.

        The flood: ``flood_connections`` connections of one vehicle, ``flood_in_flight`` PlanTrip
        each, asked again as soon as answered (refused ones after 10 ms). The quiet vehicle asks
        one plan at a time, as a driver does; its latency is compared with its own, alone,
        measured just before in the same run.
        """
        s = self.settings
        world, servers = await self.start_federation("noisy", 2)
        quiet_id, flood_id = bench_vehicle_id("A", 1), bench_vehicle_id("A", 2)
        clients: list[Client] = []
        stop_flood = asyncio.Event()
        flood_done: Counter[str] = Counter()
        try:
            clients = await self.vehicle_clients(world, servers, [quiet_id] + [flood_id] * s.flood_connections)
            quiet, floods = clients[0], clients[1:]
            origin, destination, soc = SPANNING_ROUTE
            query = p.TripQuery(origin=origin, destination=destination, soc_pct=soc)
            pids = {op_id: child.pid for op_id, child in servers.items()}
            self.say(
                f"noisy neighbour: {quiet_id} plans alone, then while {flood_id} keeps "
                f"{s.flood_connections} x {s.flood_in_flight} plans in flight"
            )

            async def quiet_plan(_i: int, _notes: Counter[str]) -> None:
                await quiet.plan_trip(query)

            alone = await closed_loop(1, quiet_plan, s.trip_duration, s.warmup, pids)

            async def flood(c: Client) -> None:
                while not stop_flood.is_set():
                    try:
                        await c.plan_trip(query)
                        flood_done["answered"] += 1
                    except EvchargeError as exc:
                        flood_done[exc.code] += 1
                        await asyncio.sleep(0.01)

            flooding = [asyncio.ensure_future(flood(c)) for c in floods for _ in range(s.flood_in_flight)]
            try:
                amid = await closed_loop(1, quiet_plan, s.trip_duration, max(s.warmup, 1.0), pids)
            finally:
                stop_flood.set()
                await asyncio.gather(*flooding, return_exceptions=True)
            rss = self.rss_of(servers)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            self.stop_servers(servers)
        alone_row = load_row("  └ the same vehicle alone", 1, alone, rss=rss, part=True)
        main = load_row(
            "noisy neighbour: a plan while another vehicle floods",
            1,
            amid,
            rss=rss,
            flood_connections=s.flood_connections,
            flood_in_flight=s.flood_connections * s.flood_in_flight,
            flood_answers=dict(flood_done),
            alone_p50_ms=alone_row["p50_ms"],
            alone_p99_ms=alone_row["p99_ms"],
        )
        main["p99_vs_alone"] = round(main["p99_ms"] / max(alone_row["p99_ms"], 1e-9), 2)
        self.add("noisy", main, main, alone_row)

    # --- 5. contention -----------------------------------------------------------------------

    async def contention(self) -> None:
        s = self.settings
        n = s.contention_vehicles
        world, servers = await self.start_federation("contention", math.ceil(n / 3))
        clients: list[Client] = []
        try:
            ids = [bench_vehicle_id("ABC"[k % 3], k // 3 + 1) for k in range(n)]
            clients = await self.vehicle_clients(world, servers, ids)
            origin, destination, soc = CONTENTION_ROUTE
            depart = (clients[0].server_now() + timedelta(minutes=10)).replace(second=0, microsecond=0)
            query = p.TripQuery(origin=origin, destination=destination, soc_pct=soc, depart=depart)
            self.say(f"contention: {n} vehicles book {origin} -> {destination} departing at the same moment")

            async def race(c: Client) -> tuple[p.TripReply | EvchargeError, float]:
                t0 = time.perf_counter()
                try:
                    answer: p.TripReply | EvchargeError = await c.book_trip(query)
                except EvchargeError as exc:  # conflict: lost every attempt (others are counted too)
                    answer = exc
                return answer, time.perf_counter() - t0

            began = time.perf_counter()
            answers = await asyncio.gather(*(race(c) for c in clients))
            all_answered = time.perf_counter() - began
            states: dict[str, p.InspectResult] = {}
            broken: list[str] = []
            deadline = time.monotonic() + 15
            while True:  # decisions may still be on their way to a participant
                states = await self.inspect_all(world, servers)
                broken = violations(states)
                if not broken or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            rss = self.rss_of(servers)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            self.stop_servers(servers)
        booked = [a for a, _ in answers if isinstance(a, p.TripReply)]
        lost = [a for a, _ in answers if isinstance(a, EvchargeError)]
        # Every slot handed out, by who got it: exactly one trip per slot.
        holders: dict[tuple[str, str, datetime, datetime], set[str]] = defaultdict(set)
        for reply in booked:
            for stop in reply.trip.stops:
                holders[(stop.operator_id, stop.charge_point_id, stop.slot_start, stop.slot_end)].add(reply.trip.id)
        # The same from the owners' books: live reservations per (charge point, interval).
        owner_holders: Counter[tuple[str, str, datetime, datetime]] = Counter(
            (op_id, r.charge_point_id, r.start, r.end)
            for op_id, state in states.items()
            for r in state.reservations
            if r.state in LIVE_STATES
        )
        winners_per_slot = max([len(v) for v in holders.values()] + list(owner_holders.values()) + [0])
        main = row(
            "contention (same route, same moment)",
            n,
            len(answers),
            all_answered,
            [t for _, t in answers],
            closed_loop=False,
            rss=rss,
            time_to_all_answered_s=round(all_answered, 3),
            vehicles=n,
            winners=len(booked),
            losers=len(lost),
            loser_errors=dict(Counter(e.code for e in lost)),
            replanned=sum(1 for r in booked if r.attempts > 1),
            slots_booked=len(holders),
            winners_per_slot=winners_per_slot,
            invariant_violations=broken,
        )
        self.add("contention", main)

    # --- 6. scale --------------------------------------------------------------------------

    # --- OCPI edge ------------------------------------------------------------------------

    async def ocpi(self) -> None:
        """The OCPI edge of operator A: pages of locations, and bookings (each a reservation in the ledger)."""
        s = self.settings
        self.say(f"ocpi: an eMSP's locations pages and bookings through evcharge ocpi, {s.connections} connections")
        world, world_path, data = await self.single_operator("ocpi", vehicles=1)
        server, _ = await self.start_server(world_path, "A", data)
        tokens = data.parent / "registration-tokens"
        tokens.write_text("bench-token-a\n")
        edge = OcpiEdgeProcess(
            world_path, "A", server.port, data.parent / "edge", self.work / f"{data.parent.name}-edge.log",
            registration_tokens=tokens, extra=("--rate-limit", "0", "--log-level", "warning"),
        )  # fmt: skip
        self.fleet.children.append(edge)
        await asyncio.to_thread(edge.start, 60.0)
        # Bookable charge points are online ones: every charge point is simulated.
        sims = [
            ChargePointSim(cp, HOST, server.port, heartbeat_s=world.rules.heartbeat_s)
            for st in world.stations_of("A")
            for cp in st.charge_points
        ]
        sim_tasks = [asyncio.ensure_future(sim.run()) for sim in sims]
        stub, base = await emsp_stub("bench-emsp-token")
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        pids = {"A": server.pid, "edge": edge.pid}
        charge_points = [cp.id for st in world.stations_of("A") for cp in st.charge_points]
        station_of = {cp.id: st.id for st in world.stations_of("A") for cp in st.charge_points}
        try:
            credentials = {
                "token": "bench-emsp-token",
                "url": f"{base}/ocpi/versions",
                "roles": [
                    {"role": "EMSP", "business_details": {"name": "bench"}, "party_id": "BEN", "country_code": "NL"}
                ],
            }
            async with http.post(
                f"{edge.url}/ocpi/2.2.1/credentials", json=credentials, headers={"Authorization": "Token bench-token-a"}
            ) as response:
                token_c = (await response.json())["data"]["token"]
            auth = {"Authorization": f"Token {token_c}"}
            total = len(world.stations_of("A"))
            async with asyncio.timeout(30):  # until the edge sees every charge point online
                while True:
                    async with http.get(f"{edge.url}/ocpi/2.2.1/locations", headers=auth) as response:
                        shown = (await response.json())["data"]
                    if all(e["status"] != "UNKNOWN" for loc in shown for e in loc["evses"]):
                        break
                    await asyncio.sleep(0.2)

            async def ocpi_call(method: str, path: str, body: Any = None) -> Any:
                async with http.request(method, f"{edge.url}{path}", json=body, headers=auth) as response:
                    answer = await response.json()
                if answer["status_code"] != 1000:
                    raise BadRequestError(f"OCPI {answer['status_code']}: {answer.get('status_message')}")
                return answer["data"]

            rng = random.Random(7)

            async def page(_i: int, _notes: Counter[str]) -> None:
                await ocpi_call("GET", f"/ocpi/2.2.1/locations?offset={rng.randrange(total)}&limit=2")

            pages = await closed_loop(s.connections, page, s.duration, s.warmup, pids)
            cells = GRID_DAYS * 86400 // GRID_S
            workers = s.connections
            made = iter(range(10**9))

            async def book(i: int, notes: Counter[str]) -> None:
                cell = rng.randrange(cells // workers) * workers + i
                start = datetime.fromtimestamp(self.grid_base + cell * GRID_S, UTC)
                cp = rng.choice(charge_points)
                n = next(made)
                request = {
                    "country_code": "NL",
                    "party_id": "BEN",
                    "request_id": f"BENCH-{n}",
                    "location_id": station_of[cp],
                    "evse_uid": cp,
                    "tokens": [
                        {
                            "country_code": "NL",
                            "party_id": "BEN",
                            "uid": f"U{i}",
                            "type": "APP_USER",
                            "contract_id": f"C{i}",
                        }
                    ],
                    "period": {
                        "start_from": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "end_before": (start + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    },
                    "authorization_reference": f"A{n}",
                }
                booking = await ocpi_call("POST", "/ocpi/2.2.1/bookings", request)
                notes[booking["reservation_status"]] += 1

            bookings = await closed_loop(s.connections, book, s.duration, s.warmup, pids)
            rss = {"A": rss_mb(server.pid), "edge": rss_mb(edge.pid)}
        finally:
            for task in sim_tasks:
                task.cancel()
            await asyncio.gather(*sim_tasks, return_exceptions=True)
            await http.close()
            await stub.cleanup()
            self.fleet.stop(edge)
            self.fleet.stop(server)
        pages_row = load_row("OCPI locations pages", s.connections, pages, rss=rss)
        bookings_row = load_row("OCPI bookings", s.connections, bookings, rss=rss)
        self.add("ocpi", {**pages_row, "bookings": bookings_row}, pages_row, bookings_row)

    async def scale(self) -> None:
        s = self.settings
        world, world_path, data = await self.single_operator("scale", vehicles=1, scale_cps=s.scale_charge_points)
        cps = scale_charge_points(world)
        server, startup = await self.start_server(world_path, "A", data)
        servers = {"A": server}
        procs: list[Child] = []
        try:
            rss_idle = rss_mb(server.pid)
            self.say(
                f"scale: {len(cps)} charge points connect to one operator and heartbeat every "
                f"{s.heartbeat_interval:g} s ({s.heartbeat_processes} client processes)"
            )
            base = Path(world_path).parent
            go = base / "heartbeat.go"
            share = math.ceil(len(cps) / s.heartbeat_processes)
            readies, outs = [], []
            began = time.perf_counter()
            for k in range(s.heartbeat_processes):
                ready, out = base / f"hb{k}.ready", base / f"hb{k}.json"
                readies.append(ready)
                outs.append(out)
                procs.append(
                    self.fleet.spawn(
                        f"{base.name}-heartbeat-client-{k}",
                        [
                            sys.executable,
                            "-m",
                            "tools.bench",
                            "--heartbeat-client",
                            "--world",
                            str(world_path),
                            "--port",
                            str(server.port),
                            "--first",
                            str(k * share),
                            "--count",
                            str(share),
                            "--interval",
                            str(s.heartbeat_interval),
                            "--hb-warmup",
                            str(s.heartbeat_warmup),
                            "--hb-duration",
                            str(s.heartbeat_duration),
                            "--ready-file",
                            str(ready),
                            "--go-file",
                            str(go),
                            "--result-file",
                            str(out),
                        ],
                    )
                )
            connected = [
                await proc.wait_ready_async(ready, timeout=600) for proc, ready in zip(procs, readies, strict=True)
            ]
            connect_s = time.perf_counter() - began
            rss_connected = rss_mb(server.pid)
            online: int | None = None
            inspect_error = ""
            try:
                online = (await self.inspect_all(world, servers))["A"].connections.get("station", 0)
            except EvchargeError as exc:  # e.g. the whole state no longer fits in one frame
                inspect_error = f"{exc.code}: {exc.message}"
            go.write_text("go")
            await asyncio.sleep(s.heartbeat_warmup)
            cpu_before = cpu_seconds(server.pid)
            await asyncio.sleep(s.heartbeat_duration / 2)
            rss_beating = rss_mb(server.pid)
            await asyncio.sleep(s.heartbeat_duration / 2)
            server_cpu = cpu_seconds(server.pid) - cpu_before
            results = [
                await self._result_of(proc, out, timeout=120 + s.heartbeat_duration)
                for proc, out in zip(procs, outs, strict=True)
            ]
        finally:
            for proc in procs:
                self.fleet.stop(proc)
            self.stop_servers(servers)
        latencies = [x for r in results for x in r["latencies"]]
        n_connected = sum(c["connected"] for c in connected)
        rss_peak = max(rss_connected, rss_beating)
        main = row(
            f"scale: {n_connected} charge points heartbeating",
            n_connected,
            len(latencies),
            s.heartbeat_duration,
            latencies,
            closed_loop=False,
            rss={"A": rss_peak},
            cpu={"A": server_cpu},
            charge_points=len(cps),
            connected=n_connected,
            online_at_server=online,
            inspect_error=inspect_error,
            connect_errors=sum(c["errors"] for c in connected),
            heartbeat_errors=sum(r["errors"] for r in results),
            heartbeat_interval_s=s.heartbeat_interval,
            connect_all_s=round(connect_s, 2),
            server_startup_s=round(startup, 2),
            rss_idle_mb=rss_idle,
            rss_connected_mb=rss_connected,
            rss_heartbeating_mb=rss_beating,
            kb_per_connection=round((rss_peak - rss_idle) * 1024 / max(1, n_connected), 1),
        )
        ledger_rows = await self.ledger()
        growth = ledger_growth(ledger_rows)
        self.add("scale", {**main, "ledger": ledger_rows, "ledger_growth": growth}, main, *ledger_rows)

    async def _result_of(self, proc: Child, out: Path, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (result := read_json(out)) is None:
            if not proc.alive() and (result := read_json(out)) is None:
                raise BenchError(f"{proc.name} exited with {proc.returncode_text()}:\n{tail(proc.log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} gave no result within {timeout:g} s:\n{tail(proc.log_path)}")
            await asyncio.sleep(0.05)
        return dict(result)


async def emsp_stub(token: str) -> tuple[web.AppRunner, str]:
    """An eMSP that answers the registration handshake (and takes no pushes: none are asked of it)."""

    def ok(data: Any) -> web.Response:
        return web.json_response({"data": data, "status_code": 1000, "timestamp": "2026-01-01T00:00:00Z"})

    base = ""

    async def versions(_request: web.Request) -> web.Response:
        return ok([{"version": "2.2.1", "url": f"{base}/ocpi/2.2.1"}])

    async def details(_request: web.Request) -> web.Response:
        url = f"{base}/ocpi/2.2.1/credentials"
        return ok({"version": "2.2.1", "endpoints": [{"identifier": "credentials", "role": "SENDER", "url": url}]})

    app = web.Application()
    app.router.add_get("/ocpi/versions", versions)
    app.router.add_get("/ocpi/2.2.1", details)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    base = f"http://{HOST}:{runner.addresses[0][1]}"
    return runner, base


def ledger_growth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cost per operation against the smallest ledger, next to log n / log n0.

    The cost is the server's CPU time per operation (what a bigger ledger could
    make grow; fsync waits do not count); the throughput ratio is given too.
    """
    if not rows or rows[0]["ops_per_s"] <= 0 or not rows[0]["server_cpu_ms_per_op"]:
        return {}
    first = rows[0]
    n0 = first["existing_reservations"]
    out: dict[str, Any] = {"baseline_reservations": n0, "cost": "server CPU ms per operation", "sizes": []}
    for r in rows:
        n = r["existing_reservations"]
        cost = (r["server_cpu_ms_per_op"] or math.inf) / first["server_cpu_ms_per_op"]
        slowdown = first["ops_per_s"] / r["ops_per_s"] if r["ops_per_s"] > 0 else math.inf
        bound = math.log(n) / math.log(n0) if n0 > 1 else 1.0
        out["sizes"].append(
            {
                "existing_reservations": n,
                "ops_per_s": r["ops_per_s"],
                "server_cpu_ms_per_op": r["server_cpu_ms_per_op"],
                "p99_ms": r["p99_ms"],
                "cost_ratio": round(cost, 3),
                "throughput_ratio": round(slowdown, 3),
                "log_ratio": round(bound, 3),
                "within_log_bound": cost <= bound,
            }
        )
    return out


# --- targets ----------------------------------------------------------------------------


def evaluate_targets(results: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """The issue's targets, read from this run (information only: nothing asserts them)."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: Any, goal: str, met: bool | None, note: str = "") -> None:
        targets.append({"target": name, "value": value, "goal": goal, "met": met, **({"note": note} if note else {})})

    if "ceiling" in results:
        ratio = results["ceiling"].get("ratio_to_raw")
        add("our Client's echo vs the raw ceiling", ratio, ">= 0.60", None if ratio is None else ratio >= 0.6)
    if "status" in results:
        ratio = results["status"].get("ratio_to_ceiling")
        add("status queries vs ceiling", ratio, ">= 0.50", None if ratio is None else ratio >= 0.5)
        ratio = results["status"].get("ratio_to_raw")
        add("status queries vs the raw ceiling", ratio, ">= 0.40", None if ratio is None else ratio >= 0.4)
    if "reserve" in results:
        ratio = results["reserve"].get("ratio_to_ceiling")
        add("single durable reservations vs ceiling", ratio, ">= 0.20", None if ratio is None else ratio >= 0.2)
        ops = results["reserve"]["ops_per_s"]
        add("single durable reservations per second", ops, ">= 15000", ops >= 15000)
    if "trip_planning" in results:
        ops = results["trip_planning"]["ops_per_s"]
        add("trip plans per second (3 servers)", ops, ">= 1500", ops >= 1500)
    if "trips" in results:
        t = results["trips"]
        add("trip bookings per second", t["ops_per_s"], ">= 3000", t["ops_per_s"] >= 3000)
        add("trip booking p99 (ms)", t["p99_ms"], "< 25", t["p99_ms"] < 25)
    if f"planning_{LARGE_WORLD}" in results:
        pl = results[f"planning_{LARGE_WORLD}"]
        add(f"plan p50 in process, {LARGE_WORLD} (ms)", pl["p50_ms"], "<= 10", pl["p50_ms"] <= 10)
    if "noisy" in results:
        n = results["noisy"]
        add("noisy neighbour: plan p99 amid a flood vs alone", n["p99_vs_alone"], "<= 3", n["p99_vs_alone"] <= 3)
    if "contention" in results:
        c = results["contention"]
        add("contention: winners per slot", c["winners_per_slot"], "== 1", c["winners_per_slot"] == 1)
        add("contention: invariant violations", len(c["invariant_violations"]), "== 0", not c["invariant_violations"])
    if "scale" in results:
        sc = results["scale"]
        rss = sc["rss_mb"].get("A", 0.0)
        note = "" if sc["connected"] >= 10_000 else f"measured with {sc['connected']} charge points, not 10,000"
        add(f"RSS with {sc['connected']} charge points (MB)", rss, "< 300", rss < 300, note)
        growth = sc.get("ledger_growth", {}).get("sizes", [])
        if len(growth) > 1:
            worst = max(growth[1:], key=lambda g: g["cost_ratio"] / g["log_ratio"])
            add(
                "reservation cost growth with ledger size",
                f"x{worst['cost_ratio']} at {worst['existing_reservations']:,} (log bound x{worst['log_ratio']})",
                "<= log n / log n0",
                all(g["within_log_bound"] for g in growth),
            )
    return targets


# --- report -------------------------------------------------------------------------------


def apply_ratios(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None, raw: dict[str, Any] | None = None) -> None:
    """Throughput (and median latency) of each closed-loop row over the ceilings measured next to it."""
    if not ceiling or ceiling["ops_per_s"] <= 0:
        return
    for r in rows:
        if r is raw:
            r["ratio_to_raw"] = 1.0
            r["ratio_to_ceiling"] = round(r["ops_per_s"] / ceiling["ops_per_s"], 4)
            continue
        if r is ceiling:
            raw_ops = r.get("paired_raw_ops_per_s")
            if raw_ops:
                r["ratio_to_raw"] = round(r["ops_per_s"] / raw_ops, 4)
            r["ratio_to_ceiling"] = 1.0
            r["p50_ratio_to_ceiling"] = 1.0
            continue
        if not r.get("closed_loop") or r.get("part"):
            continue
        raw_ops = r.get("paired_raw_ops_per_s") or (raw or {}).get("ops_per_s")
        if raw_ops:
            r["ratio_to_raw"] = round(r["ops_per_s"] / raw_ops, 4)
        base_ops = r.get("paired_ceiling_ops_per_s") or ceiling["ops_per_s"]
        base_p50 = r.get("paired_ceiling_p50_ms") or ceiling["p50_ms"]
        r["ratio_to_ceiling"] = round(r["ops_per_s"] / base_ops, 4)
        if base_p50 > 0 and r["p50_ms"] > 0:
            r["p50_ratio_to_ceiling"] = round(r["p50_ms"] / base_p50, 2)


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "scenario" else "right")
    for r in rows:
        table.add_row(*cells(r))
    return table


COLUMNS = (
    "scenario",
    "conns",
    "ops",
    "ops/s",
    "vs ceiling",
    "vs raw",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "RSS MB",
    "CPU ms/op",
)


def cells(r: dict[str, Any]) -> list[str]:
    ratio = r.get("ratio_to_ceiling")
    to_raw = r.get("ratio_to_raw")
    cpu = r.get("server_cpu_ms_per_op")
    return [
        r["scenario"],
        f"{r['connections']:,}",
        f"{r['operations']:,}",
        f"{r['ops_per_s']:,.0f}",
        "" if ratio is None else f"{ratio:.2f}",
        "" if to_raw is None else f"{to_raw:.3f}",
        f"{r['p50_ms']:.2f}",
        f"{r['p90_ms']:.2f}",
        f"{r['p99_ms']:.2f}",
        f"{r['max_ms']:.1f}",
        "/".join(f"{v:.0f}" for v in r.get("rss_mb", {}).values()),
        "" if cpu is None else f"{cpu:.3f}",
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        values = cells(r)
        values[0] = values[0].replace("  └ ", "↳ ")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    """The commit checked out here, or "unknown": no git, no checkout (say, an unpacked copy), no commit yet.

    Only a checkout whose top is this tree counts: a copy inside some other repository is
    not that repository's commit.
    """
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--show-toplevel", "HEAD"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != ROOT:
        return "unknown"
    return lines[1].strip() or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in ("evcharge", "msgspec", "uvloop", "rich", "aiorwlock"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def raise_fd_limit() -> None:
    """Children inherit it: a server with 10,000 charge points needs more than 1,024 descriptors."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


async def run_bench(settings: Settings, scenarios: list[str], work: Path, console: Console) -> dict[str, Any]:
    bench = Bench(settings, work, console)
    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "ceiling": bench.ceiling,
        "status": bench.status,
        "reserve": bench.reserve,
        "trips": bench.trips,
        "postgresql": bench.postgresql,
        "planning": bench.planning,
        "noisy": bench.noisy,
        "contention": bench.contention,
        "scale": bench.scale,
        "ocpi": bench.ocpi,
    }
    began = time.perf_counter()
    try:
        for name in scenarios:
            await steps[name]()
    finally:
        with contextlib.suppress(Exception):
            await bench.stop_echo()
        bench.fleet.stop_all()
    apply_ratios(bench.rows, bench.results.get("ceiling"), bench.results.get("raw_ceiling"))
    for name, result in bench.results.items():  # the scenario entries carry the ratio too
        match = next((r for r in bench.rows if r["scenario"] == result["scenario"]), None)
        if match is not None and match is not result:
            result["ratio_to_ceiling"] = match["ratio_to_ceiling"]
            result["p50_ratio_to_ceiling"] = match["p50_ratio_to_ceiling"]
            result["ratio_to_raw"] = match.get("ratio_to_raw")
        bench.results[name] = result
    return {
        "quick": settings.quick,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "versions": versions(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
        "settings": {
            "connections": settings.connections,
            "duration_s": settings.duration,
            "trip_duration_s": settings.trip_duration,
            "warmup_s": settings.warmup,
            "contention_vehicles": settings.contention_vehicles,
            "scale_charge_points": settings.scale_charge_points,
            "heartbeat_interval_s": settings.heartbeat_interval,
            "ledger_sizes": list(settings.ledger_sizes),
            "server_log_level": settings.server_log_level,
            "time_scale": 1.0,
        },
        "wall_time_s": round(time.perf_counter() - began, 1),
        "ceiling_windows_ops_per_s": [round(x, 1) for x in bench.ceilings],
        "raw_ceiling_windows_ops_per_s": [round(x, 1) for x in bench.raw_ceilings],
        "scenarios": bench.results,
        "rows": bench.rows,
        "targets": evaluate_targets(bench.results, settings),
    }


def report(results: dict[str, Any], console: Console) -> None:
    mode = "quick" if results["quick"] else "full"
    m = results["machine"]
    title = (
        f"evcharge bench ({mode}) — {m['cpu_count']} CPUs {m['cpu_model']}, "
        f"Python {results['python']['version']}, {results['git_commit'][:12]}"
    )
    console.print(render_table(results["rows"], title))
    sc = results["scenarios"]
    if "noisy" in sc:
        n = sc["noisy"]
        console.print(
            f"noisy neighbour: a plan's p99 {n['p99_ms']:.1f} ms amid {n['flood_in_flight']} plans in flight of "
            f"another vehicle, {n['alone_p99_ms']:.1f} ms alone (x{n['p99_vs_alone']}); the flood's answers: "
            f"{n['flood_answers']}"
        )
    if "contention" in sc:
        c = sc["contention"]
        console.print(
            f"contention: {c['vehicles']} vehicles, all answered in {c['time_to_all_answered_s']:.2f} s; "
            f"{c['winners']} got a trip ({c['replanned']} re-planned), {c['losers']} refused; "
            f"winners per slot: {c['winners_per_slot']}; invariant violations: {len(c['invariant_violations'])}"
        )
    if "scale" in sc:
        s = sc["scale"]
        console.print(
            f"scale: {s['connected']} charge points connected in {s['connect_all_s']:.1f} s; server RSS "
            f"{s['rss_idle_mb']:.0f} MB idle, {s['rss_connected_mb']:.0f} MB connected, "
            f"{s['rss_heartbeating_mb']:.0f} MB heartbeating ({s['kb_per_connection']:.1f} kB per connection)"
        )
        for g in s.get("ledger_growth", {}).get("sizes", []):
            console.print(
                f"  ledger {g['existing_reservations']:>7,}: {g['ops_per_s']:,.0f} ops/s "
                f"(x{g['throughput_ratio']:.2f} slower), server CPU {g['server_cpu_ms_per_op']:.3f} ms/op: "
                f"cost x{g['cost_ratio']:.2f} (log bound x{g['log_ratio']:.2f}) "
                f"{'ok' if g['within_log_bound'] else 'ABOVE'}"
            )
    for key, what in (("reserve", "reservations"), ("trips", "trip bookings")):
        pg = sc.get(f"{key}_postgresql")
        if pg and "vs_sqlite" in pg:
            console.print(f"{what} on PostgreSQL: {pg['ops_per_s']:,.0f} ops/s, x{pg['vs_sqlite']} of SQLite's")
    windows = results.get("ceiling_windows_ops_per_s", [])
    if len(windows) > 1:
        console.print(
            f"ceiling windows: {min(windows):,.0f}..{max(windows):,.0f} ops/s over the run "
            "(each scenario's ratio uses the window measured just before it)"
        )
    for t in results["targets"]:
        mark = {True: "[green]met[/]", False: "[red]not met[/]", None: "[yellow]n/a[/]"}[t["met"]]
        note = f" ({t['note']})" if t.get("note") else ""
        console.print(f"target {t['target']}: {t['value']} (goal {t['goal']}) {mark}{note}")


# --- the echo server (scenario 1) -------------------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    """Our framing and codec and nothing else: Hello -> Welcome, any request -> HeartbeatAck."""

    def __init__(self) -> None:
        self.frames = p.FrameBuffer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.frames.feed(data)
        out = []
        try:
            while (body := self.frames.next_body()) is not None:
                message = p.decode_body(body)
                now = datetime.now(UTC)
                if isinstance(message, p.Hello):
                    reply: p.Message = p.Welcome(
                        id=message.id,
                        version=p.PROTOCOL_VERSION,
                        operator_id="echo",
                        operator_name="echo",
                        server_time=now,
                        time_scale=1.0,
                    )
                elif isinstance(message, p.Request):
                    reply = p.HeartbeatAck(id=message.id, server_time=now)
                else:
                    continue
                out.append(p.encode_frame(reply))
        except (p.FrameTooLarge, p.UndecodableMessage):
            self.transport.close()
            return
        if out:
            self.transport.write(b"".join(out))


async def echo_server(host: str, port: int, ready_file: Path | None) -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    if ready_file is not None:
        write_atomically(ready_file, json.dumps({"host": host, "port": bound, "pid": os.getpid()}))
    try:
        await stop.wait()
    finally:
        server.close()
    return 0


# --- the heartbeat client (scenario 6) -------------------------------------------------------


async def heartbeat_client(args: argparse.Namespace) -> int:
    """Connect a share of the scale world's charge points, then heartbeat until told to stop."""
    world = load_world(args.world)
    mine = scale_charge_points(world)[args.first : args.first + args.count]
    gate = asyncio.Semaphore(64)
    errors = 0

    async def connect(cp: Any) -> Client | None:
        nonlocal errors
        async with gate:
            try:
                c = await open_client(args.host, args.port, role="station", ident=cp.id, secret=cp.secret, timeout=60)
                await c.report_status("available")
                return c
            except EvchargeError:
                errors += 1
                return None

    began = time.perf_counter()
    clients = [c for c in await asyncio.gather(*(connect(cp) for cp in mine)) if c is not None]
    write_atomically(
        args.ready_file,
        json.dumps({"connected": len(clients), "errors": errors, "seconds": time.perf_counter() - began}),
    )
    deadline = time.monotonic() + 600
    while not args.go_file.exists():
        if time.monotonic() > deadline:
            return 1
        await asyncio.sleep(0.02)
    start = time.perf_counter()
    window = (start + args.hb_warmup, start + args.hb_warmup + args.hb_duration)
    latencies: list[float] = []
    failures = 0
    rng = random.Random(args.first)

    async def beat(c: Client) -> None:
        nonlocal failures
        await asyncio.sleep(rng.uniform(0, args.interval))
        tick = time.perf_counter()
        while tick < window[1]:
            t0 = time.perf_counter()
            try:
                await c.heartbeat()
            except EvchargeError:
                failures += 1
            else:
                if t0 >= window[0]:
                    latencies.append(time.perf_counter() - t0)
            tick += args.interval
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))

    await asyncio.gather(*(beat(c) for c in clients))
    write_atomically(args.result_file, json.dumps({"latencies": latencies, "errors": failures}))
    for c in clients:
        c.conn.abort()
    return 0


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Benchmark evcharge: real servers on loopback, driven by concurrent clients. "
        "Prints a table and writes JSON; speeds are ratios to an echo server measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="shrink everything (a smoke test, under a minute)")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"), help="JSON results file")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (the ceiling always runs: ratios need it)",
    )
    parser.add_argument("--connections", type=int, help="concurrent connections (default 32; quick 4)")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 5; quick 0.7)")
    parser.add_argument("--charge-points", type=int, help="charge points of the scale scenario (default 10000)")
    parser.add_argument("--server-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--work-dir", type=Path, help="where servers keep data and logs (kept; default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for docs)")
    # Internal: the child processes of a run.
    hidden = argparse.SUPPRESS
    parser.add_argument("--echo-server", action="store_true", help=hidden)
    parser.add_argument("--heartbeat-client", action="store_true", help=hidden)
    parser.add_argument("--host", default=HOST, help=hidden)
    parser.add_argument("--port", type=int, default=0, help=hidden)
    parser.add_argument("--ready-file", type=Path, help=hidden)
    parser.add_argument("--go-file", type=Path, help=hidden)
    parser.add_argument("--result-file", type=Path, help=hidden)
    parser.add_argument("--world", help=hidden)
    parser.add_argument("--first", type=int, default=0, help=hidden)
    parser.add_argument("--count", type=int, default=0, help=hidden)
    parser.add_argument("--interval", type=float, default=5.0, help=hidden)
    parser.add_argument("--hb-warmup", type=float, default=1.0, help=hidden)
    parser.add_argument("--hb-duration", type=float, default=5.0, help=hidden)
    return parser


def parse_scenarios(text: str) -> list[str]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    return [s for s in SCENARIOS if s == "ceiling" or s in wanted]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.echo_server:
        return uvloop.run(echo_server(args.host, args.port, args.ready_file))
    if args.heartbeat_client:
        raise_fd_limit()
        return uvloop.run(heartbeat_client(args))
    scenarios = parse_scenarios(args.scenarios)
    settings = Settings.make(args)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    raise_fd_limit()
    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="evcharge-bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = uvloop.run(sigterm_cancels(run_bench(settings, scenarios, work, console)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted[/]; every server was stopped")
        return 130
    except HarnessError as exc:  # a BenchError, or a child that would not start
        console.print(f"[red]bench failed[/]: {exc}")
        return 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results, console)
    if args.markdown:
        print(markdown_table(results["rows"]))
    write_json(args.out, results)
    console.print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
