"""One operator's server: accept, handshake, route to role sessions, keep time.

The server owns the registry (state), the store (durability), the links to its
connected charge points, and the background sweeper that expires no-shows and
stops sessions whose slot has ended.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from evcharge.domain.clock import SimClock, to_datetime
from evcharge.domain.model import Reservation
from evcharge.domain.world import World
from evcharge.operator.handlers import (
    MAX_IN_FLIGHT,
    PUSH_BUFFER_LIMIT,
    OperatorSession,
    PeerSession,
    Session,
    StationSession,
    VehicleSession,
)
from evcharge.operator.registry import Actor, Registry
from evcharge.operator.store import Store, put_meta
from evcharge.operator.trips.federation import Federation
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce, peer_proof, same_secret
from evcharge.wire.connection import WRITE_TIMEOUT, Connection, ConnectionClosed
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
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
        max_connections: int = MAX_CONNECTIONS,
        listen: Sequence[Listen] = (),
        tls: TlsFiles | None = None,
        frame_timeout: float | None = FRAME_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        push_buffer_limit: int = PUSH_BUFFER_LIMIT,
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
        self.max_connections = max_connections
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.max_in_flight = max_in_flight
        self.push_buffer_limit = push_buffer_limit
        self.store = Store(data_dir / f"{operator_id}.sqlite3", max_bytes=store_max_bytes)
        self._time_scale = time_scale
        self._clock_anchor = clock_anchor
        self.clock = SimClock(time_scale)
        self.registry = Registry(world, operator_id, self.store, self.clock)
        self.registry.listeners.append(self)
        self.federation = Federation(self) if len(world.operators) > 1 else None
        if self.federation is not None:
            federation = self.federation
            self.registry.reload_hooks.append(lambda state: federation.load(state.trips))
        self.sessions: set[Session] = set()
        self.stations_online: dict[str, StationSession] = {}
        self.vehicles_online: dict[str, set[VehicleSession]] = {}
        self.operators_online: set[OperatorSession] = set()  # monitors and inspectors get every push
        self._listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._ending: set[str] = set()  # reservations whose session is being ended
        self._starting: set[str] = set()  # reservations whose charge point is being started
        self._stopping = False
        self.requests_served = 0

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        state = self.store.open()
        self.clock = self._continue_clock(state.meta)
        self.registry.clock = self.clock
        self.registry.load(state)
        if self.federation is not None:
            self.federation.load(state.trips)
        self.store.start()
        await self.store.commit(
            [
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
            opened = await asyncio.start_server(
                functools.partial(self._accept, i), listener.host, listener.port, limit=p.MAX_FRAME, **tls
            )
            self._listeners.append(opened)
            self.listen[i] = replace(listener, port=opened.sockets[0].getsockname()[1])
        self.port = self.listen[0].port
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self.federation is not None:
            self.federation.start()
        live = sum(1 for r in self.registry.reservations.values() if r.live)
        log.info(
            "operator %s (%s) listening on %s; %d stations, %d charge points, %d live reservations; time x%g, now %s",
            self.operator.id,
            self.operator.name,
            " ".join(listener.describe() for listener in self.listen),
            len(self.registry.stations),
            len(self.registry.charge_points),
            live,
            self.clock.time_scale,
            self.clock.now_dt().isoformat(timespec="seconds"),
        )

    def _continue_clock(self, meta: dict[str, str]) -> SimClock:
        """Simulated time carries on from where the store left it (or from a shared anchor)."""
        if self._clock_anchor is not None:
            # Federated servers share an anchor so they agree on simulated time.
            return SimClock(self._time_scale, anchor_sim=self._clock_anchor, anchor_real=self._clock_anchor)
        if "clock_anchor_sim" not in meta:
            return SimClock(self._time_scale)
        stored = SimClock(
            float(meta["time_scale"]),
            anchor_sim=float(meta["clock_anchor_sim"]),
            anchor_real=float(meta["clock_anchor_real"]),
        )
        return stored.rescaled(self._time_scale)

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
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await asyncio.gather(*(s.wait_idle() for s in list(self.sessions)))
        except TimeoutError:
            log.warning("requests still running after %s s; closing anyway", SHUTDOWN_GRACE)
        await asyncio.gather(*(s.conn.close() for s in list(self.sessions)), return_exceptions=True)
        await asyncio.gather(*self._handshakes, *self._background, return_exceptions=True)
        for listener in self._listeners:
            await listener.wait_closed()
        await self.registry.stop()
        await self.store.close()
        log.info("operator %s stopped", self.operator.id)

    # --- accepting and handshake ---------------------------------------------------

    async def _accept(self, listener: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handshakes) >= self.max_connections:
            # Connections that have not said Hello yet count too: silent or trickling ones
            # must not exhaust our file descriptors before their Hello deadline cuts them off.
            log.warning("%d handshakes pending; dropping a new connection", len(self._handshakes))
            writer.transport.abort()
            return
        self._handshakes.add(task)
        conn = Connection(reader, writer)
        conn.frame_timeout = self.frame_timeout
        conn.write_timeout = self.write_timeout
        try:
            session = await self._handshake(conn, self.listen[listener], writer.get_extra_info("peercert"))
        except asyncio.CancelledError:
            await conn.close()
            raise
        finally:
            self._handshakes.discard(task)
        if session is not None:
            await session.run()

    async def _handshake(self, conn: Connection, listener: Listen, peercert: dict[str, Any] | None) -> Session | None:
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
                if len(self.sessions) >= self.max_connections:
                    raise UnavailableError(f"too many connections (at most {self.max_connections}); try again later")
                if hello.role == "peer" and self.operator.peer_tls and listener.security != "mtls":
                    # Every operator has every secret: only a certificate tells B from C.
                    raise ForbiddenError("peers of this operator connect over mutual TLS, on its peer port")
                if hello.role == "peer":
                    # On a +mtls listener the TLS layer has verified the certificate already.
                    names = certificate_names(peercert) if listener.security == "mtls" else None
                    session, request_id = await self._authenticate_peer(conn, hello, names)
                else:
                    session = self._authenticate(conn, hello)
        except EvchargeError as exc:
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
        await conn.send(
            p.Welcome(
                id=request_id,
                version=p.PROTOCOL_VERSION,
                operator_id=self.operator.id,
                operator_name=self.operator.name,
                server_time=self.clock.now_dt(),
                time_scale=self.clock.time_scale,
            )
        )
        self._register(session)
        log.info("%s connected", session)
        return session

    def _authenticate(self, conn: Connection, hello: p.Hello) -> Session:
        denied = UnauthorizedError(f"{hello.role} {hello.ident!r}: unknown identity or wrong credential")
        match hello.role:
            case "vehicle":
                vehicle = next((v for v in self.world.vehicles if v.id == hello.ident), None)
                if vehicle is None or not same_secret(vehicle.token, hello.credential):
                    raise denied
                if vehicle.home != self.operator.id:
                    raise ForbiddenError(f"vehicle {vehicle.id} belongs to operator {vehicle.home}; connect there")
                return VehicleSession(self, conn, vehicle.id)
            case "station":
                cp = self.registry.charge_points.get(hello.ident)
                if cp is None or not same_secret(cp.config.secret, hello.credential):
                    raise denied
                session = StationSession(self, conn, cp.config.id)
                session.idle_timeout = 3 * self.world.rules.heartbeat_s
                return session
            case "operator":
                if hello.ident != self.operator.id or not same_secret(self.operator.secret, hello.credential):
                    raise denied
                return OperatorSession(self, conn, self.operator.id)
        raise BadRequestError(f"unknown role {hello.role!r}")

    async def _authenticate_peer(
        self, conn: Connection, hello: p.Hello, certificate_names: list[str] | None
    ) -> tuple[Session, int]:
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
        answer = await conn.receive()
        expected = peer_proof(peer.secret, "client", hello.credential, nonce, peer.id)
        if not isinstance(answer, p.PeerProof) or not same_secret(expected, answer.proof):
            raise UnauthorizedError(f"peer {peer.id}: wrong proof")
        return PeerSession(self, conn, peer.id), answer.id

    def _register(self, session: Session) -> None:
        self.sessions.add(session)
        if isinstance(session, StationSession):
            old = self.stations_online.get(session.ident)
            if old is not None:
                log.info("%s replaces an older connection of the same charge point", session)
                old.conn.abort()
            self.stations_online[session.ident] = session
            self.registry.set_online(session.ident, True)
        elif isinstance(session, VehicleSession):
            self.vehicles_online.setdefault(session.ident, set()).add(session)
        elif isinstance(session, OperatorSession):
            self.operators_online.add(session)

    def forget(self, session: Session) -> None:
        """A session's connection closed."""
        self.sessions.discard(session)
        log.info("%s disconnected", session)
        if isinstance(session, StationSession) and self.stations_online.get(session.ident) is session:
            del self.stations_online[session.ident]
            self.registry.set_online(session.ident, False)
            cp = self.registry.charge_points[session.ident]
            if cp.charging is not None and not self._stopping:
                # A vanished charge point must not leave a session open forever.
                self._spawn(self._end_session(cp.charging, None, "charge point went offline"))
        elif isinstance(session, OperatorSession):
            self.operators_online.discard(session)
        elif isinstance(session, VehicleSession):
            peers = self.vehicles_online.get(session.ident)
            if peers is not None:
                peers.discard(session)
                if not peers:
                    del self.vehicles_online[session.ident]

    def federation_or_refuse(self) -> Federation:
        if self.federation is None:
            raise UnavailableError(f"operator {self.operator.id} is not federated with anyone")
        return self.federation

    # --- charging, which needs both the registry and the charge point's link -------

    async def start_charging(self, actor: Actor, reservation_id: str) -> p.ReservationInfo:
        async with self.registry.lock.reader_lock:
            r, cp = self.registry.check_can_start(actor, reservation_id)
        station = self.stations_online.get(cp.config.id)
        if station is None:
            raise UnavailableError(f"charge point {cp.config.id} is offline")
        if reservation_id in self._starting:
            raise ConflictError(f"reservation {reservation_id} is already being started")
        self._starting.add(reservation_id)
        try:
            await station.command(p.RemoteStart(reservation_id=r.id, vehicle_id=r.vehicle_id, until=to_datetime(r.end)))
            r = await self.registry.begin_charging(actor, reservation_id)
        except EvchargeError:
            # The charge point may have started (a lost or late answer) while we record
            # nothing: make sure it stops again -- unless a session is recorded after all
            # (the charge point started it itself for the same driver).
            if self.registry.reservations[reservation_id].state != "charging":
                self._spawn(self._command_quietly(station, p.RemoteStop(reservation_id=reservation_id)))
            raise
        finally:
            self._starting.discard(reservation_id)
        return self.registry.reservation_info(r)

    async def charging_started(self, actor: Actor, reservation_id: str) -> p.ReservationInfo:
        """A charge point started a session itself, for a driver it authorized: no RemoteStart."""
        if reservation_id in self._starting:
            raise ConflictError(f"reservation {reservation_id} is already being started")
        self._starting.add(reservation_id)
        try:
            r = await self.registry.begin_charging(actor, reservation_id)
        finally:
            self._starting.discard(reservation_id)
        return self.registry.reservation_info(r)

    async def stop_charging(self, actor: Actor, reservation_id: str) -> p.ReservationInfo:
        async with self.registry.lock.reader_lock:
            r = self.registry.check_charging(actor, reservation_id)
        r = await self._end_session(r.id, actor, "stopped by vehicle")
        return self.registry.reservation_info(r)

    async def _end_session(self, reservation_id: str, actor: Actor | None, reason: str) -> Reservation:
        """Stop the charge point if it is there, then record the final reading."""
        if reservation_id in self._ending:
            raise ConflictError(f"reservation {reservation_id} is already being stopped")
        self._ending.add(reservation_id)
        try:
            return await self._stop_and_record(reservation_id, actor, reason)
        finally:
            self._ending.discard(reservation_id)

    async def _stop_and_record(self, reservation_id: str, actor: Actor | None, reason: str) -> Reservation:
        r = self.registry.reservations[reservation_id]
        kwh: float | None = None
        station = self.stations_online.get(r.charge_point_id)
        if station is not None:
            try:
                report = await station.command(p.RemoteStop(reservation_id=reservation_id))
                if isinstance(report, p.SessionReport):
                    kwh = report.kwh
            except EvchargeError as exc:
                log.warning("stopping %s on %s: %s; using the last meter value", reservation_id, station, exc)
        return await self.registry.complete_charging(
            actor or Actor("operator", self.operator.id), reservation_id, kwh, reason
        )

    async def _command_quietly(self, station: StationSession, request: p.Request) -> None:
        try:
            await station.command(request)
        except EvchargeError as exc:
            log.warning("%s: %s failed: %s", station, type(request).__name__, exc)

    async def charge_point_reported(self, actor: Actor, status: p.ReportedStatus, info: str) -> None:
        self.registry.set_reported(actor.ident, status)
        cp = self.registry.charge_points[actor.ident]
        if status != "available" and cp.charging is not None:
            what = "fault" if status == "faulted" else "unavailable"
            await self.registry.complete_charging(actor, cp.charging, None, f"charge point {what}: {info}".strip())

    def meter_value(self, cp_id: str, reservation_id: str, kwh: float) -> None:
        session = self.registry.record_meter(cp_id, reservation_id, kwh)
        if session is not None:
            event = p.ChargingProgress(reservation_id=reservation_id, kwh=session.kwh, cost=session.cost)
            for vehicle in self.vehicles_online.get(session.vehicle_id, ()):
                vehicle.push(event)

    # --- pushes (the registry calls these after a change is durable) ----------------

    def reservation_changed(self, reservation: Reservation, reason: str) -> None:
        event = p.ReservationChanged(reservation=self.registry.reservation_info(reservation), reason=reason)
        for vehicle in self.vehicles_online.get(reservation.vehicle_id, ()):
            vehicle.push(event)
        station = self.stations_online.get(reservation.charge_point_id)
        if station is not None:  # a gateway turns these into its charge point's reservations
            station.push(event)
        self.push_to_operators(event)

    def connection_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in self.sessions:
            counts[session.role] = counts.get(session.role, 0) + 1
        return counts

    def trip_changed(self, trip: p.TripInfo, reason: str) -> None:
        event = p.TripChanged(trip=trip, reason=reason)
        for vehicle in self.vehicles_online.get(trip.vehicle_id, ()):
            vehicle.push(event)
        self.push_to_operators(event)

    def push_to_operators(self, event: p.Event) -> None:
        for session in self.operators_online:
            session.push(event)

    def charge_point_changed(self, cp_id: str) -> None:
        cp = self.registry.charge_points[cp_id]
        event = p.ChargePointChanged(
            station_id=cp.station.id,
            charge_point_id=cp_id,
            status=self.registry.status_of(cp, self.clock.now()),
        )
        self.push_to_operators(event)

    # --- background work ------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.registry.expire_no_shows()
                for r in self.registry.overdue_sessions():
                    if r.id not in self._ending:
                        self._spawn(self._end_session(r.id, None, "reservation ended"))
            except EvchargeError as exc:
                log.warning("sweep: %s", exc)
            except Exception:
                log.exception("sweep failed; trying again next round")

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _logged(work: Coroutine[Any, Any, Any]) -> None:
    try:
        await work
    except EvchargeError as exc:
        log.warning("background work failed: %s", exc)
