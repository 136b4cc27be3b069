"""The web dashboard: a real server, the dashboard's HTTP side, browsers as aiohttp clients.

Everything runs over loopback sockets. The dashboard connects to the server as
the operator, like ``evcharge web`` does; the tests read the page, the JSON
state and the Server-Sent Events stream, and check that changes arrive by push.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from evcharge.apps.simulator import run_stations
from evcharge.apps.web.dashboard import Dashboard, serve
from evcharge.domain.world import World, load_world
from evcharge.wire import protocol as p

from .conftest import REPO, free_ports, running_federation, running_server, vehicle

pytestmark = pytest.mark.timeout(60)

State = dict[str, Any]
CHROMIUM = "/usr/bin/chromium"


@asynccontextmanager
async def dashboard_for(world: World, port: int, operator: str = "A") -> AsyncIterator[tuple[Dashboard, str]]:
    """A dashboard of ``operator`` (server on ``port``) served on a free port; yields it and its URL."""
    dashboard = Dashboard(world, operator, "127.0.0.1", port, backoff_max=0.5)
    runner = await serve(dashboard, "127.0.0.1", 0)
    dashboard.start()
    try:
        yield dashboard, f"http://127.0.0.1:{runner.addresses[0][1]}"
        assert dashboard._task is not None and not dashboard._task.done(), "the dashboard's link task died"
    finally:
        dashboard.close_streams()
        await runner.cleanup()
        await dashboard.close()


async def get_state(http: aiohttp.ClientSession, url: str) -> State:
    async with http.get(f"{url}/api/state") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return await resp.json()


async def wait_state(
    http: aiohttp.ClientSession, url: str, ok: Callable[[State], bool], timeout: float = 10.0
) -> State:
    async with asyncio.timeout(timeout):
        while not ok(state := await get_state(http, url)):
            await asyncio.sleep(0.05)
    return state


async def next_event(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> State:
    """The next ``state`` event of an SSE stream (comments and other fields skipped)."""
    event, data = "message", []
    async with asyncio.timeout(timeout):
        while True:
            raw = await resp.content.readline()
            if not raw:
                raise AssertionError("the event stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event == "state" and data:
                    return json.loads("\n".join(data))
                event, data = "message", []
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)


async def event_where(resp: aiohttp.ClientResponse, ok: Callable[[State], bool], timeout: float = 5.0) -> State:
    async with asyncio.timeout(timeout):
        while not ok(state := await next_event(resp, timeout)):
            pass
    return state


def reservation_ids(state: State) -> set[str]:
    return {r["id"] for r in state["reservations"]}


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), read_bufsize=1 << 20)


async def test_state_page_and_live_updates_by_push(world: World, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    data = tmp_path / "data"
    mine = world.stations_of("A")
    async with client_session() as http, dashboard_for(world, port) as (dash, url):
        # No server yet: the dashboard says so, and keeps trying.
        state = await wait_state(http, url, lambda s: bool(s["error"]))
        assert state["connected"] is False and state["stations"] == []

        async with running_server(world, data, port=port, time_scale=60.0) as server:
            state = await wait_state(http, url, lambda s: s["connected"])
            assert state["operator_id"] == "A" and state["server_time"]
            assert {s["id"] for s in state["stations"]} == {s.id for s in mine}
            by_station = {s["id"]: {cp["id"] for cp in s["charge_points"]} for s in state["stations"]}
            assert by_station == {s.id: {cp.id for cp in s.charge_points} for s in mine}
            # No charge point is connected in this test.
            assert {cp["status"] for s in state["stations"] for cp in s["charge_points"]} == {"offline"}

            async with http.get(f"{url}/") as resp:
                assert resp.status == 200 and resp.content_type == "text/html"
                page = await resp.text()
            for station in mine:
                assert station.name in page
            assert "EventSource" in page
            # Self-contained: nothing is loaded from anywhere else.
            assert "<link" not in page and "<script src" not in page and "https://" not in page

            async with http.get(f"{url}/api/events") as events:
                assert events.status == 200 and events.content_type == "text/event-stream"
                first = await next_event(events)
                assert first["connected"] and reservation_ids(first) == set()

                async with vehicle(server, "V01") as v:
                    r = await v.reserve("NAT-PN-1", v.server_now() + timedelta(minutes=60), 30)
                pushed = await event_where(events, lambda s: r.id in reservation_ids(s))
                (seen,) = [x for x in pushed["reservations"] if x["id"] == r.id]
                assert (seen["charge_point_id"], seen["vehicle_id"], seen["state"]) == ("NAT-PN-1", "V01", "booked")

                # Driven by pushes: with nothing happening, no Inspect goes out.
                quiet = dash.feed.inspects
                await asyncio.sleep(0.5)
                assert dash.feed.inspects == quiet

                # A burst of pushes costs one Inspect, not one each.
                for _ in range(50):
                    dash.feed.pushed(
                        p.ChargePointChanged(station_id="NAT-PN", charge_point_id="NAT-PN-1", status="offline")
                    )
                await asyncio.sleep(0.5)
                assert dash.feed.inspects == quiet + 1

                # The server goes away: browsers are told at once, and so is /api/state.
                await server.stop()
                down = await event_where(events, lambda s: not s["connected"])
                assert down["error"] and r.id in reservation_ids(down)  # the last state, marked as such
                state = await get_state(http, url)
                assert state["connected"] is False and state["error"]

        # The server is back: the dashboard reconnects by itself, and the reservation survived.
        async with running_server(world, data, port=port, time_scale=60.0):
            state = await wait_state(http, url, lambda s: s["connected"])
            assert r.id in reservation_ids(state)


async def test_a_browser_that_goes_away_is_forgotten(world: World, tmp_path: Path) -> None:
    async with (
        running_server(world, tmp_path / "data", time_scale=60.0) as server,
        client_session() as http,
        dashboard_for(world, server.port) as (dash, url),
    ):
        await wait_state(http, url, lambda s: s["connected"])
        async with http.get(f"{url}/api/events") as events:
            await next_event(events)
            assert dash.subscribers == 1
        async with asyncio.timeout(5):
            while dash.subscribers:
                await asyncio.sleep(0.02)


async def test_trips_across_operators_and_peer_links(federated_world_path: Path, tmp_path: Path) -> None:
    fed_world = load_world(str(federated_world_path))
    async with (
        running_federation(fed_world, tmp_path / "data") as servers,
        client_session() as http,
        dashboard_for(fed_world, servers["A"].port) as (_dash, url),
    ):
        state = await wait_state(http, url, lambda s: s["connected"])
        assert {(peer["operator_id"], peer["up"]) for peer in state["peers"]} == {("B", True), ("C", True)}
        async with http.get(f"{url}/api/events") as events:
            await next_event(events)
            v = fed_world.vehicle("V01")
            async with vehicle(servers[v.home], v.id) as c:
                query = p.TripQuery(origin="Natal", destination="Feira de Santana", soc_pct=80)
                trip = (await c.book_trip(query)).trip
            pushed = await event_where(events, lambda s: trip.id in {t["id"] for t in s["trips"]}, timeout=10)
        (shown,) = [t for t in pushed["trips"] if t["id"] == trip.id]
        assert shown["state"] == "committed" and shown["vehicle_id"] == "V01"
        assert {s["operator_id"] for s in shown["stops"]} == {"A", "B", "C"}
        assert [s["reservation_id"] for s in shown["stops"]] == [s.reservation_id for s in trip.stops]


WEB_MAIN = """
import argparse, sys, uvloop
from evcharge.apps.tls_options import client_tls_parser
from evcharge.apps.web import command as web
from evcharge.domain.world import load_world
parser = argparse.ArgumentParser(prog="evcharge")
common = argparse.ArgumentParser(add_help=False)
common.add_argument("--world")
common.add_argument("--log-level", default="warning")
web.add_parser(parser.add_subparsers(), [common, client_tls_parser()])
args = parser.parse_args(sys.argv[1:])
sys.exit(uvloop.run(args.run(load_world(args.world), args)))
"""


async def test_evcharge_web_runs_until_sigterm_and_ends_its_streams(
    world: World, world_path: Path, tmp_path: Path
) -> None:
    web_port = free_ports(1)[0]
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        log = (tmp_path / "web.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WEB_MAIN,
            "web",
            "--world",
            str(world_path),
            "--operator",
            "A",
            "--port",
            str(web_port),
            "--server",
            f"127.0.0.1:{server.port}",
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        log.close()
        url = f"http://127.0.0.1:{web_port}"
        try:
            async with client_session() as http:
                async with asyncio.timeout(20):
                    while True:
                        try:
                            if (await get_state(http, url))["connected"]:
                                break
                        except aiohttp.ClientConnectionError:
                            pass
                        assert proc.returncode is None, (tmp_path / "web.log").read_text()
                        await asyncio.sleep(0.1)
                async with http.get(f"{url}/api/events") as events:
                    await next_event(events)
                    proc.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(10):
                        while await events.content.readline():
                            pass  # the stream ends: the dashboard closed it
            async with asyncio.timeout(10):
                assert await proc.wait() == 0, (tmp_path / "web.log").read_text()
            assert "Traceback" not in (tmp_path / "web.log").read_text()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.skipif(os.environ.get("EVCHARGE_BROWSER_TESTS") != "1", reason="set EVCHARGE_BROWSER_TESTS=1")
async def test_headless_chromium_renders_the_page(world: World, tmp_path: Path) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        stations = asyncio.get_running_loop().create_task(run_stations(world, "A", host="127.0.0.1", port=server.port))
        try:
            async with client_session() as http, dashboard_for(world, server.port) as (_dash, url):
                await wait_state(
                    http,
                    url,
                    lambda s: (
                        s["connected"]
                        and all(cp["status"] != "offline" for st in s["stations"] for cp in st["charge_points"])
                    ),
                )
                async with vehicle(server, "V01") as v, vehicle(server, "V04") as w:
                    now = v.server_now()
                    charging = await v.reserve("NAT-PN-1", now, 45)
                    await v.start_charging(charging.id)
                    await w.reserve("NAT-PN-2", now + timedelta(minutes=10), 30)
                    await w.reserve("FOR-1-1", now + timedelta(minutes=90), 60)
                await wait_state(http, url, lambda s: len(s["reservations"]) == 3)
                png = tmp_path / "dashboard.png"
                started = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    f"--user-data-dir={tmp_path / 'chromium'}",
                    f"--screenshot={png}",
                    "--window-size=1280,900",
                    f"{url}/",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                try:
                    async with asyncio.timeout(45):
                        await proc.wait()
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode})"
                head = png.read_bytes()[:24]
                assert head[:8] == b"\x89PNG\r\n\x1a\n"
                assert struct.unpack(">II", head[16:24]) == (1280, 900)
                # A blank page compresses to a few kB; the dashboard's text and colours do not.
                assert png.stat().st_size > 30_000, (
                    f"{png.stat().st_size} bytes after {time.monotonic() - started:.1f} s"
                )
        finally:
            stations.cancel()
            await asyncio.gather(stations, return_exceptions=True)


def test_the_page_is_its_static_files_put_inline() -> None:
    from importlib import resources

    from evcharge.apps.web.dashboard import PAGE

    static = resources.files("evcharge.apps.web").joinpath("static")
    for name in ("dashboard.css", "dashboard.js"):
        assert static.joinpath(name).read_text(encoding="utf-8").rstrip("\n") in PAGE
    assert "__CSS__" not in PAGE and "__JS__" not in PAGE
    assert PAGE.count("__TITLE__") == 1 and PAGE.count("__STATE__") == 1  # filled in per request
