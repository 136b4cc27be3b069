"""Expensive work shared fairly between those who ask for it: one turn each, in rotation.

Planning a trip costs milliseconds of CPU and a question to every peer; a server
can do a few at once. Served first come first served, one vehicle with 500
plans in flight makes everyone else's plan wait for all of them. ``FairQueue``
runs at most ``concurrency`` at a time and, when more wait, hands the next turn
to the identity after the last one served (round robin), so another vehicle
waits for a few plans at most, however many the first one sent. An identity
with ``max_waiting`` already waiting is refused at once (``unavailable``): it is
told to slow down rather than kept waiting behind itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from evcharge.wire.errors import UnavailableError


class FairQueue:
    def __init__(self, concurrency: int, max_waiting: int, what: str = "requests") -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.what = what
        self.running = 0
        # identity -> its waiters; the identities in the order their next turns come.
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = collections.OrderedDict()

    def waiting(self, identity: str) -> int:
        return len(self._waiting.get(identity, ()))

    @asynccontextmanager
    async def turn(self, identity: str) -> AsyncIterator[None]:
        """Run the block in ``identity``'s turn (at once, if a turn is free and nobody waits)."""
        if self.running < self.concurrency and not self._waiting:
            self.running += 1
        else:
            await self._wait(identity)
        try:
            yield
        finally:
            self._pass_on()

    async def _wait(self, identity: str) -> None:
        mine = self._waiting.get(identity)
        if mine is not None and len(mine) >= self.max_waiting:
            raise UnavailableError(
                f"{identity} has {self.max_waiting} {self.what} waiting already; ask again once they are answered"
            )
        if mine is None:
            mine = self._waiting[identity] = collections.deque()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        mine.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._pass_on()  # the turn was ours already: the next one gets it
            else:
                with contextlib.suppress(ValueError):  # passed over already, as a cancelled waiter
                    mine.remove(granted)
                if not mine and self._waiting.get(identity) is mine:
                    del self._waiting[identity]
            raise

    def _pass_on(self) -> None:
        """A turn ends: the next identity in rotation gets it, or it is free."""
        while self._waiting:
            identity, waiters = next(iter(self._waiting.items()))
            granted = waiters.popleft()
            if waiters:
                self._waiting.move_to_end(identity)  # its next turn comes after everyone else's
            else:
                del self._waiting[identity]
            if not granted.done():
                granted.set_result(None)
                return
        self.running -= 1
