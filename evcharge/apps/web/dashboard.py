"""A read-only live web dashboard of one operator: ``evcharge web``.

A separate process, not part of the server: it connects to one operator's
server over the evcharge protocol as the operator's own tool (role
``operator``, with the operator's secret from the world file), keeps the latest
``Inspect`` snapshot, and takes a new one when the server pushes an event
(``ReservationChanged``, ``ChargePointChanged``, ``PeerChanged``). Pushes are
debounced: at most one Inspect is in flight, and a burst of pushes within
``debounce`` seconds costs one more. There is no polling loop; the only timed
refresh is at the next moment a charge point turns ``reserved`` by the clock
alone (its next reservation starts within the world's ``reserved_soon_min``),
which the server does not push. A quiet link is checked with a heartbeat; a
lost one is re-opened with backoff, and the state says ``connected: false``
meanwhile.

Browsers get:

* ``GET /``: one self-contained HTML page (inline CSS and JS, nothing external),
  made from ``static/index.html``, ``static/dashboard.css`` and
  ``static/dashboard.js`` (package data) with the current state filled in;
* ``GET /api/state``: the snapshot as JSON;
* ``GET /api/events``: Server-Sent Events, the whole state as a ``state`` event
  on connect and after every change, and a keep-alive comment every 15 s.

Nothing here can change the operator's state: the dashboard only sends
``Inspect`` and ``Heartbeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import logging
import random
import signal
import sys
import time
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from evcharge.domain.world import World
from evcharge.links.client import Client, open_client
from evcharge.wire import protocol as p
from evcharge.wire.connection import DEFAULT_REQUEST_TIMEOUT
from evcharge.wire.errors import EvchargeError

log = logging.getLogger(__name__)

DEBOUNCE = 0.1  # real seconds: pushes this close together cost one Inspect
HEARTBEAT_EVERY = 30.0  # real seconds of quiet before the link is checked (servers drop links idle for 600 s)
BACKOFF_MIN = 0.2
BACKOFF_MAX = 10.0
CLOSE_TIMEOUT = 5.0
KEEPALIVE = 15.0  # real seconds between SSE keep-alive comments
SUBSCRIBER_QUEUE = 8  # states waiting for one browser; past this the oldest is dropped
SSE_WRITE_TIMEOUT = 10.0  # a browser that takes longer than this to take a write is dropped
SHUTDOWN_TIMEOUT = 5.0
BOUNDARY_MARGIN = 0.05  # real seconds after a clock boundary before refreshing
LISTEN_TIMEOUT = 10.0

_json = msgspec.json.Encoder()


class Dashboard:
    """The latest state of one operator, kept fresh by the server's pushes."""

    def __init__(
        self,
        world: World,
        operator_id: str,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        debounce: float = DEBOUNCE,
        heartbeat_every: float = HEARTBEAT_EVERY,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.world = world
        self.operator = world.operator(operator_id)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.debounce = debounce
        self.heartbeat_every = heartbeat_every
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.snapshot: p.InspectResult | None = None
        self.connected = False
        self.last_error = ""
        self.version = 0  # bumped on every change published to browsers
        self.inspects = 0  # Inspect requests sent: one per (debounced) push, not per tick
        self.time_scale = 1.0
        self._received_at = 0.0  # monotonic time the snapshot arrived
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._boundary_timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self._link_snapshots = 0  # snapshots received over the current link
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._streams_closed = False

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (and stay connected) until ``close()``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain(), name="dashboard-link")

    async def close(self) -> None:
        """End every SSE stream, stop reconnecting, close the link to the server."""
        self.close_streams()
        self._cancel_timers()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1.0):
                    await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def close_streams(self) -> None:
        """Tell every SSE stream to end (at shutdown); new subscribers end at once."""
        self._streams_closed = True
        for queue in self._subscribers:
            _offer(queue, None)

    # --- the link to the operator's server ------------------------------------------

    async def _maintain(self) -> None:
        delay = self.backoff_min
        while True:
            op = self.operator
            try:
                client = await open_client(
                    self.host, self.port, role="operator", ident=op.id, secret=op.secret, timeout=self.timeout
                )
            except EvchargeError as exc:
                self._link_down(f"{exc.code}: {exc.message}")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff_max)
                continue
            self._link_snapshots = 0
            reason = await self._use(client)
            self._link_down(reason)
            if self._link_snapshots:
                delay = self.backoff_min  # the link worked: try again soon
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max)

    async def _use(self, client: Client) -> str:
        """Serve one connection until it is lost; returns why."""
        log.info("connected to operator %s at %s:%d", self.operator.id, self.host, self.port)
        self._client = client
        self.time_scale = client.time_scale or 1.0
        client.on_event.append(self._on_event)
        reason = "the server closed the connection"
        try:
            self._refresh_now()
            while not client.closed.is_set():
                try:
                    async with asyncio.timeout(self.heartbeat_every):
                        await client.closed.wait()
                except TimeoutError:
                    await client.heartbeat()  # a dead link fails here, within the client's timeout
        except EvchargeError as exc:
            reason = f"{exc.code}: {exc.message}"
        finally:
            self._client = None
            self._cancel_timers()
            refresh, self._refresh_task = self._refresh_task, None
            if refresh is not None:
                refresh.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(*([refresh] if refresh else []), return_exceptions=True)
                    await client.close()
        return reason

    def _link_down(self, reason: str) -> None:
        changed = self.connected or reason != self.last_error
        if self.connected:
            log.warning("lost operator %s at %s:%d: %s", self.operator.id, self.host, self.port, reason)
        elif changed:
            log.info("operator %s at %s:%d unreachable (retrying): %s", self.operator.id, self.host, self.port, reason)
        self.connected = False
        self.last_error = reason
        if changed:
            self._publish()

    # --- refreshing: pushes in, one Inspect at a time out ---------------------------------

    def _on_event(self, event: p.Event) -> None:
        self._dirty = True
        self._schedule(self.debounce)

    def _schedule(self, delay: float) -> None:
        if self._client is None or self._refresh_task is not None or self._refresh_timer is not None:
            return  # the Inspect in flight, or the one already scheduled, covers it
        self._refresh_timer = asyncio.get_running_loop().call_later(delay, self._start_refresh)

    def _refresh_now(self) -> None:
        self._dirty = True
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        self._start_refresh()

    def _start_refresh(self) -> None:
        self._refresh_timer = None
        client = self._client
        if client is None or self._refresh_task is not None:
            return
        self._dirty = False
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh(client))
        self._refresh_task.add_done_callback(self._refresh_done)

    async def _refresh(self, client: Client) -> None:
        self.inspects += 1
        result = await client.inspect()  # within the client's timeout
        if client is self._client:
            self._apply(result)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refresh_task is task:
            self._refresh_task = None
        if task.cancelled():
            return
        exc = task.exception()
        client = self._client
        if exc is not None:
            if not isinstance(exc, EvchargeError):
                log.error("refreshing the dashboard failed", exc_info=exc)
            if client is not None:
                # The link is not healthy: drop it and let the reconnect loop take over.
                log.warning("inspect failed (%s); reconnecting", exc)
                client.conn.abort()
            return
        if self._dirty:
            self._schedule(self.debounce)

    def _apply(self, result: p.InspectResult) -> None:
        self.snapshot = result
        self._received_at = time.monotonic()
        self._link_snapshots += 1
        self.connected = True
        self.last_error = ""
        self._schedule_boundary(result)
        self._publish()

    def _schedule_boundary(self, result: p.InspectResult) -> None:
        """Refresh when a charge point turns ``reserved`` by the clock alone (nobody pushes that)."""
        if self._boundary_timer is not None:
            self._boundary_timer.cancel()
            self._boundary_timer = None
        soon = timedelta(minutes=self.world.rules.reserved_soon_min)
        now = result.server_time
        ahead = [r.start - soon for r in result.reservations if r.state in ("held", "booked") and r.start - soon > now]
        if not ahead:
            return
        delay = (min(ahead) - now).total_seconds() / max(self.time_scale, 1e-9) + BOUNDARY_MARGIN
        self._boundary_timer = asyncio.get_running_loop().call_later(delay, self._on_boundary)

    def _on_boundary(self) -> None:
        self._boundary_timer = None
        self._dirty = True
        self._schedule(0.0)

    def _cancel_timers(self) -> None:
        for timer in (self._refresh_timer, self._boundary_timer):
            if timer is not None:
                timer.cancel()
        self._refresh_timer = self._boundary_timer = None

    # --- the state browsers see --------------------------------------------------------

    def server_now(self) -> datetime | None:
        """The server's simulated time: estimated while connected, the last known one otherwise."""
        if self.snapshot is None:
            return None
        if not self.connected:
            return self.snapshot.server_time
        elapsed = (time.monotonic() - self._received_at) * self.time_scale
        return self.snapshot.server_time + timedelta(seconds=elapsed)

    def state(self) -> dict[str, Any]:
        """The state as plain data, every field present (the wire omits defaults; browsers want them)."""
        snap = self.snapshot
        return {
            "connected": self.connected,
            "operator_id": self.operator.id,
            "operator_name": self.operator.name,
            "server": f"{self.host}:{self.port}",
            "server_time": self.server_now(),
            "snapshot_time": snap.server_time if snap else None,
            "time_scale": self.time_scale,
            "error": self.last_error,
            "version": self.version,
            "operators": {op.id: op.name for op in self.world.operators},
            "stations": _complete(snap.stations) if snap else [],
            "reservations": _complete(snap.reservations) if snap else [],
            "trips": _complete(snap.trips) if snap else [],
            "peers": _complete(snap.peers) if snap else [],
            "connections": snap.connections if snap else {},
            "requests_served": snap.requests_served if snap else 0,
        }

    def state_json(self) -> bytes:
        return _json.encode(self.state())

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE) -> asyncio.Queue[bytes | None]:
        """A queue that gets the state now and after every change; ``None`` means the stream ends."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize)
        queue.put_nowait(None if self._streams_closed else self.state_json())
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _publish(self) -> None:
        self.version += 1
        if not self._subscribers:
            return
        data = self.state_json()
        for queue in self._subscribers:
            _offer(queue, data)


def _complete(value: Any) -> Any:
    """Structs as dicts with every field, defaults included (``omit_defaults`` is for the wire)."""
    if isinstance(value, msgspec.Struct):
        return {f.encode_name: _complete(getattr(value, f.name)) for f in msgspec.structs.fields(value)}
    if isinstance(value, list):
        return [_complete(v) for v in value]
    return value


def _offer(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """Put without waiting: a browser that fell behind loses its oldest state, never the newest."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()


# --- HTTP ---------------------------------------------------------------------------------

DASHBOARD = web.AppKey("dashboard", Dashboard)
KEEPALIVE_EVERY = web.AppKey("keepalive", float)

NO_STORE = {"Cache-Control": "no-store"}
# Nothing may be loaded from elsewhere: the page is one file, and the machine may be offline.
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:",
    "X-Content-Type-Options": "nosniff",
}


def _page_template() -> str:
    """``static/index.html`` with ``dashboard.css`` and ``dashboard.js`` put inline: one file, as served."""
    static = resources.files("evcharge.apps.web").joinpath("static")

    def read(name: str) -> str:
        return static.joinpath(name).read_text(encoding="utf-8")

    page = read("index.html")
    for placeholder, name in (("__CSS__", "dashboard.css"), ("__JS__", "dashboard.js")):
        page = page.replace(placeholder, read(name).rstrip("\n"), 1)
    return page


# Read once, at import: a missing file fails `evcharge web` at start, not a browser later.
PAGE = _page_template()


def make_app(dashboard: Dashboard, *, keepalive: float = KEEPALIVE) -> web.Application:
    app = web.Application()
    app[DASHBOARD] = dashboard
    app[KEEPALIVE_EVERY] = keepalive
    app.router.add_get("/", _page)
    app.router.add_get("/api/state", _api_state)
    app.router.add_get("/api/events", _api_events)
    app.on_shutdown.append(_close_streams)
    return app


async def serve(dashboard: Dashboard, host: str, port: int, *, keepalive: float = KEEPALIVE) -> web.AppRunner:
    """Serve the dashboard on host:port (0: any free port; see ``runner.addresses``)."""
    runner = web.AppRunner(
        make_app(dashboard, keepalive=keepalive),
        access_log=None,
        handler_cancellation=True,  # a browser that goes away ends its SSE handler at once
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    try:
        async with asyncio.timeout(LISTEN_TIMEOUT):
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _close_streams(app: web.Application) -> None:
    app[DASHBOARD].close_streams()


async def _page(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    op = dashboard.operator
    # JSON inside <script>: "<" only occurs in strings, where \u003c means the same.
    state = dashboard.state_json().replace(b"<", b"\\u003c").decode()
    title = html.escape(f"{op.name} ({op.id}) · evcharge")
    text = PAGE.replace("__TITLE__", title, 1).replace("__STATE__", state, 1)
    return web.Response(text=text, content_type="text/html", headers=PAGE_HEADERS)


async def _api_state(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DASHBOARD].state_json(), content_type="application/json", headers=NO_STORE)


async def _api_events(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    keepalive = request.app[KEEPALIVE_EVERY]
    response = web.StreamResponse(headers={**NO_STORE, "X-Accel-Buffering": "no"})
    response.content_type = "text/event-stream"
    queue = dashboard.subscribe()
    try:
        async with asyncio.timeout(SSE_WRITE_TIMEOUT):
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
        while True:
            try:
                async with asyncio.timeout(keepalive):
                    data = await queue.get()
            except TimeoutError:
                chunk = b": keep-alive\n\n"
            else:
                if data is None:
                    break  # shutting down
                chunk = b"event: state\ndata: " + data + b"\n\n"
            async with asyncio.timeout(SSE_WRITE_TIMEOUT):
                await response.write(chunk)
    except (ConnectionError, TimeoutError):
        pass  # the browser went away, or stopped reading
    finally:
        dashboard.unsubscribe(queue)
    return response


# --- the command ---------------------------------------------------------------------------


async def run_web(world: World, args: argparse.Namespace) -> int:
    op = world.operator(args.operator)
    host, port = args.server or (op.host, op.port)
    dashboard = Dashboard(world, op.id, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            runner = await serve(dashboard, args.host, args.port)
        except OSError as exc:
            print(f"evcharge web: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        dashboard.start()
        for address in runner.addresses:
            log.info(
                "dashboard of operator %s (server %s:%d) on http://%s/",
                op.id,
                host,
                port,
                _url_host(address),
            )
        try:
            await stop.wait()  # until SIGTERM/SIGINT
        finally:
            log.info("dashboard shutting down")
            dashboard.close_streams()
            await runner.cleanup()
            await dashboard.close()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def _url_host(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
