"""A TCP proxy that misbehaves on purpose: the network of the chaos runs.

One listening port forwards every accepted connection to one upstream
address, byte for byte, in both directions. With fault rates set, each chunk
read from either side may instead be

* **delayed** (held back a random time, order kept: a slow network),
* **stalled** (this connection goes silent both ways: what is sent is read and
  thrown away, like packets into a black hole, until ``stall_for`` has passed,
  then it is cut),
* **cut** (a random prefix of the chunk is forwarded, then both sides are
  closed: half a frame may arrive), or
* **reset** (the same, but both sides get a TCP RST instead of a FIN).

``partition`` black-holes every connection, open or new, until ``heal``
(which cuts them, as TCP finally gives up); ``stall_all`` black-holes only the
connections open now, as when a middlebox silently drops their flows while new
connections still go through.

Choices come from one seeded ``random.Random``, so a run's faults are
reproducible as far as the event loop's scheduling is. Every wait has a
deadline (connect, idle, write, stall), and ``stop`` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # a proxied connection with no byte either way this long is closed
FAULT_KINDS = ("delay", "stall", "cut", "reset", "partition")


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Chances per forwarded chunk (each side's reads are chunks); all zero: a faithful proxy."""

    delay: float = 0.0
    max_delay: float = 0.2  # seconds; a delayed chunk waits uniform(0, max_delay)
    stall: float = 0.0
    stall_for: float = 5.0  # seconds a stalled connection stays open before it is cut
    cut: float = 0.0
    reset: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay", "stall", "cut", "reset"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} rate must be within 0..1")
        if self.stall + self.cut + self.reset > 1.0:
            raise ValueError("stall + cut + reset rates must not exceed 1")
        if self.max_delay < 0 or self.stall_for < 0:
            raise ValueError("delays must not be negative")


NO_FAULTS = FaultRates()


class _Pair:
    """One proxied connection: the client's side and the upstream side."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.stalled = False
        self.done = asyncio.Event()
        self.stall_end: asyncio.TimerHandle | None = None

    def writers(self) -> tuple[asyncio.StreamWriter, asyncio.StreamWriter]:
        return self.client[1], self.upstream[1]

    def close(self, *, reset: bool = False) -> None:
        if self.stall_end is not None:
            self.stall_end.cancel()
        for writer in self.writers():
            if reset:
                _linger_zero(writer)
                writer.transport.abort()
            else:
                writer.close()
        self.done.set()


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make the next close of this socket send RST rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ChaosProxy:
    """``host:port`` -> ``upstream_host:upstream_port``, with faults at ``rates`` (changeable any time)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rates: FaultRates = NO_FAULTS,
        seed: int = 0,
        name: str = "proxy",
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self.rates = rates
        self.name = name
        self.idle_timeout = idle_timeout
        self.rng = random.Random(seed)
        self.faults: Counter[str] = Counter()
        self.connections = 0  # accepted
        self.refused = 0  # accepted, but the upstream could not be reached
        self.bytes = 0  # forwarded, both ways
        self.partitioned = False
        self._healed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
        self.heal()
        for pair in list(self._pairs):
            pair.close()
        # Each connection's task ends by itself once its pair is closed (or its connect times out);
        # cancelling asyncio's own connection callbacks would only make them log the cancellation.
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=CONNECT_TIMEOUT + 5.0)
            for task in late:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ChaosProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def cut_all(self, *, reset: bool = False) -> int:
        """Cut every open connection now (a partition's first moment); returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            self.faults["reset" if reset else "cut"] += 1
            pair.close(reset=reset)
        return len(pairs)

    def stall_all(self, stall_for: float) -> int:
        """Black-hole every open connection for ``stall_for`` seconds, then cut it; returns how many."""
        pairs = [pair for pair in self._pairs if not pair.stalled]
        for pair in pairs:
            self._stall(pair, stall_for)
        return len(pairs)

    def partition(self) -> int:
        """Black-hole every connection, open or new, until ``heal``; returns how many were open."""
        self.faults["partition"] += 1
        self.partitioned = True
        self._healed.clear()
        for pair in self._pairs:
            pair.stalled = True
        return len(self._pairs)

    def heal(self) -> None:
        """End a partition: its black-holed connections are cut; new ones go through again."""
        if not self.partitioned:
            return
        self.partitioned = False
        self._healed.set()
        for pair in list(self._pairs):
            if pair.stalled and pair.stall_end is None:
                pair.close()

    def _stall(self, pair: _Pair, stall_for: float) -> None:
        self.faults["stall"] += 1
        pair.stalled = True
        # Silence for a while, then the connection dies (as TCP would find after retrying).
        pair.stall_end = asyncio.get_running_loop().call_later(stall_for, pair.close)

    # --- one connection -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.partitioned:
                await self._black_hole(reader, writer)
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except (OSError, TimeoutError) as exc:
                # Like a server that is down: the client's connection ends at once.
                self.refused += 1
                log.debug("%s: upstream unreachable: %s", self.name, exc)
                _linger_zero(writer)
                writer.transport.abort()
                return
            pair = _Pair((reader, writer), upstream)
            pair.stalled = self.partitioned
            self._pairs.add(pair)
            try:
                pumps = [
                    asyncio.ensure_future(self._pump(pair, reader, upstream[1])),
                    asyncio.ensure_future(self._pump(pair, upstream[0], writer)),
                ]
                try:
                    await pair.done.wait()
                finally:
                    for pump in pumps:
                        pump.cancel()
                    await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                self._pairs.discard(pair)
                pair.close()
                for w in pair.writers():
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2.0):
                            await w.wait_closed()
        finally:
            self._tasks.discard(task)

    async def _black_hole(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection made during a partition: nothing reaches the other side; cut at the heal."""
        swallow = asyncio.ensure_future(self._swallow(reader))
        healed = asyncio.ensure_future(self._healed.wait())
        try:
            await asyncio.wait([swallow, healed], timeout=self.idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (swallow, healed):
                task.cancel()
            await asyncio.gather(swallow, healed, return_exceptions=True)
            writer.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while await reader.read(CHUNK):
                pass

    async def _pump(self, pair: _Pair, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forward one direction until either side ends or a fault ends the connection."""
        try:
            while True:
                async with asyncio.timeout(self.idle_timeout):
                    data = await source.read(CHUNK)
                if not data:
                    break
                if pair.stalled:
                    continue  # the black hole swallows it
                if not await self._forward(pair, data, sink):
                    return
        except (OSError, RuntimeError, TimeoutError):  # uvloop: RuntimeError on a closed transport
            pass
        # One side finished (or failed): the connection as a whole is over.
        pair.close()

    async def _forward(self, pair: _Pair, data: bytes, sink: asyncio.StreamWriter) -> bool:
        """Send ``data`` on, or fault; False once the connection must not go on."""
        rates = self.rates
        roll = self.rng.random()
        if roll < rates.stall:
            self._stall(pair, rates.stall_for)
            return True
        if roll < rates.stall + rates.cut + rates.reset:
            reset = roll >= rates.stall + rates.cut
            self.faults["reset" if reset else "cut"] += 1
            prefix = data[: self.rng.randrange(len(data) + 1)]
            if prefix:
                with contextlib.suppress(OSError, RuntimeError):
                    sink.write(prefix)
            pair.close(reset=reset)
            return False
        if rates.delay and self.rng.random() < rates.delay:
            self.faults["delay"] += 1
            await asyncio.sleep(self.rng.uniform(0, rates.max_delay))
            if pair.stalled or pair.done.is_set():
                return not pair.done.is_set()
        sink.write(data)
        self.bytes += len(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await sink.drain()
        return True
