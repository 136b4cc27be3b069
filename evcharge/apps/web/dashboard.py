"""A read-only live web dashboard of one operator: ``evcharge web``.

A separate process, not part of the server: it connects to one operator's
server over the evcharge protocol as the operator's own tool (role
``operator``, with the operator's secret from the world file), keeps the latest
``Inspect`` snapshot, and takes a new one when the server pushes an event
(``ReservationChanged``, ``ChargePointChanged``, ``PeerChanged``): all of that is
``OperatorFeed`` (evcharge.links.feed), the monitor's too, with TLS when the
server's listener speaks it. A lost link is re-opened with backoff, and the
state says ``connected: false`` meanwhile.

Browsers get:

* ``GET /``: one self-contained HTML page (inline CSS and JS, nothing external),
  made from ``static/index.html``, ``static/dashboard.css`` and
  ``static/dashboard.js`` (package data) with the current state filled in, and
  what the map is drawn from (``geography.map_data``: stations, cities, coast);
  the page draws a map of the stations by live status with a trip's route, and
  a timeline of the day per charge point, as SVG;
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
import signal
import ssl
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from evcharge.apps.tls_options import client_tls
from evcharge.apps.web.geography import map_data
from evcharge.apps.web.guard import allowed_names, guard, is_loopback
from evcharge.domain.world import World
from evcharge.links.feed import OperatorFeed
from evcharge.links.link import Backoff
from evcharge.wire.connection import DEFAULT_REQUEST_TIMEOUT
from evcharge.wire.errors import EvchargeError

log = logging.getLogger(__name__)

DEBOUNCE = 0.1  # real seconds: pushes this close together cost one Inspect
BACKOFF_MAX = 10.0
CLOSE_TIMEOUT = 5.0
KEEPALIVE = 15.0  # real seconds between SSE keep-alive comments
SUBSCRIBER_QUEUE = 8  # states waiting for one browser; past this the oldest is dropped
SSE_WRITE_TIMEOUT = 10.0  # a browser that takes longer than this to take a write is dropped
SHUTDOWN_TIMEOUT = 5.0
LISTEN_TIMEOUT = 10.0

_json = msgspec.json.Encoder()


class Dashboard:
    """What browsers see of one operator: its feed, published to every SSE subscriber."""

    def __init__(
        self,
        world: World,
        operator_id: str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        debounce: float = DEBOUNCE,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.world = world
        self.operator = world.operator(operator_id)
        self.feed = OperatorFeed(
            self.operator,
            host,
            port,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            settle=debounce,
            reserved_soon_min=world.rules.reserved_soon_min,
            backoff=Backoff(cap=backoff_max),
        )
        # What the map is drawn from: the world's, so it never changes while we run.
        self.map_json = _json.encode(map_data(world)).replace(b"<", b"\\u003c").decode()
        self.version = 0  # bumped on every change published to browsers
        self.refusal = ""  # why the server refused us for good, if it did
        self._task: asyncio.Task[None] | None = None
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._streams_closed = False

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Follow the operator in the background (and stay connected) until ``close()``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="dashboard-feed")

    async def close(self) -> None:
        """End every SSE stream, stop following, close the link to the server."""
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def close_streams(self) -> None:
        """Tell every SSE stream to end (at shutdown); new subscribers end at once."""
        self._streams_closed = True
        for queue in self._subscribers:
            _offer(queue, None)

    async def _follow(self) -> None:
        """Publish every change of the feed until cancelled, or until the server refuses us."""
        feed = asyncio.ensure_future(self.feed.run())
        try:
            seen = self.feed.version
            while True:
                change = asyncio.ensure_future(self.feed.wait_change(seen, timeout=3600.0))
                await asyncio.wait({feed, change}, return_when=asyncio.FIRST_COMPLETED)
                if feed.done():
                    change.cancel()
                    break
                seen = change.result()
                self._publish()
        finally:
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
        error = feed.exception()
        if isinstance(error, EvchargeError):
            log.error("operator %s refused the dashboard: %s", self.operator.id, error.message)
            self.refusal = f"{error.code}: {error.message}"
            self._publish()
        elif error is not None:
            raise error

    # --- the state browsers see --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.feed.connected

    def state(self) -> dict[str, Any]:
        """The state as plain data, every field present (the wire omits defaults; browsers want them)."""
        snap = self.feed.snapshot
        return {
            "connected": self.connected,
            "operator_id": self.operator.id,
            "operator_name": self.operator.name,
            "server": self.feed.address,
            "server_time": self.feed.now(),
            "snapshot_time": snap.server_time if snap else None,
            "time_scale": self.feed.time_scale,
            "error": self.refusal or self.feed.last_error,
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

Middleware = Any  # an aiohttp middleware (aiohttp's own alias is not public)
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


def make_app(
    dashboard: Dashboard, *, keepalive: float = KEEPALIVE, middlewares: Sequence[Middleware] = ()
) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app[DASHBOARD] = dashboard
    app[KEEPALIVE_EVERY] = keepalive
    app.router.add_get("/", _page)
    app.router.add_get("/api/state", _api_state)
    app.router.add_get("/api/events", _api_events)
    app.on_shutdown.append(_close_streams)
    return app


async def serve(
    dashboard: Dashboard,
    host: str,
    port: int,
    *,
    keepalive: float = KEEPALIVE,
    allow_hosts: Sequence[str] = (),
    password: str | None = None,
) -> web.AppRunner:
    """Serve the dashboard on host:port (0: any free port; see ``runner.addresses``).

    Only to requests for its own names (``allow_hosts`` and those of ``host``), and with
    ``password`` only to those who log in with it (see ``guard``).
    """
    realm = f"evcharge operator {dashboard.operator.id}"
    checks = [guard(allowed_names(host, allow_hosts), password, realm)]
    runner = web.AppRunner(
        make_app(dashboard, keepalive=keepalive, middlewares=checks),
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
    text = PAGE.replace("__TITLE__", title, 1).replace("__MAP__", dashboard.map_json, 1).replace("__STATE__", state, 1)
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
    context, name = client_tls(args, op)
    password: str | None = None
    if args.login or not is_loopback(args.host):
        try:
            password = args.token_file.read_text().strip() if args.token_file else op.secret
        except OSError as exc:
            print(f"evcharge web: cannot read --token-file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if not password:
            print(f"evcharge web: --token-file {args.token_file} is empty", file=sys.stderr)
            return 2
    dashboard = Dashboard(world, op.id, host, port, ssl_context=context, server_hostname=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            runner = await serve(dashboard, args.host, args.port, allow_hosts=args.allow_host, password=password)
        except OSError as exc:
            # Like any setup that cannot work as typed: exit 2 (see `evcharge --help`).
            print(f"evcharge web: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            return 2
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
