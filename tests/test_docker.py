"""Docker packaging: the compose file, the compose world, the Dockerfiles, and the compose topology.

No Docker engine is needed. ``docker compose config`` (or ``docker-compose config``) validates
and resolves docker-compose.yml; the Dockerfiles are checked as text; and the topology that
compose would start (three operators, their charge points, a vehicle booking a trip across all
three) runs here as real local processes, with the same flags.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evcharge.domain.world import World, load_world, resolve_world_path
from evcharge.links.client import connect
from evcharge.wire.errors import EvchargeError

from .conftest import REPO, free_ports, run_cli

pytestmark = pytest.mark.timeout(120)

OPERATORS = ("A", "B", "C")
COMPOSE_FILE = REPO / "docker-compose.yml"
CLOCK_ANCHOR = "1767225600"  # docker-compose.yml's default ${EVCHARGE_CLOCK_ANCHOR}
CONTAINER_PORT = 7400
DOCKERFILES = {
    "Dockerfile.server": ["evcharge", "server"],
    "Dockerfile.station": ["evcharge", "station"],
    "Dockerfile.client": ["evcharge", "vehicle"],
}


def service(op: str) -> str:
    return f"operator-{op.lower()}"


def operator_command(op: str) -> list[str]:
    """What docker-compose.yml passes to `evcharge server` (checked against the resolved config)."""
    return [
        "--world", "compose", "--operator", op, "--host", "0.0.0.0", "--data-dir", "/data",
        "--time-scale", "60", "--clock-anchor", CLOCK_ANCHOR,
    ]  # fmt: skip


def station_command(op: str) -> list[str]:
    return ["--world", "compose", "--operator", op]


# --- docker compose config --------------------------------------------------------------


def _compose_tool() -> list[str] | None:
    if shutil.which("docker"):
        try:
            v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            v2 = None
        if v2 is not None and v2.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _install_debian_docker_compose(budget: float = 100.0) -> str:
    """As root on Debian/Ubuntu: apt-get install docker-compose. Returns why it could not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if not shutil.which("apt-get"):
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-compose"]
    deadline = time.monotonic() + budget
    try:
        for step in (install, ["apt-get", "update", "-q"], install):
            done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=deadline - time.monotonic())
            if step is install and done.returncode == 0:
                return ""
        return f"apt-get install docker-compose failed: {done.stderr.strip()[-300:]}"
    except (subprocess.TimeoutExpired, ValueError):
        return f"apt-get did not finish within {budget:g} s"


@pytest.fixture(scope="module")
def compose_tool() -> list[str]:
    tool = _compose_tool()
    if tool is None:
        why = _install_debian_docker_compose()
        tool = _compose_tool()
        if tool is None:
            pytest.skip(f"neither `docker compose` nor `docker-compose` is installed, and installing it failed ({why})")
    return tool


def _compose(tool: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: the file's own defaults, not whatever the caller exported.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "EVCHARGE_"))}
    return subprocess.run(
        [*tool, "--profile", "client", "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def _yaml_to_data(text: str) -> Any:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    # docker-compose v1 is a Python program with PyYAML: let its interpreter convert the YAML.
    script = shutil.which("docker-compose")
    first = Path(script).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace") if script else ""
    if first.startswith("#!") and "python" in first:
        interpreter = first[2:].strip().split()
        done = subprocess.run(
            [*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            return json.loads(done.stdout)
    pytest.skip("docker-compose config validated, but its YAML output cannot be read here (no PyYAML)")


@pytest.fixture(scope="module")
def compose_config(compose_tool: list[str]) -> dict[str, Any]:
    if compose_tool == ["docker", "compose"]:
        done = _compose(compose_tool, "config", "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    done = _compose(compose_tool, "config")
    assert done.returncode == 0, done.stderr
    return _yaml_to_data(done.stdout)


def _mounts(svc: dict[str, Any]) -> set[tuple[str, str]]:
    found = set()
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):  # docker-compose v1: "name:/target:rw"
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found.add((source, target))
    return found


def _healthy_dependency(svc: dict[str, Any], on: str) -> bool:
    depends = svc.get("depends_on", {})
    return isinstance(depends, dict) and depends.get(on, {}).get("condition") == "service_healthy"


def _dockerfile(svc: dict[str, Any]) -> str:
    return Path(svc["build"]["dockerfile"]).name


def test_compose_file_validates_and_lists_services_and_volumes(compose_tool: list[str]) -> None:
    done = _compose(compose_tool, "config", "--quiet")
    assert done.returncode == 0, f"{' '.join(compose_tool)} config rejected docker-compose.yml:\n{done.stderr}"
    services = _compose(compose_tool, "config", "--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {
        *(service(op) for op in OPERATORS),
        *(f"stations-{op.lower()}" for op in OPERATORS),
        "client",
    }
    volumes = _compose(compose_tool, "config", "--volumes")
    assert volumes.returncode == 0, volumes.stderr
    assert set(volumes.stdout.split()) == {f"{service(op)}-data" for op in OPERATORS}
    # The compose spec needs no `version:` key; docker-compose 1.27+ and compose v2 both accept it.
    assert not re.search(r"^version\s*:", COMPOSE_FILE.read_text(encoding="utf-8"), re.MULTILINE)


def test_compose_operators(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert len(services) == 7
    assert set(compose_config["volumes"]) == {f"{service(op)}-data" for op in OPERATORS}
    for op in OPERATORS:
        svc = services[service(op)]
        assert _dockerfile(svc) == "Dockerfile.server"
        command = svc["command"]
        assert command == operator_command(op), f"{service(op)} runs {command}"
        assert command[command.index("--operator") + 1] == op
        assert _mounts(svc) == {(f"{service(op)}-data", "/data")}
        assert svc["restart"] == "unless-stopped"
        assert not svc.get("profiles")
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        assert "socket" in test[3] and "curl" not in test[3]
        assert str(CONTAINER_PORT) in test[3]


def test_compose_stations_and_client(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    for op in OPERATORS:
        svc = services[f"stations-{op.lower()}"]
        assert _dockerfile(svc) == "Dockerfile.station"
        assert svc["command"] == station_command(op)
        assert _healthy_dependency(svc, service(op))
        assert not svc.get("profiles")
    client = services["client"]
    assert _dockerfile(client) == "Dockerfile.client"
    assert client["profiles"] == ["client"]
    assert client["command"][:2] == ["--world", "compose"]
    # `docker compose run client ARGS` replaces the command: the environment keeps the compose world.
    assert client["environment"]["EVCHARGE_WORLD"] == "compose"
    assert client["stdin_open"] is True and client["tty"] is True
    assert _healthy_dependency(client, "operator-a")


# --- healthchecks: stdlib Python, a TCP connection ----------------------------------------


@contextmanager
def _listener() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run_check(code: str, env: dict[str, str] | None = None) -> int:
    # -I -S: no site-packages, no PYTHON* variables: the check must need the standard library only.
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=30, env={**os.environ, **(env or {})}
    )
    return done.returncode


def _dockerfile_healthcheck_code() -> str:
    final = dockerfile_stages(REPO / "Dockerfile.server")[-1]
    [healthcheck] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"], command
    return command[2]


def test_healthchecks_connect_to_the_port(compose_config: dict[str, Any]) -> None:
    compose_code = compose_config["services"]["operator-a"]["healthcheck"]["test"][3]
    image_code = _dockerfile_healthcheck_code()
    with _listener() as port:
        assert _run_check(compose_code.replace(str(CONTAINER_PORT), str(port))) == 0
        assert _run_check(image_code, {"EVCHARGE_HEALTHCHECK_PORT": str(port)}) == 0
    assert _run_check(compose_code.replace(str(CONTAINER_PORT), str(port))) != 0
    assert _run_check(image_code, {"EVCHARGE_HEALTHCHECK_PORT": str(port)}) != 0


# --- the compose world ----------------------------------------------------------------------


def test_compose_world_is_northeast_at_the_service_names() -> None:
    compose, northeast = load_world("compose"), load_world("northeast")
    assert Path(compose.source) == REPO / "evcharge" / "worlds" / "compose.toml"
    assert "worlds/*.toml" in (REPO / "setup.cfg").read_text(encoding="utf-8")  # shipped in the wheel
    assert compose.stations == northeast.stations
    assert compose.vehicles == northeast.vehicles
    assert compose.rules == northeast.rules
    assert [msgspec.structs.replace(op, host="", port=0) for op in compose.operators] == [
        msgspec.structs.replace(op, host="", port=0) for op in northeast.operators
    ]
    assert {op.id: (op.host, op.port) for op in compose.operators} == {
        op: (service(op), CONTAINER_PORT) for op in OPERATORS
    }


# --- the Dockerfiles as text -----------------------------------------------------------------


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions as (KEYWORD, rest), continuation lines joined, one list per FROM."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{path.name}: {instruction!r} before the first FROM"
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|git|python3?-dev|lib\S+-dev)\b")


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile(name: str) -> None:
    stages = dockerfile_stages(REPO / name)
    assert len(stages) >= 2, f"{name}: multi-stage (builder + final)"
    for stage in stages:
        base = stage[0][1].split()
        assert base[0] == "python:3.11-slim", f"{name}: FROM {stage[0][1]}"
    builder, final = stages[0], stages[-1]
    builder_name = builder[0][1].split()[-1]
    runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "pip wheel --no-deps" in runs and "venv" in runs

    def values(keyword: str) -> list[str]:
        return [rest for k, rest in final if k == keyword]

    copies = values("COPY")
    assert copies == [f"--from={builder_name} /opt/venv /opt/venv"], f"{name}: the final stage copies only the venv"
    env = " ".join(values("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert "/opt/venv/bin" in env  # on PATH, so the entrypoint's `evcharge` is the venv's
    user = values("USER")[-1]
    assert user.split(":")[0] == "10001", f"{name}: USER {user}"
    for run in values("RUN"):
        installs = re.search(r"\b(apt-get|apt|apk)\s+(-\S+\s+)*(install|add)\b", run)
        assert not (installs and BUILD_TOOLS.search(run)), f"{name}: build tools in the final image: {run}"
        assert "pip install" not in run
    [entrypoint] = values("ENTRYPOINT")
    assert json.loads(entrypoint) == DOCKERFILES[name]
    if name == "Dockerfile.server":
        assert values("HEALTHCHECK"), "the server image needs a HEALTHCHECK"
        assert not re.search(r"\b(curl|wget)\b", values("HEALTHCHECK")[0])
        assert values("VOLUME") and "/data" in values("VOLUME")[0]
        assert values("EXPOSE") == [str(CONTAINER_PORT)]
        assert any("/data" in run and "10001" in run for run in values("RUN")), "/data owned by the user"
    else:
        assert not values("HEALTHCHECK")


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".venv", ".git", "data", "tests", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"):
        assert excluded in lines, f".dockerignore should exclude {excluded}"
    assert any("bench" in line for line in lines)
    for name in DOCKERFILES:
        for stage in dockerfile_stages(REPO / name):
            for keyword, rest in stage:
                if keyword == "COPY" and not rest.startswith("--from"):
                    for source in rest.split()[:-1]:
                        assert source not in lines and f"/{source}" not in lines, f"{name} needs {source}"
                        assert (REPO / source).exists()


# --- the compose topology as local processes -----------------------------------------------


def write_local_compose_world(dest: Path) -> tuple[Path, dict[str, int]]:
    """compose.toml with each service name replaced by 127.0.0.1 and a free port."""
    text = resolve_world_path("compose").read_text(encoding="utf-8")
    ports = dict(zip(OPERATORS, free_ports(len(OPERATORS)), strict=True))
    for op, port in ports.items():
        block = f'host = "{service(op)}"\nport = {CONTAINER_PORT}\n'
        assert text.count(block) == 1, f"compose.toml: operator {op}'s address"
        text = text.replace(block, f'host = "127.0.0.1"\nport = {port}\n')
    dest.write_text(text, encoding="utf-8")
    return dest, ports


def _local(args: list[str], **values: str) -> list[str]:
    """The compose command with the value of each named option swapped for its local stand-in."""
    args = list(args)
    for option, value in values.items():
        args[args.index(option) + 1] = value
    return args


async def _inspect_all(world: World) -> dict[str, Any]:
    states = {}
    for op in world.operators:
        async with connect(op.host, op.port, role="operator", ident=op.id, secret=op.secret) as c:
            states[op.id] = await c.inspect()
    return states


async def _wait_for_topology(world: World, timeout: float = 30.0) -> None:
    """Every peer link up and every charge point online (its simulator connected)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                states = await _inspect_all(world)
            except EvchargeError:
                states = None
            if states and all(
                all(peer.up for peer in state.peers)
                and all(cp.status != "offline" for st in state.stations for cp in st.charge_points)
                for state in states.values()
            ):
                return
            await asyncio.sleep(0.2)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "evcharge", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )


async def test_compose_topology_as_local_processes(tmp_path: Path) -> None:
    world_path, ports = write_local_compose_world(tmp_path / "compose-local.toml")
    world = load_world(str(world_path))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for op in OPERATORS:  # operator-a, operator-b, operator-c
            ready = tmp_path / f"{op}.ready"
            args = _local(
                operator_command(op),
                **{"--world": str(world_path), "--data-dir": str(tmp_path / f"data-{op}"), "--host": "127.0.0.1"},
            )
            procs[service(op)] = _spawn(["server", *args, "--ready-file", str(ready)], tmp_path / f"{op}.log")
        for op in OPERATORS:
            ready, proc = tmp_path / f"{op}.ready", procs[service(op)]
            deadline = time.monotonic() + 20
            while not ready.exists():
                log = (tmp_path / f"{op}.log").read_text()
                assert proc.poll() is None, f"operator {op} exited with {proc.returncode}:\n{log}"
                assert time.monotonic() < deadline, f"operator {op} not listening after 20 s:\n{log}"
                await asyncio.sleep(0.05)
            assert json.loads(ready.read_text())["port"] == ports[op]
        # The image's HEALTHCHECK, as docker would run it, against operator A.
        healthcheck = _dockerfile_healthcheck_code()
        assert await asyncio.to_thread(_run_check, healthcheck, {"EVCHARGE_HEALTHCHECK_PORT": str(ports["A"])}) == 0
        for op in OPERATORS:  # stations-a, stations-b, stations-c
            args = _local(station_command(op), **{"--world": str(world_path)})
            procs[f"stations-{op.lower()}"] = _spawn(["station", *args], tmp_path / f"stations-{op}.log")
        await _wait_for_topology(world)

        # docker compose run --rm client --id V01 --json book --from Natal --to "Feira de Santana"
        done = await asyncio.to_thread(
            run_cli,
            *("vehicle", "--world", str(world_path), "--id", "V01", "--json"),
            *("book", "--from", "Natal", "--to", "Feira de Santana"),
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        trip = json.loads(done.stdout)["trip"]
        assert {stop["operator_id"] for stop in trip["stops"]} == set(OPERATORS), trip["stops"]
        states = await _inspect_all(world)
        for op in OPERATORS:
            booked = [r for r in states[op].reservations if r.trip_id == trip["id"] and r.state == "booked"]
            assert booked, f"operator {op} holds none of the trip's stops"

        # `docker compose stop` sends SIGTERM: every process ends cleanly, well within docker's 10 s.
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            assert await asyncio.to_thread(proc.wait, 10) == 0, name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
