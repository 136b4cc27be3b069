"""Out of file descriptors, real clients are not locked out: caps follow the process's file limit.

Under a 1,024-file limit and the default ``--max-connections`` (20,000), 1,100 connections
that each sent 2 bytes used up the server's descriptors: a real vehicle could neither
connect nor keep its connection. The server is started here as a real process under a low
limit (``RLIMIT_NOFILE``, as ``ulimit -n`` sets it) that it may not raise.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from evcharge.domain.world import World
from evcharge.links.client import Client, connect

from .conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

FILE_LIMIT = 256  # soft and hard: the server cannot raise it
ATTACKERS = 400  # more connections than the server has descriptors


@asynccontextmanager
async def silent_connections(port: int, count: int) -> AsyncIterator[list[socket.socket]]:
    """``count`` connections that each sent 2 bytes of a frame header, then nothing (held open)."""
    held: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            held.append(sock)
            try:
                async with asyncio.timeout(5):
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, b"\x00\x00")
            except (OSError, TimeoutError):
                pass  # refused, reset or left in the backlog: it holds what it holds
        yield held
    finally:
        for sock in held:
            sock.close()


def as_vehicle(server: ServerProcess, world: World, vehicle_id: str) -> Client:
    v = world.vehicle(vehicle_id)
    return connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token, timeout=10.0)


async def test_a_flood_of_silent_connections_does_not_lock_out_real_clients(spawn_server, world: World) -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < ATTACKERS + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ATTACKERS + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    server: ServerProcess = spawn_server(
        "A", extra=("--hello-timeout", "30"), limits={resource.RLIMIT_NOFILE: (FILE_LIMIT, FILE_LIMIT)}
    )
    async with as_vehicle(server, world, "V01") as before, silent_connections(server.port, ATTACKERS):
        # The vehicle connected before the flood keeps its connection; one connecting now gets in.
        async with asyncio.timeout(30):
            assert await before.heartbeat()
            async with as_vehicle(server, world, "V04") as during:
                assert await during.list_stations()
            assert await before.heartbeat()
    log = server.log_path.read_text()
    assert "file limit 256" in log, "the server says what its file limit allows"
    assert "dropped the oldest" in log, "and when a cap bites"
    assert "Traceback" not in log and "out of system resource" not in log, log[-3000:]
