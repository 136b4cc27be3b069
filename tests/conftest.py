"""Shared fixtures: a test world, in-process servers on port 0, server subprocesses, a throwaway CA.

In-process servers fail the test on any exception the event loop saw but
nobody handled. Subprocesses are always killed at teardown, so the suite
leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from evcharge.domain.world import World, load_world, resolve_world_path
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire.tls import TlsFiles

REPO = Path(__file__).resolve().parent.parent
EXTRA_VEHICLES = 60  # T001..T060, home A: enough for races of 50


def write_test_world(path: Path) -> Path:
    text = resolve_world_path("northeast").read_text(encoding="utf-8")
    extra = [
        f'\n[[vehicles]]\nid = "T{n:03d}"\nhome = "A"\ntoken = "test-vehicle-{n:03d}"\n'
        "battery_kwh = 60\nconsumption_kwh_per_km = 0.16\n"
        for n in range(1, EXTRA_VEHICLES + 1)
    ]
    path.write_text(text + "".join(extra), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def world_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_world(tmp_path_factory.mktemp("world") / "world.toml")


@pytest.fixture(scope="session")
def world(world_path: Path) -> World:
    return load_world(str(world_path))


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


def vehicles_of(world: World, operator_id: str) -> list[str]:
    return [v.id for v in world.vehicles if v.home == operator_id]


# --- real server processes ------------------------------------------------------------


@dataclass
class ServerProcess:
    """``python -m evcharge server`` as a child process on a free port."""

    world_path: Path
    operator: str
    data_dir: Path
    log_path: Path
    time_scale: float = 60.0
    extra: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    world_port: bool = False  # listen where the world file says (federated), not on a free port
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, timeout: float = 20.0) -> ServerProcess:
        ready = self.data_dir.parent / f"{self.operator}.{time.monotonic_ns()}.ready"
        args = [
            sys.executable,
            "-m",
            "evcharge",
            "server",
            "--world",
            str(self.world_path),
            "--operator",
            self.operator,
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            *(() if self.world_port else ("--port", "0")),
            "--ready-file",
            str(ready),
            "--time-scale",
            str(self.time_scale),
            "--log-level",
            "info",
            *self.extra,
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(self.env or {})}
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = json.loads(ready.read_text())["port"]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


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


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "evcharge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


# --- three federated operators ----------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free right now on loopback (the servers bind them a moment later)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_federated_world(source: Path, dest: Path) -> Path:
    """The test world with each operator on a free port, so peers can find each other."""
    text = source.read_text(encoding="utf-8")
    for default, port in zip((7401, 7402, 7403), free_ports(3), strict=True):
        text = text.replace(f"port = {default}\n", f"port = {port}\n")
    dest.write_text(text, encoding="utf-8")
    return dest


@pytest.fixture
def federated_world_path(world_path: Path, tmp_path: Path) -> Path:
    return write_federated_world(world_path, tmp_path / "federated.toml")


async def wait_until_federated(servers: dict[str, Server], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not all(
            server.federation is not None and len(server.federation.peers.catalogs) == len(servers) - 1
            for server in servers.values()
        ):
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running_federation(
    world: World, data_dir: Path, operators: tuple[str, ...] = ("A", "B", "C"), **options: Any
) -> AsyncIterator[dict[str, Server]]:
    """Every operator of the world as an in-process server, sharing one simulated clock."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    options.setdefault("time_scale", 60.0)
    options.setdefault("clock_anchor", time.time())
    servers: dict[str, Server] = {}
    try:
        for op in operators:
            servers[op] = Server(world, op, data_dir / op, host="127.0.0.1", **options)
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
