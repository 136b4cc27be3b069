"""An operator's live state for its own tools (monitor, web dashboard).

``OperatorFeed`` keeps a ``Link`` to the operator's server with the operator's
secret, keeps the latest ``InspectResult`` and fetches a new one when the
server pushes a change: a burst of pushes within ``settle`` seconds costs one
``Inspect``, and at most one is in flight. ``ChargingProgress`` (kWh and cost of a
session as it charges, twice a second per session) costs none: it is written
into the snapshot, and a burst of them moves ``version`` once. There is no polling; the only timed
fetch is at the next moment a charge point turns ``reserved`` by the clock
alone (its next reservation begins within the world's ``reserved_soon_min``),
which no server pushes. Readers wait for ``version`` to move instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from datetime import datetime, timedelta

from evcharge.domain.world import OperatorConfig
from evcharge.links.client import Client
from evcharge.links.link import Backoff, Link, world_fallbacks
from evcharge.wire import protocol as p
from evcharge.wire.connection import DEFAULT_REQUEST_TIMEOUT
from evcharge.wire.errors import EvchargeError

log = logging.getLogger(__name__)

SETTLE = 0.1  # real seconds a burst of pushes may take before we fetch once
BOUNDARY_MARGIN = 0.05  # real seconds after a clock boundary before fetching


class OperatorFeed:
    def __init__(
        self,
        operator: OperatorConfig,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        settle: float = SETTLE,
        reserved_soon_min: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.operator = operator
        self.link = Link(
            host,
            port,
            role="operator",
            ident=operator.id,
            secret=operator.secret,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            backoff=backoff,
            on_up=self._came_up,
            on_down=self._went_down,
            name=f"feed of operator {operator.id}",
            fallbacks=world_fallbacks(operator, host, port),
        )
        self.settle = settle
        self.reserved_soon_min = reserved_soon_min
        self.snapshot: p.InspectResult | None = None
        self.fetched_at = 0.0  # time.monotonic() when the snapshot arrived
        self.version = 0  # moves on every new snapshot and every change of the link
        self.inspects = 0  # Inspect requests sent: one per (settled) burst of pushes
        self.time_scale = 1.0
        self.request_rate = 0.0  # requests the server served per second, between the last two snapshots
        self._fresh = False  # a snapshot arrived over the current connection
        self._dirty = asyncio.Event()
        self._moved = asyncio.Event()  # set (and replaced) when the version moves
        self._rate: tuple[float, int] | None = None  # (when, requests served) of the previous snapshot
        self._boundary: asyncio.TimerHandle | None = None
        self._progress_bump: asyncio.TimerHandle | None = None  # one version move per settled burst of progress
        self._reservations: dict[str, p.ReservationInfo] = {}  # the snapshot's, by id

    @property
    def client(self) -> Client | None:
        return self.link.client

    @property
    def connected(self) -> bool:
        """Up, with a snapshot taken over this connection."""
        return self.link.up and self._fresh

    @property
    def last_error(self) -> str:
        return "" if self.connected else self.link.last_error

    @property
    def address(self) -> str:
        return self.link.address

    def now(self) -> datetime | None:
        """The server's simulated time: extrapolated while connected, the last one seen otherwise."""
        if self.snapshot is None:
            return None
        if not self.connected:
            return self.snapshot.server_time
        elapsed = (time.monotonic() - self.fetched_at) * self.time_scale
        return self.snapshot.server_time + timedelta(seconds=elapsed)

    def pushed(self, event: p.Event) -> None:
        """The server pushed a change: fetch the state (once the burst settles)."""
        if isinstance(event, p.ChargingProgress):
            self._progressed(event)
        else:
            self._dirty.set()

    def _progressed(self, event: p.ChargingProgress) -> None:
        r = self._reservations.get(event.reservation_id)
        if r is None:
            return  # not in the snapshot yet: the fetch its start caused brings it
        r.kwh, r.cost = event.kwh, event.cost
        if self._progress_bump is None:
            self._progress_bump = asyncio.get_running_loop().call_later(self.settle, self._bump_progress)

    def _bump_progress(self) -> None:
        self._progress_bump = None
        self._bump()

    async def wait_change(self, seen: int, timeout: float) -> int:
        """The new version once it moves past ``seen`` (or the same after ``timeout``)."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._moved.wait()
        return self.version

    async def run(self) -> None:
        """Follow the operator until cancelled (or refused: that error is raised)."""
        follower = asyncio.ensure_future(self._follow())
        try:
            await self.link.run()
        finally:
            follower.cancel()
            self._cancel_timers()
            await asyncio.gather(follower, return_exceptions=True)
            await self.link.close()

    async def _came_up(self, client: Client) -> None:
        self._fresh = False
        self.time_scale = client.time_scale or 1.0
        client.on_event.append(self.pushed)
        self._dirty.set()

    def _went_down(self, _reason: str) -> None:
        self._fresh = False
        self._cancel_timers()
        self._bump()

    async def _follow(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settle)
            self._dirty.clear()
            client = self.link.client
            if client is None:
                continue  # the next connection asks afresh
            self.inspects += 1
            try:
                snapshot = await client.inspect()
            except EvchargeError as exc:
                # An operator that cannot answer is not followed: drop the link, make a new one.
                log.warning("%s: Inspect failed (%s); reconnecting", self.link.name, exc.message)
                client.conn.abort()
                continue
            if client is self.link.client:
                self._take(snapshot)

    def _take(self, snapshot: p.InspectResult) -> None:
        now = time.monotonic()
        if self._rate is not None and now > self._rate[0]:
            self.request_rate = (snapshot.requests_served - self._rate[1]) / (now - self._rate[0])
        self._rate = (now, snapshot.requests_served)
        self.snapshot, self.fetched_at, self._fresh = snapshot, now, True
        self._reservations = {r.id: r for r in snapshot.reservations}
        self._schedule_boundary(snapshot)
        self._bump()

    def _schedule_boundary(self, snapshot: p.InspectResult) -> None:
        """Fetch again when a charge point turns ``reserved`` by the clock alone."""
        self._cancel_timers()
        if self.reserved_soon_min is None:
            return
        soon = timedelta(minutes=self.reserved_soon_min)
        now = snapshot.server_time
        ahead = [
            r.start - soon for r in snapshot.reservations if r.state in ("held", "booked") and r.start - soon > now
        ]
        if ahead:
            delay = (min(ahead) - now).total_seconds() / max(self.time_scale, 1e-9) + BOUNDARY_MARGIN
            self._boundary = asyncio.get_running_loop().call_later(delay, self._dirty.set)

    def _cancel_timers(self) -> None:
        if self._boundary is not None:
            self._boundary.cancel()
            self._boundary = None
        if self._progress_bump is not None:
            self._progress_bump.cancel()
            self._progress_bump = None

    def _bump(self) -> None:
        self.version += 1
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
