"""Human output of the command line (rich), beside the stable ``--json`` output."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from evcharge.wire import protocol as p

STATUS_STYLE = {
    "available": "green",
    "reserved": "yellow",
    "charging": "cyan",
    "faulted": "red",
    "unavailable": "magenta",
    "offline": "bright_black",
    "unknown": "bright_black",
}
STATE_STYLE = {
    "held": "yellow",
    "booked": "green",
    "charging": "cyan",
    "completed": "blue",
    "cancelled": "bright_black",
    "expired": "red",
    "aborted": "bright_black",
}


def to_json(value: Any) -> str:
    """Stable machine-readable output: plain JSON objects, RFC 3339 times."""
    return msgspec.json.encode(value).decode()


def when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "now"
    minutes = round((moment - now).total_seconds() / 60)
    stamp = f"{moment:%Y-%m-%d %H:%M}Z"
    if minutes == 0:
        return f"{stamp} (now)"
    return f"{stamp} (in {minutes} min)" if minutes > 0 else f"{stamp} ({-minutes} min ago)"


def free_in(info: p.ChargePointInfo, now: datetime) -> str:
    if info.status in ("offline", "faulted", "unavailable", "unknown"):
        return "-"
    if info.free_at is not None:
        return f"free in {max(0, round((info.free_at - now).total_seconds() / 60))} min"
    if info.status == "reserved":
        # Free now, but not for long: "free now" beside "reserved" read as a contradiction.
        ahead = [i.start for i in info.busy if i.start > now]
        return f"free until {min(ahead):%H:%M}Z" if ahead else "taken soon"
    return "free now"


def status_text(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def as_of(moment: datetime | None) -> str:
    """Said of what another operator told us, while it cannot be reached: how old it is."""
    return "" if moment is None else f" [bright_black](as of {moment:%H:%M}Z)[/]"


def stations_table(stations: list[p.StationInfo], now: datetime, title: str = "Stations") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("station", "city", "operator", "charge point", "kW", "connector", "R$/kWh", "status", "free"):
        table.add_column(column)
    if any(s.distance_km is not None for s in stations):
        table.add_column("km", justify="right")
    for station in stations:
        for i, cp in enumerate(station.charge_points):
            row = [
                station.name if i == 0 else "",
                station.city if i == 0 else "",
                station.operator_id if i == 0 else "",
                cp.id,
                f"{cp.power_kw:g}",
                cp.connector,
                f"{cp.price_per_kwh:.2f}",
                status_text(cp.status) + as_of(station.as_of),
                free_in(cp, now),
            ]
            if station.distance_km is not None:
                row.append(f"{station.distance_km:.1f}" if i == 0 else "")
            table.add_row(*row)
    return table


def station_status(station: p.StationInfo, now: datetime, console: Console) -> None:
    console.print(stations_table([station], now, title=f"{station.name} ({station.id}) at {now:%H:%M}Z"))
    for cp in station.charge_points:
        if cp.busy:
            slots = ", ".join(f"{i.start:%H:%M}-{i.end:%H:%M}" for i in cp.busy)
            console.print(f"  {cp.id} taken: {slots}")


def reservations_table(reservations: list[p.ReservationInfo], now: datetime, title: str = "Reservations") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "operator", "charge point", "vehicle", "start", "end", "state", "trip", "kWh", "R$"):
        table.add_column(column)
    for r in reservations:
        table.add_row(
            r.id,
            r.operator_id,
            r.charge_point_id,
            r.vehicle_id,
            when(r.start, now),
            f"{r.end:%H:%M}Z",
            f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]" + as_of(r.as_of),
            r.trip_id or "",
            f"{r.kwh:.2f}" if r.kwh else "",
            f"{r.cost:.2f}" if r.cost else "",
        )
    return table


def history_table(history: p.History) -> Table:
    table = Table(title="Charging history", title_justify="left", show_footer=True)
    table.add_column("when", footer="total")
    table.add_column("city")
    table.add_column("operator")
    table.add_column("charge point")
    table.add_column("minutes", justify="right")
    table.add_column("kWh", justify="right", footer=f"{history.total_kwh:.2f}")
    table.add_column("R$/kWh", justify="right")
    table.add_column("R$", justify="right", footer=f"{history.total_cost:.2f}")
    for s in history.sessions:
        table.add_row(
            f"{s.started:%Y-%m-%d %H:%M}Z",
            s.city,
            s.operator_id,
            s.charge_point_id,
            f"{(s.ended - s.started).total_seconds() / 60:.0f}",
            f"{s.kwh:.2f}",
            f"{s.price_per_kwh:.2f}",
            f"{s.cost:.2f}",
        )
    return table


def costs_table(history: p.History) -> Table:
    """What the vehicle paid, by operator and month (one bill, whoever owned the chargers)."""
    totals: dict[tuple[str, str], list[float]] = {}
    for s in history.sessions:
        entry = totals.setdefault((s.operator_id, f"{s.started:%Y-%m}"), [0.0, 0.0, 0.0])
        entry[0] += s.kwh
        entry[1] += s.cost
        entry[2] += 1
    table = Table(title="Costs by operator and month", title_justify="left")
    for column in ("operator", "month", "sessions", "kWh", "R$"):
        table.add_column(column, justify="right" if column in ("sessions", "kWh", "R$") else "left")
    for (operator, month), (kwh, cost, count) in sorted(totals.items()):
        table.add_row(operator, month, str(int(count)), f"{kwh:.2f}", f"{cost:.2f}")
    table.add_row("all", "", str(len(history.sessions)), f"{history.total_kwh:.2f}", f"{history.total_cost:.2f}")
    return table


def settlement_table(settlement: p.Settlement) -> Table:
    """Per other operator and month: what we charged its vehicles, and what ours were charged there."""
    rows: dict[tuple[str, str], list[float]] = {}
    for record in settlement.charged:
        row = rows.setdefault((record.home_operator_id, f"{record.session.started:%Y-%m}"), [0, 0.0, 0, 0.0, 0])
        row[0] += 1
        row[1] += record.session.cost
        row[4] += 0 if record.delivered else 1
    for record in settlement.received:
        row = rows.setdefault((record.session.operator_id, f"{record.session.started:%Y-%m}"), [0, 0.0, 0, 0.0, 0])
        row[2] += 1
        row[3] += record.session.cost
    table = Table(title=f"Settlement of operator {settlement.operator_id}", title_justify="left")
    for column in ("with operator", "month", "we charged", "R$", "we were charged", "R$", "not yet delivered"):
        table.add_column(column, justify="left" if column in ("with operator", "month") else "right")
    for (other, month), (n_out, r_out, n_in, r_in, pending) in sorted(rows.items()):
        table.add_row(
            other, month, str(n_out), f"{r_out:.2f}", str(n_in), f"{r_in:.2f}", str(pending) if pending else ""
        )
    return table


def trip(info: p.TripInfo, console: Console, title: str) -> None:
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("#", footer="")
    table.add_column("city", footer=info.destination)
    table.add_column("operator")
    table.add_column("charge point")
    table.add_column("drive km", justify="right", footer=f"{info.distance_km:.0f}")
    table.add_column("arrive", footer=f"{info.arrival:%m-%d %H:%M}Z")
    table.add_column("slot")
    table.add_column("SoC %", footer=f"{info.soc_at_arrival:.0f}")
    table.add_column("kWh", justify="right", footer=f"{info.total_kwh:.1f}")
    table.add_column("R$", justify="right", footer=f"{info.total_cost:.2f}")
    table.add_column("reservation")
    for n, stop in enumerate(info.stops, 1):
        table.add_row(
            str(n),
            stop.city,
            stop.operator_id,
            f"{stop.charge_point_id} ({stop.power_kw:g} kW)",
            f"{stop.drive_km:.0f}",
            f"{stop.arrival:%m-%d %H:%M}Z",
            f"{stop.slot_start:%H:%M}-{stop.slot_end:%H:%M}",
            f"{stop.soc_in:.0f}→{stop.soc_out:.0f}",
            f"{stop.kwh:.1f}",
            f"{stop.cost:.2f}",
            stop.reservation_id or "",
        )
    console.print(f"{info.origin} → {info.destination}, departing {info.depart:%Y-%m-%d %H:%M}Z")
    if not info.stops:
        console.print(
            f"[bold]{title}[/]: no charging stop needed, {info.distance_km:.0f} km straight there, arriving "
            f"{info.arrival:%m-%d %H:%M}Z with {info.soc_at_arrival:.0f}%"
        )
        return
    console.print(table)


def trip_state(info: p.TripInfo, now: datetime) -> str:
    """What a trip is now: a committed trip whose every stop has ended (or, without stops, that arrived) is done."""
    if info.state == "committed" and (info.stops[-1].slot_end if info.stops else info.arrival) <= now:
        return "completed"
    return info.state


CHART_ROWS = 8  # rows of the SoC chart, 0-100 %
CHART_COLUMNS = 64
_EIGHTHS = " ▁▂▃▄▅▆▇█"


def soc_profile(info: p.TripInfo, soc_start: float) -> list[tuple[float, float, bool]]:
    """The battery along the route: (km from the origin, SoC %, charging here) at each turn."""
    points = [(0.0, soc_start, False)]
    km = 0.0
    for stop in info.stops:
        km += stop.drive_km
        points += [(km, stop.soc_in, False), (km, stop.soc_out, True)]
    points.append((info.distance_km, info.soc_at_arrival, False))
    return points


def soc_chart(info: p.TripInfo, soc_start: float, *, width: int = CHART_COLUMNS, rows: int = CHART_ROWS) -> str:
    """The state of charge along a trip as a small terminal chart (rich markup): one column per stretch of road.

    Columns are filled up to the SoC there; a charging stop is a green column, a stretch below 20 % red.
    Under the chart, each stop's city where it is on the road.
    """
    points = soc_profile(info, soc_start)
    total = max(info.distance_km, 1e-9)
    stop_columns = {min(width - 1, round(km / total * (width - 1))) for km, _, charging in points if charging}

    def soc_at(km: float) -> float:
        for (k0, s0, _), (k1, s1, _) in itertools.pairwise(points):
            if k0 <= km <= k1 and k1 > k0:
                return s0 + (s1 - s0) * (km - k0) / (k1 - k0)
        return points[-1][1]

    values = []
    for column in range(width):
        km = column / (width - 1) * total
        here = [s for k, s, charging in points if charging and min(width - 1, round(k / total * (width - 1))) == column]
        values.append((max(here), "green") if here else (soc_at(km), "red" if soc_at(km) < 20 else "yellow"))
    lines = []
    for row in range(rows - 1, -1, -1):
        label = {rows - 1: "100%", 0: "  0%"}.get(row, "    ")
        cells = []
        for value, style in values:
            eighths = round(max(0.0, min(100.0, value)) / 100 * rows * 8) - row * 8
            cells.append(f"[{style}]{_EIGHTHS[max(0, min(8, eighths))]}[/]")
        lines.append(f"{label} │{''.join(cells)}")
    axis = ["─"] * width
    for column in stop_columns:
        axis[column] = "┴"
    lines.append(f"     └{''.join(axis)}")
    lines.append("      " + _labels(info, stop_columns_in_order(info, width), width))
    return "\n".join(lines)


def stop_columns_in_order(info: p.TripInfo, width: int) -> list[tuple[int, str]]:
    """(column, city) for the origin, each stop and the destination."""
    total = max(info.distance_km, 1e-9)
    marks = [(0, info.origin)]
    km = 0.0
    for stop in info.stops:
        km += stop.drive_km
        marks.append((min(width - 1, round(km / total * (width - 1))), stop.city))
    marks.append((width - 1, info.destination))
    return marks


def _labels(info: p.TripInfo, marks: list[tuple[int, str]], width: int) -> str:
    """City names under their columns, each where it fits (the last is right-aligned to the end)."""
    line = [" "] * (width + 24)
    taken = -1
    for i, (column, city) in enumerate(marks):
        start = column - len(city) + 1 if i == len(marks) - 1 else column
        start = max(start, taken + 2 if taken >= 0 else 0)
        if start + len(city) > len(line):
            continue
        line[start : start + len(city)] = city
        taken = start + len(city)
    return "".join(line).rstrip()
