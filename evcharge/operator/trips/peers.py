"""The other operators: a link to each, their catalogs, and their availability.

Each peer's catalog (its stations and charge points, with live status) is
fetched whenever its link comes up, and kept current by the ``StationChanged``
pushes that follow (``directory``). The charge points themselves are static,
so the charge options a plan chooses from are built again only when a catalog
arrives. Availability is asked fresh from every owner for each plan. An
owner's news for one of our vehicles (``ForVehicle``) is passed on to it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from evcharge.domain import planner
from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.ledger import Ledger
from evcharge.domain.world import OperatorConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Backoff, Link
from evcharge.operator.pushes import Online
from evcharge.operator.roaming.directory import Directory
from evcharge.operator.views import Views
from evcharge.wire import protocol as p
from evcharge.wire.errors import UnavailableError

log = logging.getLogger(__name__)

PEER_TIMEOUT = 5.0  # any request to a peer that has no deadline of its own
PEER_HEARTBEAT = 30.0  # real seconds of silence on a peer link before we ask if it is still there


class PeerLink(Link):
    """Our link to one other operator (mutual TLS if it asks for it)."""

    def __init__(
        self,
        me: OperatorConfig,
        peer: OperatorConfig,
        on_up: Callable[[PeerLink, Client], Awaitable[None]],
        on_change: Callable[[PeerLink], None],
        ssl_context: ssl.SSLContext | None = None,
    ):
        host, port = peer.peer_address
        super().__init__(
            host,
            port,
            role="peer",
            ident=me.id,
            secret=me.secret,
            ssl_context=ssl_context if peer.peer_tls else None,
            server_hostname=peer.certificate_name,
            timeout=PEER_TIMEOUT,
            heartbeat=PEER_HEARTBEAT,
            backoff=Backoff(first=0.1),
            on_up=self._came_up,
            on_down=lambda _reason: on_change(self),
            retry_refused=True,  # its operator may fix its side while we wait
            name=f"peer link to {peer.id}",
            what=f"operator {peer.id}",
            fallbacks=peer.fallbacks,
        )
        self.peer = peer
        self._on_up, self._on_change = on_up, on_change

    async def _came_up(self, client: Client) -> None:
        self._on_change(self)
        await self._on_up(self, client)

    def info(self) -> p.PeerInfo:
        return p.PeerInfo(
            operator_id=self.peer.id,
            address=self.address + (" (tls)" if self.ssl_context else ""),
            up=self.up,
            last_seen=to_datetime(self.last_seen) if self.last_seen else None,
            last_error="" if self.up else self.last_error,
        )


class Peers:
    def __init__(
        self, world: World, me: OperatorConfig, views: Views, online: Online, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.me = me
        self.views = views
        self.online = online
        self.links = {
            op.id: PeerLink(me, op, self._link_up, self._link_changed, ssl_context)
            for op in world.operators
            if op.id != me.id
        }
        self.catalogs: dict[str, list[p.StationInfo]] = {}
        self.directory = Directory(world, views, self.is_live)
        self.came_up: list[Callable[[str], None]] = []  # told an operator's id once its link is up
        self._our_vehicles = {v.id for v in world.vehicles if v.home == me.id}
        self._options: list[planner.ChargeOption] | None = None  # cache of charge_options()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(link.run()) for link in self.links.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            await link.close()

    def link(self, operator_id: str) -> PeerLink:
        link = self.links.get(operator_id)
        if link is None:
            raise UnavailableError(f"operator {operator_id} is not in this federation")
        return link

    def infos(self) -> list[p.PeerInfo]:
        return [link.info() for link in self.links.values()]

    def is_live(self, operator_id: str) -> bool:
        """Our link to it is up and its catalog is in: what we know of its stations is current."""
        link = self.links.get(operator_id)
        return link is not None and link.up and operator_id in self.catalogs

    async def _link_up(self, link: PeerLink, client: Client) -> None:
        operator_id = link.peer.id
        # Pushes from here on: any that overtake the catalog are in it anyway.
        client.on_event.append(lambda event: self._pushed(operator_id, event))
        catalog = await client.call(p.GetCatalog(), p.Catalog, timeout=PEER_TIMEOUT)
        self.catalogs[operator_id] = catalog.stations
        self.directory.catalog(operator_id, catalog.stations)
        self._options = None
        log.info("catalog of %s: %d stations", operator_id, len(catalog.stations))
        for listener in self.came_up:
            listener(operator_id)

    def _link_changed(self, link: PeerLink) -> None:
        if not link.up:
            self.directory.link_down(link.peer.id)
        self.online.to_operator_tools(p.PeerChanged(peer=link.info()))

    def _pushed(self, operator_id: str, event: p.Event) -> None:
        match event:
            case p.StationChanged(station=station):
                self.directory.station_changed(operator_id, station)
            case p.ForVehicle(vehicle_id=vehicle_id, event=news) if vehicle_id in self._our_vehicles:
                self.online.to_vehicle(vehicle_id, news)
            case _:
                log.warning("operator %s pushed %s; ignored", operator_id, type(event).__name__)

    # --- what plans choose from ---------------------------------------------------------

    def not_known_yet(self) -> list[str]:
        """Operators whose chargers no plan can use yet: never reached since we started."""
        return sorted(op for op in self.links if op not in self.catalogs)

    def charge_options(self) -> list[planner.ChargeOption]:
        """Every known charge point, built again only when a catalog arrived (they are static)."""
        if self._options is None:
            books = self.views.books
            own = [self.views.station_info(s, 0) for s in books.stations.values()]
            everyone = own + [s for stations in self.catalogs.values() for s in stations]
            self._options = [
                planner.ChargeOption(
                    operator_id=s.operator_id,
                    station_id=s.id,
                    station_name=s.name,
                    city=s.city,
                    lat=s.lat,
                    lon=s.lon,
                    charge_point_id=cp.id,
                    power_kw=cp.power_kw,
                    price_per_kwh=cp.price_per_kwh,
                )
                for s in everyone
                for cp in s.charge_points
            ]
        return self._options

    async def availability(self, start: int, end: int) -> dict[str, Ledger]:
        """Taken slots of every known charge point, fresh from each owner."""
        request = p.GetAvailability(start=to_datetime(start), end=to_datetime(end))
        peers = [link for link in self.links.values() if link.peer.id in self.catalogs]
        own = await self.views.busy_between(start, end)
        answers = await asyncio.gather(*(link.call(request, p.Availability) for link in peers), return_exceptions=True)
        everyone: list[list[p.CpBusy]] = [own]
        for link, answer in zip(peers, answers, strict=True):
            if isinstance(answer, BaseException):
                # Plan as if free: PREPARE re-checks at the owner anyway.
                log.warning("availability of %s unknown: %s", link.peer.id, answer)
            else:
                everyone.append(answer.charge_points)
        ledgers: dict[str, Ledger] = {}
        for busy in everyone:
            for cp in busy:
                ledger = ledgers.setdefault(cp.charge_point_id, Ledger())
                for n, interval in enumerate(cp.busy):
                    ledger.add(to_seconds(interval.start), to_seconds(interval.end), f"busy-{n}")
        return ledgers
