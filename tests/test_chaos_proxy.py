"""The chaos proxy: faithful without faults, and each fault does what it says."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tools.chaos_proxy import NO_FAULTS, ChaosProxy, FaultRates

pytestmark = pytest.mark.timeout(30)


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """Sends back every byte it gets; closes when the client does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def proxied(rates: FaultRates = NO_FAULTS, **options: float) -> AsyncIterator[ChaosProxy]:
    async with echo_server() as port, ChaosProxy("127.0.0.1", port, rates=rates, seed=7, **options) as proxy:
        yield proxy


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            for i in range(0, len(payload), 10_000):
                writer.write(payload[i : i + 10_000])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        received = await reader.readexactly(len(payload))
        await sender
        return received
    finally:
        writer.close()


async def test_without_faults_every_byte_arrives_intact_and_in_order() -> None:
    payload = os.urandom(1_000_000)
    async with proxied() as proxy:
        answers = await asyncio.gather(*(roundtrip(proxy.port, payload) for _ in range(4)))
        assert all(a == payload for a in answers)
        assert proxy.connections == 4 and sum(proxy.faults.values()) == 0
        assert proxy.bytes == 2 * 4 * len(payload)


async def test_delays_slow_chunks_down_but_keep_them_intact() -> None:
    payload = os.urandom(50_000)
    async with proxied(FaultRates(delay=1.0, max_delay=0.05)) as proxy:
        assert await roundtrip(proxy.port, payload) == payload
        assert proxy.faults["delay"] > 0
        assert set(proxy.faults) == {"delay"}


async def test_a_cut_ends_the_connection_after_at_most_part_of_the_chunk() -> None:
    async with proxied(FaultRates(cut=1.0)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x" * 1000)
        async with asyncio.timeout(5):
            received = await reader.read()  # EOF: the proxy closed us
        writer.close()
        assert len(received) < 1000
        assert proxy.faults["cut"] == 1


async def test_a_reset_is_a_tcp_rst() -> None:
    async with proxied(FaultRates(reset=1.0)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                while await reader.read(1000):
                    pass
        writer.close()
        assert proxy.faults["reset"] == 1


async def test_a_stall_swallows_everything_then_cuts_when_its_time_is_up() -> None:
    async with proxied(FaultRates(stall=1.0, stall_for=0.5)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        began = time.monotonic()
        writer.write(b"first")  # starts the stall: never forwarded
        await asyncio.sleep(0.1)
        writer.write(b"second")  # into the black hole too
        async with asyncio.timeout(5):
            received = await reader.read()
        writer.close()
        assert received == b""
        assert time.monotonic() - began >= 0.45
        assert proxy.faults["stall"] == 1


async def test_cut_all_drops_every_open_connection_and_the_proxy_keeps_serving() -> None:
    async with proxied() as proxy:
        conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
        for reader, writer in conns:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        async with asyncio.timeout(5):
            while proxy.open_connections < 3:
                await asyncio.sleep(0.01)
        assert proxy.cut_all() == 3
        for reader, writer in conns:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
        assert await roundtrip(proxy.port, b"again") == b"again"
        assert proxy.faults["cut"] == 3


async def test_stall_all_silences_open_connections_while_new_ones_go_through() -> None:
    async with proxied() as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert proxy.stall_all(stall_for=0.5) == 1
        writer.write(b"lost")
        assert await roundtrip(proxy.port, b"fresh") == b"fresh"
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # nothing came back, then the cut
        writer.close()
        assert proxy.faults["stall"] == 1


async def test_a_partition_swallows_old_and_new_connections_until_healed() -> None:
    async with proxied() as proxy:
        old_reader, old_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        old_writer.write(b"ping")
        assert await old_reader.readexactly(4) == b"ping"
        proxy.partition()
        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for writer in (old_writer, new_writer):
            writer.write(b"anyone?")
        for reader in (old_reader, new_reader):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.read(100)
        proxy.heal()
        for reader, writer in ((old_reader, old_writer), (new_reader, new_writer)):
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
        assert await roundtrip(proxy.port, b"healed") == b"healed"
        assert proxy.faults["partition"] == 1


async def test_an_unreachable_upstream_ends_the_client_connection_at_once() -> None:
    async with echo_server() as port:
        pass  # closed: nothing listens there now
    async with ChaosProxy("127.0.0.1", port) as proxy:
        reader, _writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(5):
                await reader.readexactly(1)
        _writer.close()
        assert proxy.refused == 1


async def test_stop_closes_open_connections_promptly() -> None:
    async with echo_server() as port:
        proxy = await ChaosProxy("127.0.0.1", port).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        began = time.monotonic()
        await proxy.stop()
        assert time.monotonic() - began < 2.0
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()


def test_rates_are_validated() -> None:
    with pytest.raises(ValueError):
        FaultRates(cut=1.5)
    with pytest.raises(ValueError):
        FaultRates(stall=0.6, cut=0.6)
