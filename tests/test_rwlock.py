"""The books' reader-writer lock: free when nobody waits, in order when someone does."""

from __future__ import annotations

import asyncio

import pytest

from evcharge.operator.rwlock import RWLock

pytestmark = pytest.mark.timeout(10)


async def test_readers_share_writers_wait_for_them_and_later_readers_wait_for_a_writer() -> None:
    lock = RWLock()
    order: list[str] = []
    release_readers = asyncio.Event()

    async def reader(name: str, wait: asyncio.Event | None = None) -> None:
        async with lock.reader_lock:
            order.append(f"{name} in")
            if wait is not None:
                await wait.wait()
            order.append(f"{name} out")

    async def writer(name: str) -> None:
        async with lock.writer_lock:
            order.append(f"{name} in")
            await asyncio.sleep(0)
            order.append(f"{name} out")

    r1 = asyncio.create_task(reader("r1", release_readers))
    r2 = asyncio.create_task(reader("r2", release_readers))
    await asyncio.sleep(0)
    assert lock.read_locked and order == ["r1 in", "r2 in"]  # readers share
    w = asyncio.create_task(writer("w"))
    await asyncio.sleep(0)
    r3 = asyncio.create_task(reader("r3"))  # after a waiting writer: waits for it
    await asyncio.sleep(0)
    assert order == ["r1 in", "r2 in"]
    release_readers.set()
    await asyncio.gather(r1, r2, w, r3)
    assert order[2:] == ["r1 out", "r2 out", "w in", "w out", "r3 in", "r3 out"]
    assert not lock.read_locked and not lock.write_locked


async def test_an_uncontended_section_does_not_yield() -> None:
    lock, another = RWLock(), RWLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    async with lock.writer_lock, another.reader_lock:
        pass
    async with lock.reader_lock:
        pass
    assert ran == []  # nothing else ran: taking the lock gave up no turn
    await task


async def test_a_cancelled_waiter_takes_nothing_and_blocks_no_one() -> None:
    lock = RWLock()
    hold = asyncio.Event()

    async def holding_reader() -> None:
        async with lock.reader_lock:
            await hold.wait()

    async def write() -> None:
        async with lock.writer_lock:
            pass

    async def read() -> str:
        async with lock.reader_lock:
            return "read"

    r = asyncio.create_task(holding_reader())
    await asyncio.sleep(0)
    w = asyncio.create_task(write())
    await asyncio.sleep(0)
    later = asyncio.create_task(read())
    await asyncio.sleep(0)
    w.cancel()  # the writer the later reader queued behind gives up
    with pytest.raises(asyncio.CancelledError):
        await w
    assert await asyncio.wait_for(later, 2) == "read"
    hold.set()
    await r
    async with lock.writer_lock:  # nothing left taken
        assert lock.write_locked
