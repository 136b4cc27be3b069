"""Operators working together: the parts of roaming and of the two-phase commit, wired up.

``peers`` (links, catalogs, availability, and the ``directory`` of every
operator's stations), ``planning`` (plans, plans shown, claims),
``coordinator`` (booking and cancelling this operator's vehicles' trips),
``recovery`` (decisions re-sent, holds in doubt asked about), ``roaming``
(this operator's vehicles' requests at other operators' chargers) and
``records`` (charge records between owners and homes). The participant side
(holding this operator's own stops) exists without federation too, in
``participant``.
"""

from __future__ import annotations

import asyncio
import ssl

from evcharge.domain.world import World
from evcharge.operator.charging import Charging
from evcharge.operator.pushes import Online
from evcharge.operator.roaming.forwarding import Roaming
from evcharge.operator.roaming.records import ChargeRecords
from evcharge.operator.trips.coordinator import Coordinator
from evcharge.operator.trips.participant import Participant
from evcharge.operator.trips.peers import Peers
from evcharge.operator.trips.planning import Planning
from evcharge.operator.trips.recovery import Recovery
from evcharge.operator.views import Views


class Federation:
    def __init__(
        self,
        world: World,
        views: Views,
        participant: Participant,
        charging: Charging,
        online: Online,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        books = views.books
        self.peers = Peers(world, world.operator(books.operator_id), views, online, ssl_context)
        self.directory = self.peers.directory
        self.planning = Planning(books, self.peers)
        self.coordinator = Coordinator(books, participant, self.peers, self.planning, online)
        self.recovery = Recovery(self.coordinator, participant, self.peers)
        self.roaming = Roaming(world, books.operator_id, self.peers)
        self.records = ChargeRecords(world, books, self.peers)
        charging.session_ended.append(self.records.session_ended)
        self.peers.came_up.append(self.records.link_up)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.peers.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.recovery.run()), loop.create_task(self.records.run())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coordinator.stop()
        await self.peers.stop()
        self.planning.close()
