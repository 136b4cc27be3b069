"""The benchmark suite runs end to end (quick mode), reports every scenario, and cleans up.

A smoke test only: speeds are measured by `scripts/bench.sh`, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.timeout(300)

SCENARIOS = ("ceiling", "status", "reserve", "trips", "planning", "noisy", "contention", "scale", "ocpi")
ROW_FIELDS = ("scenario", "connections", "operations", "ops_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rss_mb")


def leftover_processes(marker: str) -> str:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return found.stdout.strip()


def test_quick_bench_reports_every_scenario_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    work = tmp_path / "bench-work"
    done = subprocess.run(
        ["bash", "scripts/bench.sh", "--quick", "--out", str(out), "--work-dir", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert "ceiling" in done.stdout and "ops/s" in done.stdout  # the table was printed
        results = json.loads(out.read_text())
    finally:
        assert leftover_processes(str(work)) == "", "bench processes left behind"

    assert results["quick"] is True
    for key in ("git_commit", "timestamp", "machine", "python", "versions", "targets", "rows"):
        assert key in results, key
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["platform"]
    assert set(results["versions"]) >= {"msgspec", "uvloop", "rich", "aiorwlock"}
    assert results["python"]["version"].startswith("3.")

    scenarios = results["scenarios"]
    # trips has two rows, planning then booking; planning three, in process on two worlds then through servers
    planning = {"planning_northeast", "planning_brazil-northeast", "planning_servers"}
    on_postgresql = {"reserve_postgresql", "trips_postgresql"}  # the postgresql scenario: the same rows on it
    expected = {*SCENARIOS, "trip_planning", "raw_ceiling"} - {"planning", "postgresql"} | planning | on_postgresql
    assert set(scenarios) == expected
    for name in on_postgresql:
        assert scenarios[name]["store"] == "postgresql" and scenarios[name]["vs_sqlite"] > 0, name
    for name in scenarios:
        entry = scenarios[name]
        for key in ROW_FIELDS:
            assert key in entry, f"{name}: no {key}"
        assert entry["operations"] > 0 and entry["ops_per_s"] > 0, name
        assert entry["p50_ms"] <= entry["p90_ms"] <= entry["p99_ms"] <= entry["max_ms"], name
        assert entry["rss_mb"] and all(mb > 0 for mb in entry["rss_mb"].values()), name
    assert scenarios["ceiling"]["ratio_to_ceiling"] == 1.0
    assert scenarios["raw_ceiling"]["ratio_to_raw"] == 1.0
    assert scenarios["trips"]["plans_booked"] > 0
    notes = scenarios["trips"].get("notes", {})
    # Every booking books a plan as shown, unless that plan lost its slots and was re-planned.
    assert notes.get("not_as_shown", 0) <= notes.get("replanned", 0), notes
    for name in ("status", "reserve", "trip_planning", "trips"):
        assert scenarios[name]["ratio_to_ceiling"] > 0, name
        assert scenarios[name]["ratio_to_raw"] > 0, name
    assert set(scenarios["trips"]["rss_mb"]) == {"A", "B", "C"}
    assert scenarios["planning_brazil-northeast"]["no_route"] == 0  # the demo world has gaps; this one none
    assert scenarios["planning_brazil-northeast"]["charge_points"] > 900
    assert set(scenarios["planning_servers"]["rss_mb"]) == set("ABCDE")
    assert scenarios["planning_servers"]["ratio_to_ceiling"] > 0

    contention = scenarios["contention"]
    assert contention["vehicles"] == contention["operations"] == contention["winners"] + contention["losers"]
    assert contention["winners"] >= 1
    assert contention["winners_per_slot"] == 1
    assert contention["invariant_violations"] == []
    assert contention["time_to_all_answered_s"] > 0

    ocpi = scenarios["ocpi"]
    assert ocpi["ops_per_s"] > 0 and ocpi["bookings"]["ops_per_s"] > 0
    assert ocpi["bookings"]["notes"].get("RESERVED", 0) > 0 and set(ocpi["rss_mb"]) == {"A", "edge"}

    scale = scenarios["scale"]
    assert scale["connected"] == scale["charge_points"] > 0 and scale["connect_errors"] == 0
    assert scale["ledger"] and all(r["operations"] > 0 for r in scale["ledger"])
    assert [g["existing_reservations"] for g in scale["ledger_growth"]["sizes"]] == [
        r["existing_reservations"] for r in scale["ledger"]
    ]
