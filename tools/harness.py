"""What the tests and the tools (bench, chaos) share to run evcharge for real.

* ``ServerProcess``: ``python -m evcharge server`` as a child process, on a free port, a
  given one or the one its world file says, started when its ready file appears, killed or
  terminated; ``Child`` is any other child process with its output in a log file.
* ``server_command``: that server's command line, built in this one place.
* ``write_world``: a world file, written atomically: the shipped world (or another) with
  operators on other ports, extra vehicles and stations, or cut to some operators.
* ``seed_store``: reservations and trips put into an operator's store before its server
  starts, through the store's own code (``evcharge.operator.store.Store``), never around it.
* ``free_ports``, ``write_atomically``, ``write_json``, ``read_json``, ``tail``,
  ``die_with_parent``, ``sigterm_cancels``, ``wait_federated``, ``inspect_operators``.

Every child runs in ``ROOT``, the directory that holds ``tools/``: there
``python -m tools.bench`` resolves, and ``python -m evcharge`` runs this tree's evcharge
(the working directory comes first on ``sys.path``), not whatever else is installed.
Nothing here needs a git checkout.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from evcharge.domain.model import Reservation, Trip
from evcharge.domain.world import (
    SHIPPED,
    OperatorConfig,
    StationConfig,
    VehicleConfig,
    World,
    load_world,
    resolve_world_path,
)
from evcharge.links.client import open_client
from evcharge.operator.store import Store, put_reservation, put_trip
from evcharge.operator.store.sqlite import store_file
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
T = TypeVar("T")


class HarnessError(RuntimeError):
    """A child would not start or answer, or the operators would not federate."""


# --- small helpers ----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free right now on loopback (the servers bind them a moment later)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never part of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically, creating the directory if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path`` (written atomically by a child), or None while it is not there yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def child_setup(with_parent: bool, limits: Mapping[int, tuple[int, int]]) -> Callable[[], None] | None:
    """A preexec_fn: the child dies with its parent (``with_parent``, see ``die_with_parent``), under ``limits``.

    ``limits`` maps ``resource.RLIMIT_*`` to (soft, hard): a server started under a low file
    limit, say. Both only call into the C library between fork and exec.
    """
    on_death = die_with_parent() if with_parent else None
    if on_death is None and not limits:
        return None

    def preexec() -> None:
        if on_death is not None:
            on_death()
        for which, (soft, hard) in limits.items():
            resource.setrlimit(which, (soft, hard))

    return preexec


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux kill the child if this process dies (even by SIGKILL).

    The kernel sends the signal when the *thread* that started the child ends: start
    children from a thread that lives as long as they should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


async def sigterm_cancels(coro: Awaitable[T]) -> T:
    """Run ``coro`` so that SIGTERM cancels it (its finally blocks then stop every child)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


# --- child processes ----------------------------------------------------------------------


def evcharge_command(*args: str) -> list[str]:
    """``python -m evcharge ARGS`` with this interpreter."""
    return [sys.executable, "-m", "evcharge", *args]


def server_command(
    world_path: Path,
    operator: str,
    data_dir: Path,
    *,
    ready_file: Path,
    port: int | None = 0,
    host: str = HOST,
    time_scale: float = 60.0,
    log_level: str = "info",
    clock_anchor: float | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """The command line of ``python -m evcharge server`` (``port`` None: the world file's port)."""
    return evcharge_command(
        "server",
        "--world",
        str(world_path),
        "--operator",
        operator,
        "--data-dir",
        str(data_dir),
        "--host",
        host,
        *(() if port is None else ("--port", str(port))),
        "--ready-file",
        str(ready_file),
        "--time-scale",
        str(time_scale),
        *(() if clock_anchor is None else ("--clock-anchor", repr(clock_anchor))),
        "--log-level",
        log_level,
        *extra,
    )


class Child:
    """A child process running in ``ROOT``, its output (stdout and stderr) appended to ``log_path``.

    ``env``: variables set on top of this process's environment. ``die_with_parent``: Linux
    kills the child when this process dies. ``log_through_pipe``: the output goes through a
    pipe to a ``cat`` that writes the log; a pipe is not a file, so the log keeps flowing
    while the child's own writes to files are refused (``RLIMIT_FSIZE``). ``limits``: the
    child's resource limits (``resource.RLIMIT_*`` -> (soft, hard)), e.g. few files.
    """

    def __init__(
        self,
        name: str,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        log_through_pipe: bool = False,
        die_with_parent: bool = True,
        limits: Mapping[int, tuple[int, int]] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.env = dict(env) if env else None
        self.log_through_pipe = log_through_pipe
        self.die_with_parent = die_with_parent
        self.limits = dict(limits or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.logger: subprocess.Popen[bytes] | None = None  # the log's cat, with log_through_pipe
        self.port = 0  # from its ready file, if it wrote one

    def __repr__(self) -> str:
        state = "never started" if self.proc is None else f"pid {self.proc.pid}, {self.returncode_text()}"
        return f"<{type(self).__name__} {self.name}: {state}>"

    def returncode_text(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return "running" if code is None else f"exit status {code}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never launched"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``args`` (not waiting for anything)."""
        preexec = child_setup(self.die_with_parent, self.limits)
        env = {**os.environ, **self.env} if self.env else None
        if self.log_through_pipe:
            proc = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
                preexec_fn=preexec,
            )
            with self.log_path.open("ab") as log:
                self.logger = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=log, preexec_fn=preexec)
            assert proc.stdout is not None
            proc.stdout.close()  # cat holds the pipe now
        else:
            with self.log_path.open("ab") as log:
                proc = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=ROOT,
                    env=env,
                    preexec_fn=preexec,
                )
        self.proc = proc
        return proc

    # --- waiting for its ready file ----------------------------------------------------

    def _ready(self, ready_file: Path, deadline: float, timeout: float) -> dict[str, Any] | None:
        """The ready file's content once there; None meanwhile; HarnessError if it died or took too long."""
        info: dict[str, Any] | None = read_json(ready_file)
        if info is not None:
            self.port = int(info.get("port", 0))
            return info
        assert self.proc is not None, f"{self.name} was never launched"
        if self.proc.poll() is not None:
            raise HarnessError(f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")
        if time.monotonic() > deadline:
            self.kill()
            raise HarnessError(f"{self.name} not ready after {timeout:g} s:\n{tail(self.log_path)}")
        return None

    def wait_ready(self, ready_file: Path, timeout: float = 20.0) -> dict[str, Any]:
        """Block until the child wrote ``ready_file`` (JSON, atomically); its content."""
        deadline = time.monotonic() + timeout
        while True:
            info = self._ready(ready_file, deadline, timeout)
            if info is not None:
                return info
            time.sleep(0.05)

    async def wait_ready_async(self, ready_file: Path, timeout: float = 60.0) -> dict[str, Any]:
        """``wait_ready`` with the event loop running on meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            info = self._ready(ready_file, deadline, timeout)
            if info is not None:
                return info
            await asyncio.sleep(0.02)

    # --- ending it ----------------------------------------------------------------------

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind; then reaped (with its log's cat)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and its exit status once it ended (``subprocess.TimeoutExpired`` if it did not in time)."""
        assert self.proc is not None, f"{self.name} was never launched"
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=timeout)
        self._reap()
        return status

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within ``grace``; its exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()
        return None if proc is None else proc.returncode

    async def stop_async(self, grace: float = 10.0) -> int | None:
        """``stop`` off the event loop, which runs on meanwhile."""
        return await asyncio.to_thread(self.stop, grace)

    def _reap(self) -> None:
        """Wait for the child and its log's cat; whichever is still there after 10 s is SIGKILLed."""
        for proc in (self.proc, self.logger):
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class ServerProcess(Child):
    """``python -m evcharge server`` for one operator as a child process; restartable on the same data.

    It listens on a free port (``listen_port`` 0, the default: a new one at each start), on
    ``listen_port``, or with ``world_port`` where the world file says (federated operators
    find each other there). ``port`` is where it listens once started; ``extra`` goes at the
    end of its command line. Its ready file goes next to its data directory.
    """

    def __init__(
        self,
        world_path: Path,
        operator: str,
        data_dir: Path,
        log_path: Path,
        *,
        time_scale: float = 60.0,
        log_level: str = "info",
        clock_anchor: float | None = None,
        world_port: bool = False,
        listen_port: int = 0,
        extra: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "",
        log_through_pipe: bool = False,
        die_with_parent: bool = True,
        limits: Mapping[int, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(
            name or f"server {operator}",
            log_path,
            env=env,
            log_through_pipe=log_through_pipe,
            die_with_parent=die_with_parent,
            limits=limits,
        )
        self.world_path = world_path
        self.operator = operator
        self.data_dir = data_dir
        self.time_scale = time_scale
        self.log_level = log_level
        self.clock_anchor = clock_anchor
        self.world_port = world_port
        self.listen_port = listen_port
        self.extra = tuple(extra)
        self.startup_s = 0.0  # from launch to listening, at the latest start (it loads the store)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self, ready_file: Path) -> list[str]:
        return server_command(
            self.world_path,
            self.operator,
            self.data_dir,
            ready_file=ready_file,
            port=None if self.world_port else self.listen_port,
            time_scale=self.time_scale,
            log_level=self.log_level,
            clock_anchor=self.clock_anchor,
            extra=self.extra,
        )

    def _launch_server(self) -> tuple[Path, float]:
        ready = self.data_dir.parent / f"{self.operator}.{time.monotonic_ns()}.ready"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        self.launch(self.command(ready))
        return ready, began

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start it and block until it listens."""
        ready, began = self._launch_server()
        self.wait_ready(ready, timeout)
        self.startup_s = time.perf_counter() - began
        return self

    async def start_async(self, timeout: float = 60.0) -> ServerProcess:
        """Start it and wait until it listens, the event loop running on meanwhile."""
        ready, began = self._launch_server()
        await self.wait_ready_async(ready, timeout)
        self.startup_s = time.perf_counter() - began
        return self


# --- world files --------------------------------------------------------------------------


class OcpiEdgeProcess(Child):
    """``python -m evcharge ocpi`` for one operator as a child process, on a free port."""

    def __init__(
        self,
        world_path: Path,
        operator: str,
        server_port: int,
        data_dir: Path,
        log_path: Path,
        *,
        registration_tokens: Path | None = None,
        extra: Iterable[str] = (),
    ) -> None:
        super().__init__(f"OCPI edge {operator}", log_path)
        self.world_path = world_path
        self.operator = operator
        self.server_port = server_port
        self.data_dir = data_dir
        self.registration_tokens = registration_tokens
        self.extra = tuple(extra)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self, ready_file: Path) -> list[str]:
        tokens = () if self.registration_tokens is None else ("--registration-tokens", str(self.registration_tokens))
        return evcharge_command(
            "ocpi",
            "--world",
            str(self.world_path),
            "--operator",
            self.operator,
            "--host",
            HOST,
            "--port",
            "0",
            "--server",
            f"{HOST}:{self.server_port}",
            "--data-dir",
            str(self.data_dir),
            *tokens,
            "--log-level",
            "info",
            *self.extra,
            "--ready-file",
            str(ready_file),
        )

    def start(self, timeout: float = 20.0) -> OcpiEdgeProcess:
        ready = self.data_dir.parent / f"ocpi-{self.operator}.{time.monotonic_ns()}.ready"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.launch(self.command(ready))
        self.wait_ready(ready, timeout)
        return self


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def operator_toml(op: OperatorConfig) -> str:
    text = (
        f"\n[[operators]]\nid = {_q(op.id)}\nname = {_q(op.name)}\nhost = {_q(op.host)}\n"
        f"port = {op.port}\nsecret = {_q(op.secret)}\n"
    )
    if op.peer_port is not None:
        text += f"peer_port = {op.peer_port}\n"
    if op.peer_tls:
        text += "peer_tls = true\n"
    if op.tls_name:
        text += f"tls_name = {_q(op.tls_name)}\n"
    if op.addresses:
        text += f"addresses = [{', '.join(map(_q, op.addresses))}]\n"
    if op.store:
        text += f"store = {_q(op.store)}\n"
    if op.ocpi is not None:
        text += "\n[operators.ocpi]\n"
        text += "".join(f"{key} = {_q(value)}\n" for key, value in msgspec.structs.asdict(op.ocpi).items())
    return text


def station_toml(s: StationConfig) -> str:
    text = (
        f"\n[[stations]]\nid = {_q(s.id)}\noperator = {_q(s.operator)}\nname = {_q(s.name)}\n"
        f"city = {_q(s.city)}\nlat = {s.lat!r}\nlon = {s.lon!r}\n"
    )
    for cp in s.charge_points:
        text += (
            f"\n[[stations.charge_points]]\nid = {_q(cp.id)}\npower_kw = {cp.power_kw!r}\n"
            f"connector = {_q(cp.connector)}\nprice_per_kwh = {cp.price_per_kwh!r}\nsecret = {_q(cp.secret)}\n"
        )
    return text


def vehicle_toml(v: VehicleConfig) -> str:
    return (
        f"\n[[vehicles]]\nid = {_q(v.id)}\nhome = {_q(v.home)}\ntoken = {_q(v.token)}\n"
        f"battery_kwh = {v.battery_kwh!r}\nconsumption_kwh_per_km = {v.consumption_kwh_per_km!r}\n"
    )


def world_toml(world: World, header: str = "evcharge world (generated by tools.harness)") -> str:
    """A whole world as TOML text that ``load_world`` reads back."""
    out = [f"# {header}\n"]
    out += map(operator_toml, world.operators)
    out += map(station_toml, world.stations)
    out += map(vehicle_toml, world.vehicles)
    out.append("\n[rules]\n")
    out += (f"{key} = {value!r}\n" for key, value in msgspec.structs.asdict(world.rules).items())
    return "".join(out)


def write_world(
    path: Path,
    base: str | Path = SHIPPED,
    *,
    operators: Iterable[str] | None = None,
    ports: Mapping[str, int] | None = None,
    vehicles: Iterable[VehicleConfig] = (),
    stations: Iterable[StationConfig] = (),
) -> World:
    """Write a world file at ``path`` (atomically) and return it as the servers will load it.

    ``base``, a shipped world's name or a world file, with each operator in ``ports`` on that
    port, and ``vehicles`` and ``stations`` added. While every operator stays, the base's text
    is kept as it is, the ports edited in place and the rest appended (tests edit that text,
    and a broken world's errors name its lines); cut to ``operators``, the world (their
    stations and vehicles, and what is added) is written out whole.
    """
    world = load_world(str(base))
    ports = dict(ports or {})
    unknown = set(ports) - {op.id for op in world.operators}
    if unknown:
        raise ValueError(f"{world.source}: no operator {', '.join(sorted(unknown))}")
    kept = [op.id for op in world.operators] if operators is None else list(operators)
    vehicles, stations = list(vehicles), list(stations)
    if kept == [op.id for op in world.operators]:
        text = resolve_world_path(str(base)).read_text(encoding="utf-8")
        for op in world.operators:
            if op.id in ports:
                text, found = re.subn(rf"^port = {op.port}$", f"port = {ports[op.id]}", text, flags=re.M)
                if found != 1:
                    raise ValueError(f"{world.source}: operator {op.id}'s port {op.port} is not on one line of its own")
        text += "".join([*map(station_toml, stations), *map(vehicle_toml, vehicles)])
    else:
        cut = World(
            operators=[
                msgspec.structs.replace(op, port=ports.get(op.id, op.port)) for op in world.operators if op.id in kept
            ],
            stations=[s for s in world.stations if s.operator in kept] + stations,
            vehicles=[v for v in world.vehicles if v.home in kept] + vehicles,
            rules=world.rules,
        )
        text = world_toml(cut, f"evcharge world: {world.source} cut to operators {', '.join(kept)}")
    write_atomically(path, text)
    return load_world(str(path))  # read back: the servers load exactly this


# The load of the tools: vehicles of every operator on routes across A, B and C.

ROUTES: tuple[tuple[str, str, float], ...] = (
    # 3-5 stops across A, B and C for the bench vehicles (75 kWh, 0.18 kWh/km): origin, destination, SoC %
    ("Natal", "Feira de Santana", 80),
    ("Natal", "Salvador", 80),
    ("Natal", "Alagoinhas", 80),
    ("Natal", "Aracaju", 80),
    ("Natal", "Estância", 80),
    ("Natal", "Aracaju", 50),
    ("Feira de Santana", "Natal", 80),
    ("Salvador", "Natal", 80),
    ("Alagoinhas", "Natal", 80),
    ("Aracaju", "Natal", 80),
    ("Estância", "Natal", 80),
    ("Arapiraca", "Natal", 50),
)
SPANNING_ROUTE = ("Natal", "Feira de Santana", 80.0)  # its trip stops at A, B and C


def bench_vehicle_id(op: str, n: int) -> str:
    return f"BV{op}{n:03d}"


def bench_vehicles(operators: Iterable[str], per_operator: int) -> list[VehicleConfig]:
    """``per_operator`` vehicles at home at each operator (75 kWh), ``bench_vehicle_id(op, 1)`` first."""
    return [
        VehicleConfig(bench_vehicle_id(op, n), op, f"bench-token-{op}-{n:03d}", 75.0, 0.18)
        for op in operators
        for n in range(1, per_operator + 1)
    ]


# --- stores and running operators ---------------------------------------------------------


def store_path(data_dir: Path, operator: str) -> Path:
    """Where ``evcharge server --data-dir DATA_DIR --operator OPERATOR`` keeps its store."""
    return store_file(data_dir, operator)


async def seed_store(
    data_dir: Path, operator: str, reservations: Iterable[Reservation] = (), trips: Iterable[Trip] = ()
) -> None:
    """Put reservations and trips into an operator's store before its server starts (one commit).

    Through the store's own code (``Store``: schema, pragmas, one transaction), as the server
    would have written them, e.g. before a crash. Its server must not be running.
    """
    store = Store(store_path(data_dir, operator))
    store.open()
    store.start()
    try:
        await store.commit([*map(put_reservation, reservations), *map(put_trip, trips)])
    finally:
        await store.close()


async def inspect_operators(
    world: World, ports: Mapping[str, int], timeout: float = 20.0
) -> dict[str, p.InspectResult]:
    """Each operator's whole state, asked as that operator at ``ports``."""
    states = {}
    for op_id, port in ports.items():
        op = world.operator(op_id)
        c = await open_client(HOST, port, role="operator", ident=op.id, secret=op.secret, timeout=timeout)
        try:
            states[op_id] = await c.inspect()
        finally:
            await c.close()
    return states


async def wait_federated(world: World, ports: Mapping[str, int], timeout: float = 60.0) -> None:
    """Until a trip planned at each operator spans all of them (peers linked, catalogs in).

    Asks as each operator's first bench vehicle (``bench_vehicle_id(op, 1)``), at ``ports``.
    """
    deadline = time.monotonic() + timeout
    origin, destination, soc = SPANNING_ROUTE
    query = p.TripQuery(origin=origin, destination=destination, soc_pct=soc)
    pending = set(ports)
    while pending:
        for op_id in sorted(pending):
            v = world.vehicle(bench_vehicle_id(op_id, 1))
            try:
                c = await open_client(HOST, ports[op_id], role="vehicle", ident=v.id, secret=v.token)
                try:
                    plan = await c.plan_trip(query)
                finally:
                    await c.close()
            except EvchargeError:
                continue
            if {s.operator_id for s in plan.stops} == set(ports):
                pending.discard(op_id)
        if pending:
            if time.monotonic() > deadline:
                raise HarnessError(f"operators {sorted(pending)} did not federate within {timeout:g} s")
            await asyncio.sleep(0.2)
