"""One history and one bill: charge records between a charger's owner and a vehicle's home.

When a visiting vehicle's session ends here, its session row (stored with the
end of the session) names the vehicle's home and whether the home has its
record yet: that row is the outbox. ``deliver`` sends every record not yet
delivered over our link to its home -- when the session ends, when the link
comes up, and every ``RETRY_EVERY`` seconds while any is left -- and stores
"delivered" once the home said it has it. The home stores each record once
(keyed by its reservation id), however often it arrives: exactly once across
restarts of either side.

The settlement of one operator: what it charged other operators' vehicles
(its sessions of visitors) and what its own vehicles were charged elsewhere
(the records it received), each by the other operator and month.
"""

from __future__ import annotations

import asyncio
import logging

from evcharge.domain.clock import to_datetime, to_seconds
from evcharge.domain.model import ChargeRecord, ChargingSession
from evcharge.domain.world import World
from evcharge.operator.state import Actor, Books, Change
from evcharge.operator.store import put_record, put_session
from evcharge.operator.trips.peers import PEER_TIMEOUT, Peers
from evcharge.operator.views import session_info
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, EvchargeError, NotFoundError

log = logging.getLogger(__name__)

RETRY_EVERY = 5.0  # real seconds between attempts while records wait for their home


class ChargeRecords:
    def __init__(self, world: World, books: Books, peers: Peers) -> None:
        self.books = books
        self.me = books.operator_id
        self.peers = peers
        self._home_of = {v.id: v.home for v in world.vehicles}
        self._wake = asyncio.Event()

    # --- the owner's side ---------------------------------------------------------------------

    def session_ended(self, session: ChargingSession) -> None:
        if session.home is not None:
            self._wake.set()

    async def run(self) -> None:
        """Deliver what waits, whenever there may be something to deliver; until cancelled."""
        while True:
            self._wake.clear()
            waiting = await self.deliver()
            timeout = RETRY_EVERY if waiting else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def link_up(self, operator_id: str) -> None:
        self._wake.set()

    async def deliver(self) -> int:
        """Send every record not yet delivered whose home we can reach; returns how many still wait."""
        books = self.books
        waiting = [s for s in books.sessions.values() if s.home is not None and s.ended is not None and not s.delivered]
        left = 0
        for session in waiting:
            assert session.home is not None
            link = self.peers.links.get(session.home)
            if link is None or not link.up:
                left += 1
                continue
            try:
                await link.call(p.DeliverChargeRecord(record=self.record_info(session)), p.Ok, timeout=PEER_TIMEOUT)
            except EvchargeError as exc:
                log.info("charge record %s not delivered to %s yet: %s", session.reservation_id, session.home, exc)
                left += 1
                continue
            await self._delivered(session)
        return left

    async def _delivered(self, session: ChargingSession) -> None:
        def mutate() -> Change[None]:
            session.delivered = True
            return Change(None, [put_session(session)])

        try:
            await self.books.apply(
                Actor("operator", self.me), f"charge record {session.reservation_id} delivered", mutate
            )
        except EvchargeError as exc:  # delivered again next time: the home keeps it once
            log.warning("could not store that %s was delivered: %s", session.reservation_id, exc)

    def record_info(self, session: ChargingSession) -> p.ChargeRecordInfo:
        return p.ChargeRecordInfo(
            vehicle_id=session.vehicle_id,
            home_operator_id=session.home or self.me,
            delivered=session.delivered,
            session=session_info(self.books, session),
        )

    # --- the home's side ----------------------------------------------------------------------

    async def receive(self, owner: str, record: p.ChargeRecordInfo) -> None:
        """A record from the charger's owner: kept once (the same one again changes nothing)."""
        s = record.session
        if s.operator_id != owner or not s.reservation_id.startswith(f"{owner}-"):
            raise BadRequestError(
                f"a charge record of reservation {s.reservation_id} at operator {s.operator_id} "
                f"cannot come from operator {owner}"
            )
        if self._home_of.get(record.vehicle_id) != self.me:
            raise NotFoundError(f"no vehicle {record.vehicle_id!r} of operator {self.me}")
        books = self.books
        kept = ChargeRecord(
            reservation_id=s.reservation_id,
            owner=owner,
            vehicle_id=record.vehicle_id,
            station_id=s.station_id,
            city=s.city,
            charge_point_id=s.charge_point_id,
            started=to_seconds(s.started),
            ended=to_seconds(s.ended),
            kwh=s.kwh,
            price_per_kwh=s.price_per_kwh,
            cost=s.cost,
        )

        def mutate() -> Change[None]:
            if s.reservation_id in books.records:
                return Change(None)  # delivered again: kept already
            books.records[s.reservation_id] = kept
            return Change(None, [put_record(kept)])

        await books.apply(Actor("peer", owner), f"charge record {s.reservation_id} of {record.vehicle_id}", mutate)

    def sessions_elsewhere(self, vehicle_id: str) -> list[p.SessionInfo]:
        return [_session_info(r) for r in self.books.records.values() if r.vehicle_id == vehicle_id]

    # --- both -------------------------------------------------------------------------------

    def settlement(self) -> p.Settlement:
        books = self.books
        charged = [self.record_info(s) for s in books.sessions.values() if s.home is not None and s.ended is not None]
        received = [
            p.ChargeRecordInfo(
                vehicle_id=r.vehicle_id, home_operator_id=self.me, delivered=True, session=_session_info(r)
            )
            for r in books.records.values()
        ]
        return p.Settlement(operator_id=self.me, charged=charged, received=received)


def _session_info(r: ChargeRecord) -> p.SessionInfo:
    return p.SessionInfo(
        reservation_id=r.reservation_id,
        operator_id=r.owner,
        station_id=r.station_id,
        city=r.city,
        charge_point_id=r.charge_point_id,
        started=to_datetime(r.started),
        ended=to_datetime(r.ended),
        kwh=r.kwh,
        price_per_kwh=r.price_per_kwh,
        cost=r.cost,
    )
