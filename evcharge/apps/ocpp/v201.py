"""OCPP 2.0.1: what a 2.0.1 charging station sends, answered; what the server wants, as 2.0.1 requests.

One of our charge points is one charging station with one EVSE (id 1), whatever its
connectors. What differs from 1.6:

* the station names its transactions (string ids); a transaction becomes a session when it
  can be tied to one of our reservations -- by the ``remoteStartId`` of our
  RequestStartTransaction (the reservation's number), by the idToken of a vehicle we asked
  to start, or by a driver's idToken the server authorizes here now. A transaction nobody
  authorized yet (a cable plugged in) waits for its idToken; one that delivers energy with
  no session is stopped.
* energy comes with TransactionEvent (Started / Updated / Ended, each with meter values);
  the Ended event's answer carries the session's total cost.
* the station tells when it lets a reservation go (ReservationStatusUpdate: Expired,
  Removed); the booking stands on the server, which expires a no-show itself.
* faults and alerts come as NotifyEvent: logged, not mapped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ocpp.routing import on
from ocpp.v201 import call, call_result
from ocpp.v201.datatypes import IdTokenInfoType, IdTokenType
from ocpp.v201.enums import Action, DataTransferStatusEnumType, RegistrationStatusEnumType

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.charge_point import MAX_ORPHANS, ChargePointLink, Transaction, TxId
from evcharge.apps.ocpp.rpc import V201
from evcharge.wire import protocol as p

log = logging.getLogger(__name__)

SUBPROTOCOL = "ocpp2.0.1"
EVSE = 1  # one of our charge points is one EVSE


class ChargePoint201(ChargePointLink):
    _call = call
    _call_result = call_result
    _ocpp_version = V201
    actions = frozenset(Action)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Transactions of the station with no session (yet) -> their last register reading:
        # the session's start once a driver is authorized (no energy flows before).
        self.unbound: dict[str, float | None] = {}

    # --- what we send -----------------------------------------------------------------

    def _token(self, vehicle_id: str) -> IdTokenType:
        return IdTokenType(id_token=m.id_tag(vehicle_id), type=m.ID_TOKEN_TYPE)

    def remote_start_request(self, reservation_id: str, vehicle_id: str) -> Any:
        return call.RequestStartTransaction(
            id_token=self._token(vehicle_id), remote_start_id=m.ocpp_id(reservation_id), evse_id=EVSE
        )

    def remote_stop_request(self, tx_id: TxId) -> Any:
        return call.RequestStopTransaction(transaction_id=str(tx_id))

    def reserve_now_request(self, r: p.ReservationInfo, number: int, expiry: str) -> Any:
        return call.ReserveNow(id=number, expiry_date_time=expiry, id_token=self._token(r.vehicle_id), evse_id=EVSE)

    def cancel_reservation_request(self, number: int) -> Any:
        return call.CancelReservation(reservation_id=number)

    def adoptable(self, tx_id: TxId) -> p.ReservationInfo | None:
        # One EVSE, one transaction at a time: a session the server has open here that no
        # transaction of ours stands for is this one.
        taken = {tx.reservation_id for tx in self.transactions.values()}
        open_here = [r for r in self.reservations.values() if r.state == "charging" and r.id not in taken]
        return open_here[0] if len(open_here) == 1 else None

    def unseen_transaction(self, r: p.ReservationInfo) -> TxId | None:
        return None  # the station's own id: unknown until it sends one

    def _id_token_info(self, verdict: m.Verdict, r: p.ReservationInfo | None) -> IdTokenInfoType:
        expiry = self._valid_until(r) if verdict == "accepted" and r is not None else None
        return IdTokenInfoType(status=m.AUTHORIZATION_201[verdict], cache_expiry_date_time=expiry)

    # --- transactions -------------------------------------------------------------------

    async def _bind(
        self, tx_id: str, info: Mapping[str, Any], id_token: Mapping[str, Any] | None, register: float | None
    ) -> tuple[m.Verdict, p.ReservationInfo | None] | None:
        """Tie a transaction new to us to its reservation, if it can be; the verdict on its idToken.

        None: it names no one (no idToken, no remote start of ours): it waits for its driver.
        """
        remote_start = info.get("remote_start_id")
        rid = next((r for r in self.remote_starts if m.ocpp_id(r) == remote_start), None)
        tag = m.token_tag(id_token)
        vehicle = self.gateway.tags.vehicle(tag) if tag is not None else None
        if rid is None and vehicle is not None:
            rid = self._asked_start(vehicle)
        if rid is not None:  # our RemoteStart: the server records the session itself
            self._begin(tx_id, rid, self.remote_starts.pop(rid), register)
            return "accepted", self.reservations.get(rid)
        if tag is None:
            return None
        if vehicle is None:
            return "unknown", None
        verdict, r = await self._authorize(tag)
        unseen = self.adoptable(tx_id)
        if verdict == "charging" and r is not None and unseen is not None and unseen.id == r.id:
            self._begin(tx_id, r.id, vehicle, register)  # its session, sent anew after a reconnect
            return "accepted", r
        if verdict != "accepted" or r is None:
            return verdict, r
        if not await self._start_for_driver(r):
            return "refused", None
        self._begin(tx_id, r.id, vehicle, register)
        return "accepted", r

    def _holder_verdict(self, tx: Transaction, id_token: Mapping[str, Any]) -> m.Verdict:
        """A token shown during a session (say, to stop it): good only if it is that vehicle's."""
        tag = m.token_tag(id_token)
        return "accepted" if tag is not None and self.gateway.tags.vehicle(tag) == tx.vehicle_id else "refused"

    # --- what the charge point sends -------------------------------------------------------

    @on(Action.boot_notification)
    def on_boot_notification(
        self, charging_station: dict[str, Any], reason: str, **_: Any
    ) -> call_result.BootNotification:
        firmware = charging_station.get("firmware_version") or "?"
        vendor, model = charging_station.get("vendor_name"), charging_station.get("model")
        log.info("%s booted (%s): %s %s, firmware %s", self, reason, vendor, model, firmware)
        return call_result.BootNotification(
            current_time=m.ocpp_time(datetime.now(UTC)),
            interval=max(1, round(self.gateway.heartbeat_s)),
            status=RegistrationStatusEnumType.accepted,
        )

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=m.ocpp_time(datetime.now(UTC)))

    @on(Action.status_notification)
    async def on_status_notification(
        self, connector_status: str, evse_id: int, connector_id: int, **_: Any
    ) -> call_result.StatusNotification:
        if evse_id == EVSE:
            self.connectors[connector_id] = (connector_status, m.status_info(connector_status, "", None, None))
            await self._report_status()
        else:
            log.warning("%s: status of EVSE %d ignored (one EVSE per charge point)", self, evse_id)
        return call_result.StatusNotification()

    @on(Action.authorize)
    async def on_authorize(self, id_token: dict[str, Any], **_: Any) -> call_result.Authorize:
        tag = m.token_tag(id_token)
        verdict, r = await self._authorize(tag) if tag is not None else ("unknown", None)
        return call_result.Authorize(id_token_info=self._id_token_info(verdict, r))

    @on(Action.transaction_event)
    async def on_transaction_event(
        self,
        event_type: str,
        trigger_reason: str,
        transaction_info: dict[str, Any],
        meter_value: list[dict[str, Any]] | None = None,
        id_token: dict[str, Any] | None = None,
        evse: dict[str, Any] | None = None,
        **_: Any,
    ) -> call_result.TransactionEvent:
        tx_id = str(transaction_info["transaction_id"])
        register = m.energy_register_wh_201(meter_value or ())
        tx = self.transactions.get(tx_id)
        verdict: m.Verdict = "unknown"  # on the idToken, if it came with one
        r: p.ReservationInfo | None = None
        answer = call_result.TransactionEvent()
        if evse is not None and evse.get("id") != EVSE:
            log.warning(
                "%s: transaction %s on EVSE %s ignored (one EVSE per charge point)", self, tx_id, evse.get("id")
            )
            verdict = "not here"
        else:
            if tx is None and event_type != "Ended":
                start_wh = register if register is not None else self.unbound.get(tx_id)
                verdict, r = await self._bind(tx_id, transaction_info, id_token, start_wh) or (verdict, r)
                if tx_id in self.transactions:
                    self.unbound.pop(tx_id, None)
            elif tx is not None and id_token is not None:
                verdict, r = self._holder_verdict(tx, id_token), self.reservations.get(tx.reservation_id)
            if event_type == "Ended":
                self.unbound.pop(tx_id, None)
                ended = await self._ended(tx_id, register, transaction_info.get("stopped_reason") or trigger_reason)
                if ended is not None:
                    answer.total_cost = self.cost(ended.kwh)
            elif (tx := self._transaction(tx_id)) is None:
                self._unbound(tx_id, transaction_info, register)
            elif register is not None:
                self._metered(tx, register)
        if id_token is not None:
            answer.id_token_info = self._id_token_info(verdict, r)
        return answer

    def _unbound(self, tx_id: str, info: Mapping[str, Any], register: float | None) -> None:
        """A transaction with no session: waiting for its driver, or delivering energy nobody pays for."""
        if info.get("charging_state") == "Charging":
            self.unbound.pop(tx_id, None)
            if self.synced:
                self._stop_orphan(tx_id)
        elif tx_id in self.unbound:
            if register is not None:
                self.unbound[tx_id] = register
        elif len(self.unbound) < MAX_ORPHANS:
            self.unbound[tx_id] = register
            log.info("%s: transaction %s waits for the idToken of a vehicle with a reservation here", self, tx_id)

    @on(Action.meter_values)
    def on_meter_values(self, evse_id: int, meter_value: list[dict[str, Any]], **_: Any) -> call_result.MeterValues:
        # Readings outside a transaction; during one they are the same register, so its session's too.
        register = m.energy_register_wh_201(meter_value)
        sessions = list(self.transactions.values())
        if evse_id == EVSE and register is not None and len(sessions) == 1:
            self._metered(sessions[0], register)
        return call_result.MeterValues()

    @on(Action.reservation_status_update)
    def on_reservation_status_update(
        self, reservation_id: int, reservation_update_status: str, **_: Any
    ) -> call_result.ReservationStatusUpdate:
        rid = next((r for r, number in self.held_at_cp.items() if number == reservation_id), None)
        rid = rid or self._reservation_numbered(reservation_id)
        if rid is None:
            log.info("%s: reservation %d %s, which is none of ours", self, reservation_id, reservation_update_status)
            return call_result.ReservationStatusUpdate()
        self.held_at_cp.pop(rid, None)
        self.reserve_refused.add(rid)  # it let go: not handed over again
        if reservation_update_status == "Expired":
            log.info("%s: its hold on %s expired; the server ends a no-show itself", self, rid)
        else:
            log.warning("%s: removed its hold on %s; the booking stands", self, rid)
        return call_result.ReservationStatusUpdate()

    @on(Action.notify_event)
    def on_notify_event(self, event_data: list[dict[str, Any]], **_: Any) -> call_result.NotifyEvent:
        for event in event_data:
            component = event.get("component", {})
            where = component.get("name", "?")
            if component.get("evse"):
                where += f" (EVSE {component['evse'].get('id')})"
            detail = " ".join(str(event[k]) for k in ("tech_code", "tech_info") if event.get(k))
            log.info(
                "%s: event %s: %s.%s = %r (%s)%s",
                self,
                event.get("trigger"),
                where,
                event.get("variable", {}).get("name", "?"),
                event.get("actual_value"),
                event.get("event_notification_type"),
                f": {detail}" if detail else "",
            )
        return call_result.NotifyEvent()

    @on(Action.security_event_notification)
    def on_security_event_notification(
        self, type: str, tech_info: str | None = None, **_: Any
    ) -> call_result.SecurityEventNotification:
        log.warning("%s: security event %s%s", self, type, f": {tech_info}" if tech_info else "")
        return call_result.SecurityEventNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status_notification(self, status: str, **_: Any) -> call_result.FirmwareStatusNotification:
        log.info("%s: firmware %s", self, status)
        return call_result.FirmwareStatusNotification()

    @on(Action.log_status_notification)
    def on_log_status_notification(self, **_: Any) -> call_result.LogStatusNotification:
        return call_result.LogStatusNotification()

    @on(Action.notify_report)
    def on_notify_report(self, **_: Any) -> call_result.NotifyReport:
        return call_result.NotifyReport()

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status=DataTransferStatusEnumType.unknown_vendor_id)
