"""An operator's live state for its own tools (monitor, web dashboard).

``OperatorFeed`` connects with the operator's secret, keeps the latest
``InspectResult`` and fetches a new one when the server pushes a change
(bursts coalesce into one fetch). It reconnects with backoff when the server
goes away. Readers wait for ``version`` to move instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from datetime import datetime, timedelta

from evcharge.domain.world import OperatorConfig
from evcharge.links.client import Backoff, Client, open_client
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError

log = logging.getLogger(__name__)

SETTLE = 0.1  # seconds a burst of pushes may take before we fetch once
MAX_BACKOFF = 5.0


class OperatorFeed:
    def __init__(
        self,
        operator: OperatorConfig,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.operator = operator
        self.host, self.port = host, port
        self.ssl_context, self.server_hostname = ssl_context, server_hostname
        self.snapshot: p.InspectResult | None = None
        self.fetched_at = 0.0
        self.version = 0
        self.last_error = ""
        self.client: Client | None = None
        self._dirty = asyncio.Event()
        self._changed = asyncio.Condition()
        self._rate: tuple[float, int] | None = None  # (when, requests served) of the previous snapshot
        self.request_rate = 0.0

    @property
    def connected(self) -> bool:
        return self.client is not None

    def now(self) -> datetime | None:
        """The server's simulated time now, extrapolated from the last snapshot."""
        if self.snapshot is None or self.client is None:
            return self.snapshot.server_time if self.snapshot else None
        elapsed = (time.monotonic() - self.fetched_at) * self.client.time_scale
        return self.snapshot.server_time + timedelta(seconds=elapsed)

    async def wait_change(self, seen: int, timeout: float) -> int:
        """The new version once it moves past ``seen`` (or the same after ``timeout``)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: self.version != seen)
            return self.version

    async def run(self) -> None:
        backoff = Backoff(cap=MAX_BACKOFF)
        while True:
            try:
                client = await open_client(
                    self.host,
                    self.port,
                    role="operator",
                    ident=self.operator.id,
                    secret=self.operator.secret,
                    ssl_context=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
            except EvchargeError as exc:
                self.last_error = exc.message
                await backoff.sleep()
                continue
            backoff.reset()
            self.client = client
            client.on_event.append(lambda _event: self._dirty.set())
            try:
                await self._follow(client)
            except EvchargeError as exc:
                self.last_error = exc.message
            finally:
                self.client = None
                await client.close()
                await self._bump()

    async def _follow(self, client: Client) -> None:
        self._dirty.set()
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            while not client.closed.is_set():
                dirty = asyncio.ensure_future(self._dirty.wait())
                await asyncio.wait({dirty, closed}, return_when=asyncio.FIRST_COMPLETED)
                dirty.cancel()
                if client.closed.is_set():
                    return
                await asyncio.sleep(SETTLE)
                self._dirty.clear()
                snapshot = await client.inspect()
                now = time.monotonic()
                if self._rate is not None and now > self._rate[0]:
                    self.request_rate = (snapshot.requests_served - self._rate[1]) / (now - self._rate[0])
                self._rate = (now, snapshot.requests_served)
                self.snapshot, self.fetched_at = snapshot, now
                await self._bump()
        finally:
            closed.cancel()

    async def _bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()
