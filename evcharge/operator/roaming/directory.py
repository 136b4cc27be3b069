"""Every operator's stations with their live status, for finding and seeing them anywhere.

Ours come from the books. The other operators' come from their owners: the
whole catalog (with live status and busy slots) when our link to them comes
up, then a ``StationChanged`` push whenever one of their stations changes. No
request of a vehicle waits on another operator. Between pushes, "reserved"
and "free in N min" are worked out again from the busy slots, so they move
with the clock. A station of an owner we cannot reach now is shown as last
heard, with the time it was heard (``as_of``); one never heard of is in the
world file, with every charge point ``unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import msgspec

from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.geo import great_circle_km
from evcharge.domain.world import StationConfig, World
from evcharge.operator.state import MIN
from evcharge.operator.views import Views
from evcharge.wire import protocol as p
from evcharge.wire.errors import NotFoundError

log = logging.getLogger(__name__)


class Directory:
    def __init__(self, world: World, views: Views, is_live: Callable[[str], bool]) -> None:
        """``is_live(operator)``: our link to it is up, so what it pushes is current."""
        self.views = views
        self.books = views.books
        self.me = self.books.operator_id
        self.soon = self.books.rules.reserved_soon_min * MIN
        self._is_live = is_live
        # Others' stations as last heard, by operator and station id; the world's until then.
        self.remote: dict[str, dict[str, p.StationInfo]] = {}
        self.heard_at: dict[str, float] = {}  # simulated time an owner's news was last known current
        self._down: set[str] = set()
        self._never_heard: dict[str, dict[str, p.StationInfo]] = {}
        for station in world.stations:
            if station.operator != self.me:
                self._never_heard.setdefault(station.operator, {})[station.id] = _unknown(station)
        self.owner_of_station = {s.id: s.operator for s in world.stations}

    # --- news from the owners --------------------------------------------------------------

    def _theirs(self, operator_id: str, station: p.StationInfo) -> bool:
        """A station the world file gives to that operator: nobody adds stations, nor speaks for another's."""
        return station.operator_id == operator_id and self.owner_of_station.get(station.id) == operator_id

    def catalog(self, operator_id: str, stations: list[p.StationInfo]) -> None:
        self.remote[operator_id] = {s.id: s for s in stations if self._theirs(operator_id, s)}
        self.heard_at[operator_id] = self.books.clock.now()
        self._down.discard(operator_id)

    def station_changed(self, operator_id: str, station: p.StationInfo) -> None:
        if not self._theirs(operator_id, station):
            log.warning("operator %s sent news of station %s, not one of its own; ignored", operator_id, station.id)
            return
        self.remote.setdefault(operator_id, {})[station.id] = station
        self.heard_at[operator_id] = self.books.clock.now()

    def link_down(self, operator_id: str) -> None:
        """Our link to it went down (told again on every failed attempt to reconnect)."""
        if operator_id in self.remote and operator_id not in self._down:
            self.heard_at[operator_id] = self.books.clock.now()  # current until this moment
        self._down.add(operator_id)

    # --- what vehicles ask -----------------------------------------------------------------

    async def list_stations(
        self, city: str | None, near: tuple[float, float] | None, limit: int | None
    ) -> list[p.StationInfo]:
        infos = await self.views.list_stations(city, near, None)
        others = self._others()
        if city:
            wanted = city.casefold()
            others = [s for s in others if s.city.casefold() == wanted]
        if near is not None:
            for info in others:
                info.distance_km = round(great_circle_km(near[0], near[1], info.lat, info.lon), 1)
        infos += others
        if near is not None:
            infos.sort(key=lambda i: i.distance_km or 0.0)
        else:
            infos.sort(key=lambda i: (i.city, i.operator_id, i.id))
        return infos[:limit] if limit else infos

    async def nearest_available(self, lat: float, lon: float, min_power_kw: float) -> p.NearestResult:
        """The nearest charge point free now at any operator (another's only if its status is live)."""
        candidates: list[p.NearestResult] = []
        try:
            candidates.append(await self.views.nearest_available(lat, lon, min_power_kw))
        except NotFoundError:
            pass
        for station in self._others():
            if station.as_of is not None:
                continue  # as last heard: it may not be free now
            usable = [c for c in station.charge_points if c.power_kw >= min_power_kw and c.status == "available"]
            if usable:
                distance = round(great_circle_km(lat, lon, station.lat, station.lon), 1)
                best = max(usable, key=lambda c: c.power_kw)
                candidates.append(p.NearestResult(station=station, charge_point_id=best.id, distance_km=distance))
        if not candidates:
            raise NotFoundError(f"no available charge point of at least {min_power_kw:g} kW right now, at any operator")
        return min(candidates, key=lambda c: c.distance_km)

    async def station_status(self, station_id: str) -> p.StationInfo:
        owner = self.owner_of_station.get(station_id)
        if owner is None or owner == self.me:
            return await self.views.station_status(station_id)
        heard = self.remote.get(owner, {}).get(station_id) or self._never_heard[owner][station_id]
        return self._as_now(owner, heard, with_busy=True)

    # --- as of now -------------------------------------------------------------------------

    def _latest(self, operator_id: str) -> list[p.StationInfo]:
        """Each of its stations in the world file: as last heard, or never heard of (its catalog may lack some)."""
        heard = self.remote.get(operator_id, {})
        return [heard.get(sid, unknown) for sid, unknown in self._never_heard.get(operator_id, {}).items()]

    def _others(self) -> list[p.StationInfo]:
        return [
            self._as_now(operator_id, station)
            for operator_id in sorted(self._never_heard)
            for station in self._latest(operator_id)
        ]

    def _as_now(self, operator_id: str, station: p.StationInfo, *, with_busy: bool = False) -> p.StationInfo:
        """A copy as of now: status and "free at" from the busy slots; ``as_of`` unless the owner is live."""
        now = int(self.books.clock.now())
        cps = [_cp_as_now(cp, now, self.soon, with_busy) for cp in station.charge_points]
        heard = self.heard_at.get(operator_id)
        as_of = None if self._is_live(operator_id) or heard is None else to_datetime(heard)
        return msgspec.structs.replace(station, charge_points=cps, as_of=as_of)


def _cp_as_now(cp: p.ChargePointInfo, now: int, soon: int, with_busy: bool) -> p.ChargePointInfo:
    busy = [(to_seconds(i.start), to_seconds(i.end)) for i in cp.busy]
    busy = [(s, e) for s, e in busy if e > now]
    status = cp.status
    if status in ("available", "reserved"):
        status = "reserved" if any(s < now + soon + 1 for s, _ in busy) else "available"
    free = _next_free(busy, now)
    return msgspec.structs.replace(
        cp,
        status=status,
        free_at=to_datetime(free) if free > now else None,
        busy=[p.Interval(to_datetime(s), to_datetime(e)) for s, e in busy] if with_busy else [],
    )


def _next_free(busy: Iterable[tuple[int, int]], now: int) -> int:
    """The first moment from ``now`` with a free minute (as ``Ledger.next_free`` for one minute)."""
    at = now
    for start, end in sorted(busy):
        if start >= at + MIN:
            break
        at = max(at, end)
    return at


def _unknown(station: StationConfig) -> p.StationInfo:
    return p.StationInfo(
        id=station.id,
        operator_id=station.operator,
        name=station.name,
        city=station.city,
        lat=station.lat,
        lon=station.lon,
        charge_points=[
            p.ChargePointInfo(
                id=cp.id,
                power_kw=cp.power_kw,
                connector=cp.connector,
                price_per_kwh=cp.price_per_kwh,
                status="unknown",
            )
            for cp in station.charge_points
        ],
    )
