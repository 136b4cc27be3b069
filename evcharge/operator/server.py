"""One operator's server: listen, handshake and authenticate, hand each connection to its role's handler.

The server builds the operator's services (books, reservations, charging,
trips, pushes; see ``Services``), owns the listeners and the store's
lifecycle, keeps simulated time across restarts, and runs the sweeper that
expires no-shows and stops sessions whose slot has ended. What is done with a
message is the handlers' business (``handlers.py``), not the server's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from evcharge.domain.clock import SimClock
from evcharge.domain.world import World
from evcharge.operator.charging import Charging
from evcharge.operator.file_limit import CapLog, ConnectionCaps, connection_caps
from evcharge.operator.handlers import (
    PUSH_BUFFER_LIMIT,
    ChargePointHandler,
    OperatorToolHandler,
    PeerHandler,
    RoleHandler,
    VehicleHandler,
)
from evcharge.operator.outcomes import Outcomes
from evcharge.operator.pushes import Online
from evcharge.operator.reservations import Reservations
from evcharge.operator.services import Services
from evcharge.operator.state import Books
from evcharge.operator.store import DamagedStoreError, StoredState, put_meta, store_for
from evcharge.operator.store.integrity import problems
from evcharge.operator.store.sqlite import RESTORE, Store
from evcharge.operator.trips.federation import Federation
from evcharge.operator.trips.participant import Participant
from evcharge.operator.views import Views
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce, peer_proof, same_secret
from evcharge.wire.connection import MAX_IN_FLIGHT, WRITE_TIMEOUT, Connection, ConnectionClosed, start_server
from evcharge.wire.errors import (
    BadRequestError,
    ConnectionLostError,
    EvchargeError,
    ForbiddenError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedVersionError,
)
from evcharge.wire.protocol import FrameTooLarge, UndecodableMessage
from evcharge.wire.tls import (
    Listen,
    TlsFiles,
    certificate_names,
    client_context,
    every_role,
    names_include,
    server_context,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # real seconds a vehicle or operator may stay silent
MAX_CONNECTIONS = 20_000
FRAME_TIMEOUT = 30.0  # real seconds for a begun frame to arrive whole, after the handshake
SWEEP_INTERVAL = 0.5  # real seconds between no-show / overdue checks
SHUTDOWN_GRACE = 5.0
CLOCK_TOLERANCE = 2.0  # simulated seconds within which a given clock anchor continues the stored clock


class ClockMismatch(Exception):
    """A ``--clock-anchor`` that would move the simulated time its store's bookings were made in."""


class _Refused(Exception):
    """A handshake refused in answer to a later frame than the Hello (a peer's proof)."""

    def __init__(self, request_id: int, error: EvchargeError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


class Server:
    def __init__(
        self,
        world: World,
        operator_id: str,
        data_dir: Path,
        *,
        time_scale: float = 1.0,
        host: str | None = None,
        port: int | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        store_max_bytes: int | None = None,
        clock_anchor: float | None = None,
        max_connections: int | None = None,
        listen: Sequence[Listen] = (),
        tls: TlsFiles | None = None,
        frame_timeout: float | None = FRAME_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        push_buffer_limit: int = PUSH_BUFFER_LIMIT,
        store: str | None = None,
    ) -> None:
        self.world = world
        self.operator = world.operator(operator_id)
        self.host = host if host is not None else self.operator.host
        self.port = port if port is not None else self.operator.port
        # Without `listen`, one plaintext listener for every role at host:port, as always.
        self.listen: list[Listen] = list(listen) or [every_role(self.host, self.port)]
        self.host, self.port = self.listen[0].host, self.listen[0].port
        tls = tls or TlsFiles()
        # Built now, so a bad certificate stops the server before it opens anything.
        self._ssl: dict[str, ssl.SSLContext] = {
            security: server_context(tls, require_client_cert=security == "mtls")
            for security in {listener.security for listener in self.listen} - {"plain"}
        }
        # Our side of the links to peers that speak TLS: verify them, show our certificate.
        self.peer_ssl: ssl.SSLContext | None = None
        if any(op.peer_tls for op in world.operators if op.id != operator_id):
            self.peer_ssl = client_context(tls.ca, tls.cert, tls.key)
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        # Asked for, a cap the file limit cannot hold is worth a warning; by default it is just the cap.
        self.max_connections_asked = max_connections
        self.max_connections = max_connections or MAX_CONNECTIONS
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.max_in_flight = max_in_flight
        self.push_buffer_limit = push_buffer_limit
        # SQLite in data_dir, or the PostgreSQL database ``store`` names (--store, the world file, $EVCHARGE_STORE).
        self.store = store_for(store, data_dir, operator_id, max_bytes=store_max_bytes)
        self.store.on_lost = self._store_lost
        self.lost = asyncio.Event()  # another server of this operator took the store over: stop serving
        self._time_scale = time_scale
        self._clock_anchor = clock_anchor
        self.books = Books(world, operator_id, self.store, SimClock(time_scale))
        self.views = Views(self.books)
        self.online = Online(self.views)
        self.books.listeners.append(self.online)
        self.reservations = Reservations(self.books)
        self.charging = Charging(self.books, self.reservations, self.online)
        self.participant = Participant(self.books)
        self.outcomes = Outcomes(self.books)
        self.federation: Federation | None = None
        if len(world.operators) > 1:
            self.federation = Federation(world, self.views, self.participant, self.charging, self.online, self.peer_ssl)
        self.services = Services(
            world=world,
            operator=self.operator,
            books=self.books,
            views=self.views,
            reservations=self.reservations,
            charging=self.charging,
            participant=self.participant,
            outcomes=self.outcomes,
            online=self.online,
            federation=self.federation,
            push_buffer_limit=push_buffer_limit,
        )
        self._listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        # Connections not past their handshake, oldest first (the first to go when they are too many).
        self._handshakes: dict[asyncio.Task[None], Connection] = {}
        self._stopping = False
        # What the process's file limit lets it hold (set at start; until then --max-connections).
        self.caps = ConnectionCaps(self.max_connections, self.max_connections, 0, 0)
        self._handshakes_capped = CapLog()
        self._clients_capped = CapLog()

    @property
    def clock(self) -> SimClock:
        return self.books.clock

    @property
    def requests_served(self) -> int:
        return self.services.counters.requests_served

    def connection_counts(self) -> dict[str, int]:
        return self.online.counts()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (refusing one that must not be served from), then listen.

        A PostgreSQL store another server of this operator serves from is waited for here:
        a standby listens only once it holds the store (cancel ``start`` to give up).
        """
        try:
            state = await asyncio.to_thread(self.store.open)
        except asyncio.CancelledError:
            self.store.abandon()
            raise
        try:
            self._check_books(state)
        except DamagedStoreError:
            await self.store.close()
            raise
        self.books.clock = self._continue_clock(state.meta)
        self.books.load(state)
        self.store.start()
        self.caps = connection_caps(self.max_connections, peers=len(self.world.operators) - 1)
        capped = self.caps.clients < self.max_connections
        (log.warning if capped and self.max_connections_asked else log.info)(
            "%s%s", self.caps.describe(), f" (fewer than --max-connections {self.max_connections})" if capped else ""
        )
        await self.store.commit(
            [
                put_meta("operator_id", self.operator.id),
                put_meta("clock_anchor_sim", repr(self.clock.anchor_sim)),
                put_meta("clock_anchor_real", repr(self.clock.anchor_real)),
                put_meta("time_scale", repr(self.clock.time_scale)),
            ]
        )
        for i, listener in enumerate(self.listen):
            context = self._ssl.get(listener.security)
            tls: dict[str, Any] = {}
            if context is not None:
                # A TLS handshake has a deadline like the Hello after it.
                tls = {"ssl": context, "ssl_handshake_timeout": self.hello_timeout, "ssl_shutdown_timeout": 2.0}
            opened = await start_server(functools.partial(self._accept, i), listener.host, listener.port, **tls)
            self._listeners.append(opened)
            self.listen[i] = replace(listener, port=opened.sockets[0].getsockname()[1])
        self.port = self.listen[0].port
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self.federation is not None:
            self.federation.start()
        live = sum(1 for r in self.books.reservations.values() if r.live)
        log.info(
            "operator %s (%s) listening on %s; %d stations, %d charge points, %d live reservations; time x%g, now %s",
            self.operator.id,
            self.operator.name,
            " ".join(listener.describe() for listener in self.listen),
            len(self.books.stations),
            len(self.books.charge_points),
            live,
            self.clock.time_scale,
            self.clock.now_dt().isoformat(timespec="seconds"),
        )

    def _check_books(self, state: StoredState) -> None:
        """Refuse books that are not this operator's, or rows that cannot be what a server wrote."""
        where = f"store {self.store.where}"
        fix = "fix it with sqlite3 (or delete it)" if isinstance(self.store, Store) else "fix it with psql"
        owner = state.meta.get("operator_id", self.operator.id)
        if owner != self.operator.id:
            raise DamagedStoreError(
                f"{where} holds the books of operator {owner}, not {self.operator.id}: "
                f"give --operator {owner}, or the data directory of {self.operator.id}"
            )
        found = problems(state)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            restore = RESTORE if isinstance(self.store, Store) else "restore the database from its backup"
            raise DamagedStoreError(f"{where}: {found[0]}{more}: {fix}, or {restore}")

    def _continue_clock(self, meta: dict[str, str]) -> SimClock:
        """Simulated time carries on from where the store left it (or from a shared anchor)."""
        stored = None
        if "clock_anchor_sim" in meta:
            stored = SimClock(
                float(meta["time_scale"]),
                anchor_sim=float(meta["clock_anchor_sim"]),
                anchor_real=float(meta["clock_anchor_real"]),
            )
        if self._clock_anchor is None:
            return SimClock(self._time_scale) if stored is None else stored.rescaled(self._time_scale)
        # Federated servers share an anchor so they agree on simulated time.
        anchored = SimClock(self._time_scale, anchor_sim=self._clock_anchor, anchor_real=self._clock_anchor)
        if stored is not None and abs(anchored.now() - stored.now()) > CLOCK_TOLERANCE:
            # A new anchor would move every booking of the store to another moment ("expired ... in 51 min").
            raise ClockMismatch(
                f"{self.store.where} keeps simulated time at {stored.now_dt():%Y-%m-%d %H:%M}Z "
                f"(x{stored.time_scale:g}), "
                f"but --clock-anchor {self._clock_anchor:.0f} --time-scale {self._time_scale:g} would make it "
                f"{anchored.now_dt():%Y-%m-%d %H:%M}Z: give the anchor and time scale it was started with, "
                "or no --clock-anchor (its clock carries on), or another --data-dir"
            )
        return anchored

    def _store_lost(self) -> None:
        """Another server of this operator holds the store now: this one must not serve a moment longer."""
        if not self.lost.is_set():
            log.critical("operator %s: another server took over the store; stopping", self.operator.id)
            self.lost.set()
            for listener in self._listeners:
                listener.close()

    async def stop(self) -> None:
        """Stop accepting, finish requests in flight, close links, commit what is queued."""
        if self._stopping:
            return
        self._stopping = True
        log.info("operator %s shutting down", self.operator.id)
        for listener in self._listeners:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.federation is not None:
            await self.federation.stop()
        for task in list(self._handshakes):
            task.cancel()
        clients = list(self.online.everyone)
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await asyncio.gather(*(c.conn.wait_served() for c in clients))
        except TimeoutError:
            log.warning("requests still running after %s s; closing anyway", SHUTDOWN_GRACE)
        await asyncio.gather(*(c.conn.close() for c in clients), return_exceptions=True)
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await self.charging.close()
        self.online.close()
        for listener in self._listeners:
            await listener.wait_closed()
        await self.books.stop()
        await self.store.close()
        log.info("operator %s stopped", self.operator.id)

    # --- accepting and handshake ---------------------------------------------------

    async def _accept(self, listener: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(writer)
        conn.frame_timeout = self.frame_timeout
        conn.write_timeout = self.write_timeout
        if len(self._handshakes) >= self.caps.handshakes:
            # Silent or trickling connections must not use up our file descriptors before their
            # Hello deadline: the oldest goes, since a real client says Hello in milliseconds.
            oldest = next(iter(self._handshakes))
            self._handshakes.pop(oldest).abort()
            self._handshakes_capped.bit(
                asyncio.get_running_loop().time(),
                "%d connections in their handshake (the most the file limit allows): dropped the oldest",
                self.caps.handshakes,
            )
        self._handshakes[task] = conn
        try:
            handler = await self._handshake(conn, self.listen[listener], writer.get_extra_info("peercert"))
        except asyncio.CancelledError:
            await conn.close()
            raise
        finally:
            self._handshakes.pop(task, None)
        if handler is not None:
            await handler.run(self.max_in_flight, closed=self._forget)

    async def _handshake(
        self, conn: Connection, listener: Listen, peercert: dict[str, Any] | None
    ) -> RoleHandler | None:
        request_id = 0
        try:
            # One deadline for the whole handshake: trickling bytes does not extend it.
            async with asyncio.timeout(self.hello_timeout):
                try:
                    hello = await conn.receive()
                except UndecodableMessage as exc:
                    request_id = exc.request_id
                    raise BadRequestError(f"expected Hello: {exc.reason}") from None
                request_id = getattr(hello, "id", 0)
                if not isinstance(hello, p.Hello):
                    raise BadRequestError(f"expected Hello, got {type(hello).__name__}")
                if hello.version != p.PROTOCOL_VERSION:
                    raise UnsupportedVersionError(
                        f"protocol version {hello.version} is not supported (this server speaks {p.PROTOCOL_VERSION})"
                    )
                if not listener.accepts(hello.role):
                    roles = ", ".join(sorted(listener.roles))
                    raise ForbiddenError(f"this port is for {roles}, not {hello.role}; ask the operator for yours")
                if self._stopping:
                    raise UnavailableError("server is shutting down")
                if len(self.online) >= self.caps.clients:
                    self._clients_capped.bit(
                        asyncio.get_running_loop().time(), "%d clients connected: refusing more", self.caps.clients
                    )
                    raise UnavailableError(f"too many connections (at most {self.caps.clients}); try again later")
                if hello.role == "peer" and self.operator.peer_tls and listener.security != "mtls":
                    # Every operator has every secret: only a certificate tells B from C.
                    raise ForbiddenError("peers of this operator connect over mutual TLS, on its peer port")
                if hello.role == "peer":
                    # On a +mtls listener the TLS layer has verified the certificate already.
                    names = certificate_names(peercert) if listener.security == "mtls" else None
                    handler, request_id = await self._authenticate_peer(conn, hello, names)
                else:
                    handler = self._authenticate(conn, hello)
        except (EvchargeError, _Refused) as exc:
            if isinstance(exc, _Refused):
                request_id, exc = exc.request_id, exc.error
            log.info("handshake from %s refused: %s", conn.peername, exc.message)
            await conn.reply_error(request_id, exc)
            await conn.close()
            return None
        except FrameTooLarge as exc:
            await conn.reply_error(0, TooLargeError(str(exc)))
            await conn.close()
            return None
        except TimeoutError:
            log.info("no complete handshake from %s within %s s; closing", conn.peername, self.hello_timeout)
            await conn.close()
            return None
        except (ConnectionClosed, UndecodableMessage):
            await conn.close()
            return None
        welcome = p.Welcome(
            id=request_id,
            version=p.PROTOCOL_VERSION,
            operator_id=self.operator.id,
            operator_name=self.operator.name,
            server_time=self.clock.now_dt(),
            time_scale=self.clock.time_scale,
            idle_timeout=handler.idle_timeout or 0.0,
        )
        try:
            await conn.send(welcome)
        except ConnectionLostError:  # gone right after its Hello: nobody to welcome
            await conn.close()
            return None
        self.online.add(handler)
        log.info("%s connected", handler)
        return handler

    def _authenticate(self, conn: Connection, hello: p.Hello) -> RoleHandler:
        denied = UnauthorizedError(f"{hello.role} {hello.ident!r}: unknown identity or wrong credential")
        match hello.role:
            case "vehicle":
                vehicle = next((v for v in self.world.vehicles if v.id == hello.ident), None)
                if vehicle is None or not same_secret(vehicle.token, hello.credential):
                    raise denied
                if vehicle.home != self.operator.id:
                    raise ForbiddenError(f"vehicle {vehicle.id} belongs to operator {vehicle.home}; connect there")
                return VehicleHandler(self.services, conn, vehicle.id, idle_timeout=self.idle_timeout)
            case "station":
                cp = self.books.charge_points.get(hello.ident)
                if cp is None or not same_secret(cp.config.secret, hello.credential):
                    raise denied
                idle = 3 * self.world.rules.heartbeat_s
                return ChargePointHandler(self.services, conn, cp.config.id, idle_timeout=idle)
            case "operator":
                if hello.ident != self.operator.id or not same_secret(self.operator.secret, hello.credential):
                    raise denied
                return OperatorToolHandler(self.services, conn, self.operator.id, idle_timeout=self.idle_timeout)
        raise BadRequestError(f"unknown role {hello.role!r}")

    async def _authenticate_peer(
        self, conn: Connection, hello: p.Hello, certificate_names: list[str] | None
    ) -> tuple[RoleHandler, int]:
        """Challenge-response: the peer proves it knows its secret without sending it.

        Over mutual TLS its certificate must also be the claimed operator's: every operator
        has the world file, hence every secret, but only B holds B's certificate.
        """
        peer = next((op for op in self.world.operators if op.id == hello.ident), None)
        if peer is None or peer.id == self.operator.id or self.federation is None:
            raise UnauthorizedError(f"peer {hello.ident!r}: not an operator of this federation")
        if certificate_names is not None and not names_include(certificate_names, peer.certificate_name):
            raise UnauthorizedError(f"peer {peer.id}: its TLS certificate is not for {peer.certificate_name}")
        if len(hello.credential) < 16:
            raise BadRequestError("a peer's Hello carries its nonce as credential")
        nonce = new_nonce()
        proof = peer_proof(peer.secret, "server", hello.credential, nonce, peer.id)
        await conn.send(p.PeerChallenge(id=hello.id, nonce=nonce, proof=proof))
        try:
            answer = await conn.receive()
        except UndecodableMessage as exc:
            raise _Refused(exc.request_id, BadRequestError(f"expected PeerProof: {exc.reason}")) from None
        expected = peer_proof(peer.secret, "client", hello.credential, nonce, peer.id)
        if not isinstance(answer, p.PeerProof) or not same_secret(expected, answer.proof):
            # Answered with the id of what it sent last, as every refusal is.
            raise _Refused(getattr(answer, "id", 0), UnauthorizedError(f"peer {peer.id}: wrong proof"))
        return PeerHandler(self.services, conn, peer.id, idle_timeout=self.idle_timeout), answer.id

    def _forget(self, handler: RoleHandler) -> None:
        """A client's connection closed."""
        log.info("%s disconnected", handler)
        if self.online.remove(handler) and not self._stopping:
            self.charging.charge_point_went_away(handler.ident)

    # --- background work ------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.reservations.expire_no_shows()
                self.reservations.remind()
                self.charging.end_overdue()
                await self.outcomes.forget_old(time.time())
            except EvchargeError as exc:
                log.warning("sweep: %s", exc)
            except Exception:
                log.exception("sweep failed; trying again next round")
