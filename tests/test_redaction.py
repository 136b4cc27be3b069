"""No secret in any log line: the redaction filter alone, then every process we ship at --log-level debug.

Each process runs for real (``python -m evcharge …``) and is given right and wrong
credentials; its whole output is then searched for every secret involved, plain and
base64-encoded (alone and as ``id:secret``, as HTTP Basic auth sends it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from evcharge.domain.world import World
from evcharge.links.client import connect
from evcharge.operator.server import Server
from evcharge.wire.errors import UnauthorizedError
from evcharge.wire.redact import MASK, RedactSecrets, install
from tools.harness import Child, evcharge_command, free_ports

from .ocpp_harness import basic, secret_of, until

pytestmark = pytest.mark.timeout(90)

WRONG = "guessed-Password-77"  # a wrong password: no world file knows it, no log may show it


def forms(user: str, secret: str) -> list[str]:
    """How a secret may show in a log: plain, base64 alone, base64 as Basic auth's ``user:secret``."""
    b64 = base64.b64encode(secret.encode()).decode()
    pair = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return [secret, b64, b64.rstrip("="), pair, pair.rstrip("=")]


def leaks(log: str, credentials: Iterable[tuple[str, str]]) -> list[str]:
    return [form for user, secret in credentials for form in forms(user, secret) if form in log]


# --- the filter ------------------------------------------------------------------------------


def redacted(filt: RedactSecrets, msg: str, *args: Any) -> str:
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, msg, args or None, None)
    filt.filter(record)
    return record.getMessage()


def test_the_filter_takes_secrets_out_wherever_they_are() -> None:
    filt = RedactSecrets(pairs=[("NAT-PN-1", "cp-nat-pn-1-secret")])
    header = "Basic " + base64.b64encode(f"NAT-PN-2:{WRONG}".encode()).decode()
    cases = {
        "< %s: %s": ("Authorization", header),  # the websockets debug logger's line, a wrong password in it
        "> authorization: Bearer abcdef123456": (),
        'headers {"Authorization": "Digest username=x, response=0123abcd"}': (),
        "Cookie: session=0123456789abcdef; theme=dark": (),
        "connecting to ws://NAT-PN-1:%s@gw:9000/NAT-PN-1": (WRONG,),
        "GET /api/state?token=%s&x=1 HTTP/1.1": (WRONG,),
        "Hello(version=1, role='vehicle', ident='V01', credential='%s')": (WRONG,),
        'secret = "%s"': (WRONG,),
        "the secret is %s, right?": ("cp-nat-pn-1-secret",),
        "encoded: %s": (base64.b64encode(b"NAT-PN-1:cp-nat-pn-1-secret").decode(),),
    }
    for msg, args in cases.items():
        line = redacted(filt, msg, *args)
        assert WRONG not in line and "cp-nat-pn-1-secret" not in line and MASK in line, (msg, line)
        assert "0123456789abcdef" not in line and "abcdef123456" not in line
        assert not leaks(line, [("NAT-PN-2", WRONG), ("NAT-PN-1", "cp-nat-pn-1-secret")]), line
    assert redacted(filt, "< Authorization: %s", header) == f"< Authorization: Basic {MASK}"
    ordinary = "charge point NAT-PN-1 booted: Acme Wallbox, Basic auth ok, 12 reservations"
    assert redacted(filt, ordinary) == ordinary


def test_the_filter_covers_tracebacks_and_every_handler() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        first = install(["a-very-secret-token"])
        again = install(pairs=[("V01", "another-secret")])
        assert first is again and handler.filters.count(first) == 1
        try:
            raise ValueError("bad credential 'a-very-secret-token' for V01")
        except ValueError:
            logging.getLogger("evcharge.test").exception("failed with %s", "another-secret")
        text = stream.getvalue()
        assert "ValueError" in text and "a-very-secret-token" not in text and "another-secret" not in text
    finally:
        root.removeHandler(handler)
        for h in root.handlers:
            h.removeFilter(first)


# --- every process, at debug -------------------------------------------------------------------


def child(tmp_path: Path, name: str, *args: str) -> Child:
    process = Child(name, tmp_path / f"{name}.log")
    process.launch(evcharge_command(*args))
    return process


async def stopped(process: Child) -> str:
    """SIGTERM, wait for it to end, and its whole output."""
    assert process.proc is not None
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            while process.proc.poll() is None:
                await asyncio.sleep(0.05)
    return process.log_path.read_text(errors="replace")


@pytest.fixture
def children() -> Any:
    started: list[Child] = []
    yield started
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)


async def test_the_ocpp_gateway_at_debug_logs_no_password(
    server: Server, world: World, world_path: Path, tmp_path: Path, children: list[Child]
) -> None:
    [port] = free_ports(1)
    gateway = child(
        tmp_path,
        "gateway",
        "ocpp-gateway",
        "--world",
        str(world_path),
        "--operator",
        "A",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--server",
        f"127.0.0.1:{server.port}",
        "--log-level",
        "debug",
    )
    children.append(gateway)
    right = secret_of(world, "NAT-PN-1")

    async def handshake(cp_id: str, password: str, subprotocol: str) -> int:
        try:
            async with ws_connect(
                f"ws://127.0.0.1:{port}/{cp_id}",
                subprotocols=[subprotocol],  # type: ignore[list-item]
                additional_headers=basic(cp_id, password),
                open_timeout=10,
            ) as ws:
                await ws.send('[2, "1", "Heartbeat", {}]')
                await asyncio.wait_for(ws.recv(), 10)
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    async with asyncio.timeout(20):
        while True:
            try:
                if await handshake("NAT-PN-1", right, "ocpp1.6") == 101:
                    break
            except OSError:
                await asyncio.sleep(0.1)
    await until(lambda: server.books.charge_points["NAT-PN-1"].online)
    assert await handshake("NAT-PN-2", WRONG, "ocpp2.0.1") == 401
    assert await handshake("NAT-PN-3", secret_of(world, "NAT-PN-3"), "ocpp2.0.1") == 101
    log = await stopped(gateway)
    # Its own server links' credentials, the charge points' and the wrong one: none anywhere.
    cps = [("NAT-PN-1", right), ("NAT-PN-3", secret_of(world, "NAT-PN-3")), ("NAT-PN-2", WRONG)]
    assert not leaks(log, cps), leaks(log, cps)
    assert not leaks(log, world.credentials())
    assert "< Authorization: Basic [redacted]" in log  # the websockets debug logger was on, and redacted
    assert "refused: wrong or missing credentials" in log


async def test_the_server_at_debug_logs_no_token(
    world: World, world_path: Path, tmp_path: Path, children: list[Child], spawn_server: Any
) -> None:
    proc = spawn_server("A", log_level="debug")
    v = world.vehicle("V01")
    async with connect("127.0.0.1", proc.port, role="vehicle", ident="V01", secret=v.token) as client:
        await client.reservations()
    for ident, secret in (("V01", WRONG), ("V04", world.vehicle("V01").token)):
        with pytest.raises(UnauthorizedError):
            async with connect("127.0.0.1", proc.port, role="vehicle", ident=ident, secret=secret):
                pass
    op = world.operator("A")
    async with connect("127.0.0.1", proc.port, role="operator", ident="A", secret=op.secret) as tool:
        await tool.inspect()
    log = await stopped(proc)
    assert proc.proc is not None and "debug" in proc.proc.args and "handshake from" in log
    assert not leaks(log, [("V01", WRONG), *world.credentials()]), leaks(log, [("V01", WRONG), *world.credentials()])


async def test_the_web_dashboard_at_debug_logs_no_secret(
    server: Server, world: World, world_path: Path, tmp_path: Path, children: list[Child]
) -> None:
    [port] = free_ports(1)
    web = child(
        tmp_path,
        "web",
        "web",
        "--world",
        str(world_path),
        "--operator",
        "A",
        "--port",
        str(port),
        "--server",
        f"127.0.0.1:{server.port}",
        "--log-level",
        "debug",
    )
    children.append(web)
    secret = world.operator("A").secret
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with http.get(f"{url}/api/state") as resp:
                        if resp.status == 200 and (await resp.json())["connected"]:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        # Credentials a browser or a script might send it: none may come back in its log.
        headers = basic("A", secret) | {"Cookie": f"token={WRONG}"}
        async with http.get(f"{url}/api/state?token={WRONG}", headers=headers) as resp:
            await resp.read()
    log = await stopped(web)
    assert web.proc is not None and "debug" in web.proc.args and "feed of operator A up" in log
    assert not leaks(log, [("A", WRONG), *world.credentials()]), leaks(log, [("A", WRONG), *world.credentials()])
