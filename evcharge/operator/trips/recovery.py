"""Nothing vanished leaves a trip stuck: decisions are re-sent, holds in doubt are asked about.

Every ``RESOLVE_INTERVAL`` the coordinator re-sends each trip's decision to the
participants that have not acknowledged it (after a restart too: the trip rows
say who), and this operator, as a participant, asks the coordinator of every
hold past its deadline what was decided -- it never decides alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from evcharge.domain.model import Withdrawal
from evcharge.operator.trips.coordinator import Coordinator
from evcharge.operator.trips.participant import Participant
from evcharge.operator.trips.peers import Peers
from evcharge.wire import protocol as p
from evcharge.wire.errors import EvchargeError, ForbiddenError, NotFoundError

log = logging.getLogger(__name__)

RESOLVE_INTERVAL = 0.5  # real seconds between passes


class Recovery:
    def __init__(self, coordinator: Coordinator, participant: Participant, peers: Peers) -> None:
        self.coordinator = coordinator
        self.participant = participant
        self.peers = peers

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RESOLVE_INTERVAL)
            try:
                await self.resolve_once()
            except EvchargeError as exc:
                log.warning("resolver: %s", exc)

    async def resolve_once(self) -> None:
        coordinator = self.coordinator
        # A trip whose acknowledgements are being stored looks undelivered until they are.
        undelivered = [
            t
            for t in coordinator.books.trips.values()
            if t.unacked and (t.id, t.state) not in coordinator.sending and t.id not in coordinator.storing_acks
        ]
        in_doubt = self.participant.overdue_holds(time.time())
        await asyncio.gather(
            *(coordinator.deliver(t) for t in undelivered),
            *(self._ask(txn, owner, trip) for txn, (owner, trip) in in_doubt.items()),
            *(self._tell_withdrawal(w) for w in list(self.participant.untold.values())),
            return_exceptions=True,
        )

    async def _tell_withdrawal(self, withdrawal: Withdrawal) -> None:
        """A stop we withdrew: its coordinator is told until it acknowledges."""
        me = self.coordinator.me
        try:
            if withdrawal.coordinator == me:
                await self.coordinator.stop_withdrawn(
                    me, withdrawal.trip_id, withdrawal.reservation_id, withdrawal.reason
                )
            else:
                request = p.StopWithdrawn(
                    trip_id=withdrawal.trip_id, reservation_id=withdrawal.reservation_id, reason=withdrawal.reason
                )
                await self.peers.link(withdrawal.coordinator).call(request, p.Ok)
        except (NotFoundError, ForbiddenError) as exc:
            # It will never show this stop: saying it again would not change that.
            log.error("withdrawal of %s refused by %s: %s", withdrawal.reservation_id, withdrawal.coordinator, exc)
        await self.participant.told(withdrawal)

    async def _ask(self, txn_id: str, coordinator: str, trip_id: str) -> None:
        """A hold past its deadline: ask its coordinator, never decide alone."""
        if coordinator == self.coordinator.me:
            outcome = self.coordinator.outcome(txn_id, asker=coordinator)
        else:
            link = self.peers.links.get(coordinator)
            if link is None:
                log.error("hold of %s names unknown coordinator %s", txn_id, coordinator)
                return
            outcome = (await link.call(p.QueryDecision(txn_id=txn_id), p.Decision)).outcome
        if outcome != "pending":
            log.info("in-doubt %s resolved by asking %s: %s", txn_id, coordinator, outcome)
            await self.participant.resolve(coordinator, txn_id, trip_id, commit=outcome == "commit")
