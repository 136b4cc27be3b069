"""Bad input gets a typed error or a close of that connection only; state is unchanged."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from evcharge.domain.world import World
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.connection import Connection, open_connection
from evcharge.wire.errors import TooLargeError

from .conftest import operator, running_server, vehicle

pytestmark = pytest.mark.timeout(60)


class RawPeer:
    """A hand-driven socket, to send what no well-behaved client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = p.FrameBuffer()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: p.Message) -> None:
        await self.send_raw(p.encode_frame(message))

    async def send_body(self, body: bytes) -> None:
        await self.send_raw(struct.pack(">I", len(body)) + body)

    async def receive(self, timeout: float = 5.0) -> p.Message | None:
        """The next message, or None once the server closed the connection."""
        async with asyncio.timeout(timeout):
            while True:
                body = self.frames.next_body()
                if body is not None:
                    return p.decode_body(body)
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.frames.feed(data)

    async def hello(self, server: Server, vehicle_id: str = "V01") -> p.Welcome:
        v = server.world.vehicle(vehicle_id)
        await self.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident=v.id, credential=v.token))
        welcome = await self.receive()
        assert isinstance(welcome, p.Welcome)
        return welcome


@asynccontextmanager
async def raw(server: Server) -> AsyncIterator[RawPeer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield RawPeer(reader, writer)
    finally:
        writer.close()


async def expect_error_then_close(peer: RawPeer, code: str) -> p.Error:
    error = await peer.receive()
    assert isinstance(error, p.Error), error
    assert error.code == code, error
    assert await peer.receive() is None, "the server should have closed this connection"
    return error


@pytest.fixture
async def strict_server(world: World, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(world, tmp_path / "data", time_scale=60.0, hello_timeout=0.5) as srv:
        yield srv


async def test_every_bad_input_leaves_others_and_state_alone(strict_server: Server) -> None:
    server = strict_server
    async with vehicle(server, "V04") as good, operator(server) as op:
        kept = await good.reserve("NAT-PN-1", good.server_now(), 30)
        before = await op.inspect()

        # Oversized length prefix: refused before reading the body, then closed.
        async with raw(server) as peer:
            await peer.send_raw(struct.pack(">I", p.MAX_FRAME + 1))
            error = await expect_error_then_close(peer, "too_large")
            assert str(p.MAX_FRAME) in error.message
        async with raw(server) as peer:
            await peer.hello(server)
            await peer.send_raw(b"\xff\xff\xff\xff" + b"x" * 100)
            await expect_error_then_close(peer, "too_large")

        # A request before Hello.
        async with raw(server) as peer:
            await peer.send(p.ListStations(id=7))
            error = await expect_error_then_close(peer, "bad_request")
            assert error.id == 7 and "Hello" in error.message

        # Garbage instead of Hello.
        async with raw(server) as peer:
            await peer.send_body(b"\xc1\xc1 not msgpack")
            await expect_error_then_close(peer, "bad_request")

        # Bad credentials, unknown identities, wrong version, unknown role.
        for hello, code in (
            (
                p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident="V01", credential="wrong-token"),
                "unauthorized",
            ),
            (
                p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident="ZZZ", credential="whatever!"),
                "unauthorized",
            ),
            (
                p.Hello(id=1, version=p.PROTOCOL_VERSION, role="station", ident="NAT-PN-1", credential="x" * 12),
                "unauthorized",
            ),
            (
                p.Hello(id=1, version=p.PROTOCOL_VERSION, role="operator", ident="A", credential="x" * 12),
                "unauthorized",
            ),
            (
                p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident="V02", credential="vehicle-v02-token"),
                "forbidden",
            ),
            (
                p.Hello(id=1, version=99, role="vehicle", ident="V01", credential="vehicle-v01-token"),
                "unsupported_version",
            ),
        ):
            async with raw(server) as peer:
                await peer.send(hello)
                await expect_error_then_close(peer, code)
        async with raw(server) as peer:
            await peer.send_body(
                msgspec.msgpack.encode(
                    {"type": "Hello", "id": 1, "version": 1, "role": "god", "ident": "x", "credential": "y"}
                )
            )
            await expect_error_then_close(peer, "bad_request")

        # A Hello that never comes: the connection is closed after the deadline.
        async with raw(server) as peer:
            await peer.send_raw(b"\x00\x00")  # half a header, then silence
            assert await peer.receive(timeout=5.0) is None

        # After a good Hello: bad bodies are answered and the connection goes on.
        async with raw(server) as peer:
            await peer.hello(server)
            await peer.send_body(b"\x93\x01\x02")  # msgpack, but not a message
            assert (await peer.receive()).code == "bad_request"
            await peer.send_body(
                msgspec.msgpack.encode(
                    {"type": "Reserve", "id": 11, "charge_point_id": "NAT-PN-2", "start": 5, "minutes": "ten"}
                )
            )
            error = await peer.receive()
            assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 11
            assert "start" in error.message
            await peer.send_body(msgspec.msgpack.encode({"type": "LaunchRockets", "id": 12}))
            error = await peer.receive()
            assert error.code == "bad_request" and error.id == 12
            await peer.send(p.SessionComplete(id=13, reservation_id=kept.id, kwh=99.0))
            error = await peer.receive()
            assert error.code == "forbidden" and error.id == 13
            await peer.send(p.Inspect(id=14))
            assert (await peer.receive()).code == "forbidden"
            await peer.send(p.Hello(id=15, version=1, role="vehicle", ident="V01", credential="vehicle-v01-token"))
            assert (await peer.receive()).code == "bad_request"
            await peer.send(p.ListStations(id=16, city="Natal"))
            listed = await peer.receive()
            assert isinstance(listed, p.StationList) and listed.id == 16 and len(listed.stations) == 2

        # A frame cut off in the middle, then the peer vanishes.
        async with raw(server) as peer:
            await peer.hello(server)
            frame = p.encode_frame(p.CancelReservation(id=2, reservation_id=kept.id))
            await peer.send_raw(frame[: len(frame) // 2])

        # The good client never noticed, and nothing changed.
        assert (await good.station_status("NAT-PN")).id == "NAT-PN"
        after = await op.inspect()
        assert after.reservations == before.reservations
        assert [r.id for r in await good.reservations()] == [kept.id]


async def test_a_reply_over_the_frame_limit_is_refused_not_sent() -> None:
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())
        done.set()
        writer.close()

    listener = await asyncio.start_server(sink, "127.0.0.1", 0)
    try:
        writer = await open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
        conn = Connection(writer, max_frame=64)
        with pytest.raises(TooLargeError, match="over the frame limit"):
            await conn.send(p.Error(id=1, code="internal", message="x" * 200))
        await conn.send(p.Ok(id=2))  # the connection is still good for what fits
        await conn.close()
        await asyncio.wait_for(done.wait(), 5)
        assert bytes(received) == p.encode_frame(p.Ok(id=2))
    finally:
        listener.close()
        await listener.wait_closed()
