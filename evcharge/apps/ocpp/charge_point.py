"""One connected OCPP charge point and its station link to the operator's server, in any OCPP version.

This is the server's side of the translation, the same for OCPP 1.6 and 2.0.1: the link
(one station-role client per charge point), our copy of the server's live reservations on
this charge point, which of them the charge point holds (ReserveNow), the RemoteStarts
awaited, the transactions with their sessions, and the session ends the server has not
heard yet. The version classes (``v16``, ``v201``) read and write OCPP and call into this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ocpp.exceptions import OCPPError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.rpc import OcppEndpoint, is_not_taken
from evcharge.domain.model import LIVE_STATES
from evcharge.domain.world import ChargePointConfig, OperatorConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Link, world_fallbacks
from evcharge.wire import protocol as p
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

# Deadlines (real seconds). The server waits 10 s for a charge point's answer to a command,
# so everything a command does at the charge point fits inside that.
OCPP_RESPONSE_TIMEOUT = 8.0  # a charge point's answer to one of our calls
COMMAND_DEADLINE = 9.0  # a whole RemoteStart / RemoteStop, including the end of the transaction awaited
RESERVE_RETRY = 5.0  # a ReserveNow the charge point could not take (Occupied...) is tried again
MAX_ORPHANS = 64  # transactions without a session that one connection stops

TxId = int | str  # an OCPP transaction id: 1.6's are numbers (we give them), 2.0.1's strings (the charge point's)


class Gateway(Protocol):
    """What a charge point's link needs of the gateway it came through (``gateway.Gateway``)."""

    world: World
    operator: OperatorConfig
    tags: m.IdTags
    heartbeat_s: float
    server_host: str
    server_port: int
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None

    @property
    def server_address(self) -> str: ...


@dataclass(slots=True)
class Transaction:
    """An OCPP transaction at the charge point: one charging session of one of our reservations."""

    reservation_id: str
    vehicle_id: str
    meter_start_wh: float | None  # None: learned from the first reading (we came in mid-session)
    kwh: float = 0.0
    # Set while the server's RemoteStop waits for this transaction to end.
    stopped: asyncio.Future[float] | None = None


class ChargePointLink(OcppEndpoint):
    """A charge point and its station connection to the operator's server.

    Subclasses speak one OCPP version: they answer the charge point (``@on`` handlers) and
    build the requests sent to it (the ``*_request`` methods).
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
            fallbacks=world_fallbacks(gateway.operator, gateway.server_host, gateway.server_port),
        )
        self.synced = False  # the server link is up and our copy of its reservations is current
        self.connectors: dict[int, tuple[str, str]] = {}  # connector -> (its OCPP status, details)
        self.reported: p.ReportedStatus | None = None  # what the server was last told
        self.reservations: dict[str, p.ReservationInfo] = {}  # the live ones on this charge point
        self.held_at_cp: dict[str, int] = {}  # reservation id -> OCPP reservation id the charge point took
        self.reserve_refused: set[str] = set()  # not to be asked again (Rejected, or the charge point let it go)
        self.reserve_retry: dict[str, float] = {}  # reservation id -> monotonic time of the next try
        self.transactions: dict[TxId, Transaction] = {}
        # Reservation id -> vehicle, oldest first: RemoteStarts accepted, their transaction to come.
        self.remote_starts: dict[str, str] = {}
        self.unsent: list[p.SessionComplete] = []  # ends of sessions the server has not heard yet
        self.orphans_stopped: set[TxId] = set()  # transactions with no session, already told to stop
        self._wake = asyncio.Event()  # reservations changed: look at ReserveNow again
        self._tasks: set[asyncio.Task[None]] = set()
        self._link: asyncio.Task[None] | None = None

    # --- what a version builds ------------------------------------------------------------

    def remote_start_request(self, reservation_id: str, vehicle_id: str) -> Any:
        raise NotImplementedError

    def remote_stop_request(self, tx_id: TxId) -> Any:
        raise NotImplementedError

    def reserve_now_request(self, r: p.ReservationInfo, number: int, expiry: str) -> Any:
        raise NotImplementedError

    def cancel_reservation_request(self, number: int) -> Any:
        raise NotImplementedError

    def adoptable(self, tx_id: TxId) -> p.ReservationInfo | None:
        """The server's session an unseen transaction is (the charge point came back mid-session)."""
        raise NotImplementedError

    def unseen_transaction(self, r: p.ReservationInfo) -> TxId | None:
        """The transaction id of a session of the server's that no message of this connection named."""
        raise NotImplementedError

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
            # one): the transaction it waited for must not become another session's.
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
            log.info("%s: no transaction expected for %s any more: it has ended", self, reservation_id)

    def _asked_start(self, vehicle_id: str) -> str | None:
        """The reservation a transaction of this vehicle answers the RemoteStart of, if any.

        The newest of its RemoteStarts whose reservation is still live here; only without one
        (our copy of the books may be behind) the newest at all.
        """
        asked = [rid for rid, v in self.remote_starts.items() if v == vehicle_id]
        current = [rid for rid in asked if self._may_charge(rid, vehicle_id)]
        return (current or asked)[-1] if asked else None

    # --- the server's commands: RemoteStart, RemoteStop ------------------------------------

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
        request = self.remote_start_request(reservation_id, vehicle_id)
        # Expected before it is asked for: a charge point may start the transaction right
        # behind its answer, and that is handled before this call returns. Asked again, it is
        # the newest.
        self.remote_starts.pop(reservation_id, None)
        self.remote_starts[reservation_id] = vehicle_id
        try:
            result = await self._call_for_server(request, COMMAND_DEADLINE)
            if result.status != "Accepted":
                raise ConflictError(f"charge point {self.id} rejected {type(request).__name__}")
        except BaseException:
            self.remote_starts.pop(reservation_id, None)
            raise
        return p.Ok()

    async def _remote_stop(self, reservation_id: str) -> p.Reply:
        self.remote_starts.pop(reservation_id, None)  # a start still to come is not wanted any more
        tx_id = next((i for i, tx in self.transactions.items() if tx.reservation_id == reservation_id), None)
        r = self.reservations.get(reservation_id)
        if tx_id is None and r is not None and r.state == "charging":
            tx_id = self.unseen_transaction(r)  # the server's session, one we have not seen a message of yet
        if tx_id is None:
            return p.SessionReport(reservation_id=reservation_id, kwh=0.0)
        tx = self.transactions.get(tx_id)
        deadline = asyncio.get_running_loop().time() + COMMAND_DEADLINE
        stopped: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if tx is not None:
            tx.stopped = stopped
        request = self.remote_stop_request(tx_id)
        try:
            result = await self._call_for_server(request, COMMAND_DEADLINE)
            if tx is not None and result.status == "Accepted":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        # The final reading comes with the end of the charge point's transaction.
                        return p.SessionReport(reservation_id=reservation_id, kwh=await stopped)
            log.warning("%s: %s %s: %s", self, type(request).__name__, tx_id, result.status)
        except EvchargeError as exc:
            log.warning("%s: %s %s failed: %s", self, type(request).__name__, tx_id, exc.message)
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
                return await self.ask(request)
        except TimeoutError:
            raise RequestTimeoutError(f"charge point {self.id} did not answer {name}") from None
        except OCPPError as exc:
            raise ConflictError(f"charge point {self.id} refused {name}: {exc.code} {exc.description}") from None
        except ConnectionClosed:
            raise UnavailableError(f"charge point {self.id} went offline") from None

    # --- what the server is told -----------------------------------------------------------

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
        try:
            result = await self.ask(self.reserve_now_request(r, number, m.ocpp_time(expiry)))
        except OCPPError as exc:
            if is_not_taken(exc):
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
        if result.status == "Accepted":
            log.info("%s: holds reservation %s (OCPP %d) for %s", self, r.id, number, r.vehicle_id)
            self.held_at_cp[r.id] = number
            self.reserve_retry.pop(r.id, None)
            return True
        if result.status == "Rejected":
            log.warning("%s: rejected ReserveNow for %s; not asking again", self, r.id)
            self.reserve_refused.add(r.id)
            return True
        log.info("%s: ReserveNow %s: %s; trying again in %g s", self, r.id, result.status, RESERVE_RETRY)
        self.reserve_retry[r.id] = time.monotonic() + RESERVE_RETRY
        return False

    async def _cancel_at_cp(self, reservation_id: str, number: int) -> None:
        try:
            result = await self.ask(self.cancel_reservation_request(number))
        except (TimeoutError, OCPPError) as exc:
            # Its own expiry date ends it anyway.
            log.warning("%s: CancelReservation %s failed: %s", self, reservation_id, exc)
            return
        log.info("%s: reservation %s cancelled at the charge point (%s)", self, reservation_id, result.status)

    def _reservation_numbered(self, number: int) -> str | None:
        """Our reservation whose OCPP reservation id this is."""
        return next((rid for rid in self.reservations if m.ocpp_id(rid) == number), None)

    # --- transactions ---------------------------------------------------------------------

    def _transaction(self, tx_id: TxId) -> Transaction | None:
        tx = self.transactions.get(tx_id)
        if tx is None:
            # A session the server has open here that we have not seen start (the charge point
            # came back on a new connection): take it up where the server's books stand.
            r = self.adoptable(tx_id)
            if r is not None:
                tx = self.transactions[tx_id] = Transaction(r.id, r.vehicle_id, meter_start_wh=None, kwh=r.kwh)
                log.info("%s: transaction %s is the session of %s", self, tx_id, r.id)
        return tx

    def _stop_orphan(self, tx_id: TxId) -> None:
        """A transaction at the charge point with no session on the server: nobody pays for it, stop it."""
        if tx_id in self.orphans_stopped or len(self.orphans_stopped) >= MAX_ORPHANS:
            return  # told once; and a charge point inventing transactions gets no task per invention
        self.orphans_stopped.add(tx_id)
        log.warning("%s: transaction %s has no session on the server; stopping it", self, tx_id)

        async def stop() -> None:
            try:
                await self.ask(self.remote_stop_request(tx_id))
            except (TimeoutError, OCPPError, ConnectionClosed) as exc:
                log.warning("%s: stopping transaction %s: %s", self, tx_id, exc)

        self._spawn(stop())

    async def _authorize(self, tag: str) -> tuple[m.Verdict, p.ReservationInfo | None]:
        """Accepted only for the vehicle whose reservation it is, here, in its slot."""
        vehicle = self.gateway.tags.vehicle(tag)
        client = self.client
        if vehicle is None:
            return "unknown", None
        if client is None:
            log.warning("%s: cannot check %s: the server is not reachable", self, tag)
            return "unchecked", None
        try:
            r = await client.authorize(vehicle)
        except ConnectionLostError:
            return "unchecked", None
        except (NotFoundError, ConflictError, UnavailableError, ForbiddenError) as exc:
            log.info("%s: %s (%s) blocked: %s", self, tag, vehicle, exc.message)
            return m.refusal_verdict(exc.code), None
        except EvchargeError as exc:
            log.warning("%s: cannot check %s: %s", self, tag, exc.message)
            return "unchecked", None
        if r.state == "charging":
            return "charging", r
        return "accepted", r

    def _valid_until(self, r: p.ReservationInfo) -> str | None:
        """Until when an accepted tag is good here (its slot's end): a charge point may cache it."""
        client = self.client
        if client is None:
            return None
        return m.ocpp_time(m.wall_clock(r.end, client.server_now(), client.time_scale))

    async def _start_for_driver(self, r: p.ReservationInfo) -> bool:
        """A driver at the charge point, authorized by us: the server starts the session, like `charge`."""
        client = self.client
        if client is None:
            return False
        try:
            await client.start_charging(r.id)
        except EvchargeError as exc:
            log.info("%s: start of %s refused: %s", self, r.id, exc.message)
            return False
        return True

    def _begin(self, tx_id: TxId, reservation_id: str, vehicle_id: str, meter_start_wh: float | None) -> None:
        self.transactions[tx_id] = Transaction(reservation_id, vehicle_id, meter_start_wh=meter_start_wh)
        self.held_at_cp.pop(reservation_id, None)  # the transaction used up the charge point's reservation
        log.info("%s: transaction %s started for %s (reservation %s)", self, tx_id, vehicle_id, reservation_id)

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

    async def _ended(self, tx_id: TxId, final_wh: float | None, reason: str) -> Transaction | None:
        """The charge point ended a transaction: its session ends with the final reading."""
        tx = self._transaction(tx_id)
        if tx is None:
            log.info("%s: transaction %s ended, which has no session here", self, tx_id)
            return None
        del self.transactions[tx_id]
        if final_wh is not None and tx.meter_start_wh is not None:
            tx.kwh = max(tx.kwh, m.session_kwh(final_wh, tx.meter_start_wh) or 0.0)
        log.info("%s: transaction %s stopped (%s) at %.3f kWh", self, tx_id, reason, tx.kwh)
        if tx.stopped is not None and not tx.stopped.done():
            tx.stopped.set_result(tx.kwh)  # the server's RemoteStop records it
            return tx
        reason_text = f"stopped at the charge point ({reason})"
        await self._complete(p.SessionComplete(reservation_id=tx.reservation_id, kwh=tx.kwh, reason=reason_text))
        return tx

    def cost(self, kwh: float) -> float:
        """What a session of ``kwh`` costs here, as the server bills it."""
        return round(kwh * self.config.price_per_kwh, 2)
