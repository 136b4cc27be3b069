"""The books' reader-writer lock: many readers or one writer, writers not starved.

Every section under it today is synchronous (nothing awaits while holding it), so it is
never contended, and taking it must cost next to nothing: an uncontended acquire here
neither yields to the event loop nor looks up the loop or the task (aiorwlock, used
before, did all three per acquire: 15 % of a server's time answering status queries).
A section that does await some day still gets the lock's meaning: waiters queue in
order, a writer waits for the readers before it, readers that come after a waiting
writer wait for it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class RWLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting: deque[tuple[bool, asyncio.Future[None]]] = deque()  # (a writer?, granted when done)
        self.reader_lock = _Side(self, writer=False)
        self.writer_lock = _Side(self, writer=True)

    @property
    def read_locked(self) -> bool:
        return self._readers > 0

    @property
    def write_locked(self) -> bool:
        return self._writer

    async def acquire(self, writer: bool) -> None:
        if not self._waiting and not self._writer and (not writer or self._readers == 0):
            if writer:
                self._writer = True
            else:
                self._readers += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((writer, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted, then cancelled before it ran
                self.release(writer)
            else:
                self._wake()  # a writer given up on may have been what the readers behind it waited for
            raise

    def release(self, writer: bool) -> None:
        if writer:
            self._writer = False
        else:
            self._readers -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            writer, granted = self._waiting[0]
            if granted.done():  # its waiter was cancelled
                self._waiting.popleft()
                continue
            if self._writer or (writer and self._readers):
                return
            self._waiting.popleft()
            if writer:
                self._writer = True
                granted.set_result(None)
                return
            self._readers += 1
            granted.set_result(None)


class _Side:
    def __init__(self, lock: RWLock, *, writer: bool) -> None:
        self._lock = lock
        self._writer = writer

    async def __aenter__(self) -> None:
        await self._lock.acquire(self._writer)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release(self._writer)
