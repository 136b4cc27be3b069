"""OCPP 1.6J gateway: real charge points join an operator through it.

A charge point connects to ``ws://HOST:PORT/<charge point id>`` with the subprotocol
``ocpp1.6`` and HTTP Basic auth (OCPP security profile 1: user = its id, password = its
secret from the world file). Unknown ids and bad credentials are refused at the handshake.
For every connected charge point the gateway keeps one station-role connection to the
operator's server and translates both ways (``ocpp_mapping`` has the tables):

* BootNotification, Heartbeat, StatusNotification -> the charge point's status;
* Authorize, StartTransaction, MeterValues, StopTransaction -> the vehicle's session;
* the server's reservations -> ReserveNow / CancelReservation, RemoteStart / RemoteStop ->
  RemoteStartTransaction / RemoteStopTransaction.

The OCPP side is the ``ocpp`` library over ``websockets``. A lost server link is re-made
with backoff; a charge point that loses the gateway reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import secrets
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from ocpp.exceptions import FormatViolationError, OCPPError, ProtocolError
from ocpp.exceptions import InternalError as OcppInternalError
from ocpp.messages import Call, CallError, MessageType, unpack
from ocpp.routing import on
from ocpp.v16 import ChargePoint as OcppChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.datatypes import IdTagInfo
from ocpp.v16.enums import (
    Action,
    AuthorizationStatus,
    DataTransferStatus,
    RegistrationStatus,
    RemoteStartStopStatus,
    ReservationStatus,
)
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from evcharge.apps.ocpp import DEFAULT_PORT
from evcharge.apps.ocpp import mapping as m
from evcharge.domain.model import LIVE_STATES
from evcharge.domain.world import ChargePointConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Link
from evcharge.wire import protocol as p
from evcharge.wire.auth import same_secret
from evcharge.wire.errors import (
    ConflictError,
    ConnectionLostError,
    EvchargeError,
    ForbiddenError,
    NotFoundError,
    RequestTimeoutError,
    UnavailableError,
)

log = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("ocpp1.6")
CONNECTOR = 1  # one of our charge points is one OCPP connector
# Deadlines (real seconds). The server waits 10 s for a charge point's answer to a command,
# so everything a command does at the charge point fits inside that.
OCPP_RESPONSE_TIMEOUT = 8.0  # a charge point's answer to one of our calls
COMMAND_DEADLINE = 9.0  # a whole RemoteStart / RemoteStop, including the StopTransaction awaited
RESERVE_RETRY = 5.0  # a ReserveNow the charge point could not take (Occupied...) is tried again
MAX_ORPHANS = 64  # transactions without a session that one connection stops
MAX_MESSAGE = 256 * 1024  # OCPP messages are small; a bigger one closes that connection (1009)
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0


@dataclass(slots=True)
class Transaction:
    """An OCPP transaction at the charge point: one charging session of one of our reservations."""

    reservation_id: str
    vehicle_id: str
    meter_start_wh: float | None  # None: learned from the first reading (we came in mid-session)
    kwh: float = 0.0
    # Set while the server's RemoteStop waits for this transaction's StopTransaction.
    stopped: asyncio.Future[float] | None = None


class ChargePointLink(OcppChargePoint):
    """One connected OCPP charge point and its station connection to the operator's server.

    The ``ocpp`` library handles one message of the charge point at a time, so a handler
    never calls the charge point itself (the answer could not be read): such calls run as
    tasks of their own.
    """

    def __init__(self, gateway: Gateway, config: ChargePointConfig, websocket: ServerConnection) -> None:
        super().__init__(config.id, websocket, response_timeout=OCPP_RESPONSE_TIMEOUT)
        self.gateway = gateway
        self.config = config
        self.websocket = websocket
        self.link = Link(
            gateway.server_host,
            gateway.server_port,
            role="station",
            ident=config.id,
            secret=config.secret,
            ssl_context=gateway.ssl_context,
            server_hostname=gateway.server_hostname,
            heartbeat=gateway.heartbeat_s,
            on_up=self._came_up,
            on_down=self._went_down,
            name=f"charge point {config.id}'s server link",
        )
        self.synced = False  # the server link is up and our copy of its reservations is current
        self.connectors: dict[int, tuple[str, str]] = {}  # connector id -> (OCPP status, details)
        self.reported: p.ReportedStatus | None = None  # what the server was last told
        self.reservations: dict[str, p.ReservationInfo] = {}  # the live ones on this charge point
        self.held_at_cp: dict[str, int] = {}  # reservation id -> OCPP reservationId the charge point took
        self.reserve_refused: set[str] = set()  # ReserveNow Rejected: the charge point does not reserve
        self.reserve_retry: dict[str, float] = {}  # reservation id -> monotonic time of the next try
        self.transactions: dict[int, Transaction] = {}
        # Reservation id -> vehicle, oldest first: RemoteStarts accepted, their StartTransaction to come.
        self.remote_starts: dict[str, str] = {}
        self.unsent: list[p.SessionComplete] = []  # ends of sessions the server has not heard yet
        self.orphans_stopped: set[int] = set()  # transactions with no session, already told to stop
        self._wake = asyncio.Event()  # reservations changed: look at ReserveNow again
        self._tasks: set[asyncio.Task[None]] = set()
        self._link: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return f"charge point {self.id}"

    # --- life -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the charge point until its WebSocket closes; then drop the server link."""
        self._link = self._spawn(self._keep_linked())
        workers = [self._link, self._spawn(self._keep_reserved())]
        try:
            await self.start()
        except ConnectionClosed as exc:
            log.info("%s disconnected (%s)", self, exc.rcvd or "no close frame")
        finally:
            for task in [*workers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*workers, *self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def retire(self) -> None:
        """A newer connection of the same charge point took over: let go of the server at once.

        Otherwise this link and the new one would each reconnect when the server drops the
        other, until this WebSocket had finished closing.
        """
        if self._link is not None:
            self._link.cancel()

    async def route_message(self, raw_msg: str | bytes) -> None:
        """One frame from the charge point. A malformed one is answered with a CallError, never fatal."""
        try:
            msg = unpack(raw_msg)
        except OCPPError as exc:
            await self._refuse_frame(raw_msg, exc)
            return
        except RecursionError:  # JSON arrays or objects nested too deeply for the decoder
            await self._refuse_frame(raw_msg, FormatViolationError(details={"cause": "nested too deeply"}))
            return
        if isinstance(msg, Call):
            if not (isinstance(msg.unique_id, str) and isinstance(msg.action, str) and isinstance(msg.payload, dict)):
                await self._refuse_frame(raw_msg, ProtocolError(details={"cause": "malformed Call"}))
                return
            try:
                await self._handle_call(msg)
            except OCPPError as exc:
                log.info("%s: %s refused: %s %s", self, msg.action, exc.code, exc.description)
                await self._send(msg.create_call_error(exc).to_json())
            except ConnectionClosed:
                raise
            except Exception:
                log.exception("%s: %s failed", self, msg.action)
                await self._send(msg.create_call_error(OcppInternalError()).to_json())
        elif msg.message_type_id in (MessageType.CallResult, MessageType.CallError) and self._call_lock.locked():
            self._response_queue.put_nowait(msg)
        else:
            # Nobody waits for it; queued, it would only confuse our next call.
            log.info("%s: dropped an answer to no call of ours", self)

    async def _refuse_frame(self, raw_msg: str | bytes, exc: OCPPError) -> None:
        unique_id = "-1"  # OCPP's id for "the message that could not be read"
        with contextlib.suppress(ValueError, TypeError, RecursionError):
            parsed = json.loads(raw_msg)
            if isinstance(parsed, list) and len(parsed) > 1 and isinstance(parsed[1], str):
                unique_id = parsed[1][:36]
        cause = str((exc.details or {}).get("cause", exc.description))[:200]
        log.info("%s: malformed frame refused: %s", self, cause)
        await self._send(CallError(unique_id, exc.code, cause, {}).to_json())

    # --- the server link ------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        return self.link.client

    async def _keep_linked(self) -> None:
        try:
            await self.link.run()
        except EvchargeError as exc:
            # Its credentials are the world file's, as ours: someone has to look at that file.
            log.error("%s: server %s refused it: %s; closing its WebSocket", self, self.link.address, exc.message)
            await self.websocket.close(code=1008, reason="refused by the operator's server")

    async def _came_up(self, client: Client) -> None:
        client.on_request = self._command
        client.on_event.append(self._on_event)
        await self._synchronize(client)
        log.info("%s: online at %s", self, self.gateway.server_address)

    def _went_down(self, reason: str) -> None:
        self.synced, self.reported = False, None

    async def _synchronize(self, client: Client) -> None:
        """After (re)connecting: tell the server what we know, learn what it has."""
        await self._report_status()
        while self.unsent:
            completion = self.unsent[0]
            try:
                await client.session_complete(completion.reservation_id, completion.kwh, completion.reason)
            except (ConnectionLostError, RequestTimeoutError):
                raise  # the link again: kept for the next try
            except EvchargeError as exc:
                log.warning("%s: server refused the end of %s: %s", self, completion.reservation_id, exc.message)
            self.unsent.pop(0)
        expected = set(self.remote_starts)  # a RemoteStart over this link while we ask is not stale
        self.reservations = {r.id: r for r in await client.reservations()}
        self.synced = True
        for rid in expected & set(self.remote_starts):
            # The server ended it while we were away, without a RemoteStop (it could not send
            # one): the StartTransaction it waited for must not become another session's.
            self._drop_remote_start_unless_current(rid)
        for tx_id, tx in list(self.transactions.items()):
            r = self.reservations.get(tx.reservation_id)
            if r is None or r.state != "charging":
                # The server ended the session while we were away: the charge point must stop too.
                del self.transactions[tx_id]
                self._stop_orphan(tx_id)
            elif tx.kwh > 0:
                client.send_meter(tx.reservation_id, tx.kwh)
        self._wake.set()

    def _on_event(self, event: p.Event) -> None:
        if not isinstance(event, p.ReservationChanged) or event.reservation.charge_point_id != self.id:
            return
        r = event.reservation
        if r.state in LIVE_STATES:
            self.reservations[r.id] = r
        else:
            self.reservations.pop(r.id, None)
        if r.state in ("charging", "completed"):
            self.held_at_cp.pop(r.id, None)  # a transaction ends the charge point's reservation itself
        if r.id in self.remote_starts:
            self._drop_remote_start_unless_current(r.id)  # ended (a fault, the slot's end) before it started
        self._wake.set()

    def _may_charge(self, reservation_id: str, vehicle_id: str) -> bool:
        """Whether the server's books (our copy) let this vehicle charge here on this reservation."""
        r = self.reservations.get(reservation_id)
        return r is not None and r.vehicle_id == vehicle_id and r.state in ("booked", "charging")

    def _drop_remote_start_unless_current(self, reservation_id: str) -> None:
        vehicle = self.remote_starts.get(reservation_id)
        if vehicle is not None and not self._may_charge(reservation_id, vehicle):
            del self.remote_starts[reservation_id]
            log.info("%s: no StartTransaction expected for %s any more: it has ended", self, reservation_id)

    def _asked_start(self, vehicle_id: str) -> str | None:
        """The reservation a StartTransaction of this vehicle answers the RemoteStart of, if any.

        The newest of its RemoteStarts whose reservation is still live here; only without one
        (our copy of the books may be behind) the newest at all.
        """
        asked = [rid for rid, v in self.remote_starts.items() if v == vehicle_id]
        current = [rid for rid in asked if self._may_charge(rid, vehicle_id)]
        return (current or asked)[-1] if asked else None

    async def _command(self, request: p.Request) -> p.Reply:
        match request:
            case p.RemoteStart(reservation_id=rid, vehicle_id=vehicle):
                return await self._remote_start(rid, vehicle)
            case p.RemoteStop(reservation_id=rid):
                return await self._remote_stop(rid)
        raise ForbiddenError(f"the OCPP gateway does not handle {type(request).__name__}")

    async def _remote_start(self, reservation_id: str, vehicle_id: str) -> p.Reply:
        if any(tx.reservation_id == reservation_id for tx in self.transactions.values()):
            return p.Ok()  # already started here
        request = call.RemoteStartTransaction(id_tag=m.id_tag(vehicle_id), connector_id=CONNECTOR)
        # Expected before it is asked for: a charge point may send StartTransaction right
        # behind its answer, and it is handled before this call returns. Asked again, it is
        # the newest.
        self.remote_starts.pop(reservation_id, None)
        self.remote_starts[reservation_id] = vehicle_id
        try:
            result = await self._call_for_server(request, COMMAND_DEADLINE)
            if result.status != RemoteStartStopStatus.accepted:
                raise ConflictError(f"charge point {self.id} rejected RemoteStartTransaction")
        except BaseException:
            self.remote_starts.pop(reservation_id, None)
            raise
        return p.Ok()

    async def _remote_stop(self, reservation_id: str) -> p.Reply:
        self.remote_starts.pop(reservation_id, None)  # a start still to come is not wanted any more
        tx_id = next((i for i, tx in self.transactions.items() if tx.reservation_id == reservation_id), None)
        r = self.reservations.get(reservation_id)
        if tx_id is None and r is not None and r.state == "charging":
            tx_id = m.ocpp_id(reservation_id)  # the server's session, one we have not seen a message of yet
        if tx_id is None:
            return p.SessionReport(reservation_id=reservation_id, kwh=0.0)
        tx = self.transactions.get(tx_id)
        deadline = asyncio.get_running_loop().time() + COMMAND_DEADLINE
        stopped: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if tx is not None:
            tx.stopped = stopped
        try:
            result = await self._call_for_server(call.RemoteStopTransaction(transaction_id=tx_id), COMMAND_DEADLINE)
            if tx is not None and result.status == RemoteStartStopStatus.accepted:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        # The final reading comes with the charge point's StopTransaction.
                        return p.SessionReport(reservation_id=reservation_id, kwh=await stopped)
            log.warning("%s: RemoteStopTransaction %d: %s", self, tx_id, result.status)
        except EvchargeError as exc:
            log.warning("%s: RemoteStopTransaction %d failed: %s", self, tx_id, exc.message)
        finally:
            if tx is not None:
                tx.stopped = None
        if tx is not None:
            # The server ends the session now all the same. Should the charge point go on,
            # its next reading names a transaction with no session, and it is told to stop.
            self.transactions.pop(tx_id, None)
        # The server keeps the highest reading it has seen, so 0 never lowers a session.
        return p.SessionReport(reservation_id=reservation_id, kwh=tx.kwh if tx is not None else 0.0)

    async def _call_for_server(self, request: Any, deadline_s: float) -> Any:
        """Call the charge point on the server's behalf; its failures become our typed errors."""
        name = type(request).__name__
        try:
            async with asyncio.timeout(deadline_s):
                return await self.call(request, suppress=False)
        except TimeoutError:
            raise RequestTimeoutError(f"charge point {self.id} did not answer {name}") from None
        except OCPPError as exc:
            raise ConflictError(f"charge point {self.id} refused {name}: {exc.code} {exc.description}") from None
        except ConnectionClosed:
            raise UnavailableError(f"charge point {self.id} went offline") from None

    async def _report_status(self) -> None:
        now = m.reported_status(self.connectors)
        client = self.client
        if now is None or client is None or now[0] == self.reported:
            return
        status, info = now
        try:
            await client.report_status(status, info if status != "available" else "")
        except EvchargeError as exc:
            log.warning("%s: reporting %s: %s", self, status, exc.message)  # sent again on reconnect
            return
        self.reported = status

    async def _complete(self, completion: p.SessionComplete) -> None:
        client = self.client
        if client is not None:
            try:
                await client.session_complete(completion.reservation_id, completion.kwh, completion.reason)
                return
            except (ConnectionLostError, RequestTimeoutError) as exc:
                log.info("%s: session end of %s kept for later: %s", self, completion.reservation_id, exc.message)
            except EvchargeError as exc:
                log.warning("%s: server refused the end of %s: %s", self, completion.reservation_id, exc.message)
                return
        self.unsent.append(completion)

    # --- reservations: ReserveNow and CancelReservation -----------------------------------

    async def _keep_reserved(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._reconcile_reservations()
            except ConnectionClosed:
                return
            except Exception:
                log.exception("%s: handing over reservations failed; trying again", self)
                delay = RESERVE_RETRY
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _reconcile_reservations(self) -> float | None:
        """Make the charge point hold the reservation that is due, and nothing else.

        Returns how long to sleep (real seconds) before the next look, None: until woken.
        """
        client = self.client
        if client is None or not self.synced:
            return None
        now = client.server_now()
        rules = self.gateway.world.rules
        live = list(self.reservations.values())
        wanted: dict[str, tuple[p.ReservationInfo, datetime]] = {}  # id -> (it, its expiry at the charge point)
        next_look: datetime | None = None
        for r in live:
            if r.state != "booked":
                continue
            due, deadline = m.reserve_window(r, live, rules)
            if due <= now < deadline:
                wanted[r.id] = (r, deadline)
            moment = due if now < due else deadline
            if moment > now:
                next_look = moment if next_look is None else min(next_look, moment)
        for rid, number in list(self.held_at_cp.items()):
            if rid not in wanted:
                del self.held_at_cp[rid]
                await self._cancel_at_cp(rid, number)
        retry_in: float | None = None
        for rid, (r, deadline) in wanted.items():
            if rid in self.held_at_cp or rid in self.reserve_refused:
                continue
            wait = self.reserve_retry.get(rid, 0.0) - time.monotonic()
            if wait > 0:
                retry_in = wait if retry_in is None else min(retry_in, wait)
                continue
            if not await self._reserve_at_cp(r, m.wall_clock(deadline, now, client.time_scale)):
                retry_in = RESERVE_RETRY if retry_in is None else min(retry_in, RESERVE_RETRY)
        for rid in [*self.reserve_retry, *self.reserve_refused]:
            if rid not in self.reservations:
                self.reserve_retry.pop(rid, None)
                self.reserve_refused.discard(rid)
        delays = [30.0]  # at least this often: our estimate of the server's clock drifts a little
        if retry_in is not None:
            delays.append(retry_in)
        if next_look is not None:
            delays.append((next_look - now).total_seconds() / client.time_scale)
        return min(delays)

    async def _reserve_at_cp(self, r: p.ReservationInfo, expiry: datetime) -> bool:
        """ReserveNow; False if it should be tried again later."""
        number = m.ocpp_id(r.id)
        request = call.ReserveNow(
            connector_id=CONNECTOR,
            expiry_date=m.ocpp_time(expiry),
            id_tag=m.id_tag(r.vehicle_id),
            reservation_id=number,
        )
        try:
            result = await self.call(request, suppress=False)
        except OCPPError as exc:
            if exc.code in ("NotImplemented", "NotSupported"):
                log.warning("%s: does not take reservations (%s); not asking again", self, exc.code)
                self.reserve_refused.add(r.id)
                return True
            log.warning("%s: ReserveNow %s failed: %s", self, r.id, exc)
            self.reserve_retry[r.id] = time.monotonic() + RESERVE_RETRY
            return False
        except TimeoutError:
            log.warning("%s: ReserveNow %s: no answer", self, r.id)
            self.reserve_retry[r.id] = time.monotonic() + RESERVE_RETRY
            return False
        if result.status == ReservationStatus.accepted:
            log.info("%s: holds reservation %s (OCPP %d) for %s", self, r.id, number, r.vehicle_id)
            self.held_at_cp[r.id] = number
            self.reserve_retry.pop(r.id, None)
            return True
        if result.status == ReservationStatus.rejected:
            log.warning("%s: rejected ReserveNow for %s; not asking again", self, r.id)
            self.reserve_refused.add(r.id)
            return True
        log.info("%s: ReserveNow %s: %s; trying again in %g s", self, r.id, result.status, RESERVE_RETRY)
        self.reserve_retry[r.id] = time.monotonic() + RESERVE_RETRY
        return False

    async def _cancel_at_cp(self, reservation_id: str, number: int) -> None:
        try:
            result = await self.call(call.CancelReservation(reservation_id=number), suppress=False)
        except (TimeoutError, OCPPError) as exc:
            # Its own expiry date ends it anyway.
            log.warning("%s: CancelReservation %s failed: %s", self, reservation_id, exc)
            return
        log.info("%s: reservation %s cancelled at the charge point (%s)", self, reservation_id, result.status)

    # --- transactions ---------------------------------------------------------------------

    def _transaction(self, tx_id: int) -> Transaction | None:
        tx = self.transactions.get(tx_id)
        if tx is None:
            # A session the server has open here that we have not seen start (the charge point
            # came back on a new connection): take it up where the server's books stand.
            r = next(
                (r for r in self.reservations.values() if r.state == "charging" and m.ocpp_id(r.id) == tx_id), None
            )
            if r is not None:
                tx = self.transactions[tx_id] = Transaction(r.id, r.vehicle_id, meter_start_wh=None, kwh=r.kwh)
        return tx

    def _stop_orphan(self, tx_id: int) -> None:
        """A transaction at the charge point with no session on the server: nobody pays for it, stop it."""
        if tx_id in self.orphans_stopped or len(self.orphans_stopped) >= MAX_ORPHANS:
            return  # told once; and a charge point inventing transactions gets no task per invention
        self.orphans_stopped.add(tx_id)
        log.warning("%s: transaction %d has no session on the server; stopping it", self, tx_id)

        async def stop() -> None:
            try:
                await self.call(call.RemoteStopTransaction(transaction_id=tx_id), suppress=False)
            except (TimeoutError, OCPPError, ConnectionClosed) as exc:
                log.warning("%s: stopping transaction %d: %s", self, tx_id, exc)

        self._spawn(stop())

    async def _authorize(self, tag: str) -> tuple[AuthorizationStatus, p.ReservationInfo | None]:
        """Accepted only for the vehicle whose reservation it is, here, in its slot."""
        vehicle = self.gateway.tags.vehicle(tag)
        client = self.client
        if vehicle is None:
            return AuthorizationStatus.invalid, None
        if client is None:
            log.warning("%s: cannot check %s: the server is not reachable", self, tag)
            return AuthorizationStatus.invalid, None
        try:
            r = await client.authorize(vehicle)
        except ConnectionLostError:
            return AuthorizationStatus.invalid, None
        except (NotFoundError, ConflictError, UnavailableError, ForbiddenError) as exc:
            log.info("%s: %s (%s) blocked: %s", self, tag, vehicle, exc.message)
            return AuthorizationStatus.blocked, None
        except EvchargeError as exc:
            log.warning("%s: cannot check %s: %s", self, tag, exc.message)
            return AuthorizationStatus.invalid, None
        if r.state == "charging":
            return AuthorizationStatus.concurrent_tx, r
        return AuthorizationStatus.accepted, r

    def _id_tag_info(self, status: AuthorizationStatus, r: p.ReservationInfo | None) -> IdTagInfo:
        expiry = None
        client = self.client
        if status == AuthorizationStatus.accepted and r is not None and client is not None:
            # Good here until its slot ends (a charge point may cache the tag until then).
            expiry = m.ocpp_time(m.wall_clock(r.end, client.server_now(), client.time_scale))
        return IdTagInfo(status=status, expiry_date=expiry)

    def _begin(self, r_id: str, vehicle_id: str, meter_start: int) -> call_result.StartTransaction:
        tx_id = m.ocpp_id(r_id)
        self.transactions[tx_id] = Transaction(r_id, vehicle_id, meter_start_wh=float(meter_start))
        self.held_at_cp.pop(r_id, None)  # the transaction used up the charge point's reservation
        log.info("%s: transaction %d started for %s (reservation %s)", self, tx_id, vehicle_id, r_id)
        return call_result.StartTransaction(
            transaction_id=tx_id, id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted)
        )

    @staticmethod
    def _refuse_start(status: AuthorizationStatus) -> call_result.StartTransaction:
        # OCPP wants a transaction id even for a refused start; one that stands for nothing.
        return call_result.StartTransaction(
            transaction_id=secrets.randbelow(0x7FFFFFFF) + 1, id_tag_info=IdTagInfo(status=status)
        )

    def _metered(self, tx: Transaction, register_wh: float) -> None:
        if tx.meter_start_wh is None:
            tx.meter_start_wh = register_wh - tx.kwh * 1000.0
        kwh = m.session_kwh(register_wh, tx.meter_start_wh)
        if kwh is None:
            log.warning("%s: implausible meter reading %.0f Wh ignored", self, register_wh)
            return
        tx.kwh = max(tx.kwh, kwh)
        client = self.client
        if client is not None:
            with contextlib.suppress(ConnectionLostError):
                client.send_meter(tx.reservation_id, tx.kwh)

    # --- what the charge point sends -------------------------------------------------------

    @on(Action.boot_notification)
    def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **details: Any
    ) -> call_result.BootNotification:
        firmware = details.get("firmware_version") or "?"
        log.info("%s booted: %s %s, firmware %s", self, charge_point_vendor, charge_point_model, firmware)
        return call_result.BootNotification(
            current_time=m.ocpp_time(datetime.now(UTC)),
            interval=max(1, round(self.gateway.heartbeat_s)),
            status=RegistrationStatus.accepted,
        )

    @on(Action.heartbeat)
    def on_heartbeat(self) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=m.ocpp_time(datetime.now(UTC)))

    @on(Action.status_notification)
    async def on_status_notification(
        self,
        connector_id: int,
        error_code: str,
        status: str,
        info: str | None = None,
        vendor_error_code: str | None = None,
        **_: Any,
    ) -> call_result.StatusNotification:
        if connector_id in (0, CONNECTOR):
            self.connectors[connector_id] = (status, m.status_info(status, error_code, info, vendor_error_code))
            await self._report_status()
        else:
            log.warning("%s: status of connector %d ignored (one connector per charge point)", self, connector_id)
        return call_result.StatusNotification()

    @on(Action.authorize)
    async def on_authorize(self, id_tag: str, **_: Any) -> call_result.Authorize:
        status, r = await self._authorize(id_tag)
        return call_result.Authorize(id_tag_info=self._id_tag_info(status, r))

    @on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, **_: Any
    ) -> call_result.StartTransaction:
        vehicle = self.gateway.tags.vehicle(id_tag)
        if connector_id != CONNECTOR or vehicle is None:
            return self._refuse_start(AuthorizationStatus.invalid)
        # A start we asked for (RemoteStart): the server records the session itself.
        asked = self._asked_start(vehicle)
        if asked is not None:
            del self.remote_starts[asked]
            return self._begin(asked, vehicle, meter_start)
        status, r = await self._authorize(id_tag)
        if status == AuthorizationStatus.concurrent_tx and r is not None:
            tx = self.transactions.get(m.ocpp_id(r.id))
            if tx is None:
                # The server's session, which this connection has not seen start: a charge point
                # sending its start anew after a reconnect.
                return self._begin(r.id, vehicle, meter_start)
            if tx.meter_start_wh == meter_start:
                return self._accepted(r.id)  # the same start again (our answer got lost)
            return self._refuse_start(status)
        if status != AuthorizationStatus.accepted or r is None or self.client is None:
            return self._refuse_start(status)
        try:
            await self.client.start_charging(r.id)  # a driver at the charge point: like the vehicle's `charge`
        except EvchargeError as exc:
            log.info("%s: start of %s refused: %s", self, r.id, exc.message)
            return self._refuse_start(AuthorizationStatus.blocked)
        return self._begin(r.id, vehicle, meter_start)

    @staticmethod
    def _accepted(reservation_id: str) -> call_result.StartTransaction:
        return call_result.StartTransaction(
            transaction_id=m.ocpp_id(reservation_id), id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted)
        )

    @on(Action.meter_values)
    def on_meter_values(
        self, connector_id: int, meter_value: list[dict[str, Any]], transaction_id: int | None = None, **_: Any
    ) -> call_result.MeterValues:
        if transaction_id is None:
            return call_result.MeterValues()  # readings outside a session bill nobody
        tx = self._transaction(transaction_id)
        if tx is None:
            if self.synced:
                self._stop_orphan(transaction_id)
            return call_result.MeterValues()
        register = m.energy_register_wh(meter_value)
        if register is not None:
            self._metered(tx, register)
        return call_result.MeterValues()

    @on(Action.stop_transaction)
    async def on_stop_transaction(
        self, meter_stop: int, transaction_id: int, reason: str | None = None, id_tag: str | None = None, **_: Any
    ) -> call_result.StopTransaction:
        answer = call_result.StopTransaction(
            id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted) if id_tag is not None else None
        )
        tx = self._transaction(transaction_id)
        if tx is None:
            log.info("%s: StopTransaction of transaction %d, which has no session here", self, transaction_id)
            return answer
        del self.transactions[transaction_id]
        if tx.meter_start_wh is not None:
            tx.kwh = max(tx.kwh, m.session_kwh(float(meter_stop), tx.meter_start_wh) or 0.0)
        log.info("%s: transaction %d stopped (%s) at %.3f kWh", self, transaction_id, reason or "Local", tx.kwh)
        if tx.stopped is not None and not tx.stopped.done():
            tx.stopped.set_result(tx.kwh)  # the server's RemoteStop records it
            return answer
        reason_text = f"stopped at the charge point ({reason or 'Local'})"
        await self._complete(p.SessionComplete(reservation_id=tx.reservation_id, kwh=tx.kwh, reason=reason_text))
        return answer

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id)

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status_notification(self, **_: Any) -> call_result.DiagnosticsStatusNotification:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status_notification(self, **_: Any) -> call_result.FirmwareStatusNotification:
        return call_result.FirmwareStatusNotification()


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
    ) -> None:
        """``ssl_context``: speak TLS to the server (its station listener is ``+tls`` or ``+mtls``),
        and check that its certificate names ``server_hostname`` (default: ``server_host``)."""
        self.world = world
        self.operator = world.operator(operator_id)
        self.host = host if host is not None else self.operator.host
        self.port = port
        self.server_host = server_host or self.operator.host
        self.server_port = server_port if server_port is not None else self.operator.port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
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
            subprotocols=[SUBPROTOCOL],
            process_request=self._check_handshake,
            open_timeout=OPEN_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE,
            compression=None,  # small messages; no deflate state per charge point
        )
        self.port = next(iter(self._ws.sockets)).getsockname()[1]
        log.info(
            "OCPP 1.6J gateway of operator %s on ws://%s:%d/<charge point id>, server %s; %d charge points known",
            self.operator.id,
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

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse unknown charge points (404) and wrong credentials (401) before the upgrade."""
        cp_id = unquote(request.path.partition("?")[0].rstrip("/").rpartition("/")[2])
        cp = self.charge_points.get(cp_id)
        if cp is None:
            log.info("handshake for unknown charge point %r from %s refused", cp_id, connection.remote_address)
            return connection.respond(http.HTTPStatus.NOT_FOUND, "unknown charge point\n")
        header = request.headers.get("Authorization")
        try:
            user, password = parse_authorization_basic(header) if header is not None else ("", "")
        except InvalidHeader:
            user, password = "", ""
        if user != cp.id or not same_secret(cp.secret, password):
            log.info("handshake of %s from %s refused: wrong or missing credentials", cp.id, connection.remote_address)
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "wrong or missing credentials\n")
            response.headers["WWW-Authenticate"] = build_www_authenticate_basic(f"evcharge {self.operator.id}")
            return response
        connection.username = cp.id
        return None

    async def _serve(self, websocket: ServerConnection) -> None:
        cp = self.charge_points[websocket.username]
        link = ChargePointLink(self, cp, websocket)
        old = self.links.get(cp.id)
        self.links[cp.id] = link
        if old is not None:
            log.info("%s connected again; closing its older connection", link)
            old.retire()
            self._spawn(old.websocket.close(1000, "replaced by a newer connection"))
        log.info("%s connected from %s", link, websocket.remote_address)
        try:
            await link.run()
        finally:
            if self.links.get(cp.id) is link:
                del self.links[cp.id]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
