"""The Python client: one typed coroutine per request.

    async with connect(host, port, role="vehicle", ident="V01", secret="...") as c:
        nearest = await c.find_nearest(-5.79, -35.21)

Requests are pipelined over one connection (call them concurrently with
``asyncio.gather``); an ``Error`` reply is raised as the matching
``EvchargeError`` subclass. Events pushed by the server go to the callbacks in
``on_event``; a charge point's commands from the server go to ``on_request``.
A client that should stay connected is kept by a ``Link`` (evcharge.links.link).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

from evcharge.links.requests import Requests
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce, peer_proof, same_secret
from evcharge.wire.connection import DEFAULT_REQUEST_TIMEOUT, Connection, ConnectionClosed, Responder, open_connection
from evcharge.wire.errors import (
    BadRequestError,
    ConnectionLostError,
    EvchargeError,
    ForbiddenError,
    RequestTimeoutError,
    UnauthorizedError,
    UnavailableError,
    error_from_reply,
)
from evcharge.wire.protocol import FrameTooLarge, UndecodableMessage
from evcharge.wire.tls import describe_ssl_failure

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p.Reply)
RequestHandler = Callable[[p.Request], Awaitable[p.Reply]]
EventHandler = Callable[[p.Event], None]


class Client(Requests, Responder):
    def __init__(self, conn: Connection, welcome: p.Welcome, *, timeout: float) -> None:
        self.conn = conn
        self.welcome = welcome
        self.timeout = timeout
        self.on_event: list[EventHandler] = []
        self.on_request: RequestHandler | None = None
        self._welcomed_at = time.monotonic()
        self._reader: asyncio.Task[None] | None = None
        self._position_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @property
    def time_scale(self) -> float:
        return self.welcome.time_scale

    def server_now(self) -> datetime:
        """The server's simulated time, estimated from the handshake."""
        elapsed = (time.monotonic() - self._welcomed_at) * self.welcome.time_scale
        return self.welcome.server_time + timedelta(seconds=elapsed)

    def __str__(self) -> str:
        return f"link to {self.welcome.operator_id} ({self.conn.peername})"

    def _start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            await self.conn.serve(self)
        finally:
            self.closed.set()

    async def handle(self, request: p.Request) -> p.Reply:
        if self.on_request is None:
            raise ForbiddenError(f"this client does not accept {type(request).__name__}")
        return await self.on_request(request)

    def handle_event(self, event: p.Event) -> None:
        for handler in list(self.on_event):
            handler(event)

    async def close(self) -> None:
        if self._position_task is not None:
            self._position_task.cancel()
            await asyncio.gather(self._position_task, return_exceptions=True)
        await self.conn.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.conn.cancel_serving()

    async def call(
        self, request: p.Request, expect: type[R], timeout: float | None = None, *, again_until: float | None = None
    ) -> R:
        """One request over this one connection (``again_until`` is for a ``Link``: a lost reply is raised here)."""
        reply = await self.conn.request(request, timeout=timeout or self.timeout)
        if not isinstance(reply, expect):
            raise BadRequestError(f"expected {expect.__name__} in reply, got {type(reply).__name__}")
        return reply

    async def heartbeat(self) -> datetime:
        return (await self.call(p.Heartbeat(), p.HeartbeatAck)).server_time

    async def update_position(self, lat: float, lon: float) -> None:
        await self.call(p.UpdatePosition(lat=lat, lon=lon), p.Ok)

    def report_position(self, where: Callable[[], tuple[float, float]], every: float = 60.0) -> None:
        """Send ``where()`` now and then every ``every`` seconds until the client closes."""
        if self._position_task is not None:
            self._position_task.cancel()
        self._position_task = asyncio.get_running_loop().create_task(self._report_position(where, every))

    async def _report_position(self, where: Callable[[], tuple[float, float]], every: float) -> None:
        while not self.closed.is_set():
            try:
                await self.update_position(*where())
            except ConnectionLostError:
                return
            except EvchargeError as exc:
                log.warning("position update failed: %s", exc.message)
            await asyncio.sleep(every)

    def send_meter(self, reservation_id: str, kwh: float) -> None:
        self.conn.write_nowait(p.MeterValues(reservation_id=reservation_id, kwh=kwh))


async def open_client(
    host: str,
    port: int,
    *,
    role: p.Role,
    ident: str,
    secret: str,
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Client:
    """Connect and say Hello; the caller must ``close()`` the client.

    With ``ssl_context`` the connection is TLS, and the server's certificate must
    name ``server_hostname`` (default: ``host``).
    """
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls = {"ssl": ssl_context, "server_hostname": server_hostname, "ssl_handshake_timeout": timeout}
    try:
        async with asyncio.timeout(timeout):
            writer = await open_connection(host, port, **tls)
    except TimeoutError:
        raise RequestTimeoutError(f"could not connect to {host}:{port} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        # The server is not who it should be: as with a wrong peer proof, refuse it.
        raise UnauthorizedError(
            f"TLS: {host}:{port} is not {server_hostname or host}: {describe_ssl_failure(exc)}"
        ) from None
    except ssl.SSLError as exc:
        raise UnavailableError(f"TLS handshake with {host}:{port} failed: {describe_ssl_failure(exc)}") from None
    except OSError as exc:
        raise UnavailableError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    conn = Connection(writer)
    try:
        # A peer sends a nonce, never its secret (see evcharge.wire.auth).
        nonce = new_nonce() if role == "peer" else ""
        hello = p.Hello(version=p.PROTOCOL_VERSION, role=role, ident=ident, credential=nonce or secret)
        hello.id = 1
        await conn.send(hello)
        reply = await _handshake_reply(conn, host, port, timeout, over_tls=ssl_context is not None)
        if isinstance(reply, p.PeerChallenge):
            if not same_secret(peer_proof(secret, "server", nonce, reply.nonce, ident), reply.proof):
                raise UnauthorizedError(f"{host}:{port} could not prove it knows operator {ident}'s secret")
            answer = p.PeerProof(proof=peer_proof(secret, "client", nonce, reply.nonce, ident))
            answer.id = 2
            await conn.send(answer)
            reply = await _handshake_reply(conn, host, port, timeout, over_tls=ssl_context is not None)
        if not isinstance(reply, p.Welcome):
            raise BadRequestError(f"expected Welcome, got {type(reply).__name__}")
    except BaseException:
        await conn.close()
        raise
    client = Client(conn, reply, timeout=timeout)
    client._start()
    return client


async def _handshake_reply(conn: Connection, host: str, port: int, timeout: float, *, over_tls: bool) -> p.Message:
    try:
        reply = await conn.receive(timeout=timeout)
    except TimeoutError:
        raise RequestTimeoutError(f"{host}:{port} did not answer the handshake within {timeout:g} s") from None
    except (ConnectionClosed, UndecodableMessage, FrameTooLarge) as exc:
        # The likeliest reasons, as a hint: with TLS 1.3 a server refuses a client certificate
        # only after our side of the TLS handshake is done, and asyncio sends no alert saying
        # why; a TLS listener cannot answer a client that does not speak TLS at all.
        if over_tls:
            hint = "if it requires client certificates, show one it trusts (--tls-cert)"
        else:
            hint = "if it is a TLS listener, connect with TLS (--tls-ca)"
        raise ConnectionLostError(f"{host}:{port} closed the connection during the handshake ({hint})") from exc
    if isinstance(reply, p.Error):
        raise error_from_reply(reply)
    return reply


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    role: p.Role,
    ident: str,
    secret: str,
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[Client]:
    client = await open_client(
        host,
        port,
        role=role,
        ident=ident,
        secret=secret,
        timeout=timeout,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
    )
    try:
        yield client
    finally:
        await client.close()
