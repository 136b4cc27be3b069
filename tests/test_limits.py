"""Connection limits: every way a client can hold on to the server without using it ends.

Idle clients, clients without a Hello, trickled frames, clients that pipeline
without reading or never read at all are cut off or held back, and a full
server says so instead of hanging. Misbehaving clients are raw sockets; the
well-behaved one next to them must never notice.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evcharge.domain.world import World, load_world
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.connection import WRITE_HIGH_WATER
from evcharge.wire.errors import UnavailableError

from .conftest import running_server, vehicle
from .raw import RawPeer, raw

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def station(server: Server, cp_id: str) -> AsyncIterator[Client]:
    secret = server.books.charge_points[cp_id].config.secret
    async with connect("127.0.0.1", server.port, role="station", ident=cp_id, secret=secret) as client:
        yield client


async def test_a_silent_client_is_closed_after_the_idle_timeout(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", idle_timeout=0.5) as server, vehicle(server, "V01") as c:
        await c.heartbeat()  # activity keeps it open...
        async with asyncio.timeout(5):
            await c.closed.wait()  # ...silence does not
        assert not server.online.vehicles


async def test_connections_beyond_the_maximum_are_refused_with_a_clear_error(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", max_connections=2) as server:
        async with vehicle(server, "V01"), vehicle(server, "V04"):
            with pytest.raises(UnavailableError, match="too many connections"):
                async with vehicle(server, "V07"):
                    pass
        # Once the others have gone, there is room again.
        async with asyncio.timeout(5):
            while server.online.everyone:
                await asyncio.sleep(0.02)
        async with vehicle(server, "V07") as c:
            assert await c.heartbeat()


# --- misbehaving clients on raw sockets -------------------------------------------------------


def hello_frame(server: Server, vehicle_id: str = "V01") -> bytes:
    v = server.world.vehicle(vehicle_id)
    return p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident=v.id, credential=v.token))


def hello_frame_for(world_path: Path, vehicle_id: str) -> bytes:
    v = load_world(str(world_path)).vehicle(vehicle_id)
    return p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident=v.id, credential=v.token))


async def trickle(peer: RawPeer, data: bytes, every: float) -> None:
    """One byte at a time; stops quietly once the server has cut us off."""
    for i in range(len(data)):
        try:
            await peer.send_raw(data[i : i + 1])
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(every)


@pytest.mark.parametrize("sends", ["nothing", "half a Hello", "a Hello one byte at a time"])
async def test_a_client_without_a_whole_hello_in_time_is_closed(sends: str, world: World, tmp_path: Path) -> None:
    # The idle timeout is far away: only the Hello deadline can close these connections in time.
    async with running_server(world, tmp_path / "data", hello_timeout=1.0, idle_timeout=600) as server:
        async with raw(server) as peer, vehicle(server, "V04") as good:
            hello = hello_frame(server)
            dripping: asyncio.Task[None] | None = None
            if sends == "half a Hello":
                await peer.send_raw(hello[: len(hello) // 2])
            elif sends == "a Hello one byte at a time":
                # ~8 s for the whole Hello: every byte comes well within any idle timeout.
                dripping = asyncio.get_running_loop().create_task(trickle(peer, hello, every=0.1))
            assert await peer.closed_by_server(timeout=6.0), "the Hello deadline did not close the connection"
            assert await good.heartbeat()  # nobody else noticed
            if dripping is not None:
                assert not dripping.done(), "the whole Hello went out before the deadline; the test proves nothing"
                dripping.cancel()
                await asyncio.gather(dripping, return_exceptions=True)
        assert not server._handshakes


async def test_a_frame_trickled_after_hello_is_cut_off_by_the_frame_timeout(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", frame_timeout=2.0, idle_timeout=600) as server:
        async with raw(server) as peer, vehicle(server, "V04") as good:
            await peer.hello(server, "vehicle", "V01")
            # A frame split in two within the frame timeout is fine.
            frame = p.encode_frame(p.Heartbeat(id=2))
            await peer.send_raw(frame[:7])
            await asyncio.sleep(0.3)
            await peer.send_raw(frame[7:])
            ack = await peer.receive()
            assert isinstance(ack, p.HeartbeatAck) and ack.id == 2
            # One byte every 0.2 s: always active, never idle, but the frame takes ~5 s.
            frame = p.encode_frame(p.Heartbeat(id=3))
            dripping = asyncio.get_running_loop().create_task(trickle(peer, frame, every=0.2))
            try:
                assert await peer.receive(timeout=8.0) is None, "the trickled frame was served, not cut off"
                assert not dripping.done(), "the whole frame went out before the deadline; the test proves nothing"
            finally:
                dripping.cancel()
                await asyncio.gather(dripping, return_exceptions=True)
            assert await good.heartbeat()
        async with asyncio.timeout(5):
            while "V01" in server.online.vehicles:
                await asyncio.sleep(0.02)


async def test_each_frame_has_its_own_frame_timeout(world: World, tmp_path: Path) -> None:
    async with (
        running_server(world, tmp_path / "data", frame_timeout=2.0, idle_timeout=600) as server,
        raw(server) as peer,
    ):
        await peer.hello(server, "vehicle", "V01")
        first, second = p.encode_frame(p.Heartbeat(id=2)), p.encode_frame(p.Heartbeat(id=3))
        # Each frame is whole 1.2 s after it began, the second 2.4 s after the first began.
        await peer.send_raw(first[:7])
        await asyncio.sleep(1.2)
        await peer.send_raw(first[7:] + second[:7])
        await asyncio.sleep(1.2)
        await peer.send_raw(second[7:])
        assert [(await peer.receive()).id, (await peer.receive()).id] == [2, 3]


async def test_the_limits_are_options_of_evcharge_server(spawn_server: Any) -> None:
    # A real `evcharge server` process takes every limit option; two of them are seen at work.
    proc = spawn_server(
        "A",
        extra=(
            "--hello-timeout=0.5",
            "--frame-timeout=0.5",
            "--write-timeout=1",
            "--max-in-flight=4",
            "--push-buffer-kb=64",
        ),
    )
    async with raw(proc) as silent:
        assert await silent.closed_by_server(timeout=5.0), "--hello-timeout was not applied"
    async with raw(proc) as trickler:
        await trickler.send_raw(hello_frame_for(proc.world_path, "V01"))
        assert isinstance(await trickler.receive(), p.Welcome)
        await trickler.send_raw(p.encode_frame(p.Heartbeat(id=2))[:5])
        assert await trickler.closed_by_server(timeout=5.0), "--frame-timeout was not applied"


async def test_pending_handshakes_are_capped_and_the_oldest_makes_room(world: World, tmp_path: Path) -> None:
    async with running_server(world, tmp_path / "data", max_connections=2, hello_timeout=30.0) as server:
        async with raw(server) as first, raw(server) as second:
            await first.send_raw(b"\x00")
            await second.send_raw(b"\x00")
            async with asyncio.timeout(5):
                while len(server._handshakes) < 2:
                    await asyncio.sleep(0.01)
            # A third connection makes room by dropping the oldest silent one, not after the
            # 30 s Hello deadline: a client that says Hello at once gets in while others idle.
            async with vehicle(server, "V01") as c:
                assert await c.heartbeat()
                assert await first.closed_by_server(timeout=5.0)
            assert len(server._handshakes) <= 2
        async with asyncio.timeout(5):
            while server._handshakes:
                await asyncio.sleep(0.01)
        async with vehicle(server, "V01") as c:
            assert await c.heartbeat()


def padded_request(request_id: int) -> bytes:
    # Unknown fields are ignored; the padding makes pipelined requests outgrow the socket buffers.
    # Six stations a reply (of every operator's): replies big enough to fill the socket buffers.
    body = msgspec.msgpack.encode({"type": "ListStations", "id": request_id, "limit": 6, "pad": "x" * 1000})
    return struct.pack(">I", len(body)) + body


async def test_a_client_pipelining_without_reading_is_held_to_the_in_flight_cap(world: World, tmp_path: Path) -> None:
    cap, sent = 8, 3000
    async with (
        running_server(world, tmp_path / "data", max_in_flight=cap, write_timeout=60.0) as server,
        raw(server, rcvbuf=4096) as peer,
        vehicle(server, "V04") as good,
    ):
        await peer.hello(server, "vehicle", "V01")
        (session,) = server.online.vehicles["V01"]
        served_before = server.requests_served
        writer = asyncio.get_running_loop().create_task(
            peer.send_raw(b"".join(padded_request(i) for i in range(1, sent + 1)), timeout=120.0)
        )
        # While the client reads nothing: watch the server reach the cap, stop reading, and stay there.
        most_in_flight = most_buffered = 0
        served, still_since = -1, asyncio.get_running_loop().time()
        async with asyncio.timeout(30):
            while session.conn.in_flight < cap or asyncio.get_running_loop().time() - still_since < 1.0:
                most_in_flight = max(most_in_flight, session.conn.in_flight)
                most_buffered = max(most_buffered, session.conn.buffered_out)
                if server.requests_served != served:
                    served, still_since = server.requests_served, asyncio.get_running_loop().time()
                await asyncio.sleep(0.005)
        assert most_in_flight <= cap
        assert most_buffered <= WRITE_HIGH_WATER + cap * 4096, most_buffered
        assert served - served_before < sent, "the server read every request of a client that reads nothing"
        assert session.conn.in_flight == cap, "requests held at the cap are waiting for the client to read"
        assert await good.heartbeat()  # others are served meanwhile
        # Once the client reads, every reply comes, each once.
        ids: list[int] = []
        async with asyncio.timeout(60):
            while len(ids) < sent:
                reply = await peer.receive(timeout=30.0)
                assert isinstance(reply, p.StationList), reply
                ids.append(reply.id)
            await writer
        assert sorted(ids) == list(range(1, sent + 1))
        assert most_in_flight <= cap


async def test_a_client_that_never_reads_its_replies_is_disconnected(world: World, tmp_path: Path) -> None:
    cap = 8
    async with (
        running_server(world, tmp_path / "data", max_in_flight=cap, write_timeout=1.0) as server,
        raw(server, rcvbuf=4096) as peer,
        vehicle(server, "V04") as good,
    ):
        await peer.hello(server, "vehicle", "V01")
        (session,) = server.online.vehicles["V01"]
        writer = asyncio.get_running_loop().create_task(
            peer.send_raw(b"".join(padded_request(i) for i in range(1, 3001)), timeout=60.0)
        )
        most_buffered = 0
        try:
            async with asyncio.timeout(20):
                while "V01" in server.online.vehicles:
                    most_buffered = max(most_buffered, session.conn.buffered_out)
                    await asyncio.sleep(0.005)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        assert most_buffered <= WRITE_HIGH_WATER + cap * 4096, most_buffered
        # Nothing is kept for it: what it never read is dropped with the connection.
        assert session.conn.buffered_out == 0
        assert await good.heartbeat()


async def test_a_client_that_never_reads_its_pushes_is_disconnected(world: World, tmp_path: Path) -> None:
    limit = 64 * 1024
    async with (
        running_server(world, tmp_path / "data", push_buffer_limit=limit) as server,
        raw(server, rcvbuf=4096) as monitor,
        station(server, "NAT-PN-1") as cp,
    ):
        await monitor.hello(server, "operator", server.operator.id)
        (session,) = server.online.operator_tools
        most_buffered = 0
        async with asyncio.timeout(30):
            # Every status change is pushed to the operator's tools, which never read here.
            while server.online.operator_tools:
                await cp.report_status("faulted")
                await cp.report_status("available")
                most_buffered = max(most_buffered, session.conn.buffered_out)
        assert most_buffered <= limit + 1024, most_buffered
        assert session.conn.buffered_out == 0
        assert await cp.heartbeat()  # the charge point never noticed
