"""The live monitor: an operator's stations, reservations, trips and peers (rich Live).

It redraws when the server pushes a change (through ``OperatorFeed``), and
once a second so "free in N min" keeps counting down. Times of bookings are
the server's simulated time, said so in the header; "last seen" of a peer link
is real time, as "N s ago". ``q`` (or Ctrl-C) quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evcharge.apps import render
from evcharge.domain.model import LIVE_STATES
from evcharge.links.feed import OperatorFeed
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError

RESERVATION_ROWS = 12


def monitor_view(
    snapshot: p.InspectResult | None, now: datetime | None, *, connected: bool, rate: float = 0.0, error: str = ""
) -> RenderableType:
    if snapshot is None or now is None:
        return Text(f"waiting for the server... {error}".rstrip())
    head = Text.assemble(
        (f"Operator {snapshot.operator_id}", "bold"),
        f"  simulated time {now:%Y-%m-%d %H:%M}Z  ",
        ("connected" if connected else "DISCONNECTED (reconnecting)", "green" if connected else "bold red"),
        f"  {rate:.1f} req/s  ",
        ", ".join(f"{n} {role}" for role, n in sorted(snapshot.connections.items())),
        ("   q quits", "bright_black"),
    )
    parts: list[RenderableType] = [head, _stations(snapshot, now), _reservations(snapshot, now)]
    if snapshot.trips:
        parts.append(_trips(snapshot, now))
    if snapshot.peers:
        parts.append(_peers(snapshot))
    return Group(*parts)


def _stations(snapshot: p.InspectResult, now: datetime) -> Table:
    table = Table(title="Stations", title_justify="left")
    for column in ("city", "station", "charge points"):
        table.add_column(column)
    for station in sorted(snapshot.stations, key=lambda s: (s.city, s.name)):
        cells = Text()
        for cp in station.charge_points:
            style = render.STATUS_STYLE.get(cp.status, "white")
            cells.append(f"{cp.id} {cp.power_kw:g}kW ", style="bold")
            cells.append(cp.status, style=style)
            cells.append(f" ({render.free_in(cp, now)})  ")
        table.add_row(station.city, station.name, cells)
    return table


def _reservations(snapshot: p.InspectResult, now: datetime) -> Table:
    live = [r for r in snapshot.reservations if r.state in LIVE_STATES and r.end > now]
    live.sort(key=lambda r: r.start)
    table = render.reservations_table(
        live[:RESERVATION_ROWS], now, title=f"Current and next reservations ({len(live)} live)"
    )
    return table


def _trips(snapshot: p.InspectResult, now: datetime) -> Table:
    table = Table(title="Trips coordinated here", title_justify="left")
    for column in ("trip", "vehicle", "state", "stops"):
        table.add_column(column)
    for trip in snapshot.trips[-RESERVATION_ROWS:]:
        stops = " → ".join(f"{s.city} ({s.operator_id}) {s.slot_start:%H:%M}" for s in trip.stops) or "direct"
        state = render.trip_state(trip, now)
        style = "green" if state == "committed" else "blue" if state == "completed" else "bright_black"
        table.add_row(trip.id, trip.vehicle_id, Text(state, style=style), stops)
    return table


def _peers(snapshot: p.InspectResult) -> Table:
    table = Table(title="Peer links", title_justify="left")
    for column in ("operator", "address", "link", "last seen", "last error"):
        table.add_column(column)
    real_now = datetime.now(UTC)  # a link's last answer is wall-clock time, not the simulated one
    for peer in snapshot.peers:
        table.add_row(
            peer.operator_id,
            peer.address,
            Text("up", style="green") if peer.up else Text("down", style="red"),
            _ago(peer.last_seen, real_now) if peer.last_seen else "-",
            peer.last_error,
        )
    return table


def _ago(moment: datetime, now: datetime) -> str:
    seconds = max(0, round((now - moment).total_seconds()))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


@contextlib.contextmanager
def _keys(stop: asyncio.Event) -> Iterator[None]:
    """While inside: ``q`` typed at the terminal sets ``stop`` (keys are read one by one, not echoed)."""
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def typed() -> None:
        with contextlib.suppress(OSError):
            if os.read(fd, 64).lower().startswith(b"q"):
                stop.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, typed)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _until_change_or(stop: asyncio.Event, feed: OperatorFeed, seen: int) -> int:
    """The feed's version once it moves (or after a second, for the clock), or at once when asked to stop."""
    change = asyncio.ensure_future(feed.wait_change(seen, timeout=1.0))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({change, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        change.cancel()
        await asyncio.gather(change, stopping, return_exceptions=True)
    return feed.version


async def run_monitor(feed: OperatorFeed) -> int:
    follower = asyncio.ensure_future(feed.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def view() -> RenderableType:
        return monitor_view(
            feed.snapshot, feed.now(), connected=feed.connected, rate=feed.request_rate, error=feed.last_error
        )

    try:
        with _keys(stop), Live(view(), auto_refresh=False, screen=False) as live:
            seen = -1
            while not stop.is_set() and not follower.done():
                seen = await _until_change_or(stop, feed, seen)
                live.update(view(), refresh=True)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    if not follower.cancelled() and isinstance(follower.exception(), EvchargeError):
        refusal = follower.exception()
        assert isinstance(refusal, EvchargeError)
        print(f"evcharge monitor: {refusal.code}: {refusal.message}", file=sys.stderr)
        return 1
    return 0
