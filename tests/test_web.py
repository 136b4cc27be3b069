"""The web dashboard: a real server, the dashboard's HTTP side, browsers as aiohttp clients.

Everything runs over loopback sockets. The dashboard connects to the server as
the operator, like ``evcharge web`` does; the tests read the page, the JSON
state and the Server-Sent Events stream, and check that changes arrive by push.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from evcharge.apps.simulator import run_stations
from evcharge.apps.web.dashboard import Dashboard, serve
from evcharge.domain import geo
from evcharge.domain.world import World, load_world
from evcharge.wire import protocol as p

from .conftest import REPO, free_ports, running_federation, running_server, vehicle

pytestmark = pytest.mark.timeout(60)

State = dict[str, Any]
CHARGING, SEA = "#1765c1", "#dbe9f6"  # dashboard.css: --charging, #map-svg .sea


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


# --- in a real browser ---------------------------------------------------------------------

CHROMIUM_FLAGS = (  # what this machine needs: no sandbox as root, no network of its own, nothing remembered
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--window-size=1400,1000",
)


def chromium_or_skip() -> tuple[str, str]:
    """Debian's chromium and its chromedriver; skipped saying why if absent, failed if absent under CI=true."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        why = (
            f"no {' and no '.join(missing)} on PATH: the browser tests need Debian's chromium and "
            "chromium-driver (scripts/test.sh installs them where it runs as root with apt-get)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests, but {why}")
        pytest.skip(why)
    return found["chromium"] or "", found["chromedriver"] or ""


class Browser:
    """A headless Chromium driven over WebDriver (selenium). Blocking: call it from a thread."""

    def __init__(self, chromium: str, chromedriver: str, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(30)

    def close(self) -> None:
        self.driver.quit()

    def wait(self, script: str, timeout: float = 20.0) -> Any:
        """The value of ``script`` once it is truthy (the page draws by itself, and on every push)."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))

    def centre(self, selector: str) -> tuple[int, int]:
        box = self.driver.execute_script(
            "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()", selector
        )
        return round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)

    def top_right(self, selector: str) -> tuple[int, int]:
        box = self.driver.execute_script(
            "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()", selector
        )
        return round(box["x"] + box["width"] - 8), round(box["y"] + 8)


def colour_near(image: Any, at: tuple[int, int], expected: str, tolerance: int = 40) -> bool:
    """Is the pixel at ``at`` (or one next to it, for anti-aliasing) within ``tolerance`` of ``expected``?"""
    want = tuple(int(expected[i : i + 2], 16) for i in (1, 3, 5))
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            got = image.getpixel((at[0] + dx, at[1] + dy))[:3]
            if all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True)):
                return True
    return False


COUNTS = """
const q = (s) => document.querySelectorAll(s).length;
return q('#map-svg circle.cp') && {
  cps: q('#map-svg circle.cp'), charging: q('#map-svg circle.cp[data-status="charging"]'),
  cities: q('#map-svg text.city'), coast: document.querySelector('#map-svg polyline.coast')
    .getAttribute('points').split(' ').length,
  others: q('#map-svg circle.other'), route: q('#map-svg polyline.route'), stops: q('#map-svg g.stop'),
  rows: q('#timeline-svg g.row'), slots: [...document.querySelectorAll('#timeline-svg rect.slot')]
    .map((r) => r.closest('g.row').dataset.cp + ' ' + r.dataset.state).sort(),
  energy: (document.querySelector('#current .energy') || {}).textContent || '',
};
"""


async def test_headless_chromium_draws_the_map_and_the_timeline(world: World, tmp_path: Path) -> None:
    chromium, chromedriver = chromium_or_skip()
    from PIL import Image

    mine = [cp.id for s in world.stations_of("A") for cp in s.charge_points]
    async with running_server(world, tmp_path / "data", time_scale=60.0) as server:
        stations = asyncio.get_running_loop().create_task(run_stations(world, "A", host="127.0.0.1", port=server.port))
        browser: Browser | None = None
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
                    trip = (await w.book_trip(p.TripQuery(origin="Natal", destination="Recife", soc_pct=30))).trip
                assert trip.stops, "a trip with stops to draw"
                await wait_state(http, url, lambda s: len(s["reservations"]) == 3 + len(trip.stops) and s["trips"])
                browser = await asyncio.to_thread(Browser, chromium, chromedriver, tmp_path / "chromium")
                await asyncio.to_thread(browser.driver.get, f"{url}/")
                # The session's meter values arrive by push while the page is open.
                await asyncio.to_thread(
                    browser.wait,
                    "return /[1-9]/.test(document.querySelector('#current .energy')"
                    " ?.textContent.split('kWh')[0] || '')",
                )
                drawn = await asyncio.to_thread(browser.wait, COUNTS)
                png = await asyncio.to_thread(browser.driver.get_screenshot_as_png)
                (tmp_path / "dashboard.png").write_bytes(png)
                dot = await asyncio.to_thread(browser.centre, '#map-svg circle.cp[data-cp="NAT-PN-1"]')
                bar = await asyncio.to_thread(browser.centre, '#timeline-svg rect.slot[data-state="charging"]')
                sea = await asyncio.to_thread(browser.top_right, "#map-svg")  # north-east: the Atlantic

                # The map: every charge point of ours a dot, the other operators' stations, the cities, the coast.
                assert drawn["cps"] == len(mine) and drawn["charging"] == 1
                assert drawn["others"] == len(world.stations) - len(world.stations_of("A"))
                assert drawn["cities"] == len(geo.CITIES) and drawn["coast"] > 30
                # The trip's route with its stops.
                assert drawn["route"] == 1 and drawn["stops"] == len(trip.stops)
                # The timeline: a row per charge point, a slot per booking of today, in its state.
                assert drawn["rows"] == len(mine)
                assert "NAT-PN-1 charging" in drawn["slots"] and "NAT-PN-2 booked" in drawn["slots"]
                assert "FOR-1-1 booked" in drawn["slots"]
                assert "kWh" in drawn["energy"] and "R$" in drawn["energy"]

                # And it is on the screen, in colour: the charging dot and its slot are blue, the sea is sea.
                image = Image.open(io.BytesIO(png)).convert("RGB")
                assert image.size[0] == 1400
                assert colour_near(image, dot, CHARGING), (dot, image.getpixel(dot))
                assert colour_near(image, bar, CHARGING), (bar, image.getpixel(bar))
                assert colour_near(image, sea, SEA, tolerance=12), (sea, image.getpixel(sea))

                # A booking made while the page is open appears in the timeline by itself.
                async with vehicle(server, "V07") as x:
                    await x.reserve("NAT-PN-3", x.server_now() + timedelta(minutes=5), 20)
                await asyncio.to_thread(
                    browser.wait, "return document.querySelector('#timeline-svg g.row[data-cp=\"NAT-PN-3\"] rect.slot')"
                )
        finally:
            if browser is not None:
                await asyncio.to_thread(browser.close)
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


def test_without_a_browser_the_test_says_why_and_ci_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, no chromedriver
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="need Debian's chromium and chromium-driver"):
        chromium_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser tests"):
        chromium_or_skip()
