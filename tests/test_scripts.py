"""The scripts a newcomer runs: they work, and leave nothing running behind."""

from __future__ import annotations

import signal
import subprocess
import threading

import pytest

from .conftest import REPO

pytestmark = pytest.mark.timeout(180)


def leftover_processes(marker: str) -> str:
    """This checkout's processes still running with ``marker`` (another checkout's demo on the machine is not ours)."""
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return "\n".join(line for line in found.stdout.splitlines() if str(REPO) in line)


def test_demo_quick_runs_the_whole_story_and_cleans_up() -> None:
    done = subprocess.run(["bash", "scripts/demo.sh", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for expected in ("Nearest: Natal Ponta Negra", "conflict: charge point NAT-PN-1 is taken", "Released NAT-PN-1"):
        assert expected in out, out[-3000:]
    assert "Charging history" in out
    # A's driver at C's charger, through A: reserved, charged, and on one bill with A's session.
    assert "Nearest: Feira de Santana BR-116" in out and "Released FEC-1-2" in out
    bill = out.split("Costs by operator and month")[1]
    assert "│ A " in bill and "│ C " in bill, bill[:2000]
    assert "Settlement of operator C" in out
    # The trip: stops at all three operators, then two vehicles racing for the same route.
    for op in "ABC":
        assert f"operator {op}: " in out and "booked" in out.split(f"operator {op}: ")[1].split("\n")[0]
    assert "V04: trip" in out and ("V07: trip" in out or "V07: no trip" in out)
    assert "is cancelled; its" in out
    assert leftover_processes("evcharge-demo") == ""


def test_demo_interrupted_with_ctrl_c_stops_everything() -> None:
    proc = subprocess.Popen(
        ["bash", "scripts/demo.sh"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "V01 reserves" in line:
                break  # the server and the charge points are running now
        # Go on reading: a demo whose output pipe is full would block on it and never get to exit.
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        assert leftover_processes("evcharge-demo") != ""
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert leftover_processes("evcharge-demo") == ""


def run_script(*args: str) -> str:
    done = subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert leftover_processes("evcharge-demo") == ""
    return done.stdout


def test_demo_race_gives_no_slot_twice() -> None:
    out = run_script("scripts/demo-race.sh", "--quick")
    assert "of 6 vehicles got a trip" in out
    assert "invariants hold" in out and "VIOLATION" not in out


def test_demo_crash_leaves_every_trip_whole_or_absent() -> None:
    out = run_script("scripts/demo-crash.sh", "--quick")
    assert out.count("is gone (killed with SIGKILL mid-booking)") == 2
    assert out.count("invariants hold") == 2 and "VIOLATION" not in out
