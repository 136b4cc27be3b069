"""The one reconnecting link every client uses: keep-alive, reconnect, fail fast on refusal."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from evcharge.apps.simulator import ChargePointSim
from evcharge.apps.web.dashboard import Dashboard
from evcharge.domain.world import World
from evcharge.links.feed import OperatorFeed
from evcharge.links.link import Backoff, Link
from evcharge.links.requests import new_key
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import OutcomeUnknownError, UnauthorizedError, UnavailableError
from evcharge.wire.tls import ROLES, Listen, client_context

from .conftest import Pki, running_server

pytestmark = pytest.mark.timeout(60)


async def until(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def vehicle_link(world: World, port: int, vehicle_id: str = "V01", **options: object) -> Link:
    v = world.vehicle(vehicle_id)
    return Link("127.0.0.1", port, role="vehicle", ident=v.id, secret=v.token, **options)  # type: ignore[arg-type]


async def test_an_idle_monitor_stays_connected_past_the_idle_timeout(world: World, tmp_path: Path) -> None:
    # The server closes connections that send nothing for a second; the feed sends nothing
    # but heartbeats, which it paces by the idle timeout the server's Welcome names.
    async with running_server(world, tmp_path / "data", idle_timeout=1.0) as server:
        feed = OperatorFeed(server.operator, "127.0.0.1", server.port)
        follower = asyncio.ensure_future(feed.run())
        try:
            await until(lambda: feed.connected)
            assert feed.client is not None and feed.client.welcome.idle_timeout == 1.0
            await asyncio.sleep(3.5)
            assert feed.connected and feed.link.connects == 1, f"reconnected: {feed.link.last_error}"
            assert server.connection_counts() == {"operator": 1}
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


async def test_a_quiet_link_heartbeats_only_when_nothing_else_was_sent(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", idle_timeout=0.9) as server:
        link = vehicle_link(world, server.port)
        runner = asyncio.ensure_future(link.run())
        try:
            await until(lambda: link.up)
            served = server.requests_served
            await asyncio.sleep(1.5)
            heartbeats = server.requests_served - served
            assert 3 <= heartbeats <= 7, heartbeats  # every 0.3 s of silence
            # Busy with other requests, the link needs no heartbeats of its own.
            served = server.requests_served
            for _ in range(15):
                await link.call(p.ListStations(limit=1), p.StationList)
                await asyncio.sleep(0.1)
            assert server.requests_served - served <= 15 + 1
            assert link.connects == 1
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_a_link_comes_back_after_its_server_restarts(world: World, tmp_path: Path) -> None:
    downs: list[str] = []
    ups: list[int] = []

    async def came_up(_client: object) -> None:
        ups.append(len(ups))

    link: Link | None = None
    runner: asyncio.Future[None] | None = None
    try:
        async with running_server(world, tmp_path / "data") as server:
            port = server.port
            link = vehicle_link(world, port, on_up=came_up, on_down=downs.append, backoff=Backoff(0.05, 0.2))
            runner = asyncio.ensure_future(link.run())
            await until(lambda: link.up)
        await until(lambda: link.client is None)
        with pytest.raises(UnavailableError):
            await link.call(p.Heartbeat(), p.HeartbeatAck)
        with pytest.raises(UnavailableError, match="unreachable"):
            await link.wait_up(timeout=0.2)
        async with running_server(world, tmp_path / "data", port=port):
            await until(lambda: link.up)
            await link.call(p.Heartbeat(), p.HeartbeatAck)
        assert link.connects == 2 and ups == [0, 1] and downs
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_wrong_credentials_end_the_link_at_once(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data") as server:
        v = world.vehicle("V01")
        link = Link("127.0.0.1", server.port, role="vehicle", ident=v.id, secret="not-the-token")
        with pytest.raises(UnauthorizedError):
            async with asyncio.timeout(5):
                await link.run()
        assert link.connects == 0 and "wrong credential" in link.last_error
        # A charge point whose secret is wrong, and the feed of a wrong operator, the same.
        cp = world.charge_point("NAT-PN-1")[1]
        sim = ChargePointSim(msgspec.structs.replace(cp, secret="wrong-secret"), "127.0.0.1", server.port)
        with pytest.raises(UnauthorizedError):
            async with asyncio.timeout(5):
                await sim.run()
        other = world.operator("B")
        with pytest.raises(UnauthorizedError):
            async with asyncio.timeout(5):
                await OperatorFeed(other, "127.0.0.1", server.port).run()
        # Unless told to keep trying (a peer whose operator may fix its side meanwhile).
        patient = Link("127.0.0.1", server.port, role="vehicle", ident=v.id, secret="x", retry_refused=True)
        runner = asyncio.ensure_future(patient.run())
        await asyncio.sleep(0.5)
        assert not runner.done() and not patient.up
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_web_dashboard_follows_an_operator_over_tls(world: World, tmp_path: Path, pki: Pki) -> None:
    listen = [Listen(frozenset(ROLES), "127.0.0.1", 0, "tls")]
    async with running_server(world, tmp_path / "data", listen=listen, tls=pki.files["A"]) as server:
        dashboard = Dashboard(
            world, "A", "127.0.0.1", server.port, ssl_context=client_context(pki.ca), server_hostname=pki.name("A")
        )
        dashboard.start()
        try:
            await until(lambda: dashboard.connected)
            state = dashboard.state()
            assert state["error"] == "" and {s["id"] for s in state["stations"]} >= {"NAT-PN"}
            assert server.connection_counts() == {"operator": 1}
        finally:
            await dashboard.close()
        # Without TLS it cannot follow that listener, and says why.
        plain = Dashboard(world, "A", "127.0.0.1", server.port)
        plain.start()
        try:
            await until(lambda: "TLS" in plain.state()["error"])
            assert not plain.connected and "--tls-ca" in plain.state()["error"]
        finally:
            await plain.close()


async def test_a_question_unanswered_is_unavailable_and_a_change_unanswered_is_outcome_unknown(
    spawn_server, world: World
) -> None:
    """`stations` with the server stopped answered exit 3, "whether it was done is not known"."""
    server = spawn_server("A")
    async with vehicle_link(world, server.port).running() as link:
        await link.wait_up(timeout=10)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # connected, and answering nothing
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(UnavailableError, match="did not answer") as asked:
                await link.call(p.ListStations(), p.StationList, timeout=0.5, again_until=loop.time() + 1.5)
            assert not isinstance(asked.value, OutcomeUnknownError)
            start = link.server_now() + timedelta(hours=1)
            reserve = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key=new_key())
            with pytest.raises(OutcomeUnknownError, match="whether it was done is not known"):
                await link.call(reserve, p.ReservationReply, timeout=0.5, again_until=loop.time() + 1.5)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)


async def test_a_link_tries_the_operators_other_addresses_in_turn(server: Server) -> None:
    # The world file may list more addresses per operator (its standby): a dead first one is passed over.
    from tools.harness import free_ports

    dead = free_ports(1)[0]
    v = server.world.vehicle("V01")
    link = Link("127.0.0.1", dead, role="vehicle", ident=v.id, secret=v.token, fallbacks=[("127.0.0.1", server.port)])
    async with link.running():
        assert link.up and link.address == f"127.0.0.1:{server.port}"
        assert await link.reservations() == []
