"""TLS per listener, client certificates, and operators federated over mutual TLS.

Every test makes a throwaway CA with trustme. Operators' certificates name
``x.evcharge.test`` (not the loopback address they run on), so a client must
ask for the right name: that is what the world file's ``tls_name`` is for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from evcharge.apps.simulator import ChargePointSim
from evcharge.domain.world import World, load_world
from evcharge.links.client import connect, open_client
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConnectionLostError, ForbiddenError, UnauthorizedError, UnavailableError
from evcharge.wire.tls import ROLES, Listen, TlsConfigError, TlsFiles, client_context, every_role, parse_listen

from .conftest import REPO, Pki, free_ports, run_cli, running_server

pytestmark = pytest.mark.timeout(90)

TRIP = p.TripQuery(origin="Natal", destination="Maceió", soc_pct=30)


def everyone(security: str = "tls") -> list[Listen]:
    return [Listen(frozenset(ROLES), "127.0.0.1", 0, security)]  # type: ignore[arg-type]


@asynccontextmanager
async def tls_vehicle(server: Server, pki: Pki, vehicle_id: str = "V01", **tls: Any) -> AsyncIterator[Any]:
    v = server.world.vehicle(vehicle_id)
    tls.setdefault("ssl_context", client_context(pki.ca))
    tls.setdefault("server_hostname", pki.name(server.operator.id))
    async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token, **tls) as client:
        yield client


# --- one listener with TLS ---------------------------------------------------------------


async def test_a_vehicle_books_over_tls(world: World, tmp_path: Path, pki: Pki) -> None:
    async with (
        running_server(world, tmp_path / "data", listen=everyone(), tls=pki.files["A"]) as server,
        tls_vehicle(server, pki) as c,
    ):
        r = await c.reserve("NAT-PN-1", c.server_now(), 30)
        assert [mine.id for mine in await c.reservations()] == [r.id]
        ssl_object = c.conn._writer.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")


async def test_a_client_that_does_not_trust_the_server_refuses_it_clearly(
    world: World, tmp_path: Path, pki: Pki
) -> None:
    async with running_server(world, tmp_path / "data", listen=everyone(), tls=pki.files["A"]) as server:
        for context in (client_context(pki.stranger_ca), client_context()):  # another CA; the system's CAs
            with pytest.raises(UnauthorizedError, match="certificate verify failed") as refused:
                async with tls_vehicle(server, pki, ssl_context=context):
                    pass
            assert "a.evcharge.test" in refused.value.message
        # A server with a certificate from another CA, under the right name, is refused as well.
    async with running_server(world, tmp_path / "data2", listen=everyone(), tls=pki.files["stranger"]) as server:
        with pytest.raises(UnauthorizedError, match="certificate verify failed"):
            async with tls_vehicle(server, pki):
                pass


async def test_a_certificate_for_another_name_is_refused(world: World, tmp_path: Path, pki: Pki) -> None:
    async with running_server(world, tmp_path / "data", listen=everyone(), tls=pki.files["A"]) as server:
        for name in ("b.evcharge.test", None):  # another operator's name; the address connected to
            with pytest.raises(UnauthorizedError, match="mismatch, certificate is not valid for"):
                async with tls_vehicle(server, pki, server_hostname=name):
                    pass
        async with tls_vehicle(server, pki) as c:
            assert await c.heartbeat()


async def test_plaintext_and_tls_mixups_fail_cleanly_and_the_server_serves_on(
    world: World, tmp_path: Path, pki: Pki
) -> None:
    async with running_server(
        world,
        tmp_path / "data",
        listen=[*everyone("tls"), Listen(frozenset(ROLES), "127.0.0.1", 0, "plain")],
        tls=pki.files["A"],
        hello_timeout=0.5,
    ) as server:
        tls_port, plain_port = (listener.port for listener in server.listen)
        v = server.world.vehicle("V04")
        async with tls_vehicle(server, pki) as before:
            # Plaintext to the TLS listener: our Hello is not a TLS handshake.
            with pytest.raises(ConnectionLostError, match="connect with TLS"):
                await open_client("127.0.0.1", tls_port, role="vehicle", ident=v.id, secret=v.token, timeout=5)
            # TLS to the plaintext listener: its answer is not TLS.
            with pytest.raises(UnavailableError, match=r"TLS handshake with .* failed"):
                await open_client(
                    "127.0.0.1",
                    plain_port,
                    role="vehicle",
                    ident=v.id,
                    secret=v.token,
                    ssl_context=client_context(pki.ca),
                    server_hostname="a.evcharge.test",
                    timeout=5,
                )
            # A client that opens the socket and never starts TLS is closed by the handshake deadline.
            reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
            try:
                async with asyncio.timeout(10):
                    assert await reader.read() == b""
            finally:
                writer.close()
            # Everyone else never noticed.
            assert await before.heartbeat()
            async with tls_vehicle(server, pki, "V04") as after:
                assert await after.reservations() == []
            async with connect("127.0.0.1", plain_port, role="vehicle", ident=v.id, secret=v.token) as plain:
                assert await plain.heartbeat()


async def test_a_charge_point_connects_over_mutual_tls(world: World, tmp_path: Path, pki: Pki) -> None:
    async with running_server(world, tmp_path / "data", listen=everyone("mtls"), tls=pki.files["A"]) as server:
        station_cert = pki.files["B"]  # any certificate the operator's CA signed will do for a charge point
        sim = ChargePointSim(
            world.charge_point("NAT-PN-1")[1],
            "127.0.0.1",
            server.port,
            ssl_context=client_context(pki.ca, station_cert.cert, station_cert.key),
            server_hostname="a.evcharge.test",
        )
        task = asyncio.create_task(sim.run())
        try:
            async with asyncio.timeout(10):
                while not server.books.charge_points["NAT-PN-1"].online:
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- listeners per role ------------------------------------------------------------------


def test_listen_syntax() -> None:
    assert parse_listen("all=0.0.0.0:7401") == Listen(frozenset(ROLES), "0.0.0.0", 7401, "plain")
    assert parse_listen("vehicle,station=[::1]:0+tls") == Listen(frozenset({"vehicle", "station"}), "::1", 0, "tls")
    assert parse_listen("peer=10.0.0.1:7411+mtls").describe() == "peer=10.0.0.1:7411+mtls"
    for bad in ("0.0.0.0:7401", "pilot=0.0.0.0:1", "peer=0.0.0.0", "peer=:1", "peer=h:99999", "all=h:1+ssl", "=h:1"):
        with pytest.raises(TlsConfigError):
            parse_listen(bad)


async def test_each_listener_accepts_only_its_roles(world: World, tmp_path: Path) -> None:
    listen = [
        Listen(frozenset({"vehicle"}), "127.0.0.1", 0),
        Listen(frozenset({"station", "operator"}), "127.0.0.1", 0),
        Listen(frozenset({"peer"}), "127.0.0.1", 0),
    ]
    async with running_server(world, tmp_path / "data", listen=listen) as server:
        vehicles, stations, peers = (listener.port for listener in server.listen)
        v01, op = world.vehicle("V01"), server.operator
        for port in (stations, peers):
            with pytest.raises(ForbiddenError, match=r"this port is for .*, not vehicle"):
                await open_client("127.0.0.1", port, role="vehicle", ident=v01.id, secret=v01.token)
        with pytest.raises(ForbiddenError, match="not operator"):
            await open_client("127.0.0.1", vehicles, role="operator", ident=op.id, secret=op.secret)
        with pytest.raises(ForbiddenError, match="not peer"):
            await open_client("127.0.0.1", vehicles, role="peer", ident="B", secret=world.operator("B").secret)
        async with (
            connect("127.0.0.1", vehicles, role="vehicle", ident=v01.id, secret=v01.token) as c,
            connect("127.0.0.1", stations, role="operator", ident=op.id, secret=op.secret) as tool,
        ):
            r = await c.reserve("NAT-PN-1", c.server_now(), 30)
            assert [x.id for x in (await tool.inspect()).reservations] == [r.id]


def test_a_tls_listener_without_usable_files_is_refused_at_start(world: World, tmp_path: Path, pki: Pki) -> None:
    for listen, files, problem in (
        (everyone("tls"), TlsFiles(), "needs --tls-cert"),
        (everyone("mtls"), TlsFiles(pki.files["A"].cert, pki.files["A"].key), "needs --tls-ca"),
        (everyone("tls"), TlsFiles(tmp_path / "missing.pem"), "missing.pem"),
        (everyone("tls"), TlsFiles(pki.files["A"].cert, pki.files["B"].key), "cannot use certificate"),
    ):
        with pytest.raises(TlsConfigError, match=problem):
            Server(world, "A", tmp_path / "data", listen=listen, tls=files)


# --- operators over mutual TLS -----------------------------------------------------------


@pytest.fixture
def mtls_world(federated_world_path: Path, tmp_path: Path) -> World:
    """The federated world where every operator takes peers on a port of their own, over mutual TLS."""
    text = federated_world_path.read_text(encoding="utf-8")
    for op, port in zip("abc", free_ports(3), strict=True):
        secret = f'secret = "operator-{op}-secret"\n'
        text = text.replace(secret, f'{secret}peer_port = {port}\npeer_tls = true\ntls_name = "{op}.evcharge.test"\n')
    path = tmp_path / "mtls.toml"
    path.write_text(text, encoding="utf-8")
    return load_world(str(path))


def mtls_listeners(world: World, operator: str) -> list[Listen]:
    op = world.operator(operator)
    return [
        Listen(frozenset({"vehicle", "station", "operator"}), "127.0.0.1", op.port, "tls"),
        Listen(frozenset({"peer"}), "127.0.0.1", op.peer_address[1], "mtls"),
    ]


@asynccontextmanager
async def mtls_federation(world: World, data: Path, pki: Pki, operators: str) -> AsyncIterator[dict[str, Server]]:
    anchor = time.time()
    async with AsyncExitStack() as stack:
        servers = {
            op: await stack.enter_async_context(
                running_server(
                    world,
                    data / op,
                    op,
                    listen=mtls_listeners(world, op),
                    tls=pki.files[op],
                    time_scale=60.0,
                    clock_anchor=anchor,
                )
            )
            for op in operators
        }
        yield servers


async def test_two_operators_book_a_trip_over_mutual_tls(mtls_world: World, tmp_path: Path, pki: Pki) -> None:
    async with mtls_federation(mtls_world, tmp_path / "data", pki, "AB") as servers:
        a, b = servers["A"], servers["B"]
        assert a.federation is not None and b.federation is not None
        async with asyncio.timeout(15):
            while not (
                a.federation.peers.links["B"].up
                and b.federation.peers.links["A"].up
                and "B" in a.federation.peers.catalogs
            ):
                await asyncio.sleep(0.05)
        async with tls_vehicle(a, pki) as c:
            trip = (await c.book_trip(TRIP)).trip
        assert trip.state == "committed" and {s.operator_id for s in trip.stops} >= {"A", "B"}
        at_b = [r for r in b.books.reservations.values() if r.trip_id == trip.id]
        assert at_b and all(r.state == "booked" for r in at_b)
        # The peer connections really are TLS with a client certificate, both ways.
        for server in (a, b):
            peers = [s for s in server.online.everyone if s.role == "peer"]
            assert peers and all(s.conn._writer.get_extra_info("peercert") for s in peers)
        assert a.federation.peers.links["B"].info().address.endswith("(tls)")


async def test_a_peer_needs_a_certificate_of_its_own(mtls_world: World, tmp_path: Path, pki: Pki) -> None:
    async with mtls_federation(mtls_world, tmp_path / "data", pki, "A") as servers:
        a = servers["A"]
        peers = a.listen[1].port
        b = mtls_world.operator("B")

        async def as_b(context: Any) -> None:
            client = await open_client(
                "127.0.0.1",
                peers,
                role="peer",
                ident="B",
                secret=b.secret,
                ssl_context=context,
                server_hostname="a.evcharge.test",
                timeout=5,
            )
            await client.close()

        # No client certificate: the TLS layer refuses it, and says so.
        with pytest.raises(ConnectionLostError, match="client certificates"):
            await as_b(client_context(pki.ca))
        # A certificate from a CA the operator does not trust.
        stranger = pki.files["stranger"]
        with pytest.raises(ConnectionLostError, match="client certificates"):
            await as_b(client_context(pki.ca, stranger.cert, stranger.key))
        # C's own good certificate, with B's secret (every operator has the world file): not B.
        c = pki.files["C"]
        with pytest.raises(UnauthorizedError, match=r"certificate is not for b\.evcharge\.test"):
            await as_b(client_context(pki.ca, c.cert, c.key))
        # B's certificate and B's secret: welcome.
        await as_b(client_context(pki.ca, pki.files["B"].cert, pki.files["B"].key))


async def test_a_peer_of_an_operator_on_mutual_tls_is_refused_on_its_other_listeners(
    mtls_world: World, tmp_path: Path, pki: Pki
) -> None:
    listen = [*mtls_listeners(mtls_world, "A"), every_role("127.0.0.1", 0)]
    async with running_server(mtls_world, tmp_path / "data", "A", listen=listen, tls=pki.files["A"]) as a:
        b = mtls_world.operator("B")
        # The plaintext listener takes every role, but a peer there shows no certificate.
        with pytest.raises(ForbiddenError, match="mutual TLS"):
            await open_client("127.0.0.1", a.listen[2].port, role="peer", ident="B", secret=b.secret, timeout=5)


async def test_a_peer_link_to_a_server_we_cannot_verify_stays_down_and_says_why(
    mtls_world: World, tmp_path: Path, pki: Pki
) -> None:
    anchor = time.time()
    async with (
        running_server(
            mtls_world,
            tmp_path / "A",
            "A",
            listen=mtls_listeners(mtls_world, "A"),
            tls=pki.files["stranger"],  # A presents a certificate B cannot verify
            clock_anchor=anchor,
        ),
        running_server(
            mtls_world,
            tmp_path / "B",
            "B",
            listen=mtls_listeners(mtls_world, "B"),
            tls=pki.files["B"],
            clock_anchor=anchor,
        ) as b,
    ):
        assert b.federation is not None
        link = b.federation.peers.links["A"]
        async with asyncio.timeout(15):
            while "certificate verify failed" not in link.last_error:
                await asyncio.sleep(0.05)
        assert not link.up and link.connects == 0


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def tls_server_process(mtls_world: World, tmp_path: Path, pki: Pki) -> Iterator[tuple[Path, int]]:
    """``evcharge server`` of operator A with one TLS listener for everyone, as a real process."""
    world_path = Path(mtls_world.source)
    ready = tmp_path / "ready.json"
    files = pki.files["A"]
    args = [
        *("server", "--world", str(world_path), "--operator", "A", "--data-dir", str(tmp_path / "data")),
        *("--listen", "all=127.0.0.1:0+tls", "--tls-cert", str(files.cert), "--tls-key", str(files.key)),
        *("--ready-file", str(ready), "--log-level", "debug"),
    ]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "evcharge", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["listeners"] == [
            {"roles": sorted(ROLES), "host": "127.0.0.1", "port": info["port"], "security": "tls"}
        ]
        yield world_path, info["port"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = (tmp_path / "server.log").read_text()
    assert "all=127.0.0.1" in text and "+tls" in text
    assert "vehicle-v01-token" not in text and "operator-a-secret" not in text


def test_the_command_line_speaks_tls(tls_server_process: tuple[Path, int], pki: Pki) -> None:
    world_path, port = tls_server_process
    common = ("--world", str(world_path), "--server", f"127.0.0.1:{port}")
    trusted = run_cli("vehicle", "--id", "V01", *common, "--tls-ca", str(pki.ca), "--json", "stations")
    assert trusted.returncode == 0, trusted.stderr + trusted.stdout
    assert len(json.loads(trusted.stdout)["stations"]) > 0
    inspected = run_cli("inspect", "--operator", "A", *common, "--tls-ca", str(pki.ca), "--json")
    assert inspected.returncode == 0, inspected.stderr + inspected.stdout

    untrusted = run_cli("vehicle", "--id", "V01", *common, "--tls-ca", str(pki.stranger_ca), "--json", "history")
    assert untrusted.returncode == 1
    error = json.loads(untrusted.stdout)["error"]
    assert error["code"] == "unauthorized" and "certificate verify failed" in error["message"]

    plaintext = run_cli("vehicle", "--id", "V01", *common, "--json", "history")
    assert plaintext.returncode == 1 and json.loads(plaintext.stdout)["error"]["code"] == "unavailable"

    missing = run_cli("vehicle", "--id", "V01", *common, "--tls-ca", str(pki.ca.parent / "nope.pem"), "history")
    assert missing.returncode == 2 and "nope.pem" in missing.stderr
