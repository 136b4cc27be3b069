"""Ordinary mistakes get one clear line and the exit code of one rule (`evcharge --help`).

0 done; 1 the server said no, or the operation failed; 2 the command cannot run as
typed. Mistakes the command line can see are checked in this process before anything
connects; the server's refusals and a second server on a taken port run for real.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import pytest

from evcharge.apps.cli import main
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from tools.harness import HarnessError

from .conftest import REPO, ServerProcess, run_cli
from .raw import raw

pytestmark = pytest.mark.timeout(120)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``evcharge ARGV`` in this process: its exit code, stdout and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["vehicle", "--id", "V01", "--server", "nonsense", "reservations"], "'nonsense' has no port"),
        (["vehicle", "--id", "V01", "--server", ":abc", "reservations"], "no host before the port"),
        (["vehicle", "--id", "V01", "--server", "127.0.0.1:99999", "reservations"], "the port must be 1-65535"),
        (["inspect", "--operator", "A", "--server", "nonsense"], "'nonsense' has no port"),
        (["monitor", "--operator", "A", "--server", "h:abc"], "the port 'abc' is not a number"),
        (["station", "--operator", "A", "--server", "nonsense"], "'nonsense' has no port"),
        (["web", "--operator", "A", "--server", "nonsense"], "'nonsense' has no port"),
        (["server", "--operator", "A", "--port", "99999"], "a port is a number 0-65535"),
        (["web", "--operator", "A", "--port", "-1"], "a port is a number 0-65535"),
        (["vehicle", "--id", "V01", "--at", "Atlantis"], "unknown city 'Atlantis'"),
        (["vehicle", "--id", "v01", "history"], "no vehicle 'v01'; did you mean V01?"),
        (["inspect", "--operator", "a"], "no operator 'a'; did you mean A?"),
        (["vehicle", "--id", "V01", "nearest", "--near", "999,999"], "latitude must be between -90 and 90, not 999"),
        (["vehicle", "--id", "V01", "nearest", "--near=-5,200"], "longitude must be between -180 and 180, not 200"),
        (["vehicle", "--id", "V01", "nearest", "--near", "Atlantis"], "unknown city 'Atlantis'"),
        (["vehicle", "--id", "V01", "plan", "--from", "Natal", "--to", "Atlantis"], "unknown city 'Atlantis'"),
        (["vehicle", "--id", "V01", "book", "--from", "Atlantis", "--to", "Natal"], "unknown city 'Atlantis'"),
        (["vehicle", "--id", "V01", "plan", "--from", "Natal", "--to", "natal"], "both Natal: there is no trip"),
        (["vehicle", "--id", "V01", "plan", "--from", "Natal", "--to", "Recife", "--soc", "150"], "between 0 and 100"),
        (["vehicle", "--id", "V01", "reserve", "NAT-PN-1", "--minutes", "0"], "must be at least 1"),
        (["vehicle", "--id", "V01", "reserve", "NAT-PN-1", "--in", "soon"], "'soon' is not a number"),
        (["vehicle", "--id", "V01", "stations", "--limit", "0"], "must be at least 1"),
        (["station", "--operator", "A", "--except", "NOPE-1"], "operator A has no charge point NOPE-1"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], world_path: Path, argv: list[str], said: str
) -> None:
    if argv[0] != "server" and "--server" not in argv:
        argv = [argv[0], "--server", "127.0.0.1:1", *argv[1:]]  # nobody there: refused before connecting
    code, out, err = run_main(capsys, *argv[:1], "--world", str(world_path), *argv[1:])
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]
    assert said in last, err
    assert "Traceback" not in err and "Error:" not in err  # no exception's class name either


def test_exit_codes_are_one_rule_written_in_help_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "exit codes (every command):" in out
    for line in ("0    done", "1    the server said no", "2    the command cannot run as typed"):
        assert line in out
    code, out, _ = run_main(capsys, "vehicle", "--help")
    assert out.count("commands:") == 1 and "exit codes" in out  # one list of commands, then the rule
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Exit codes" in readme and "2 the command cannot run as typed" in readme


def test_every_option_and_argument_of_a_command_says_what_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "vehicle", "--id", "V01", "reserve", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "charge_point charge point id, e.g. NAT-PN-1" in text
    assert "--minutes MINUTES how long, in minutes (default: 30)" in text


def test_the_server_said_no_is_exit_1(spawn_server, world_path: Path) -> None:
    server: ServerProcess = spawn_server("A")
    done = run_cli("vehicle", "--world", str(world_path), "--id", "V01", "--server", server.address, "cancel", "A-x")
    assert done.returncode == 1 and done.stdout.startswith("not_found"), (done.stdout, done.stderr)


def test_ids_in_another_case_are_taken_as_the_world_spells_them(spawn_server, world_path: Path) -> None:
    server: ServerProcess = spawn_server("A")
    argv = ("vehicle", "--world", str(world_path), "--id", "V01", "--server", server.address, "--json")
    done = run_cli(*argv, "reserve", "nat-pn-1", "--in", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["reservation"]["charge_point_id"] == "NAT-PN-1"
    done = run_cli(*argv, "plan", "--from", "natal", "--to", "joao pessoa")
    assert done.returncode == 0, done.stdout + done.stderr
    trip = json.loads(done.stdout)["trip"]
    assert (trip["origin"], trip["destination"]) == ("Natal", "João Pessoa")


def test_a_second_server_on_a_taken_port_says_so_in_one_line(spawn_server, world_path: Path, tmp_path: Path) -> None:
    server: ServerProcess = spawn_server("A")
    done = run_cli(
        "server", "--world", str(world_path), "--operator", "A", "--port", str(server.port),
        "--data-dir", str(tmp_path / "other"), "--log-level", "warning",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "evcharge server: cannot listen: the address is already in use (is one for operator A running already?)"
    ]


def test_the_store_keeps_its_clock_anchor_and_refuses_another(world_path: Path, tmp_path: Path) -> None:
    """The README's recipe restarted: the same anchor carries on, a new one is refused, none carries on."""
    data = tmp_path / "data"
    anchor = time.time()
    server = ServerProcess(world_path, "A", data, tmp_path / "a.log", clock_anchor=anchor).start()
    try:
        argv = ("vehicle", "--world", str(world_path), "--id", "V01", "--json")
        done = run_cli(*argv, "--server", server.address, "reserve", "NAT-PN-1", "--in", "90")
        assert done.returncode == 0, done.stderr
        booked = json.loads(done.stdout)["reservation"]
    finally:
        server.stop()

    later = ServerProcess(world_path, "A", data, tmp_path / "b.log", clock_anchor=anchor + 600)
    with pytest.raises(HarnessError, match="exited with 2"):
        later.start(timeout=20)
    refusal = (tmp_path / "b.log").read_text()
    assert "keeps simulated time at" in refusal and "give the anchor and time scale it was started with" in refusal
    assert "Traceback" not in refusal

    for again in (anchor, None):  # the same anchor, or none: the store's clock carries on
        server = ServerProcess(world_path, "A", data, tmp_path / "c.log", clock_anchor=again).start()
        try:
            done = run_cli(*argv, "--server", server.address, "reservations")
            (kept,) = json.loads(done.stdout)["reservations"]
            assert (kept["id"], kept["start"], kept["state"]) == (booked["id"], booked["start"], "booked")
        finally:
            server.stop()


@pytest.mark.parametrize(
    ("request_fields", "said"),
    [
        ({"type": "FindNearest", "lat": 999.0, "lon": 999.0}, "latitude must be between -90 and 90, not 999"),
        (
            {"type": "PlanTrip", "query": {"origin": "Natal", "destination": "Recife", "soc_pct": 150.0}},
            "state of charge at departure (%) must be between 0 and 100, not 150",
        ),
        ({"type": "ListStations", "limit": 0}, "limit must be at least 1, not 0"),
        ({"type": "Reserve", "charge_point_id": "NAT-PN-1", "minutes": 30}, "start time is missing"),
        (
            {"type": "Reserve", "charge_point_id": "NAT-PN-1", "start": "2026-01-01T10:00:00", "minutes": 30},
            "start time must say its offset from UTC",
        ),
        ({"type": "ListStations", "city": ["Natal"]}, "city must be text, not a list"),
        ({"type": "Teleport"}, "unknown request 'Teleport'"),
    ],
)
async def test_the_server_says_what_is_wrong_with_a_request_in_user_words(
    server: Server, request_fields: dict[str, object], said: str
) -> None:
    async with raw(server) as peer:
        await peer.hello(server, "vehicle", "V01")
        await peer.send_body(msgspec.msgpack.encode({**request_fields, "id": 8}))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 8, error
        assert error.message.startswith(said), error.message
        assert "$." not in error.message and "`" not in error.message  # no decoder's paths or types
        # The connection goes on, and nothing changed.
        await peer.send(p.Heartbeat(id=9))
        assert isinstance(await asyncio.wait_for(peer.receive(), 10), p.HeartbeatAck)


@pytest.mark.parametrize(
    ("command", "secret"),
    [(("monitor", "--operator", "A"), "operator-a-secret"), (("station", "--operator", "A"), "cp-nat-pn-1-secret")],
)
def test_a_wrong_secret_is_final_said_once_and_exit_1(
    spawn_server, world_path: Path, tmp_path: Path, command: tuple[str, ...], secret: str
) -> None:
    server: ServerProcess = spawn_server("A")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(world_path.read_text(encoding="utf-8").replace(secret, "not-the-secret"), encoding="utf-8")
    done = run_cli(command[0], "--world", str(wrong), *command[1:], "--server", server.address, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "unauthorized:" in done.stderr.strip().splitlines()[-1] and "wrong credential" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("unauthorized:") == 1


def test_a_plan_draws_the_battery_along_the_route_and_one_without_stops_says_so(spawn_server, world_path: Path) -> None:
    server: ServerProcess = spawn_server("A")
    argv = ("vehicle", "--world", str(world_path), "--id", "V01", "--server", server.address, "plan")
    done = run_cli(*argv, "--from", "Natal", "--to", "Recife", "--soc", "30")  # A's chargers alone suffice
    assert done.returncode == 0, done.stderr
    chart = done.stdout[done.stdout.index("100% │") :]
    assert "  0% │" in chart and "┴" in chart  # a stop marked on the road
    cities = chart.splitlines()[9].split()  # under the 8 rows and the road: where the trip goes
    assert cities[0] == "Natal" and cities[-1] == "Recife" and len(cities) >= 3, chart
    assert "Book it as shown" in done.stdout
    done = run_cli(*argv, "--from", "Natal", "--to", "João Pessoa", "--soc", "90")
    assert done.returncode == 0, done.stderr
    assert "no charging stop needed" in done.stdout
    assert "Book it as shown" not in done.stdout and "│ #" not in done.stdout  # no empty table, nothing to book
