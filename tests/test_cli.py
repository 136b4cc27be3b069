"""The command line end to end: real server and station processes, --json output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, ServerProcess, run_cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def station_process(world_path: Path, tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(server: ServerProcess, *cp_ids: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "evcharge", "station", "--world", str(world_path), "--operator", "A"]
        args += ["--server", server.address, *(x for cp in cp_ids for x in ("--id", cp))]
        log = (tmp_path / "station.log").open("ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def vehicle(world_path: Path, server: ServerProcess, vehicle_id: str, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_cli(
        "vehicle", "--world", str(world_path), "--id", vehicle_id, "--server", server.address, "--json", *args
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_vehicle_commands_json_end_to_end(spawn_server, station_process, world_path: Path) -> None:
    server: ServerProcess = spawn_server("A")
    station_process(server, "NAT-PN-1", "NAT-PN-2", "NAT-PN-3")

    rc, out = vehicle(world_path, server, "V01", "stations", "--city", "natal")
    assert rc == 0 and {s["id"] for s in out["stations"]} == {"NAT-PN", "NAT-CEN"}
    rc, out = vehicle(world_path, server, "V01", "stations", "--near", "Mossoró", "--limit", "1")
    assert rc == 0 and [s["id"] for s in out["stations"]] == ["MOS-1"]

    deadline = time.monotonic() + 20
    while True:  # the simulated charge points connect in the background
        rc, out = vehicle(world_path, server, "V01", "nearest", "--near=-5.88,-35.18", "--min-kw", "100")
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rc == 0, out
    assert out["charge_point_id"] == "NAT-PN-1" and out["station"]["city"] == "Natal"

    rc, out = vehicle(world_path, server, "V01", "reserve", "NAT-PN-1", "--minutes", "20")
    assert rc == 0
    mine = out["reservation"]
    assert mine["state"] == "booked" and mine["vehicle_id"] == "V01"

    rc, out = vehicle(world_path, server, "V04", "reserve", "NAT-PN-1", "--minutes", "20")
    assert rc == 1
    assert out["error"]["code"] == "conflict" and out["error"]["next_free"] == mine["end"]
    rc, out = vehicle(world_path, server, "V04", "cancel", mine["id"])
    assert rc == 1 and out["error"]["code"] == "not_found"  # not even disclosed

    rc, out = vehicle(world_path, server, "V01", "status", "NAT-PN")
    cps = {cp["id"]: cp for cp in out["station"]["charge_points"]}
    assert cps["NAT-PN-1"]["status"] == "reserved" and cps["NAT-PN-1"]["free_at"] == mine["end"]

    rc, out = vehicle(world_path, server, "V01", "charge", mine["id"])
    assert rc == 0 and out["reservation"]["state"] == "charging"
    time.sleep(1.0)
    rc, out = vehicle(world_path, server, "V01", "release", mine["id"])
    assert rc == 0 and out["reservation"]["state"] == "completed"
    kwh, cost = out["reservation"]["kwh"], out["reservation"]["cost"]
    assert kwh > 0 and cost == pytest.approx(round(kwh * 2.29, 2))

    rc, out = vehicle(world_path, server, "V01", "history")
    assert rc == 0 and [s["reservation_id"] for s in out["sessions"]] == [mine["id"]]
    assert out["total_cost"] == cost

    rc, spare = vehicle(world_path, server, "V01", "reserve", "NAT-PN-2", "--in", "60", "--minutes", "30")
    assert rc == 0
    rc, out = vehicle(world_path, server, "V01", "reservations")
    assert [r["id"] for r in out["reservations"]] == [spare["reservation"]["id"]]
    rc, out = vehicle(world_path, server, "V01", "cancel", spare["reservation"]["id"])
    assert rc == 0 and out["reservation"]["state"] == "cancelled"
    rc, out = vehicle(world_path, server, "V01", "reservations", "--all")
    assert {r["state"] for r in out["reservations"]} == {"completed", "cancelled"}

    done = run_cli("inspect", "--world", str(world_path), "--operator", "A", "--server", server.address, "--json")
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["operator_id"] == "A"
    assert {(r["id"], r["state"]) for r in state["reservations"]} == {
        (mine["id"], "completed"),
        (spare["reservation"]["id"], "cancelled"),
    }
    assert len(state["stations"]) == 6

    # The human format says the same in words.
    done = run_cli("vehicle", "--world", str(world_path), "--id", "V01", "--server", server.address, "history")
    assert done.returncode == 0 and "NAT-PN-1" in done.stdout and f"{cost:.2f}" in done.stdout
    # Every state change was logged with the client who made it.
    log = server.log_path.read_text()
    assert "reserve NAT-PN-1 20 min for V01 by vehicle V01" in log
    assert f"cancel {spare['reservation']['id']} by vehicle V01" in log


def test_errors_are_one_clear_line(world_path: Path, tmp_path: Path) -> None:
    # Nobody listens on this port.
    done = run_cli("vehicle", "--world", str(world_path), "--id", "V01", "--server", "127.0.0.1:1", "history")
    assert done.returncode == 1 and "unavailable" in done.stdout and "Traceback" not in done.stderr
    done = run_cli("vehicle", "--world", str(world_path), "--id", "NOPE", "history")
    assert done.returncode == 2 and "no vehicle 'NOPE'" in done.stderr
    done = run_cli("--help")
    assert done.returncode == 0 and "server" in done.stdout and "vehicle" in done.stdout
    done = run_cli("vehicle", "--help")
    assert done.returncode == 0 and "reserve" in done.stdout and "release" in done.stdout


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: re.sub(r"\bport = \d+", 'port = "seven"', t, count=1),
            "operators[0].port: Expected `int`, got `str`",
        ),
        (lambda t: t.replace("lat = -5.8772", "lat = -95.0"), "stations[0].lat: Expected `float` >= -90"),
        (lambda t: t.replace('operator = "B"', 'operator = "Z"', 1), "unknown operator 'Z'"),
        (lambda t: t.replace('id = "NAT-CEN-1"', 'id = "NAT-PN-1"'), "duplicate charge point id 'NAT-PN-1'"),
        (lambda t: t.replace("[[operators]]", "[[operators]\n", 1), "line 5"),
        (lambda t: t + "\nsurprise = 1\n", "unknown field `surprise`"),
    ],
)
def test_bad_world_file_names_file_key_and_problem(world_path: Path, tmp_path: Path, edit, expected: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(world_path.read_text(encoding="utf-8")), encoding="utf-8")
    done = run_cli("server", "--world", str(bad), "--operator", "A", "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 2
    assert str(bad) in done.stderr and expected in done.stderr, done.stderr


def test_option_defaults_are_those_of_what_they_configure() -> None:
    import inspect

    from evcharge.apps.cli import build_parser
    from evcharge.apps.ocpp.gateway import Gateway
    from evcharge.apps.repl import VehicleRepl
    from evcharge.operator.server import MAX_CONNECTIONS, Server
    from evcharge.wire import protocol as p

    parser = build_parser()
    server = parser.parse_args(["server", "--operator", "A"])
    defaults = {name: param.default for name, param in inspect.signature(Server).parameters.items()}
    for option in ("max_connections", "idle_timeout", "hello_timeout", "frame_timeout", "write_timeout"):
        assert getattr(server, option) == defaults[option], option
    assert server.max_in_flight == defaults["max_in_flight"]
    assert server.push_buffer_kb * 1024 == defaults["push_buffer_limit"]
    assert server.time_scale == defaults["time_scale"]

    gateway = parser.parse_args(["ocpp-gateway", "--operator", "A"])
    assert gateway.port == inspect.signature(Gateway).parameters["port"].default

    vehicle = parser.parse_args(["vehicle", "--id", "V01"])
    repl = inspect.signature(VehicleRepl).parameters
    assert vehicle.start_soc / 100 == repl["start_soc"].default
    assert vehicle.position_every == repl["position_every"].default

    plan = parser.parse_args(["vehicle", "--id", "V01", "plan", "--from", "Natal", "--to", "Recife"])
    asked = p.TripQuery(
        origin="Natal",
        destination="Recife",
        soc_pct=plan.soc,
        min_arrival_soc_pct=plan.min_arrival_soc,
        max_charge_soc_pct=plan.max_charge_soc,
        prefer=plan.prefer,
    )
    assert asked == p.TripQuery(origin="Natal", destination="Recife")
    nearest = parser.parse_args(["vehicle", "--id", "V01", "nearest", "--near", "Natal"])
    assert nearest.min_kw == p.FindNearest(lat=0, lon=0).min_power_kw

    done = run_cli("server", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert f"(default: {defaults['hello_timeout']})" in text
    assert f"(default: as many as the file limit holds, at most {MAX_CONNECTIONS})" in text
