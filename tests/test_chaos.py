"""The chaos run, and the checker it relies on (which must not pass vacuously)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from evcharge.domain.model import Reservation, Trip
from evcharge.domain.world import World, load_world
from evcharge.wire import protocol as p
from tools.chaos import (
    AckedTrip,
    Chaos,
    DiskWindow,
    Kill,
    OperatorProcess,
    Record,
    Settings,
    build_parser,
    check_states,
)
from tools.chaos_proxy import ChaosProxy
from tools.harness import seed_store

from .conftest import REPO, operator, running_federation


def leftover_processes(marker: str) -> str:
    return subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout.strip()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_quick_chaos_run_injects_every_fault_and_finds_no_violation(tmp_path: Path, store: str) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        ["bash", "scripts/chaos.sh", "--quick", "--seed", "7", "--json", str(out), "--store", store],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert leftover_processes(results["work_dir"]) == ""  # every server and log pipe is gone
    assert results["violations"] == []
    assert "0 invariant violations" in done.stdout
    # It did something, under every kind of fault.
    assert results["operations"]["total"] > 0
    ack = results["acknowledged"]
    assert ack["reservations"] > 0 and ack["trips"] > 0 and ack["cancels"] > 0
    faults = results["faults"]
    kinds = ["delay", "stall", "cut", "reset", "partition", "kill", "disk_refused"]
    if store == "sqlite":  # a damaged file is SQLite's: with PostgreSQL its database refuses writes instead
        kinds.append("store_damaged")
    for kind in kinds:
        assert faults[kind] > 0, f"no {kind} fault injected: {faults}"
    assert results["settings"]["store"] == store
    for kill in results["kills"]:
        if kill["damage"]:  # refused in one line naming the store, then restarted on it put back
            assert kill["refusal"].startswith("evcharge server: store ") and kill["restart_s"] > 0, kill
    assert results["restarts"] == faults["kill"]
    for window in results["disk_windows"]:
        assert window["probe"] == "unavailable"  # refused, never acknowledged
        assert window["unavailable_answers"] > 0
        assert window["recovered_after_s"] is not None
    # Both checks ran, on real books: after healing, and after kill -9 of every server.
    assert [c["name"] for c in results["checks"]] == [
        "after healing",
        "after kill -9 and restart of every server",
    ]
    for check in results["checks"]:
        assert check["violations"] == [] and check["trips"] > 0 and check["live_reservations"] > 0


# --- the checker against real servers whose books are broken ----------------------------------


def trip_row(trip_id: str, stops: list[tuple[str, str, str, int]], now: int) -> Trip:
    """A committed trip of V01 coordinated by A, its stops (operator, reservation, charge point, start)."""
    at = datetime.fromtimestamp(stops[0][3], UTC)
    info = p.TripInfo(
        id=trip_id,
        vehicle_id="V01",
        state="committed",
        origin="Natal",
        destination="Recife",
        depart=at,
        arrival=at,
        distance_km=1,
        soc_at_arrival=10,
        total_kwh=1,
        total_cost=1,
        home_operator_id="A",
        stops=[
            p.TripStop(
                city="X",
                operator_id=op,
                station_id="S",
                station_name="S",
                charge_point_id=cp,
                power_kw=50,
                drive_km=1,
                arrival=datetime.fromtimestamp(start, UTC),
                slot_start=datetime.fromtimestamp(start, UTC),
                slot_end=datetime.fromtimestamp(start + 1800, UTC),
                soc_in=1,
                soc_out=2,
                kwh=1,
                cost=1,
                reservation_id=rid,
            )
            for op, rid, cp, start in stops
        ],
    )
    return Trip(trip_id, "V01", "committed", f"{trip_id}.1", ["A", "B"], [], msgspec.json.encode(info), now)


def acked(record: Record, r: Reservation, operator_id: str) -> None:
    record.reservation(
        operator_id,
        p.ReservationInfo(
            id=r.id,
            operator_id=operator_id,
            station_id="S",
            charge_point_id=r.charge_point_id,
            vehicle_id=r.vehicle_id,
            start=datetime.fromtimestamp(r.start, UTC),
            end=datetime.fromtimestamp(r.end, UTC),
            state="booked",
        ),
    )


@pytest.mark.timeout(60)
async def test_the_chaos_checker_sees_every_kind_of_violation_in_real_books(
    federated_world_path: Path, tmp_path: Path
) -> None:
    world = load_world(str(federated_world_path))  # on free ports: the shipped ones may be taken
    now = int(time.time())
    later = now + 2 * 86400
    cp_a = world.stations_of("A")[0].charge_points[0].id
    cp_b = world.stations_of("B")[0].charge_points[0].id

    def res(rid: str, cp: str, start: int, state: str = "booked", **more: object) -> Reservation:
        return Reservation(rid, cp, "V01", start, start + 1800, state, now, **more)  # type: ignore[arg-type]

    kept = res("A-kept", cp_a, later)
    cancel_lost = res("A-cancel-lost", cp_a, later + 3600)  # its cancellation was acknowledged
    expired_early = res("A-expired-early", cp_a, later + 7200, "expired")  # a no-show before its time
    never_stored = res("A-never-stored", cp_a, later + 10_800)  # acknowledged, never written
    of_trip = {"trip_id": "A-Tpartial", "txn_id": "A-Tpartial.1", "coordinator": "A"}
    stop_a = res("A-stop", cp_a, later + 14_400, **of_trip)
    stop_b = res("B-stop", cp_b, later + 18_000, "aborted", **of_trip)  # the other half of the trip is gone
    # A hold whose coordinator C is never there to answer: nobody resolves it.
    in_doubt = {"trip_id": "C-Tx", "txn_id": "C-Tx.1", "coordinator": "C", "hold_deadline": now - 60}
    stuck = res("B-stuck", cp_b, later, "held", **in_doubt)
    partial = trip_row("A-Tpartial", [("A", "A-stop", cp_a, stop_a.start), ("B", "B-stop", cp_b, stop_b.start)], now)
    # Rows in the operators' stores before their servers start, as a crash could have left them.
    await seed_store(tmp_path / "A", "A", [kept, cancel_lost, expired_early, stop_a], [partial])
    await seed_store(tmp_path / "B", "B", [stop_b, stuck])

    record = Record()
    for r in (kept, cancel_lost, expired_early, never_stored):
        acked(record, r, "A")
    record.cancel_acked.add(cancel_lost.id)
    record.trip(msgspec.json.decode(partial.info, type=p.TripInfo))

    async with running_federation(world, tmp_path, operators=("A", "B")) as servers:
        states = {}
        for op, server in servers.items():
            async with operator(server) as c:
                states[op] = await c.inspect()
    grace = world.rules.no_show_grace_min
    found = check_states(states, record, grace, time.time())
    expected = {
        "lost acknowledged booking": "acknowledged reservation A-never-stored is gone",
        "acknowledged cancellation not kept": "A-cancel-lost at A: its cancellation was acknowledged but it is booked",
        "expired before its time": "A-expired-early at A was acknowledged and never cancelled, but it is expired",
        "partial trip": "trip A-Tpartial is not whole",
        "partial acknowledged trip": "stop B-stop at B of trip A-Tpartial (committed) is aborted",
        "hold past its deadline": "hold B-stuck at B (trip C-Tx) is",
    }
    for kind, text in expected.items():
        assert any(text in v for v in found), f"{kind} not reported: {found}"
    assert len(found) == len(expected), found
    # The one thing left right is not reported.
    assert not any("A-kept" in v for v in found)

    # Overlaps cannot even be loaded (a server refuses a store whose live reservations overlap),
    # so the last kind is shown on these real books with one reservation copied onto another's slot.
    copy = msgspec.structs.replace(states["A"].reservations[0], id="A-overlap")
    states["A"].reservations.append(copy)
    assert any("overlap at A/" in v for v in check_states(states, record, grace, time.time()))


def test_a_record_of_nothing_on_clean_books_finds_nothing() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    r = p.ReservationInfo(
        id="A-1",
        operator_id="A",
        station_id="S",
        charge_point_id="c",
        vehicle_id="V",
        start=t0,
        end=t0 + timedelta(minutes=30),
        state="booked",
    )
    states = {"A": p.InspectResult(operator_id="A", server_time=t0, stations=[], reservations=[r], trips=[])}
    record = Record()
    record.reservation("A", r)
    assert check_states(states, record, 15, t0.timestamp()) == []


# --- the servers' processes ----------------------------------------------------------------

# A stand-in for a server that will not stop on SIGTERM: it says so on its output once it ignores it.
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf', flush=True); time.sleep(120)"


@pytest.mark.timeout(60)
async def test_stopping_a_server_that_ignores_sigterm_kills_it_without_blocking_the_event_loop(tmp_path: Path) -> None:
    server = OperatorProcess("A", tmp_path / "world.toml", tmp_path, 0, 0.0, "info")
    server.launch([sys.executable, "-c", DEAF, str(tmp_path)])  # its work dir in its command line, for pgrep
    try:
        async with asyncio.timeout(20):
            while b"deaf" not in server.log_path.read_bytes():
                await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(server.stop_async(grace=2.0))
        # Other tasks run while stop waits: a synchronous wait would have held the loop until it was done.
        turns = 0
        async with asyncio.timeout(30):
            while not stopping.done():
                turns += 1
                await asyncio.sleep(0.05)
        await stopping
        assert turns > 1
        assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
        assert server.logger is not None and server.logger.returncode is not None
        assert server.died_by_itself() is None  # stopped by us
        assert leftover_processes(str(tmp_path)) == ""
    finally:
        server.kill()


# --- the run's own checks, without servers -------------------------------------------------


def quiet_chaos(tmp_path: Path, world: World, *args: str, **settings: float) -> Chaos:
    """A chaos run that was never started (its checks are called by hand), printing nothing."""
    made = Settings.make(build_parser().parse_args(["--quick", "--seed", "1", *args]))
    chaos = Chaos(dataclasses.replace(made, **settings), tmp_path, Console(quiet=True))
    chaos.world = world
    return chaos


def books(peers_down: dict[str, set[str]]) -> dict[str, p.InspectResult]:
    """Empty books of A, B and C, each seeing its two peers, up but for those in ``peers_down``."""
    now = datetime.now(UTC)
    return {
        op: p.InspectResult(
            operator_id=op,
            server_time=now,
            stations=[],
            reservations=[],
            peers=[
                p.PeerInfo(
                    operator_id=peer,
                    address="127.0.0.1:1",
                    up=peer not in peers_down.get(op, set()),
                    last_error="connection refused" if peer in peers_down.get(op, set()) else "",
                )
                for peer in "ABC"
                if peer != op
            ],
        )
        for op in "ABC"
    }


@pytest.mark.timeout(30)
async def test_a_peer_link_still_down_after_settling_is_a_violation(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    chaos = quiet_chaos(tmp_path, world, settle_timeout=0.5)

    async def inspect_all() -> dict[str, p.InspectResult]:
        return books({"A": {"C"}})

    monkeypatch.setattr(chaos, "inspect_all", inspect_all)
    check = await chaos.settle_and_check("after healing")
    assert len(check["violations"]) == 1, check
    assert "link from A to C still down (connection refused) after settling" in check["violations"][0]
    assert chaos.violations == [f"after healing: {check['violations'][0]}"]


@pytest.mark.timeout(30)
async def test_a_peer_link_that_comes_back_while_settling_is_no_violation(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    chaos = quiet_chaos(tmp_path, world, settle_timeout=20.0)
    answers = iter([books({"B": {"A", "C"}}), books({"B": {"C"}})])

    async def inspect_all() -> dict[str, p.InspectResult]:
        return next(answers, books({}))

    monkeypatch.setattr(chaos, "inspect_all", inspect_all)
    check = await chaos.settle_and_check("after healing")
    assert check["violations"] == [] and chaos.violations == []
    assert next(answers, None) is None  # it waited for the links, and stopped once all were up


def covered(chaos: Chaos, *, but: str = "") -> Chaos:
    """Give a never-started run everything a run must do (``but`` one thing): acknowledgements and faults."""
    if but != "reservation":
        chaos.ops[("reserve", "ok")] += 1
    if but != "trip":
        chaos.record.trips["A-T1"] = AckedTrip("A-T1", "A", "V01", (("B", "B-1"),))
    if but != "cancellation":
        chaos.record.cancel_acked.add("A-2")
    proxy = ChaosProxy("127.0.0.1", 1, name="vehicles->A")  # never started: only its counts matter
    proxy.faults.update({kind: 1 for kind in ("delay", "stall", "cut", "reset") if kind != but})
    chaos.client_proxies["A"] = proxy
    chaos.partitions = 0 if but == "partition" else 1
    chaos.kills.append(Kill("B", 0.5, 0.0 if but == "kill" else 1.2))  # not restarted: no kill that counts
    refusal = "" if but == "store" else "evcharge server: store data/A.sqlite3 is empty, but ..."
    chaos.kills.append(Kill("A", 0.5, 1.1, damage="emptied", refusal=refusal))
    chaos.disk_windows.append(DiskWindow("C", 3.0, "timeout" if but == "disk" else "unavailable", int(but != "disk")))
    return chaos


@pytest.mark.timeout(30)
def test_a_run_that_did_all_it_must_has_no_violation(tmp_path: Path, world: World) -> None:
    assert covered(quiet_chaos(tmp_path, world)).results(1.0, 14.0, 20.0)["violations"] == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("but", "violation"),
    [
        ("trip", "no trip was acknowledged"),
        ("reservation", "no single reservation was acknowledged"),
        ("cancellation", "no cancellation was acknowledged"),
        ("delay", "the proxies made no delay"),
        ("stall", "the proxies made no stall"),
        ("cut", "the proxies made no cut"),
        ("reset", "the proxies made no reset"),
        ("partition", "no operator was partitioned"),
        ("kill", "no server was killed with kill -9 and restarted"),
        ("disk", "no disk refused writes with a request answered `unavailable`"),
        ("store", "no killed server was restarted on a damaged store"),
    ],
)
def test_a_run_that_left_something_untested_has_a_violation_saying_what(
    tmp_path: Path, world: World, but: str, violation: str
) -> None:
    results = covered(quiet_chaos(tmp_path, world), but=but).results(1.0, 14.0, 20.0)
    assert len(results["violations"]) == 1 and violation in results["violations"][0], results["violations"]


@pytest.mark.timeout(30)
def test_a_run_that_did_nothing_has_a_violation_for_each_thing_and_proxy_faults_count_only_if_enabled(
    tmp_path: Path, world: World
) -> None:
    assert len(quiet_chaos(tmp_path, world).results(0.0, 0.0, 0.0)["violations"]) == 3 + 4 + 4
    # With every proxy rate at zero only the server faults are enabled, and must still be injected.
    idle_proxies = quiet_chaos(tmp_path, world, "--fault-scale", "0")
    assert idle_proxies.s.enabled_faults == ("partition", "kill", "disk_refused", "store_damaged")
    assert len(idle_proxies.results(0.0, 0.0, 0.0)["violations"]) == 3 + 4
    assert covered(idle_proxies, but="delay").results(1.0, 14.0, 20.0)["violations"] == []
