"""The dashboard answers only under its own names, and asks for a login beyond loopback.

``curl -H "Host: evil.example" http://127.0.0.1:18080/api/state`` returned vehicle ids,
reservations and trips: a DNS-rebinding page in the operator's browser could read them.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from evcharge.apps.web.dashboard import Dashboard, serve
from evcharge.domain.world import World

from .conftest import REPO, free_ports, running_server
from .test_web import WEB_MAIN, client_session

pytestmark = pytest.mark.timeout(60)

PATHS = ("/", "/api/state", "/api/events")


@asynccontextmanager
async def dashboard_on(world: World, server_port: int, host: str, **options: object) -> AsyncIterator[str]:
    dashboard = Dashboard(world, "A", "127.0.0.1", server_port, backoff_max=0.5)
    runner = await serve(dashboard, host, 0, **options)  # type: ignore[arg-type]
    dashboard.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        dashboard.close_streams()
        await runner.cleanup()
        await dashboard.close()


async def status(http: aiohttp.ClientSession, url: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    async with http.get(url + path, headers=headers) as resp:
        if path == "/api/events" and resp.status == 200:
            return resp.status, (await resp.content.readline()).decode()
        return resp.status, await resp.text()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_requests_for_another_host_name_are_refused(world: World, tmp_path: Path) -> None:
    async with (
        running_server(world, tmp_path / "data") as server,
        dashboard_on(world, server.port, "127.0.0.1", allow_hosts=["dash.example"]) as url,
        client_session() as http,
    ):
        port = url.rsplit(":", 1)[1]
        for path in PATHS:
            for evil in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
                code, body = await status(http, url, path, {"Host": evil})
                assert code == 421, (path, evil, code)
                assert "V0" not in body and "reservations" not in body
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"dash.example:{port}", f"[::1]:{port}"):
            code, _ = await status(http, url, "/api/state", {"Host": good})
            assert code == 200, (good, code)


async def test_a_dashboard_bound_beyond_loopback_asks_for_the_login(world: World, tmp_path: Path) -> None:
    secret = world.operator("A").secret
    async with (
        running_server(world, tmp_path / "data") as server,
        dashboard_on(world, server.port, "0.0.0.0", password=secret) as url,
        client_session() as http,
    ):
        for path in PATHS:
            code, body = await status(http, url, path, {})
            assert code == 401 and "V0" not in body, (path, code)
            for wrong in (
                basic("A", "guess"),
                basic("A", ""),
                {"Authorization": "Bearer guess"},
                {"Authorization": "Basic !!"},
            ):
                assert (await status(http, url, path, wrong))[0] == 401, (path, wrong)
            assert (await status(http, url, path, basic("anyone", secret)))[0] == 200, path
            assert (await status(http, url, path, {"Authorization": f"Bearer {secret}"}))[0] == 200, path
        async with http.get(url + "/api/state") as resp:
            assert resp.headers["WWW-Authenticate"].startswith('Basic realm="evcharge operator A"')
        # The Host check holds for those logged in too.
        assert (await status(http, url, "/api/state", {**basic("A", secret), "Host": "evil.example"}))[0] == 421


async def test_evcharge_web_beyond_loopback_takes_its_token_from_a_file(
    world: World, world_path: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("dashboard-token-7f3a\n")
    web_port = free_ports(1)[0]
    async with running_server(world, tmp_path / "data") as server:
        log_path = tmp_path / "web.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WEB_MAIN, "web", "--world", str(world_path), "--operator", "A",
                "--host", "0.0.0.0", "--port", str(web_port), "--server", f"127.0.0.1:{server.port}",
                "--token-file", str(token), cwd=REPO, stdout=log, stderr=log,
            )  # fmt: skip
        url = f"http://127.0.0.1:{web_port}"
        try:
            async with client_session() as http, asyncio.timeout(20):
                while True:
                    try:
                        code, _ = await status(http, url, "/api/state", {})
                        break
                    except aiohttp.ClientConnectionError:
                        assert proc.returncode is None, log_path.read_text()
                        await asyncio.sleep(0.1)
                assert code == 401
                assert (await status(http, url, "/api/state", basic("A", world.operator("A").secret)))[0] == 401
                assert (await status(http, url, "/api/state", basic("A", "dashboard-token-7f3a")))[0] == 200
        finally:
            proc.terminate()
            await proc.wait()
        logged = log_path.read_text()
        assert "dashboard-token-7f3a" not in logged and "wrong login" in logged and "Traceback" not in logged
