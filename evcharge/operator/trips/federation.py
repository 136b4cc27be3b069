"""Operators working together on trips: the parts of the two-phase commit, wired up.

``peers`` (links, catalogs, availability), ``planning`` (plans, plans shown,
claims), ``coordinator`` (booking and cancelling this operator's vehicles'
trips) and ``recovery`` (decisions re-sent, holds in doubt asked about). The
participant side (holding this operator's own stops) exists without
federation too, in ``participant``.
"""

from __future__ import annotations

import asyncio
import ssl

from evcharge.domain.world import World
from evcharge.operator.pushes import Online
from evcharge.operator.trips.coordinator import Coordinator
from evcharge.operator.trips.participant import Participant
from evcharge.operator.trips.peers import Peers
from evcharge.operator.trips.planning import Planning
from evcharge.operator.trips.recovery import Recovery
from evcharge.operator.views import Views


class Federation:
    def __init__(
        self, world: World, views: Views, participant: Participant, online: Online, ssl_context: ssl.SSLContext | None
    ) -> None:
        books = views.books
        self.peers = Peers(world, world.operator(books.operator_id), views, online, ssl_context)
        self.planning = Planning(books, self.peers)
        self.coordinator = Coordinator(books, participant, self.peers, self.planning, online)
        self.recovery = Recovery(self.coordinator, participant, self.peers)
        self._resolver: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.peers.start()
        self._resolver = asyncio.get_running_loop().create_task(self.recovery.run())

    async def stop(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        await self.coordinator.stop()
        await self.peers.stop()
        self.planning.close()
