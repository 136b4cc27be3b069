"""No outcome guessed: the answers to keyed state-changing requests, kept under their keys.

A client names each intent (reserve this, cancel that, book this trip) with a
key of its own choosing. The first delivery acts, and its reply is stored
under (who asked, key) in the same transaction as the change it made
(``Books.apply``'s ``remember``), so the answer is durable exactly when the
change is. A delivery of the same key again -- a retry after a lost reply,
before or after a crash of either side -- acts no more: it waits for the
first one if that is still running, then gets the stored reply.

Refusals (a conflict, a reservation that is not there) are kept too, so that a
retry hears the same, but in memory only and at most ``REFUSALS_KEPT`` per
client: nothing was done, so writing them to disk would let anyone cost the
server a disk sync per request, and after a restart a retry answered afresh is
as true. ``unavailable`` and ``timeout`` are not kept at all: nothing happened,
or nobody knows yet, so the retry tries again. A key reused for a different
request is refused. Outcomes are forgotten ``KEEP_OUTCOMES`` seconds after
they were made.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from evcharge.domain.model import Outcome
from evcharge.operator.crash_points import crash_point
from evcharge.operator.state import Actor, Books, Change
from evcharge.operator.store import Op, forget_outcomes, put_outcome
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, EvchargeError, error_from_reply

T = TypeVar("T")

# Real seconds: far beyond any client's retries (ours give up within --answer-within, a home's
# forwarding within seconds), and short enough that memory stays bounded: about 0.9 KB an outcome.
KEEP_OUTCOMES = 86400.0
REFUSALS_KEPT = 256  # per client, the newest: a retry comes soon after its refusal
NOT_KEPT = frozenset({"unavailable", "timeout", "internal"})  # nothing happened, or not known yet

_encoder = msgspec.msgpack.Encoder()
_replies = msgspec.msgpack.Decoder(p.AnyMessage)

Remember = Callable[[T], Op]


def scope_of(actor: Actor) -> str:
    """Whose keys these are: a visiting vehicle's keys are its own, as at home."""
    return f"{actor.role}:{actor.ident}"


def fingerprint(request: p.Request) -> str:
    """The request without its id and key: the same intent sent again has the same one."""
    bare = msgspec.structs.replace(request, id=0, key="")
    # JSON keeps each time as sent, with its offset (a "year 1 at +05:00" has no UTC in msgpack).
    return hashlib.sha256(msgspec.json.encode(bare)).hexdigest()[:32]


class Outcomes:
    def __init__(self, books: Books) -> None:
        self.books = books
        self._running: dict[tuple[str, str], asyncio.Event] = {}  # first deliveries not answered yet
        self._refusals: dict[str, deque[Outcome]] = {}  # each client's kept refusals, oldest first

    async def once(
        self,
        actor: Actor,
        request: p.Request,
        act: Callable[[Remember[T] | None], Awaitable[T]],
        render: Callable[[T], p.Reply],
    ) -> p.Reply:
        """Act on ``request`` once per key: ``act`` is given what to pass to ``Books.apply`` as ``remember``."""
        key: str = getattr(request, "key", "")
        if not key:
            result = await act(None)
            crash_point("change-stored")
            return render(result)
        slot = (scope_of(actor), key)
        while (running := self._running.get(slot)) is not None:
            await running.wait()  # the first delivery is still at work: its answer is this one's
        request_print = fingerprint(request)
        kept = self.books.outcomes.get(slot)
        if kept is not None:
            return await self._again(kept, request_print, key)
        done = self._running[slot] = asyncio.Event()
        answer: list[p.Reply] = []

        def remember(result: T) -> Op:
            reply = render(result)
            answer.append(reply)
            return self._keep(slot, request_print, reply)

        try:
            result = await act(remember)
            crash_point("change-stored")
            return answer[0] if answer else render(result)
        except EvchargeError as exc:
            if exc.code in NOT_KEPT:
                self.books.outcomes.pop(slot, None)  # remembered for a change that was not stored
            else:
                self._keep_refusal(slot, request_print, exc.to_reply(0))
            raise
        finally:
            del self._running[slot]
            done.set()

    async def _again(self, kept: Outcome, request_print: str, key: str) -> p.Reply:
        # No wait for the disk here: a first delivery still being stored holds ``_running``,
        # and what was loaded from the store is on it.
        if kept.fingerprint != request_print:
            raise BadRequestError(f"key {key!r} was used for a different request; use a new key for a new request")
        reply = _replies.decode(kept.reply)
        assert isinstance(reply, p.Reply)
        if isinstance(reply, p.Error):
            raise error_from_reply(reply)
        return reply

    def _keep(self, slot: tuple[str, str], request_print: str, reply: p.Reply) -> Op:
        """Remember ``reply`` in memory now and return its write (for the change's own transaction)."""
        outcome = self._outcome(slot, request_print, reply)
        self.books.outcomes[slot] = outcome
        return put_outcome(outcome)

    def _keep_refusal(self, slot: tuple[str, str], request_print: str, error: p.Error) -> None:
        outcome = self.books.outcomes[slot] = self._outcome(slot, request_print, error)
        refused = self._refusals.setdefault(slot[0], deque())
        refused.append(outcome)
        if len(refused) > REFUSALS_KEPT:
            oldest = refused.popleft()
            if self.books.outcomes.get((oldest.scope, oldest.key)) is oldest:  # not forgotten or reloaded since
                del self.books.outcomes[(oldest.scope, oldest.key)]

    @staticmethod
    def _outcome(slot: tuple[str, str], request_print: str, reply: p.Reply) -> Outcome:
        reply = msgspec.structs.replace(reply, id=0)
        return Outcome(slot[0], slot[1], request_print, _encoder.encode(reply), time.time())

    async def forget_old(self, now: float) -> None:
        """Drop outcomes older than ``KEEP_OUTCOMES``: their clients have long stopped asking.

        ``books.outcomes`` is in the order they were made (and loaded), so only its oldest are looked at.
        """
        before = now - KEEP_OUTCOMES
        books = self.books
        oldest = next(iter(books.outcomes.values()), None)
        if oldest is None or oldest.created >= before:
            return

        def mutate() -> Change[None]:
            while (o := next(iter(books.outcomes.values()), None)) is not None and o.created < before:
                del books.outcomes[(o.scope, o.key)]
            return Change(None, [forget_outcomes(before)])

        await books.apply(Actor("operator", books.operator_id), "forget old outcomes", mutate)
