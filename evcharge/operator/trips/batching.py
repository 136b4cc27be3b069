"""Concurrent trips' two-phase-commit messages to one participant, sent together.

Each booking (or cancellation) still asks each owner its own PREPARE and tells it
its own decision; a ``Batcher`` per owner only carries what concurrent trips ask
of that owner at about the same moment in one ``TwoPhaseBatch`` frame, which the
owner takes in one writer section and one commit (``Participant.batch``). While a
batch is on its way (at most ``IN_FLIGHT`` per owner) the next one fills up: the
busier the coordinator, the bigger the batches, and an idle one sends each message
at once (in the next turn of the event loop).

Nothing about the protocol changes: every item is answered as it would be alone,
a NO or an error for one trip is that trip's, and a batch that gets no answer is,
for each of its items, a request that got none (a PREPARE not answered is a NO, a
decision not acknowledged is sent again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from evcharge.operator.store import Op
from evcharge.wire import protocol as p
from evcharge.wire.errors import UnavailableError, error_from_reply

log = logging.getLogger(__name__)

# Batches on their way to one owner at once; what comes meanwhile waits and joins the next.
# Not fewer: a PREPARE that waits places its holds later, and meanwhile the other coordinators
# plan onto its slots (at 2, the contention race of the bench lost a fifth of its winners).
IN_FLIGHT = 8
Result = p.Vote | p.Ok | p.Error
# Sends one batch (items, what each also stores when the owner is us, the batch's deadline in wall-clock seconds).
Send = Callable[[list[p.TwoPhaseItem], list[tuple[Op, ...]], float], Awaitable[Sequence[Result]]]


@dataclass(slots=True)
class _Item:
    request: p.TwoPhaseItem
    also: tuple[Op, ...]
    deadline: float  # wall clock
    future: asyncio.Future[Result] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, name: str, send: Send) -> None:
        self.name = name
        self._send = send
        self._queue: list[_Item] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # sent, and items in them: the batch size, for whoever wants to know
        self.items = 0

    async def submit(self, request: p.TwoPhaseItem, timeout: float | None, also: tuple[Op, ...] = ()) -> Result:
        """Send ``request`` with the next batch; its answer (an ``Error`` is raised), within ``timeout`` seconds.

        No ``timeout`` only for ourselves as participant: what ``also`` stores must not be
        given up on while it may still be written.
        """
        item = _Item(request, also, time.time() + (timeout if timeout is not None else 0.0))
        self._queue.append(item)
        self._schedule()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, timeout), _expire, item.future, self.name) if timeout is not None else None
        try:
            result = await item.future
        finally:
            if timer is not None:
                timer.cancel()
            if not item.future.done():  # we were cancelled: not sent yet, it is not sent at all
                item.future.cancel()
        if isinstance(result, p.Error):
            raise error_from_reply(result)
        return result

    def _schedule(self) -> None:
        if not self._scheduled and self._queue and self._in_flight < IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < IN_FLIGHT:
            live = [item for item in self._queue if not item.future.done()]  # those given up on stay unsent
            batch, self._queue = live[: p.MAX_BATCH_ITEMS], live[p.MAX_BATCH_ITEMS :]
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._deliver(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, batch: list[_Item]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            deadline = max(item.deadline for item in batch)
            results = await self._send([i.request for i in batch], [i.also for i in batch], deadline)
            if len(results) != len(batch):
                raise UnavailableError(f"{self.name} answered {len(results)} of {len(batch)} items of a batch")
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        except BaseException:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(UnavailableError(f"the batch to {self.name} was not sent"))
            raise
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._schedule()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _expire(future: asyncio.Future[Result], name: str) -> None:
    if not future.done():
        future.set_exception(UnavailableError(f"{name} did not answer in time"))
