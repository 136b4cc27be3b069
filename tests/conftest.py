"""Shared fixtures: a test world, in-process servers on port 0, server subprocesses, a throwaway CA.

In-process servers fail the test on any exception the event loop saw but
nobody handled. Subprocesses (``tools.harness.ServerProcess``, shared with the
tools) are always killed at teardown, so the suite leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from evcharge.domain.world import VehicleConfig, World, load_world
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire.tls import TlsFiles
from tools.harness import ROOT, ServerProcess, evcharge_command, free_ports, write_world
from tools.postgres import PostgresServer

from .ocpp_harness import GatewayProcess

REPO = ROOT
EXTRA_VEHICLES = 60  # T001..T060, home A: enough for races of 50


def write_test_world(path: Path) -> Path:
    """The shipped world, its text as it is, plus the test vehicles."""
    extra = [VehicleConfig(f"T{n:03d}", "A", f"test-vehicle-{n:03d}", 60.0, 0.16) for n in range(1, EXTRA_VEHICLES + 1)]
    # Ports of its own: a single server must not reach peers someone else runs on the usual ones.
    write_world(path, vehicles=extra, ports=dict(zip("ABC", free_ports(3), strict=True)))
    return path


@pytest.fixture(scope="session")
def world_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_world(tmp_path_factory.mktemp("world") / "world.toml")


@pytest.fixture(scope="session")
def world(world_path: Path) -> World:
    return load_world(str(world_path))


# --- stores: SQLite in a data directory, or a real PostgreSQL server ---------------------------

STORES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (started when a test first needs it)."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run the test on each store: SQLite, then PostgreSQL."""
    return str(request.param)


NewStore = Callable[[], "str | None"]


@pytest.fixture
def new_store(store_kind: str, request: pytest.FixtureRequest) -> NewStore:
    """A fresh store per call: None for SQLite (the data directory's), a new database's URL for PostgreSQL."""
    if store_kind == "sqlite":
        return lambda: None
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.fresh_database


def store_args(store: str | None) -> tuple[str, ...]:
    """The server's command-line arguments for ``store`` (none for SQLite)."""
    return () if store is None else ("--store", store)


@asynccontextmanager
async def running_server(world: World, data_dir: Path, operator: str = "A", **options: Any) -> AsyncIterator[Server]:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    options.setdefault("port", 0)
    server = Server(world, operator, data_dir, host="127.0.0.1", **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        loop.set_exception_handler(None)
    assert not unhandled, f"unhandled exceptions in the event loop: {unhandled}"


@pytest.fixture
async def server(world: World, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(world, tmp_path / "data", time_scale=60.0) as srv:
        yield srv


@asynccontextmanager
async def vehicle(server: Server, vehicle_id: str) -> AsyncIterator[Client]:
    v = server.world.vehicle(vehicle_id)
    async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as client:
        yield client


@asynccontextmanager
async def operator(server: Server) -> AsyncIterator[Client]:
    op = server.operator
    async with connect("127.0.0.1", server.port, role="operator", ident=op.id, secret=op.secret) as client:
        yield client


def as_peer(server: Server, peer_id: str) -> Any:
    """A connection to ``server`` as operator ``peer_id``'s peer link would make it."""
    secret = server.world.operator(peer_id).secret
    return connect("127.0.0.1", server.port, role="peer", ident=peer_id, secret=secret)


def vehicles_of(world: World, operator_id: str) -> list[str]:
    return [v.id for v in world.vehicles if v.home == operator_id]


# --- real server processes ------------------------------------------------------------


@pytest.fixture
def spawn_server(world_path: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def spawn(
        operator: str = "A", *, data_dir: Path | None = None, world: Path | None = None, **options: Any
    ) -> ServerProcess:
        proc = ServerProcess(
            world or world_path,
            operator,
            data_dir or tmp_path / f"data-{operator}",
            tmp_path / f"server-{operator}.log",
            **options,
        )
        started.append(proc)
        return proc.start()

    yield spawn
    for proc in started:
        proc.kill()


@pytest.fixture
def gateway_process(world_path: Path, tmp_path: Path) -> Iterator[Any]:
    """``make(server_port, port, *options)``: an ``evcharge ocpp-gateway`` process, killed at teardown."""
    started: list[GatewayProcess] = []

    def make(server_port: int, port: int, *extra: str, world: Path | None = None) -> GatewayProcess:
        process = GatewayProcess(world or world_path, server_port, port, tmp_path, extra)
        started.append(process)
        return process

    yield make
    for process in started:
        process.kill()


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        evcharge_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


# --- three federated operators ----------------------------------------------------------


def write_federated_world(source: Path, dest: Path) -> Path:
    """The test world with each operator on a free port, so peers can find each other."""
    write_world(dest, source, ports=dict(zip("ABC", free_ports(3), strict=True)))
    return dest


@pytest.fixture
def federated_world_path(world_path: Path, tmp_path: Path) -> Path:
    return write_federated_world(world_path, tmp_path / "federated.toml")


@pytest.fixture
def fed_world(federated_world_path: Path) -> World:
    return load_world(str(federated_world_path))


async def wait_until_federated(servers: dict[str, Server], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not all(
            server.federation is not None and len(server.federation.peers.catalogs) == len(servers) - 1
            for server in servers.values()
        ):
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running_federation(
    world: World,
    data_dir: Path,
    operators: tuple[str, ...] = ("A", "B", "C"),
    new_store: NewStore | None = None,
    **options: Any,
) -> AsyncIterator[dict[str, Server]]:
    """Every operator of the world as an in-process server, sharing one simulated clock.

    ``new_store`` gives each operator its store (default: SQLite in its data directory).
    """
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    options.setdefault("time_scale", 60.0)
    options.setdefault("clock_anchor", time.time())
    servers: dict[str, Server] = {}
    try:
        for op in operators:
            store = new_store() if new_store is not None else None
            servers[op] = Server(world, op, data_dir / op, host="127.0.0.1", store=store, **options)
            await servers[op].start()
        await wait_until_federated(servers)
        yield servers
    finally:
        for server in servers.values():
            await server.stop()
        loop.set_exception_handler(None)
    assert not unhandled, f"unhandled exceptions in the event loop: {unhandled}"


# --- TLS: a throwaway CA ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the federation's CA
    stranger_ca: Path  # a CA nobody here trusts
    files: dict[str, TlsFiles]  # "A", "B", "C": certificate for a.evcharge.test ...; "stranger": signed by the other CA

    def name(self, operator: str) -> str:
        return f"{operator.lower()}.evcharge.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    stranger.cert_pem.write_to_path(str(where / "stranger-ca.pem"))

    def issue(authority: trustme.CA, name: str, label: str) -> TlsFiles:
        leaf = authority.issue_cert(name)
        cert, key = where / f"{label}.pem", where / f"{label}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return TlsFiles(cert=cert, key=key, ca=where / "ca.pem")

    files = {op: issue(ca, f"{op.lower()}.evcharge.test", op) for op in "ABC"}
    files["stranger"] = issue(stranger, "a.evcharge.test", "stranger")
    return Pki(where / "ca.pem", where / "stranger-ca.pem", files)


def pytest_asyncio_loop_factories() -> dict[str, Any]:
    """The tests run on uvloop, like `evcharge server` does."""
    return {"uvloop": uvloop.new_event_loop}
