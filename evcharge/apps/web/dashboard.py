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

* ``GET /``: one self-contained HTML page (inline CSS and JS, nothing external);
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


# --- the page ---------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root {
  --bg: #f4f5f7; --card: #fff; --ink: #1c2230; --muted: #687083; --line: #e2e5eb;
  --available: #1a8f4c; --reserved: #c27c00; --charging: #1765c1; --faulted: #cf2f2a; --offline: #8b919c;
  --unavailable: #8e44ad;
  --held: #c27c00; --booked: #1a8f4c; --completed: #3d5a99; --cancelled: #8b919c; --expired: #cf2f2a;
  --aborted: #8b919c; --committed: #1a8f4c; --planned: #c27c00;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif; }
header { position: sticky; top: 0; z-index: 2; display: flex; align-items: center; gap: 14px; flex-wrap: wrap;
  padding: 10px 20px; background: #1c2230; color: #fff; }
header h1 { margin: 0; font-size: 18px; font-weight: 650; }
header .sub { color: #aab3c2; font-size: 13px; }
header .clock { margin-left: auto; text-align: right; font-variant-numeric: tabular-nums; }
header .clock b { font-size: 17px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-size: 12px; font-weight: 700;
  letter-spacing: .03em; color: #fff; }
.badge.up { background: var(--available); }
.badge.down { background: var(--faulted); }
.badge.wait { background: var(--reserved); }
.banner { padding: 8px 20px; background: #fdebea; color: #86201b; border-bottom: 1px solid #f2c4c1; }
.banner.info { background: #fff5de; color: #6d4a00; border-color: #f0dca8; }
main { display: grid; grid-template-columns: minmax(0, 7fr) minmax(0, 5fr); gap: 18px; padding: 14px 20px 30px; }
body.stale main { opacity: .6; filter: grayscale(.4); }
h2 { margin: 6px 0 8px; font-size: 12px; text-transform: uppercase; letter-spacing: .08em; color: var(--muted); }
h2 .n { color: var(--ink); margin-left: 4px; }
.summary { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 0 0 10px; }
.city { margin-bottom: 10px; }
.city > h3 { margin: 0 0 4px; font-size: 15px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px;
  margin-bottom: 8px; overflow-x: auto; }
.card .head { display: flex; align-items: baseline; gap: 8px; flex-wrap: wrap; }
.card .head .name { font-weight: 650; }
.muted, .id { color: var(--muted); }
.id { font-size: 12px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table { width: 100%; border-collapse: collapse; margin-top: 4px; }
th, td { padding: 3px 6px; text-align: left; vertical-align: top; font-variant-numeric: tabular-nums; }
td { border-top: 1px solid var(--line); }
th { font-size: 12px; font-weight: 500; color: var(--muted); }
td.num, th.num { text-align: right; }
td.id, td.slot { white-space: nowrap; }
.st { display: inline-flex; align-items: center; gap: 6px; font-weight: 650; color: var(--c, var(--muted)); }
.st::before { content: ""; width: 9px; height: 9px; border-radius: 50%; background: currentColor; }
.op { display: inline-block; min-width: 20px; padding: 0 5px; border-radius: 4px; text-align: center;
  font-size: 12px; font-weight: 700; color: #fff; }
.op.mine { box-shadow: 0 0 0 2px #1c2230 inset, 0 0 0 1px #fff inset; }
ol.stops { margin: 6px 0 2px; padding-left: 22px; }
ol.stops li { margin: 3px 0; }
.empty { color: var(--muted); font-style: italic; padding: 4px 0 8px; }
.free-now { color: var(--available); font-weight: 600; }
@media (max-width: 960px) { main { grid-template-columns: minmax(0, 1fr); } }
</style>
</head>
<body>
<header>
  <h1 id="title">evcharge</h1>
  <span id="link" class="badge wait">connecting</span>
  <span id="sub" class="sub"></span>
  <span class="clock" id="clock"></span>
</header>
<div id="banner"></div>
<noscript><div class="banner">This dashboard needs JavaScript; <a href="/api/state">/api/state</a>
has the same state as JSON.</div></noscript>
<main>
  <section id="stations"></section>
  <div>
    <section id="current"></section>
    <section id="upcoming"></section>
    <section id="trips"></section>
    <section id="peers"></section>
    <section id="ended"></section>
  </div>
</main>
<script type="application/json" id="initial-state">__STATE__</script>
<script>
"use strict";
(() => {
  let state = JSON.parse(document.getElementById("initial-state").textContent);
  let receivedAt = performance.now();
  let streamUp = true;  // our own link to this dashboard (EventSource)
  const LIVE = new Set(["held", "booked", "charging"]);
  const OP_COLOURS = ["#1765c1", "#b4491c", "#0f8a78", "#7a3db8", "#b0126a", "#5c6b0f"];
  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  const ms = (iso) => Date.parse(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const day = (t) => new Date(t).toISOString().slice(0, 10);

  function now() {  // the server's simulated time, in ms
    if (!state.server_time) return null;
    const t = ms(state.server_time);
    return state.connected ? t + (performance.now() - receivedAt) * (state.time_scale || 1) : t;
  }
  function hm(t) { const d = new Date(t); return pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()); }
  function at(iso, ref) {  // "14:30", or "11-24 14:30" on another day than ref
    const t = ms(iso);
    return (ref !== null && day(t) === day(ref) ? "" : new Date(t).toISOString().slice(5, 10) + " ") + hm(t);
  }
  function span(minutes) {
    if (minutes < 90) return minutes + " min";
    const h = Math.floor(minutes / 60), m = minutes % 60;
    return h + " h" + (m ? " " + pad(m) + " min" : "");
  }
  function rel(iso, ref) {
    const m = Math.round((ms(iso) - ref) / 60000);
    return m > 0 ? "in " + span(m) : m < 0 ? span(-m) + " ago" : "now";
  }
  function pill(text, colour) { return `<span class="st" style="--c: var(--${colour})">${esc(text)}</span>`; }
  function statusPill(s) { return pill(s, String(s).replace(/[^a-z]/g, "")); }
  function opBadge(id) {
    const ids = Object.keys(state.operators || {});
    const colour = OP_COLOURS[Math.max(0, ids.indexOf(id)) % OP_COLOURS.length];
    const name = (state.operators || {})[id] || id;
    const mine = id === state.operator_id ? " mine" : "";
    return `<span class="op${mine}" style="background:${colour}" title="${esc(name)}">${esc(id)}</span>`;
  }
  function freeText(cp, ref) {
    if (["offline", "faulted", "unavailable"].includes(cp.status)) return '<span class="muted">&mdash;</span>';
    const m = cp.free_at && ref !== null ? Math.round((ms(cp.free_at) - ref) / 60000) : 0;
    return m <= 0 ? '<span class="free-now">free now</span>' : "free in " + span(m);
  }
  function nextSlots(cp, ref) {
    const ahead = (cp.busy || []).filter((i) => ref === null || ms(i.end) > ref).slice(0, 2);
    return ahead.map((i) => at(i.start, ref) + "&ndash;" + hm(ms(i.end))).join(", ");
  }
  const where = {};  // charge point id -> station
  function indexStations() {
    for (const s of state.stations) for (const cp of s.charge_points || []) where[cp.id] = s;
  }

  function renderHeader(ref) {
    $("title").textContent = `${state.operator_name} (${state.operator_id})`;
    const link = $("link");
    if (!streamUp) { link.className = "badge down"; link.textContent = "dashboard offline"; }
    else if (state.connected) { link.className = "badge up"; link.textContent = "live"; }
    else if (state.snapshot_time) { link.className = "badge down"; link.textContent = "disconnected"; }
    else { link.className = "badge wait"; link.textContent = "connecting"; }
    const c = state.connections || {};
    const online = Object.entries(c).map(([role, n]) => `${n} ${role}${n === 1 ? "" : "s"}`).join(", ");
    $("sub").textContent = `server ${state.server}` + (online ? ` \\u00b7 clients: ${online}` : "");
    $("clock").innerHTML = ref === null ? "" :
      `<b>${hm(ref)}</b> UTC <span class="sub">${day(ref)} \\u00b7 simulated, \\u00d7${state.time_scale}</span>`;
    document.body.classList.toggle("stale", !state.connected || !streamUp);
    let banner = "";
    if (!streamUp) {
      banner = `<div class="banner">Lost the link to this dashboard; retrying. What you see may be out of date.</div>`;
    } else if (!state.connected && state.snapshot_time) {
      banner = `<div class="banner">Not connected to operator ${esc(state.operator_id)}'s server at
        ${esc(state.server)} (${esc(state.error)}). Showing the last state, from ${esc(at(state.snapshot_time,
        null))} UTC; reconnecting by itself.</div>`;
    } else if (!state.connected) {
      banner = `<div class="banner info">Connecting to operator ${esc(state.operator_id)}'s server at
        ${esc(state.server)}\\u2026 ${state.error ? "(" + esc(state.error) + ")" : ""}</div>`;
    }
    $("banner").innerHTML = banner;
  }

  function renderStations(ref) {
    const counts = {};
    const cities = new Map();
    for (const s of state.stations) {
      if (!cities.has(s.city)) cities.set(s.city, []);
      cities.get(s.city).push(s);
      for (const cp of s.charge_points || []) counts[cp.status] = (counts[cp.status] || 0) + 1;
    }
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    let out = `<h2>Stations<span class="n">${state.stations.length}</span> \\u00b7 charge points<span
      class="n">${total}</span></h2>`;
    out += `<div class="summary">` + ["available", "reserved", "charging", "faulted", "unavailable", "offline"]
      .map((s) => `<span>${statusPill(s)} ${counts[s] || 0}</span>`).join("") + `</div>`;
    if (!state.stations.length) out += `<div class="empty">No state yet.</div>`;
    for (const city of [...cities.keys()].sort((a, b) => a.localeCompare(b))) {
      out += `<div class="city"><h3>${esc(city)}</h3>`;
      for (const s of cities.get(city).sort((a, b) => a.name.localeCompare(b.name))) {
        out += `<div class="card"><div class="head"><span class="name">${esc(s.name)}</span>
          <span class="id">${esc(s.id)}</span></div><table><thead><tr><th>charge point</th><th class="num">kW</th>
          <th>connector</th><th class="num">R$/kWh</th><th>status</th><th>free</th><th>next slots</th></tr>
          </thead><tbody>`;
        for (const cp of s.charge_points || []) {
          out += `<tr><td class="id">${esc(cp.id)}</td><td class="num">${esc(cp.power_kw)}</td>
            <td>${esc(cp.connector)}</td><td class="num">${Number(cp.price_per_kwh).toFixed(2)}</td>
            <td>${statusPill(cp.status)}</td><td>${freeText(cp, ref)}</td>
            <td class="muted">${nextSlots(cp, ref)}</td></tr>`;
        }
        out += `</tbody></table></div>`;
      }
      out += `</div>`;
    }
    $("stations").innerHTML = out;
  }

  function reservationTable(rows, ref, withRel) {
    if (!rows.length) return `<div class="empty">None.</div>`;
    let out = `<div class="card"><table><thead><tr><th>reservation</th><th>vehicle</th><th>charge point</th>
      <th>slot (UTC)</th><th>state</th></tr></thead><tbody>`;
    for (const r of rows) {
      const station = where[r.charge_point_id];
      const trip = r.trip_id ? `<div class="id">trip ${esc(r.trip_id)}</div>` : "";
      const when = withRel ? `<div class="muted">${rel(r.start, ref)}</div>` : "";
      const energy = r.kwh ? `<div class="muted">${Number(r.kwh).toFixed(1)} kWh, R$ ${
        Number(r.cost).toFixed(2)}</div>` : "";
      out += `<tr><td class="id">${esc(r.id)}${trip}</td><td>${esc(r.vehicle_id)}</td>
        <td>${esc(r.charge_point_id)}<div class="muted">${esc(station ? station.name : "")}</div></td>
        <td class="slot">${at(r.start, ref)}&ndash;${hm(ms(r.end))}${when}</td>
        <td>${statusPill(r.state)}${energy}</td></tr>`;
    }
    return out + `</tbody></table></div>`;
  }

  function renderReservations(ref) {
    const t = ref === null ? 0 : ref;
    const live = state.reservations.filter((r) => LIVE.has(r.state));
    const current = live.filter((r) => r.state === "charging" || (ms(r.start) <= t && t < ms(r.end)));
    const upcoming = live.filter((r) => !current.includes(r) && ms(r.start) > t)
      .sort((a, b) => ms(a.start) - ms(b.start));
    const ended = state.reservations.filter((r) => !LIVE.has(r.state))
      .sort((a, b) => ms(b.end) - ms(a.end)).slice(0, 8);
    $("current").innerHTML = `<h2>Now<span class="n">${current.length}</span></h2>` +
      reservationTable(current, ref, false);
    $("upcoming").innerHTML = `<h2>Upcoming reservations<span class="n">${upcoming.length}</span></h2>` +
      reservationTable(upcoming, ref, true);
    $("ended").innerHTML = `<h2>Recently ended</h2>` + reservationTable(ended, ref, false);
  }

  function renderTrips(ref) {
    const trips = [...state.trips].sort((a, b) => (a.state === "cancelled") - (b.state === "cancelled") ||
      ms(b.depart) - ms(a.depart));
    let out = `<h2>Trips coordinated here<span class="n">${trips.length}</span></h2>`;
    if (!trips.length) out += `<div class="empty">None.</div>`;
    for (const trip of trips) {
      const owners = [...new Set((trip.stops || []).map((s) => s.operator_id))].map(opBadge).join(" ");
      out += `<div class="card"><div class="head"><span class="name">${esc(trip.origin)} &rarr;
        ${esc(trip.destination)}</span>${statusPill(trip.state)}<span>${esc(trip.vehicle_id)}</span>
        <span class="id">${esc(trip.id)}</span><span style="margin-left:auto">${owners}</span></div>
        <div class="muted">departs ${at(trip.depart, ref)}, arrives ${at(trip.arrival, ref)} \\u00b7
        ${Math.round(trip.distance_km)} km \\u00b7 ${Number(trip.total_kwh).toFixed(1)} kWh \\u00b7
        R$ ${Number(trip.total_cost).toFixed(2)} \\u00b7 arrives with ${Math.round(trip.soc_at_arrival)}%</div>
        <ol class="stops">`;
      for (const s of trip.stops || []) {
        out += `<li>${opBadge(s.operator_id)} <b>${esc(s.city)}</b> \\u00b7 ${esc(s.station_name)}
          <span class="id">${esc(s.charge_point_id)}</span> ${esc(s.power_kw)} kW \\u00b7
          ${at(s.slot_start, ref)}&ndash;${hm(ms(s.slot_end))} \\u00b7 ${Math.round(s.soc_in)}&rarr;${
          Math.round(s.soc_out)}% \\u00b7 R$ ${Number(s.cost).toFixed(2)}
          ${s.reservation_id ? `<span class="id">${esc(s.reservation_id)}</span>` : ""}</li>`;
      }
      out += `</ol></div>`;
    }
    $("trips").innerHTML = out;
  }

  function renderPeers(ref) {
    let out = `<h2>Peer links<span class="n">${state.peers.length}</span></h2>`;
    if (!state.peers.length) { $("peers").innerHTML = out + `<div class="empty">Not federated.</div>`; return; }
    out += `<div class="card"><table><thead><tr><th>operator</th><th>address</th><th>link</th>
      <th>last seen</th><th>last error</th></tr></thead><tbody>`;
    for (const peer of state.peers) {
      const name = (state.operators || {})[peer.operator_id] || "";
      out += `<tr><td>${opBadge(peer.operator_id)} ${esc(name)}</td><td class="id">${esc(peer.address)}</td>
        <td>${peer.up ? pill("up", "available") : pill("down", "faulted")}</td>
        <td>${peer.last_seen ? at(peer.last_seen, ref) : ""}</td>
        <td class="muted">${esc(peer.last_error || "")}</td></tr>`;
    }
    $("peers").innerHTML = out + `</tbody></table></div>`;
  }

  function render() {
    const ref = now();
    indexStations();
    renderHeader(ref);
    renderStations(ref);
    renderReservations(ref);
    renderTrips(ref);
    renderPeers(ref);
  }

  render();
  if (window.EventSource) {
    const events = new EventSource("/api/events");
    events.addEventListener("state", (e) => {
      state = JSON.parse(e.data);
      receivedAt = performance.now();
      streamUp = true;
      render();
    });
    events.onopen = () => { streamUp = true; };
    events.onerror = () => { streamUp = false; renderHeader(now()); };
  }
  setInterval(render, 1000);  // the clock and "free in N min" move on between changes
})();
</script>
</body>
</html>
"""
