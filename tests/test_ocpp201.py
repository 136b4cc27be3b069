"""OCPP 2.0.1 charging stations through the gateway, driven by the `ocpp` library's own v201 ChargePoint.

The same scenarios as the 1.6 tests (test_ocpp.py), in 2.0.1's terms: StatusNotification
per EVSE and connector, idToken types, TransactionEvent with meter values, ReserveNow and
ReservationStatusUpdate, RequestStart/StopTransaction, the 2.0.1 error codes; and both
versions on one gateway at once, and the gateway's own TLS listener (security profile 2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.exceptions import GenericError
from ocpp.routing import on
from ocpp.v16 import call as call16
from ocpp.v201 import ChargePoint as OcppStation
from ocpp.v201 import call, call_result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.gateway import Gateway
from evcharge.apps.ocpp.v201 import SUBPROTOCOL
from evcharge.domain.world import World
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.tls import TlsFiles, server_context

from .conftest import free_ports, running_server, vehicle
from .ocpp_harness import basic, now_text, running_gateway, secret_of, status, until
from .test_ocpp import boot as boot16
from .test_ocpp import charge_point as charge_point16
from .test_ocpp import fresh_status as fresh_status16

pytestmark = pytest.mark.timeout(90)


class Station(OcppStation):
    """A 2.0.1 charging station that says yes (or what ``answers`` says) and remembers every request."""

    def __init__(self, cs_id: str, websocket: ClientConnection) -> None:
        super().__init__(cs_id, websocket, response_timeout=10)
        self.requests: dict[str, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.answers: dict[str, str] = {}
        self.seq = 0

    async def expect(self, action: str, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.requests[action].get(), timeout)

    def got_none(self, action: str) -> bool:
        return self.requests[action].empty()

    def _got(self, action: str, payload: dict[str, Any]) -> str:
        self.requests[action].put_nowait(payload)
        return self.answers.get(action, "Accepted")

    @on("ReserveNow")
    def on_reserve_now(self, **payload: Any) -> call_result.ReserveNow:
        answer = self._got("ReserveNow", payload)
        if answer == "RpcFrameworkError":  # a CallError whose code the ocpp library has no class for
            raise type("RpcFrameworkError", (GenericError,), {"code": answer})()
        return call_result.ReserveNow(status=answer)

    @on("CancelReservation")
    def on_cancel_reservation(self, **payload: Any) -> call_result.CancelReservation:
        return call_result.CancelReservation(status=self._got("CancelReservation", payload))

    @on("RequestStartTransaction")
    def on_request_start_transaction(self, **payload: Any) -> call_result.RequestStartTransaction:
        return call_result.RequestStartTransaction(status=self._got("RequestStartTransaction", payload))

    @on("RequestStopTransaction")
    def on_request_stop_transaction(self, **payload: Any) -> call_result.RequestStopTransaction:
        return call_result.RequestStopTransaction(status=self._got("RequestStopTransaction", payload))

    async def transaction_event(
        self,
        event_type: str,
        trigger: str,
        tx_id: str,
        *,
        wh: float | None = None,
        context: str = "Sample.Periodic",
        id_token: dict[str, str] | None = None,
        **info: Any,
    ) -> call_result.TransactionEvent:
        self.seq += 1
        meter = None
        if wh is not None:
            meter = [{"timestamp": now_text(), "sampled_value": [{"value": wh, "context": context}]}]
        return await self.call(
            call.TransactionEvent(
                event_type=event_type,
                timestamp=now_text(),
                trigger_reason=trigger,
                seq_no=self.seq,
                transaction_info={"transaction_id": tx_id, **info},
                meter_value=meter,
                id_token=id_token,
                evse={"id": 1, "connector_id": 1} if event_type == "Started" else None,
            )
        )

    async def notify(self, connector_status: str, connector: int = 1, evse: int = 1) -> None:
        await self.call(
            call.StatusNotification(
                timestamp=now_text(), connector_status=connector_status, evse_id=evse, connector_id=connector
            )
        )


def token(tag: str, kind: str = "ISO14443") -> dict[str, str]:
    return {"id_token": tag, "type": kind}


@asynccontextmanager
async def station(
    port: int,
    world: World,
    cs_id: str,
    *,
    password: str | None = None,
    subprotocols: tuple[str, ...] = (SUBPROTOCOL,),
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Station]:
    async with connect(
        f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}/{cs_id}",
        subprotocols=list(subprotocols),  # type: ignore[arg-type]
        additional_headers=basic(cs_id, password if password is not None else secret_of(world, cs_id)),
        ssl=ssl_context,
        open_timeout=5,
        close_timeout=2,
    ) as ws:
        cs = Station(cs_id, ws)
        reading = asyncio.create_task(cs.start())
        try:
            yield cs
        finally:
            await ws.close()
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


async def boot(cs: Station, server: Server) -> call_result.BootNotification:
    booted = await cs.call(
        call.BootNotification(charging_station={"model": "Wallbox 300", "vendor_name": "Acme"}, reason="PowerUp")
    )
    await cs.notify("Available")
    await until(lambda: server.books.charge_points[cs.id].online)
    return booted


async def fresh_status(server: Server, cs: Station) -> str:
    # A heartbeat's answer comes after everything the station sent before it was handled.
    await cs.call(call.Heartbeat())
    return status(server, cs.id)


# --- the mapping ---------------------------------------------------------------------------


def test_2_0_1_meter_values_tokens_and_authorization_words() -> None:
    def sample(value: Any, **extra: Any) -> list[dict[str, Any]]:
        return [{"timestamp": "t", "sampled_value": [{"value": value, **extra}]}]

    assert m.energy_register_wh_201(sample(1500)) == 1500.0  # no measurand, no unit: the register in Wh
    assert m.energy_register_wh_201(sample(1.5, unit_of_measure={"unit": "kWh"})) == 1500.0
    assert m.energy_register_wh_201(sample(15, unit_of_measure={"unit": "Wh", "multiplier": 2})) == 1500.0
    assert m.energy_register_wh_201(sample(7400, measurand="Power.Active.Import")) is None
    assert m.energy_register_wh_201(sample(100, phase="L1")) is None
    assert m.energy_register_wh_201(sample(100, location="EV")) is None  # the car's own meter
    assert m.energy_register_wh_201(sample(-4)) is None
    assert m.energy_register_wh_201(sample(1, unit_of_measure={"multiplier": 400})) is None
    assert m.token_tag({"id_token": "V01", "type": "ISO14443"}) == "V01"
    assert m.token_tag({"id_token": "", "type": "NoAuthorization"}) is None
    assert m.refusal_verdict("not_found") == "not here" and m.refusal_verdict("conflict") == "not now"
    assert m.AUTHORIZATION_201["not now"] == "NotAtThisTime" and m.AUTHORIZATION_16["not now"] == "Blocked"
    assert m.reported_status({1: ("Occupied", ""), 2: ("Faulted", "x")}) == ("faulted", "x")


# --- the gateway, end to end --------------------------------------------------------------------


async def test_boot_heartbeat_and_status_per_evse_and_connector(
    server: Server, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_gateway(server) as gw, station(gw.port, world, "NAT-PN-3") as cs:
        assert cs._connection.subprotocol == SUBPROTOCOL and gw.links["NAT-PN-3"].version == "2.0.1"
        assert status(server, "NAT-PN-3") == "offline"
        booted = await boot(cs, server)
        assert (booted.status, booted.interval) == ("Accepted", round(world.rules.heartbeat_s))
        assert "current_time" in vars(await cs.call(call.Heartbeat()))

        async def notify(connector_status: str, connector: int = 1, evse: int = 1) -> str:
            await cs.notify(connector_status, connector, evse)
            return await fresh_status(server, cs)

        assert await notify("Faulted") == "faulted"
        assert await notify("Occupied") == "available"
        assert await notify("Unavailable") == "unavailable"
        assert await notify("Reserved") == "available"
        assert await notify("Faulted", connector=2) == "faulted"  # EVSE 1's other connector
        assert await notify("Available", connector=2) == "available"
        assert await notify("Faulted", evse=2) == "available"  # not ours: ignored

        caplog.set_level("INFO", logger="evcharge.apps.ocpp")
        event = {
            "event_id": 7,
            "timestamp": now_text(),
            "trigger": "Alerting",
            "actual_value": "true",
            "tech_code": "E42",
            "event_notification_type": "HardWiredNotification",
            "component": {"name": "EVSE", "evse": {"id": 1}},
            "variable": {"name": "Problem"},
        }
        await cs.call(call.NotifyEvent(generated_at=now_text(), seq_no=0, event_data=[event]))
        assert any(
            "EVSE (EVSE 1).Problem = 'true'" in r.getMessage() and "E42" in r.getMessage() for r in caplog.records
        )
    await until(lambda: status(server, "NAT-PN-3") == "offline")


async def test_authorize_tells_why_in_2_0_1_words(server: Server, world: World) -> None:
    async with (
        running_gateway(server) as gw,
        station(gw.port, world, "NAT-CEN-2") as cs,
        vehicle(server, "V01") as v1,
        vehicle(server, "V04") as v4,
    ):
        await boot(cs, server)

        async def authorize(id_token: dict[str, str]) -> dict[str, Any]:
            return dict((await cs.call(call.Authorize(id_token=id_token))).id_token_info)

        assert (await authorize(token("V01")))["status"] == "NotAtThisLocation"  # no reservation here
        r = await v1.reserve("NAT-CEN-2", v1.server_now(), 30)
        await v4.reserve("NAT-CEN-2", v4.server_now() + timedelta(minutes=45), 30)
        accepted = await authorize(token("V01"))
        assert accepted["status"] == "Accepted"
        # Good until its slot ends, in wall-clock time.
        assert "cache_expiry_date_time" in accepted and r.end > v1.server_now()
        for kind in ("ISO15693", "KeyCode", "Local", "Central", "eMAID", "MacAddress"):
            assert (await authorize(token("v01", kind)))["status"] == "Accepted", kind  # any type, any case
        assert (await authorize(token("V04")))["status"] == "NotAtThisTime"  # its slot is later
        assert (await authorize(token("NOBODY")))["status"] == "Unknown"
        assert (await authorize({"id_token": "", "type": "NoAuthorization"}))["status"] == "Unknown"


async def test_reservations_become_reserve_now_and_cancel_reservation(
    server: Server, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_gateway(server) as gw,
        station(gw.port, world, "NAT-PN-3") as cs,
        vehicle(server, "V01") as v,
    ):
        await boot(cs, server)
        later = await v.reserve("NAT-PN-3", v.server_now() + timedelta(hours=3), 30)
        r = await v.reserve("NAT-PN-3", v.server_now(), 30)
        reserve = await cs.expect("ReserveNow")
        expiry = datetime.fromisoformat(reserve.pop("expiry_date_time"))
        assert reserve == {"id": m.ocpp_id(r.id), "id_token": {"id_token": "V01", "type": "Central"}, "evse_id": 1}
        # It expires when the server would call it a no-show, in wall-clock time.
        no_show = m.wall_clock(r.start + timedelta(minutes=15), v.server_now(), v.time_scale)
        assert abs(expiry - no_show) < timedelta(seconds=2)
        assert cs.got_none("ReserveNow"), f"{later.id} is hours away and must not be held yet"
        await v.cancel(r.id)
        assert await cs.expect("CancelReservation") == {"reservation_id": m.ocpp_id(r.id)}
        cs.answers["ReserveNow"] = "RpcFrameworkError"  # asked again a little later
        again = await v.reserve("NAT-PN-3", v.server_now() + timedelta(minutes=1), 20)
        assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(again.id)
        cs.answers["ReserveNow"] = "Accepted"
        assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(again.id)
        ours = [r for r in caplog.records if r.name.startswith("evcharge") and r.levelno >= logging.ERROR]
        assert not ours, "a CallError is no failure of ours"


async def test_remote_start_and_stop_run_a_transaction_into_history(server: Server, world: World) -> None:
    price = world.charge_point("NAT-PN-3")[1].price_per_kwh
    async with (
        running_gateway(server) as gw,
        station(gw.port, world, "NAT-PN-3") as cs,
        vehicle(server, "V01") as v,
    ):
        await boot(cs, server)
        progress: list[p.Event] = []
        v.on_event.append(progress.append)
        r = await v.reserve("NAT-PN-3", v.server_now(), 30)
        await cs.expect("ReserveNow")

        assert (await v.start_charging(r.id)).state == "charging"
        asked = await cs.expect("RequestStartTransaction")
        assert asked == {
            "id_token": {"id_token": "V01", "type": "Central"},
            "remote_start_id": m.ocpp_id(r.id),
            "evse_id": 1,
        }
        started = await cs.transaction_event(
            "Started",
            "RemoteStart",
            "tx-1",
            wh=120_000,
            context="Transaction.Begin",
            id_token=asked["id_token"],
            remote_start_id=asked["remote_start_id"],
            charging_state="Charging",
        )
        assert started.id_token_info["status"] == "Accepted"
        await cs.notify("Occupied")
        assert await fresh_status(server, cs) == "charging"
        await cs.transaction_event("Updated", "MeterValuePeriodic", "tx-1", wh=125_000)
        await until(lambda: any(isinstance(e, p.ChargingProgress) and e.kwh == 5.0 for e in progress))

        stopping = asyncio.create_task(v.stop_charging(r.id))
        assert await cs.expect("RequestStopTransaction") == {"transaction_id": "tx-1"}
        ended = await cs.transaction_event(
            "Ended", "RemoteStop", "tx-1", wh=127_500, context="Transaction.End", stopped_reason="Remote"
        )
        assert ended.total_cost == round(7.5 * price, 2)
        done = await stopping
        assert (done.state, done.kwh, done.cost) == ("completed", 7.5, round(7.5 * price, 2))
        history = await v.history()
        assert [(s.reservation_id, s.kwh, s.cost) for s in history.sessions] == [(r.id, 7.5, round(7.5 * price, 2))]
        assert cs.got_none("RequestStopTransaction")


async def test_a_driver_plugs_in_then_shows_a_token_at_the_station(server: Server, world: World) -> None:
    price = world.charge_point("NAT-CEN-1")[1].price_per_kwh
    async with (
        running_gateway(server) as gw,
        station(gw.port, world, "NAT-CEN-1") as cs,
        vehicle(server, "V01") as v1,
        vehicle(server, "V04") as v4,
    ):
        await boot(cs, server)
        await v1.reserve("NAT-CEN-1", v1.server_now(), 30)
        later = await v4.reserve("NAT-CEN-1", v4.server_now() + timedelta(minutes=45), 30)
        # The cable first: a transaction nobody has authorized waits for its driver.
        plugged = await cs.transaction_event(
            "Started", "CablePluggedIn", "tx-a", wh=50_000, charging_state="EVConnected"
        )
        assert plugged.id_token_info is None and plugged.total_cost is None
        assert [x.state for x in await v1.reservations()] == ["booked"]
        # The wrong driver's card: refused, with the reason, and no session.
        wrong = await cs.transaction_event("Updated", "Authorized", "tx-a", id_token=token("V04"))
        assert wrong.id_token_info["status"] == "NotAtThisTime"
        assert [x.state for x in await v4.reservations()] == ["booked"]
        # The right one: the server starts V01's session, as its `charge` would.
        right = await cs.transaction_event(
            "Updated", "Authorized", "tx-a", id_token=token("V01"), charging_state="Charging"
        )
        assert right.id_token_info["status"] == "Accepted"
        assert [x.state for x in await v1.reservations()] == ["charging"]
        await cs.transaction_event("Updated", "MeterValuePeriodic", "tx-a", wh=52_250)
        ended = await cs.transaction_event(
            "Ended",
            "EVCommunicationLost",
            "tx-a",
            wh=54_000,
            context="Transaction.End",
            stopped_reason="EVDisconnected",
            id_token=token("V01"),
        )
        assert ended.total_cost == round(4.0 * price, 2) and ended.id_token_info["status"] == "Accepted"
        [done] = await v1.reservations(include_past=True)
        assert (done.state, done.kwh, done.cost) == ("completed", 4.0, round(4.0 * price, 2))
        assert [(s.kwh, s.cost) for s in (await v1.history()).sessions] == [(4.0, round(4.0 * price, 2))]
        assert later.id in {x.id for x in await v4.reservations()}

        # Energy delivered in a transaction that is nobody's session: it is stopped.
        await cs.transaction_event("Started", "CablePluggedIn", "tx-free", wh=0, charging_state="Charging")
        assert await cs.expect("RequestStopTransaction") == {"transaction_id": "tx-free"}


async def test_the_station_letting_a_reservation_go_is_heard(world: World, tmp_path: Path) -> None:
    # x300: the 15 simulated minutes of grace before a no-show pass in 3 real seconds.
    async with (
        running_server(world, tmp_path / "data", time_scale=300.0) as server,
        running_gateway(server) as gw,
        station(gw.port, world, "MOS-1-2") as cs,
        vehicle(server, "V01") as v,
    ):
        await boot(cs, server)
        link = gw.links["MOS-1-2"]
        removed = await v.reserve("MOS-1-2", v.server_now(), 60)
        assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(removed.id)
        await until(lambda: removed.id in link.held_at_cp)
        # Taken off at the station (by its owner, say): the booking stands, and is not handed over again.
        await cs.call(
            call.ReservationStatusUpdate(reservation_id=m.ocpp_id(removed.id), reservation_update_status="Removed")
        )
        assert removed.id not in link.held_at_cp and removed.id in link.reserve_refused
        assert [x.state for x in await v.reservations()] == ["booked"]
        # Its expiry at the station is the moment the server calls it a no-show.
        await v.cancel(removed.id)
        expiring = await v.reserve("MOS-1-2", v.server_now(), 60)
        assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(expiring.id)
        await until(lambda: server.books.reservations[expiring.id].state == "expired", timeout=20)
        await cs.call(
            call.ReservationStatusUpdate(reservation_id=m.ocpp_id(expiring.id), reservation_update_status="Expired")
        )
        assert expiring.id not in link.held_at_cp
        # Nothing stuck: the next reservation is handed over as usual.
        following = await v.reserve("MOS-1-2", v.server_now(), 30)
        assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(following.id)


async def test_bad_credentials_unknown_ids_and_malformed_frames_get_2_0_1_answers(server: Server, world: World) -> None:
    async with running_gateway(server) as gw, station(gw.port, world, "NAT-PN-3") as good:
        await boot(good, server)

        async def refused_with(cs_id: str, **options: Any) -> int:
            with pytest.raises(InvalidStatus) as caught:
                async with station(gw.port, world, cs_id, **options):
                    pass
            return caught.value.response.status_code

        assert await refused_with("NAT-PN-2", password="not-the-secret") == 401
        assert await refused_with("NAT-PN-2", password=secret_of(world, "NAT-PN-3")) == 401  # another's secret
        assert await refused_with("NO-SUCH-CP") == 404
        assert not server.books.charge_points["NAT-PN-2"].online

        async with connect(
            f"ws://127.0.0.1:{gw.port}/NAT-PN-2",
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers=basic("NAT-PN-2", secret_of(world, "NAT-PN-2")),
            open_timeout=5,
            close_timeout=2,
        ) as raw:

            async def answer(frame: str) -> list[Any]:
                await raw.send(frame)
                return json.loads(await asyncio.wait_for(raw.recv(), 10))

            # OCPP-J 2.0.1's error table (§4.3), frame by frame.
            assert (await answer("this is not json"))[:3] == [4, "-1", "RpcFrameworkError"]
            assert (await answer('{"an": "object"}'))[:3] == [4, "-1", "RpcFrameworkError"]
            assert (await answer('[2, 17, "Heartbeat", {}]'))[:3] == [4, "-1", "RpcFrameworkError"]
            assert (await answer('[9, "m1", "Heartbeat", {}]'))[:3] == [4, "m1", "MessageTypeNotSupported"]
            assert (await answer('[2, "m2", "Heartbeat", []]'))[:3] == [4, "m2", "FormatViolation"]
            unknown = await answer('[2, "m3", "NoSuchAction", {}]')
            assert unknown[:4] == [4, "m3", "NotImplemented", "Requested Action is not known by receiver"]
            assert (await answer('[2, "m4", "Reset", {"type": "Immediate"}]'))[:3] == [4, "m4", "NotSupported"]
            assert (await answer('[2, "m5", "Heartbeat", {"unexpected": 1}]'))[:3] == [4, "m5", "FormatViolation"]
            missing = await answer('[2, "m6", "BootNotification", {"reason": "PowerUp"}]')
            assert missing[:3] == [4, "m6", "OccurrenceConstraintViolation"]
            flying = '{"timestamp": "2030-01-01T00:00:00Z", "connectorStatus": "Flying", "evseId": 1, "connectorId": 1}'
            assert (await answer(f'[2, "m7", "StatusNotification", {flying}]'))[:3] == [4, "m7", "FormatViolation"]
            wrong_type = '{"timestamp": "2030-01-01T00:00:00Z", "connectorStatus": "Available", "evseId": "one", '
            wrong_type += '"connectorId": 1}'
            assert (await answer(f'[2, "m8", "StatusNotification", {wrong_type}]'))[:3] == [
                4,
                "m8",
                "TypeConstraintViolation",
            ]
            ok = await answer('[2, "m9", "Heartbeat", {}]')
            assert ok[:2] == [3, "m9"] and "currentTime" in ok[2]
        assert await fresh_status(server, good) == "available"
        assert set(gw.links) == {"NAT-PN-3"}


async def test_both_versions_at_once_on_one_gateway(server: Server, world: World) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point16(gw.port, world, "NAT-PN-1") as old,
        station(gw.port, world, "NAT-PN-3") as new,
        station(gw.port, world, "NAT-PN-2", subprotocols=("ocpp1.6", SUBPROTOCOL)) as either,
        vehicle(server, "V01") as v,
    ):
        # A charge point that offers both gets 2.0.1.
        assert either._connection.subprotocol == SUBPROTOCOL
        assert {cp_id: link.version for cp_id, link in gw.links.items()} == {
            "NAT-PN-1": "1.6",
            "NAT-PN-3": "2.0.1",
            "NAT-PN-2": "2.0.1",
        }
        await boot16(old, server)
        await boot(new, server)
        await old.call(call16.StatusNotification(connector_id=1, error_code="GroundFailure", status="Faulted"))
        await new.notify("Unavailable")
        assert await fresh_status16(server, old) == "faulted"
        assert await fresh_status(server, new) == "unavailable"
        await new.notify("Available")
        assert await fresh_status(server, new) == "available"
        r3 = await v.reserve("NAT-PN-3", v.server_now(), 30)
        assert (await new.expect("ReserveNow"))["id"] == m.ocpp_id(r3.id)
        await old.call(call16.StatusNotification(connector_id=1, error_code="NoError", status="Available"))
        assert await fresh_status16(server, old) == "available"
        r1 = await v.reserve("NAT-PN-1", v.server_now() + timedelta(minutes=31), 30)
        await v.cancel(r3.id)
        assert (await new.expect("CancelReservation")) == {"reservation_id": m.ocpp_id(r3.id)}
        assert r1.state == "booked" and old.got_none("ReserveNow")  # its slot is not due yet


async def test_a_server_restart_reconnects_and_resyncs(world: World, tmp_path: Path) -> None:
    [port] = free_ports(1)
    data = tmp_path / "data"
    # The gateway comes first: it keeps trying until the server is there.
    gateway = Gateway(world, "A", host="127.0.0.1", port=0, server_host="127.0.0.1", server_port=port)
    await gateway.start()
    try:
        async with station(gateway.port, world, "JPA-1-2") as cs:
            async with running_server(world, data, port=port, time_scale=60.0) as first:
                await boot(cs, first)
                await cs.notify("Faulted")
                assert await fresh_status(first, cs) == "faulted"
            await cs.call(call.Heartbeat())  # the server is gone; the station stays connected to the gateway
            async with running_server(world, data, port=port, time_scale=60.0) as second:
                await until(lambda: second.books.charge_points["JPA-1-2"].online)
                await until(lambda: status(second, "JPA-1-2") == "faulted")
                await cs.notify("Available")
                assert await fresh_status(second, cs) == "available"
                async with vehicle(second, "V01") as v:
                    r = await v.reserve("JPA-1-2", v.server_now(), 30)
                    assert (await cs.expect("ReserveNow"))["id"] == m.ocpp_id(r.id)
    finally:
        await gateway.stop()


async def test_the_gateway_process_killed_in_mid_transaction_and_restarted(
    server: Server, world: World, gateway_process: Any
) -> None:
    price = world.charge_point("NAT-PN-2")[1].price_per_kwh
    [port] = free_ports(1)
    gateway = gateway_process(server.port, port)
    await gateway.start()
    connections: asyncio.Queue[Station] = asyncio.Queue()

    async def keep_connected() -> None:
        """What a real station does: connect, boot, and connect again when the line drops."""
        while True:
            try:
                async with station(port, world, "NAT-PN-2") as cs:
                    await boot(cs, server)
                    connections.put_nowait(cs)
                    await cs._connection.wait_closed()
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError):
                pass
            await asyncio.sleep(0.2)

    running = asyncio.create_task(keep_connected())
    try:
        first = await asyncio.wait_for(connections.get(), 20)
        async with vehicle(server, "V01") as v:
            r = await v.reserve("NAT-PN-2", v.server_now(), 30)
            assert (await first.expect("ReserveNow"))["id"] == m.ocpp_id(r.id)
            assert (await v.start_charging(r.id)).state == "charging"
            asked = await first.expect("RequestStartTransaction")
            await first.transaction_event(
                "Started",
                "RemoteStart",
                "tx-9",
                wh=100_000,
                id_token=asked["id_token"],
                remote_start_id=asked["remote_start_id"],
                charging_state="Charging",
            )
            await first.transaction_event("Updated", "MeterValuePeriodic", "tx-9", wh=104_000)
            await until(lambda: server.books.sessions[r.id].kwh == 4.0)
            gateway.kill()  # kill -9 in the middle of the session
            # The server ends the session of a charge point it lost, at the last reading it had.
            await until(lambda: server.books.reservations[r.id].state == "completed")
            await gateway.start()
            second = await asyncio.wait_for(connections.get(), 30)
            await until(lambda: server.books.charge_points["NAT-PN-2"].online, timeout=20)
            # The station charges on: that transaction is nobody's session now, and is stopped.
            going_on = await second.transaction_event(
                "Updated", "MeterValuePeriodic", "tx-9", wh=106_000, charging_state="Charging"
            )
            assert going_on.total_cost is None
            assert await second.expect("RequestStopTransaction") == {"transaction_id": "tx-9"}
            ended = await second.transaction_event(
                "Ended", "RemoteStop", "tx-9", wh=106_100, context="Transaction.End", stopped_reason="Remote"
            )
            assert ended.total_cost is None  # it changes nothing
            [done] = await v.reservations(include_past=True)
            assert (done.state, done.kwh, done.cost) == ("completed", 4.0, round(4.0 * price, 2))
            # The new gateway learns the books from the server and hands the next reservation over.
            following = await v.reserve("NAT-PN-2", v.server_now(), 30)
            assert (await second.expect("ReserveNow"))["id"] == m.ocpp_id(following.id)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# --- security profile 2: TLS on the gateway's own listener ----------------------------------------


@pytest.fixture(scope="module")
def gateway_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, ssl.SSLContext]:
    """A certificate for 127.0.0.1 and a client context that trusts only its CA."""
    where = tmp_path_factory.mktemp("gateway-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = where / "gateway.pem", where / "gateway.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return TlsFiles(cert=cert, key=key), trusting


async def test_security_profile_2_tls_and_basic_auth_on_the_gateway_itself(
    server: Server, world: World, gateway_cert: tuple[TlsFiles, ssl.SSLContext], gateway_process: Any
) -> None:
    files, trusting = gateway_cert
    listener = server_context(files, require_client_cert=False)
    async with running_gateway(server, listener_ssl=listener) as gw:
        async with station(gw.port, world, "NAT-PN-3", ssl_context=trusting) as cs:
            await boot(cs, server)
            assert await fresh_status(server, cs) == "available"
        with pytest.raises(InvalidStatus) as wrong:
            async with station(gw.port, world, "NAT-PN-3", password="guess", ssl_context=trusting):
                pass
        assert wrong.value.response.status_code == 401
        with pytest.raises((InvalidHandshake, ConnectionClosed, OSError, TimeoutError)):
            async with station(gw.port, world, "NAT-PN-3"):  # plain ws:// to a TLS listener
                pass

    # The command: --tls-cert/--tls-key make its listener wss://; --plain-listener keeps ws://.
    [port, plain_port] = free_ports(2)
    process = gateway_process(server.port, port, "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    await process.start()
    async with station(port, world, "NAT-PN-1", ssl_context=trusting) as cs:
        await boot(cs, server)
    plain = gateway_process(
        server.port, plain_port, "--tls-cert", str(files.cert), "--tls-key", str(files.key), "--plain-listener"
    )
    await plain.start()
    async with station(plain_port, world, "NAT-PN-2") as cs:
        await boot(cs, server)
    assert "wss://127.0.0.1" in process.log_path.read_text()
