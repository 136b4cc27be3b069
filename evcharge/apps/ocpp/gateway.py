"""OCPP gateway: real charge points join an operator through it, in OCPP 1.6J or 2.0.1.

A charge point connects to ``ws://HOST:PORT/<charge point id>`` (``wss://`` when the gateway
has a certificate: OCPP security profile 2) with the subprotocol ``ocpp2.0.1`` or ``ocpp1.6``
and HTTP Basic auth (user = its id, password = its secret from the world file). Unknown ids
and bad credentials are refused at the handshake, each failure answered later than the one
before (``throttle``). For every connected charge point the gateway keeps one station-role
connection to the operator's server and translates both ways: ``v16`` and ``v201`` speak
each version, ``charge_point`` keeps the server's side, ``mapping`` has the tables, ``rpc``
the OCPP-J framing and error codes.

The OCPP side is the ``ocpp`` library over ``websockets``. A lost server link is re-made
with backoff; a charge point that loses the gateway reconnects by itself.
"""

from __future__ import annotations

import asyncio
import http
import logging
import ssl
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidHeader
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from evcharge.apps.ocpp import DEFAULT_PORT, v16, v201
from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.charge_point import ChargePointLink
from evcharge.apps.ocpp.throttle import LoginThrottle
from evcharge.domain.world import World
from evcharge.wire.auth import same_secret

log = logging.getLogger(__name__)

# The server's order is the preference: a charge point offering both speaks 2.0.1.
VERSIONS: dict[str, type[ChargePointLink]] = {
    v201.SUBPROTOCOL: v201.ChargePoint201,
    v16.SUBPROTOCOL: v16.ChargePoint16,
}
SUBPROTOCOLS = [Subprotocol(name) for name in VERSIONS]
MAX_MESSAGE = 256 * 1024  # OCPP messages are small; a bigger one closes that connection (1009)
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0


class Gateway:
    """The WebSocket server charge points connect to, and their links."""

    def __init__(
        self,
        world: World,
        operator_id: str,
        *,
        host: str | None = None,
        port: int = DEFAULT_PORT,
        server_host: str | None = None,
        server_port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        listener_ssl: ssl.SSLContext | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        """``ssl_context``: speak TLS to the server (its station listener is ``+tls`` or ``+mtls``),
        and check that its certificate names ``server_hostname`` (default: ``server_host``).
        ``listener_ssl``: charge points connect over TLS (``wss://``, security profile 2)."""
        self.world = world
        self.operator = world.operator(operator_id)
        self.host = host if host is not None else self.operator.host
        self.port = port
        self.server_host = server_host or self.operator.host
        self.server_port = server_port if server_port is not None else self.operator.port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.listener_ssl = listener_ssl
        self.throttle = throttle or LoginThrottle()
        self.heartbeat_s = world.rules.heartbeat_s
        self.charge_points = {cp.id: cp for s in world.stations_of(operator_id) for cp in s.charge_points}
        self.tags = m.IdTags(world.vehicles)
        self.links: dict[str, ChargePointLink] = {}
        self._ws: WebSocketServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def server_address(self) -> str:
        return f"{self.server_host}:{self.server_port}" + (" (tls)" if self.ssl_context is not None else "")

    async def start(self) -> None:
        self._ws = await serve(
            self._serve,
            self.host,
            self.port,
            subprotocols=SUBPROTOCOLS,
            process_request=self._check_handshake,
            ssl=self.listener_ssl,
            open_timeout=OPEN_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE,
            compression=None,  # small messages; no deflate state per charge point
        )
        self.port = next(iter(self._ws.sockets)).getsockname()[1]
        log.info(
            "OCPP gateway (%s) of operator %s on %s://%s:%d/<charge point id>, server %s; %d charge points known",
            " and ".join(SUBPROTOCOLS),
            self.operator.id,
            "wss" if self.listener_ssl is not None else "ws",
            self.host,
            self.port,
            self.server_address,
            len(self.charge_points),
        )

    async def stop(self) -> None:
        if self._ws is not None:
            self._ws.close()  # closes every charge point's WebSocket (1001 going away)
            await self._ws.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("OCPP gateway of operator %s stopped", self.operator.id)

    async def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse unknown charge points (404) and wrong credentials (401) before the upgrade.

        Each failure is answered later than the one before; attempts past what the throttle
        holds are turned away (429) without a look at their credentials.
        """
        cp_id = unquote(request.path.partition("?")[0].rstrip("/").rpartition("/")[2])
        cp = self.charge_points.get(cp_id)
        host = str(connection.remote_address[0]) if connection.remote_address else "?"
        retry_after = self.throttle.turned_away(cp.id if cp is not None else None, host)
        if retry_after is not None:
            response = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "too many failed logins; try later\n")
            response.headers["Retry-After"] = str(retry_after)
            return response
        if cp is None:
            await self.throttle.failed(None, host, "unknown charge point")
            return connection.respond(http.HTTPStatus.NOT_FOUND, "unknown charge point\n")
        header = request.headers.get("Authorization")
        try:
            user, password = parse_authorization_basic(header) if header is not None else ("", "")
        except InvalidHeader:
            user, password = "", ""
        if user != cp.id or not same_secret(cp.secret, password):
            await self.throttle.failed(cp.id, host, "wrong or missing credentials")
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "wrong or missing credentials\n")
            response.headers["WWW-Authenticate"] = build_www_authenticate_basic(f"evcharge {self.operator.id}")
            return response
        self.throttle.succeeded(cp.id)
        connection.username = cp.id
        return None

    async def _serve(self, websocket: ServerConnection) -> None:
        cp = self.charge_points[websocket.username]
        link = VERSIONS[websocket.subprotocol or v16.SUBPROTOCOL](self, cp, websocket)
        old = self.links.get(cp.id)
        self.links[cp.id] = link
        if old is not None:
            log.info("%s connected again; closing its older connection", link)
            old.retire()
            self._spawn(old.websocket.close(1000, "replaced by a newer connection"))
        log.info("%s connected from %s (OCPP %s)", link, websocket.remote_address, link.version)
        try:
            await link.run()
        finally:
            if self.links.get(cp.id) is link:
                del self.links[cp.id]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
