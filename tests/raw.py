"""A hand-driven client socket, to send what no well-behaved client would.

The fuzz and limit tests use it to misbehave on purpose: half frames, garbage,
pipelining without reading, reading nothing at all. Every wait has a deadline.
``LoopWatch`` tells whether the (in-process) server's event loop was held up.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol

from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce, peer_proof


class Listening(Protocol):
    """A server in this process or a server process: all a raw client needs is its port."""

    @property
    def port(self) -> int: ...


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        # Generous: a test may send bodies right at the cap, and the server never sends more.
        self.frames = p.FrameBuffer(p.MAX_FRAME)

    async def send_raw(self, data: bytes, timeout: float = 10.0) -> None:
        self.writer.write(data)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    async def send(self, message: p.Message) -> None:
        await self.send_raw(p.encode_frame(message))

    async def send_body(self, body: bytes) -> None:
        await self.send_raw(struct.pack(">I", len(body)) + body)

    async def receive(self, timeout: float = 10.0) -> p.Message | None:
        """The next message, or None once the server closed (or reset) the connection."""
        async with asyncio.timeout(timeout):
            while True:
                body = self.frames.next_body()
                if body is not None:
                    return p.decode_body(body)
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    return None
                if not data:
                    return None
                self.frames.feed(data)

    async def closed_by_server(self, timeout: float) -> bool:
        """Read and drop everything until the server closes; False if it is still open at the deadline."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        data = await self.reader.read(65536)
                    except (ConnectionError, OSError):
                        return True
                    if not data:
                        return True
        except TimeoutError:
            return False

    async def hello(self, server: Server, role: p.Role = "vehicle", ident: str = "V01") -> p.Welcome:
        """A complete, valid handshake as ``role`` ``ident`` (peers answer the challenge)."""
        world = server.world
        match role:
            case "vehicle":
                credential = world.vehicle(ident).token
            case "station":
                credential = server.books.charge_points[ident].config.secret
            case "operator":
                credential = world.operator(ident).secret
            case "peer":
                credential = new_nonce()
        await self.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role=role, ident=ident, credential=credential))
        reply = await self.receive()
        if role == "peer":
            assert isinstance(reply, p.PeerChallenge), reply
            secret = world.operator(ident).secret
            await self.send(p.PeerProof(id=2, proof=peer_proof(secret, "client", credential, reply.nonce, ident)))
            reply = await self.receive()
        assert isinstance(reply, p.Welcome), reply
        return reply

    def abort(self) -> None:
        self.writer.transport.abort()


@asynccontextmanager
async def raw(server: Listening, *, rcvbuf: int | None = None, sndbuf: int | None = None) -> AsyncIterator[RawPeer]:
    """A raw connection to ``server``; small socket buffers make a non-reader felt sooner."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(10):
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield RawPeer(reader, writer)
    finally:
        # Abort, not close: a close would wait on whatever the server never read.
        writer.transport.abort()


class LoopWatch:
    """The longest the event loop went without running a tick: how long everyone else waited.

    In-process servers share the test's loop, so a request that blocks it shows here.
    """

    TICK = 0.01

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK)
            self.longest = max(self.longest, loop.time() - before - self.TICK)

    def reset(self) -> None:
        self.longest = 0.0

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
