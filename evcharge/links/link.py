"""A link to one server that stays up: the one reconnect loop every client uses.

``Link.run()`` connects (TLS when given a context), says Hello, and then keeps
the connection: a heartbeat goes out whenever nothing else was sent for a while
(the server closes connections idle longer than the ``idle_timeout`` its
``Welcome`` names), and at once when a call timed out, so that a link whose
packets vanish is found and replaced. A lost link is re-opened with backoff,
reset once a connection has come up and ``on_up`` (a catalog to fetch, a state
to send; calls may already use the link) has succeeded. ``on_down`` hears why
a link went down, and each new reason an attempt to connect failed. A refusal
of who we are (``unauthorized``, ``forbidden``, ``unsupported_version``) ends
``run()`` with that error: retrying cannot fix it, and someone has to look --
unless ``retry_refused`` (a peer operator may fix its side while we wait).
A server that closes the link saying why (it was replaced by a newer
connection of the same charge point: ``conflict``) is heard, and with
``replaced_is_final`` that ends ``run()`` too, so two clients speaking for one
charge point do not take it from each other forever.

The model is nats.py's reconnect, written once with callbacks, and redis-py's
``Backoff`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from evcharge.domain.world import OperatorConfig
from evcharge.links.client import Client, open_client
from evcharge.links.requests import Requests
from evcharge.wire import protocol as p
from evcharge.wire.connection import DEFAULT_REQUEST_TIMEOUT
from evcharge.wire.errors import (
    ConnectionLostError,
    EvchargeError,
    OutcomeUnknownError,
    RequestTimeoutError,
    UnavailableError,
    error_from_reply,
)

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p.Reply)

HEARTBEAT = 30.0  # real seconds of sending nothing before a heartbeat (sooner if the server's idle timeout is short)
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0
# Refusals a retry cannot fix: the credentials, the role on this port, the protocol version.
REFUSALS = frozenset({"unauthorized", "forbidden", "unsupported_version"})


class Backoff:
    """Delays between reconnection attempts: doubling from ``first`` up to ``cap``, with jitter."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.8, 1.2))
        self.delay = min(self.delay * 2, self.cap)


ANSWER_DEADLINE = 30.0  # real seconds a request whose reply was lost is asked for again


def world_fallbacks(operator: OperatorConfig, host: str, port: int) -> list[tuple[str, int]]:
    """The operator's other addresses (its standby), when ``host:port`` is where its world file says it is.

    An address given by hand (``--server``) is taken alone.
    """
    return operator.fallbacks if (host, port) == (operator.host, operator.port) else []


class Link(Requests):
    def __init__(
        self,
        host: str,
        port: int,
        *,
        role: p.Role,
        ident: str,
        secret: str,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        heartbeat: float = HEARTBEAT,
        backoff: Backoff | None = None,
        on_up: Callable[[Client], Awaitable[None]] | None = None,
        on_down: Callable[[str], None] | None = None,
        retry_refused: bool = False,
        replaced_is_final: bool = False,
        name: str = "",
        what: str = "",
        answer_within: float = ANSWER_DEADLINE,
        fallbacks: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.host, self.port = host, port
        # Where the server may be, tried in turn (a standby that took over listens elsewhere).
        self.addresses: list[tuple[str, int]] = [(host, port), *(a for a in fallbacks if a != (host, port))]
        self.role, self.ident, self.secret = role, ident, secret
        self.ssl_context, self.server_hostname = ssl_context, server_hostname
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.backoff = backoff or Backoff()
        self.on_up = on_up
        self.on_down = on_down
        self.retry_refused = retry_refused
        self.replaced_is_final = replaced_is_final
        self.name = name or f"{role} {ident} -> {host}:{port}"  # for the log
        self.what = what or f"{host}:{port}"  # for users: who did not answer
        self.client: Client | None = None  # set while the link is up
        self.last_error = "not connected yet"
        self.last_seen: float | None = None  # wall-clock time of the last reply
        self.connects = 0  # times the link came up
        self.answer_within = answer_within
        self._tried = asyncio.Event()  # set once a first attempt to connect ended, either way
        self._suspect = asyncio.Event()
        self._is_up = asyncio.Event()  # set while self.client is

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self.client is not None and not self.client.closed.is_set()

    async def wait_up(self, timeout: float) -> Client:
        """The client once the link is up; ``UnavailableError`` if it is not within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._is_up.wait()
        except TimeoutError:
            raise UnavailableError(f"{self.what} is unreachable ({self.last_error})") from None
        assert self.client is not None  # set and cleared together with _is_up
        return self.client

    def server_now(self) -> datetime:
        client = self.client
        if client is None:
            raise UnavailableError(f"{self.what} is unreachable ({self.last_error})")
        return client.server_now()

    def answer_deadline(self, timeout: float | None = None) -> float | None:
        return asyncio.get_running_loop().time() + max(self.answer_within, timeout or 0.0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Link]:
        """The link kept up while in the block, once its first attempt to connect succeeded.

        For a one-shot command: a server that cannot be reached, or refuses us, is said at once.
        """
        task = asyncio.get_running_loop().create_task(self.run())
        tried = asyncio.ensure_future(self._tried.wait())
        try:
            await asyncio.wait({task, tried}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # refused: raised here
            if not self.up:
                raise UnavailableError(f"{self.what} is unreachable ({self.last_error})")
            yield self
        finally:
            tried.cancel()
            task.cancel()
            await asyncio.gather(task, tried, return_exceptions=True)
            await self.close()

    async def run(self) -> None:
        """Stay connected until cancelled, or until refused (that error is raised).

        Each address is tried in turn; a round that reached none backs off before the next.
        A connection that was up is sought again at the address it had.
        """
        at = 0
        while True:
            self.host, self.port = self.addresses[at]
            try:
                client = await open_client(
                    self.host,
                    self.port,
                    role=self.role,
                    ident=self.ident,
                    secret=self.secret,
                    timeout=self.timeout,
                    ssl_context=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
            except EvchargeError as exc:
                if exc.code in REFUSALS and not self.retry_refused:
                    self._failed(exc)
                    self._tried.set()
                    raise
                at = (at + 1) % len(self.addresses)
                if at != 0 and exc.code not in REFUSALS:
                    continue  # the next address at once: a round fails only once none answered
                self._failed(exc)
                self._tried.set()
                await self.backoff.sleep()
                continue
            self._down(await self._keep(client))
            farewell = client.conn.farewell
            if farewell is not None and farewell.code == "conflict" and self.replaced_is_final:
                raise error_from_reply(farewell)
            await self.backoff.sleep()  # a link that fails at once is not re-made in a tight loop

    async def _keep(self, client: Client) -> str:
        """Use one connection until it is lost; returns why it was."""
        reason = "connection closed"
        self.connects += 1
        self.client = client
        self._is_up.set()
        self._tried.set()
        self.last_seen = time.time()
        self.last_error = ""
        log.info("%s up", self.name)
        try:
            if self.on_up is not None:
                await self.on_up(client)
            self.backoff.reset()  # it worked: once this one goes, try again soon
            await self._keep_alive(client)
        except EvchargeError as exc:
            reason = exc.message
        except Exception:
            # A fault of ours must not leave this client without its server for good.
            log.exception("%s: failed; reconnecting", self.name)
            reason = "internal error (see the log)"
        finally:
            self.client = None
            self._is_up.clear()
            await client.close()
        if client.conn.farewell is not None:
            reason = client.conn.farewell.message  # the server said why it closed
        return reason

    async def _keep_alive(self, client: Client) -> None:
        """Heartbeat whenever nothing was sent for a while, or a call timed out; until closed."""
        every = self.heartbeat
        if client.welcome.idle_timeout > 0:
            every = min(every, client.welcome.idle_timeout / 3)
        loop = asyncio.get_running_loop()  # conn.last_sent is in the loop's clock
        self._suspect.clear()
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            while not closed.done():
                suspect = asyncio.ensure_future(self._suspect.wait())
                try:
                    while not (closed.done() or suspect.done()):
                        quiet = client.conn.last_sent + every - loop.time()
                        if quiet <= 0:
                            break
                        await asyncio.wait({closed, suspect}, timeout=quiet, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    suspect.cancel()
                if closed.done():
                    return
                self._suspect.clear()
                # A dead link (or one whose packets vanish: no FIN, no RST) fails this.
                await self.call(p.Heartbeat(), p.HeartbeatAck)
        finally:
            closed.cancel()
            await asyncio.gather(closed, return_exceptions=True)

    def _failed(self, exc: EvchargeError) -> None:
        if exc.message == self.last_error:
            return  # said once per new reason, not once per retry
        # A server that is not up yet is routine; one that refuses our credentials needs someone to look.
        level = logging.WARNING if exc.code in REFUSALS else logging.INFO
        log.log(level, "%s: %s", self.name, exc.message)
        self.last_error = exc.message
        if self.on_down is not None:
            self.on_down(exc.message)

    def _down(self, reason: str) -> None:
        self.last_error = reason
        log.warning("%s down (%s); reconnecting", self.name, reason)
        if self.on_down is not None:
            self.on_down(reason)

    async def call(
        self, request: p.Request, expect: type[R], timeout: float | None = None, *, again_until: float | None = None
    ) -> R:
        """One request over the link; ``UnavailableError`` when it is down or does not answer.

        With ``again_until`` (a time of the loop's clock) the request is one that may be sent
        again (it carries an idempotency key, or only reads): it waits for the link to come up,
        and a reply lost to a broken connection or a timeout is asked for again, until then.
        ``OutcomeUnknownError`` once it was sent and no answer came by the deadline.
        """
        if again_until is not None:
            return await self._call_until_answered(request, expect, timeout, again_until)
        client = self.client
        if client is None:
            raise UnavailableError(f"{self.what} is unreachable ({self.last_error})")
        try:
            reply = await client.call(request, expect, timeout=max(0.05, timeout or self.timeout))
        except EvchargeError as exc:
            if exc.code == "timeout" and client is self.client:
                self._suspect.set()  # test the link now, not at the next heartbeat
            if exc.code in ("timeout", "unavailable"):
                raise UnavailableError(f"{self.what} did not answer: {exc.message}") from None
            raise
        self.last_seen = time.time()
        return reply

    async def _call_until_answered(
        self, request: p.Request, expect: type[R], timeout: float | None, deadline: float
    ) -> R:
        loop = asyncio.get_running_loop()
        sent = False
        while True:
            left = deadline - loop.time()
            client = self.client
            if client is None and not sent:  # nothing sent, nothing done: say so at once
                raise UnavailableError(f"{self.what} is unreachable ({self.last_error})")
            if client is None:
                try:
                    client = await self.wait_up(max(0.0, left))
                except UnavailableError:
                    raise self._no_answer(request, self.last_error) from None
            try:
                reply = await client.call(request, expect, timeout=max(0.05, min(timeout or self.timeout, left)))
            except (ConnectionLostError, RequestTimeoutError) as exc:
                sent = True
                if isinstance(exc, RequestTimeoutError) and client is self.client:
                    self._suspect.set()
                if loop.time() >= deadline:
                    raise self._no_answer(request, exc.message) from None
                log.info("%s: %s lost (%s); asking again", self.name, type(request).__name__, exc.message)
                await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))  # the link notices a loss meanwhile
                continue
            self.last_seen = time.time()
            return reply

    def _no_answer(self, request: p.Request, why: str) -> EvchargeError:
        """No answer by the deadline: for a change, its outcome is not known; a question just went unanswered."""
        if getattr(request, "key", ""):
            return OutcomeUnknownError(f"{self.what} did not answer ({why}); whether it was done is not known yet")
        return UnavailableError(f"{self.what} did not answer ({why})")

    async def close(self) -> None:
        client = self.client
        if client is not None:
            await client.close()
