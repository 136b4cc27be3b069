"""OCPP 1.6J: what a 1.6 charge point sends, answered; what the server wants, as 1.6 requests.

* BootNotification, Heartbeat, StatusNotification (connector 0 and 1) -> the charge point's status;
* Authorize, StartTransaction, MeterValues, StopTransaction -> the vehicle's session;
* the server's reservations -> ReserveNow / CancelReservation, RemoteStart / RemoteStop ->
  RemoteStartTransaction / RemoteStopTransaction (transaction ids are ours: derived from
  the reservation, so the same after a restart).
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from ocpp.routing import on
from ocpp.v16 import call, call_result
from ocpp.v16.datatypes import IdTagInfo
from ocpp.v16.enums import Action, DataTransferStatus, RegistrationStatus

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.charge_point import ChargePointLink, TxId
from evcharge.apps.ocpp.rpc import V16
from evcharge.wire import protocol as p

log = logging.getLogger(__name__)

SUBPROTOCOL = "ocpp1.6"
CONNECTOR = 1  # one of our charge points is one OCPP connector


class ChargePoint16(ChargePointLink):
    _call = call
    _call_result = call_result
    _ocpp_version = V16
    actions = frozenset(Action)

    # --- what we send -----------------------------------------------------------------

    def remote_start_request(self, reservation_id: str, vehicle_id: str) -> Any:
        return call.RemoteStartTransaction(id_tag=m.id_tag(vehicle_id), connector_id=CONNECTOR)

    def remote_stop_request(self, tx_id: TxId) -> Any:
        return call.RemoteStopTransaction(transaction_id=int(tx_id))

    def reserve_now_request(self, r: p.ReservationInfo, number: int, expiry: str) -> Any:
        return call.ReserveNow(
            connector_id=CONNECTOR, expiry_date=expiry, id_tag=m.id_tag(r.vehicle_id), reservation_id=number
        )

    def cancel_reservation_request(self, number: int) -> Any:
        return call.CancelReservation(reservation_id=number)

    def adoptable(self, tx_id: TxId) -> p.ReservationInfo | None:
        return next((r for r in self.reservations.values() if r.state == "charging" and m.ocpp_id(r.id) == tx_id), None)

    def unseen_transaction(self, r: p.ReservationInfo) -> TxId | None:
        return m.ocpp_id(r.id)  # ours, so known without a message

    # --- answers ----------------------------------------------------------------------

    def _id_tag_info(self, verdict: m.Verdict, r: p.ReservationInfo | None) -> IdTagInfo:
        expiry = self._valid_until(r) if verdict == "accepted" and r is not None else None
        return IdTagInfo(status=m.AUTHORIZATION_16[verdict], expiry_date=expiry)

    def _begin16(self, reservation_id: str, vehicle_id: str, meter_start: int) -> call_result.StartTransaction:
        tx_id = m.ocpp_id(reservation_id)
        self._begin(tx_id, reservation_id, vehicle_id, float(meter_start))
        return self._accepted(reservation_id)

    @staticmethod
    def _accepted(reservation_id: str) -> call_result.StartTransaction:
        return call_result.StartTransaction(
            transaction_id=m.ocpp_id(reservation_id), id_tag_info=IdTagInfo(status=m.AUTHORIZATION_16["accepted"])
        )

    @staticmethod
    def _refuse_start(verdict: m.Verdict) -> call_result.StartTransaction:
        # OCPP wants a transaction id even for a refused start; one that stands for nothing.
        return call_result.StartTransaction(
            transaction_id=secrets.randbelow(0x7FFFFFFF) + 1, id_tag_info=IdTagInfo(status=m.AUTHORIZATION_16[verdict])
        )

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
        verdict, r = await self._authorize(id_tag)
        return call_result.Authorize(id_tag_info=self._id_tag_info(verdict, r))

    @on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, **_: Any
    ) -> call_result.StartTransaction:
        vehicle = self.gateway.tags.vehicle(id_tag)
        if connector_id != CONNECTOR or vehicle is None:
            return self._refuse_start("unknown")
        # A start we asked for (RemoteStart): the server records the session itself.
        asked = self._asked_start(vehicle)
        if asked is not None:
            del self.remote_starts[asked]
            return self._begin16(asked, vehicle, meter_start)
        verdict, r = await self._authorize(id_tag)
        if verdict == "charging" and r is not None:
            tx = self.transactions.get(m.ocpp_id(r.id))
            if tx is None:
                # The server's session, which this connection has not seen start: a charge point
                # sending its start anew after a reconnect.
                return self._begin16(r.id, vehicle, meter_start)
            if tx.meter_start_wh == meter_start:
                return self._accepted(r.id)  # the same start again (our answer got lost)
            return self._refuse_start(verdict)
        if verdict != "accepted" or r is None:
            return self._refuse_start(verdict)
        if not await self._start_for_driver(r):
            return self._refuse_start("refused")
        return self._begin16(r.id, vehicle, meter_start)

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
        await self._ended(transaction_id, float(meter_stop), reason or "Local")
        return call_result.StopTransaction(
            id_tag_info=IdTagInfo(status=m.AUTHORIZATION_16["accepted"]) if id_tag is not None else None
        )

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id)

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status_notification(self, **_: Any) -> call_result.DiagnosticsStatusNotification:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status_notification(self, **_: Any) -> call_result.FirmwareStatusNotification:
        return call_result.FirmwareStatusNotification()
