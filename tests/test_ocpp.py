"""The OCPP 1.6J gateway, driven by the `ocpp` library's own ChargePoint over a real WebSocket.

The charge point here is a client we did not write (``ocpp.v16.ChargePoint`` on
``websockets``); the gateway and the operator's server are real, on loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ocpp.messages import Call
from ocpp.routing import on
from ocpp.v16 import ChargePoint as OcppChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.gateway import Gateway
from evcharge.apps.ocpp.v16 import SUBPROTOCOL
from evcharge.domain.world import Rules, VehicleConfig, World, load_world
from evcharge.links.client import Client
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.tls import Listen, client_context

from .conftest import Pki, free_ports, operator, running_server, vehicle
from .ocpp_harness import basic, now_text, running_gateway, secret_of, status, until

pytestmark = pytest.mark.timeout(90)


# --- the charge point: the ocpp library's class, answering what the gateway asks ------------


class ChargePoint(OcppChargePoint):
    """A charge point that says yes (or what ``answers`` says) and remembers every request."""

    def __init__(self, cp_id: str, websocket: ClientConnection) -> None:
        super().__init__(cp_id, websocket, response_timeout=10)
        self.requests: dict[str, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.answers: dict[str, str] = {}
        self.start_eagerly = False

    async def expect(self, action: str, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.requests[action].get(), timeout)

    def got_none(self, action: str) -> bool:
        return self.requests[action].empty()

    def _got(self, action: str, payload: dict[str, Any]) -> str:
        self.requests[action].put_nowait(payload)
        return self.answers.get(action, "Accepted")

    @on(Action.reserve_now)
    def on_reserve_now(self, **payload: Any) -> call_result.ReserveNow:
        return call_result.ReserveNow(status=self._got("ReserveNow", payload))

    @on(Action.cancel_reservation)
    def on_cancel_reservation(self, **payload: Any) -> call_result.CancelReservation:
        return call_result.CancelReservation(status=self._got("CancelReservation", payload))

    @on(Action.remote_start_transaction)
    async def on_remote_start_transaction(self, **payload: Any) -> call_result.RemoteStartTransaction:
        status = self._got("RemoteStartTransaction", payload)
        if self.start_eagerly and status == "Accepted":
            # The cable is in already: StartTransaction goes out even before the answer does.
            start = {"connectorId": 1, "idTag": payload["id_tag"], "meterStart": 0, "timestamp": now_text()}
            await self._send(Call("eager-start", "StartTransaction", start).to_json())
        return call_result.RemoteStartTransaction(status=status)

    @on(Action.remote_stop_transaction)
    def on_remote_stop_transaction(self, **payload: Any) -> call_result.RemoteStopTransaction:
        return call_result.RemoteStopTransaction(status=self._got("RemoteStopTransaction", payload))


@asynccontextmanager
async def charge_point(
    port: int, world: World, cp_id: str, *, password: str | None = None, subprotocol: str = "ocpp1.6"
) -> AsyncIterator[ChargePoint]:
    async with connect(
        f"ws://127.0.0.1:{port}/{cp_id}",
        subprotocols=[subprotocol],  # type: ignore[list-item]
        additional_headers=basic(cp_id, password if password is not None else secret_of(world, cp_id)),
        open_timeout=5,
        close_timeout=2,
    ) as ws:
        cp = ChargePoint(cp_id, ws)
        reading = asyncio.create_task(cp.start())
        try:
            yield cp
        finally:
            await ws.close()
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


async def boot(cp: ChargePoint, server: Server) -> call_result.BootNotification:
    booted = await cp.call(call.BootNotification(charge_point_model="Wallbox 150", charge_point_vendor="Acme"))
    await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Available"))
    await until(lambda: server.books.charge_points[cp.id].online)
    return booted


async def fresh_status(server: Server, cp: ChargePoint) -> str:
    # A heartbeat's answer comes after everything the charge point sent before it was handled.
    await cp.call(call.Heartbeat())
    return status(server, cp.id)


# --- the mapping, on its own ------------------------------------------------------------


def test_ocpp_status_maps_onto_ours_and_the_worse_connector_wins() -> None:
    assert m.reported_status({}) is None
    for ocpp_status in ("Available", "Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing", "Reserved"):
        assert m.reported_status({1: (ocpp_status, "")}) == ("available", "")
    assert m.reported_status({1: ("Unavailable", "x")}) == ("unavailable", "x")
    assert m.reported_status({0: ("Faulted", "board"), 1: ("Available", "")}) == ("faulted", "board")
    assert m.reported_status({0: ("Unavailable", "a"), 1: ("Faulted", "b")}) == ("faulted", "b")
    assert m.status_info("Faulted", "GroundFailure", "relay", "E42") == "OCPP Faulted GroundFailure (vendor E42): relay"
    assert m.status_info("Available", "NoError", None, None) == "OCPP Available"


def test_id_tags_and_ids(world: World) -> None:
    assert m.id_tag("V01") == "V01"
    long_id = "vehicle-with-a-very-long-identifier"
    tag = m.id_tag(long_id)
    assert len(tag) == m.ID_TAG_MAX and tag != m.id_tag(long_id + "2")
    somebody = VehicleConfig(id=long_id, home="A", token="t" * 8, battery_kwh=60, consumption_kwh_per_km=0.2)
    tags = m.IdTags([*world.vehicles, somebody])
    assert tags.vehicle("V01") == "V01" and tags.vehicle("v01") == "V01"  # OCPP id tags ignore case
    assert tags.vehicle(tag.lower()) == long_id
    assert tags.vehicle("NOBODY") is None
    numbers = {m.ocpp_id(f"A-{n:010x}") for n in range(2000)}
    assert len(numbers) == 2000 and all(0 < n < 2**31 for n in numbers)
    assert m.ocpp_id("A-1a2b3c4d5e") == m.ocpp_id("A-1a2b3c4d5e")


def test_energy_register_readings() -> None:
    def sample(value: str, **extra: str) -> list[dict[str, Any]]:
        return [{"timestamp": "t", "sampled_value": [{"value": value, **extra}]}]

    assert m.energy_register_wh(sample("1500")) == 1500.0  # no measurand: the energy register
    assert m.energy_register_wh(sample("1.5", unit="kWh", measurand=m.ENERGY_REGISTER)) == 1500.0
    assert m.energy_register_wh(sample("7400", measurand="Power.Active.Import", unit="W")) is None
    assert m.energy_register_wh(sample("100", phase="L1")) is None
    assert m.energy_register_wh(sample("nan")) is None
    assert m.energy_register_wh(sample("-4")) is None
    assert m.energy_register_wh(sample("abc")) is None
    assert m.energy_register_wh(sample("10", unit="varh")) is None
    two = [*sample("1000"), *sample("2500")]
    assert m.energy_register_wh(two) == 2500.0  # the latest
    assert m.session_kwh(127_500, 120_000) == 7.5
    assert m.session_kwh(100, 200) == 0.0  # a meter never runs backwards into a refund
    assert m.session_kwh(1e12, 0) is None


def test_reserve_window_waits_for_the_slot_before() -> None:
    t0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)

    def res(rid: str, start_min: int, end_min: int) -> p.ReservationInfo:
        return p.ReservationInfo(
            id=rid,
            operator_id="A",
            station_id="S",
            charge_point_id="CP",
            vehicle_id="V",
            start=t0 + timedelta(minutes=start_min),
            end=t0 + timedelta(minutes=end_min),
            state="booked",
        )

    rules = Rules(early_start_min=10, no_show_grace_min=15)
    alone = res("a", 0, 60)
    assert m.reserve_window(alone, [alone], rules) == (t0 - timedelta(minutes=10), t0 + timedelta(minutes=15))
    before = res("b", -30, -4)  # someone else's slot ends 4 min before ours starts
    assert m.reserve_window(alone, [before, alone], rules)[0] == t0 - timedelta(minutes=4)
    short = res("c", 0, 5)  # a slot shorter than the grace period expires at its end
    assert m.reserve_window(short, [short], rules)[1] == t0 + timedelta(minutes=5)
    later = datetime.now(UTC) + timedelta(minutes=60)
    real = m.wall_clock(later, datetime.now(UTC), time_scale=60.0)
    assert timedelta(seconds=59) < real - datetime.now(UTC) <= timedelta(seconds=60)


# --- the gateway, end to end --------------------------------------------------------------


async def test_boot_heartbeat_and_status_reach_the_operator(server: Server, world: World) -> None:
    async with running_gateway(server) as gw, charge_point(gw.port, world, "NAT-PN-1") as cp:
        assert status(server, "NAT-PN-1") == "offline"
        booted = await boot(cp, server)
        assert (booted.status, booted.interval) == ("Accepted", round(world.rules.heartbeat_s))
        beat = await cp.call(call.Heartbeat())
        assert abs(datetime.fromisoformat(beat.current_time) - datetime.now(UTC)) < timedelta(minutes=1)
        assert status(server, "NAT-PN-1") == "available"

        async def notify(connector: int, ocpp_status: str, error: str = "NoError", info: str | None = None) -> str:
            await cp.call(
                call.StatusNotification(connector_id=connector, error_code=error, status=ocpp_status, info=info)
            )
            return await fresh_status(server, cp)

        async with operator(server) as op:
            changes: list[p.Event] = []
            op.on_event.append(changes.append)
            assert await notify(1, "Faulted", "GroundFailure", "relay welded") == "faulted"
            assert await notify(1, "Preparing") == "available"
            assert await notify(1, "Unavailable") == "unavailable"
            assert await notify(1, "SuspendedEVSE") == "available"
            assert await notify(0, "Faulted", "InternalError") == "faulted"  # the whole charge point
            assert await notify(1, "Finishing") == "faulted"  # ...still: its controller is faulted
            assert await notify(0, "Available") == "available"
            assert await notify(2, "Faulted") == "available"  # no connector 2 here: ignored
            await op.heartbeat()
            seen = [e.status for e in changes if isinstance(e, p.ChargePointChanged)]
            assert seen == ["faulted", "available", "unavailable", "available", "faulted", "available"]
    await until(lambda: status(server, "NAT-PN-1") == "offline")


async def test_reservations_become_reserve_now_and_cancel_reservation(server: Server, world: World) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-PN-1") as cp,
        vehicle(server, "V01") as v,
    ):
        await boot(cp, server)
        later = await v.reserve("NAT-PN-1", v.server_now() + timedelta(hours=3), 30)
        r = await v.reserve("NAT-PN-1", v.server_now(), 30)
        reserve = await cp.expect("ReserveNow")
        expiry = datetime.fromisoformat(reserve.pop("expiry_date"))
        assert reserve == {"connector_id": 1, "id_tag": "V01", "reservation_id": m.ocpp_id(r.id)}
        # It expires when the server would call it a no-show (15 simulated minutes after its
        # start), told in wall-clock time: 15 real seconds after the start at x60.
        no_show = m.wall_clock(r.start + timedelta(minutes=15), v.server_now(), v.time_scale)
        assert abs(expiry - no_show) < timedelta(seconds=2)
        assert cp.got_none("ReserveNow"), f"{later.id} is hours away and must not be held yet"
        await v.cancel(r.id)
        assert await cp.expect("CancelReservation") == {"reservation_id": m.ocpp_id(r.id)}
        # A charge point that cannot take one now (Occupied) is asked again.
        cp.answers["ReserveNow"] = "Occupied"
        again = await v.reserve("NAT-PN-1", v.server_now() + timedelta(minutes=1), 20)
        assert (await cp.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(again.id)
        cp.answers["ReserveNow"] = "Accepted"
        assert (await cp.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(again.id)


async def test_charge_and_release_run_a_remote_transaction_into_history(server: Server, world: World) -> None:
    price = world.charge_point("NAT-PN-1")[1].price_per_kwh
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-PN-1") as cp,
        vehicle(server, "V01") as v,
    ):
        await boot(cp, server)
        progress: list[p.Event] = []
        v.on_event.append(progress.append)
        r = await v.reserve("NAT-PN-1", v.server_now(), 30)
        reserved = await cp.expect("ReserveNow")

        starting = asyncio.create_task(v.start_charging(r.id))
        assert await cp.expect("RemoteStartTransaction") == {"id_tag": "V01", "connector_id": 1}
        assert (await starting).state == "charging"
        started = await cp.call(
            call.StartTransaction(
                connector_id=1,
                id_tag="V01",
                meter_start=120_000,
                timestamp=now_text(),
                reservation_id=reserved["reservation_id"],
            )
        )
        assert started.id_tag_info["status"] == "Accepted"
        tx = started.transaction_id
        await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Charging"))
        assert await fresh_status(server, cp) == "charging"

        await cp.call(
            call.MeterValues(
                connector_id=1,
                transaction_id=tx,
                meter_value=[
                    {
                        "timestamp": now_text(),
                        "sampled_value": [{"value": "125000", "measurand": m.ENERGY_REGISTER, "unit": "Wh"}],
                    }
                ],
            )
        )
        await until(lambda: any(isinstance(e, p.ChargingProgress) and e.kwh == 5.0 for e in progress))

        stopping = asyncio.create_task(v.stop_charging(r.id))
        assert await cp.expect("RemoteStopTransaction") == {"transaction_id": tx}
        await cp.call(
            call.StopTransaction(meter_stop=127_500, timestamp=now_text(), transaction_id=tx, reason="Remote")
        )
        done = await stopping
        assert (done.state, done.kwh, done.cost) == ("completed", 7.5, round(7.5 * price, 2))
        history = await v.history()
        assert [(s.reservation_id, s.kwh, s.cost) for s in history.sessions] == [(r.id, 7.5, round(7.5 * price, 2))]
        assert (history.total_kwh, history.total_cost) == (7.5, round(7.5 * price, 2))


async def test_a_start_transaction_before_the_remote_start_answer_is_the_vehicles_session(
    server: Server, world: World
) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-PN-2") as cp,
        vehicle(server, "V01") as v,
    ):
        await boot(cp, server)
        cp.start_eagerly = True
        r = await v.reserve("NAT-PN-2", v.server_now(), 30)
        assert (await v.start_charging(r.id)).state == "charging"
        # Nobody waits for that StartTransaction's answer in the library: it is left in its queue.
        answer = await asyncio.wait_for(cp._response_queue.get(), 10)
        assert answer.unique_id == "eager-start"
        assert answer.payload == {"transactionId": m.ocpp_id(r.id), "idTagInfo": {"status": "Accepted"}}
        assert [x.state for x in await v.reservations()] == ["charging"]


async def test_a_charge_point_connecting_again_replaces_its_older_connection(server: Server, world: World) -> None:
    async with running_gateway(server) as gw, charge_point(gw.port, world, "NAT-PN-1") as old:
        await boot(old, server)
        first_link = gw.links["NAT-PN-1"]
        async with charge_point(gw.port, world, "NAT-PN-1") as new:
            await asyncio.wait_for(old._connection.wait_closed(), 10)
            assert old._connection.close_code == 1000
            await boot(new, server)
            assert gw.links["NAT-PN-1"] is not first_link
            await new.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Unavailable"))
            assert await fresh_status(server, new) == "unavailable"
            async with operator(server) as op:
                assert (await op.inspect()).connections.get("station") == 1


async def test_a_driver_at_the_charge_point_charges_only_on_its_own_reservation(server: Server, world: World) -> None:
    price = world.charge_point("NAT-CEN-1")[1].price_per_kwh
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-CEN-1") as cp,
        vehicle(server, "V01") as v1,
        vehicle(server, "V04") as v4,
    ):
        await boot(cp, server)

        async def authorize(tag: str) -> str:
            return (await cp.call(call.Authorize(id_tag=tag))).id_tag_info["status"]

        async def start(tag: str, meter: int) -> call_result.StartTransaction:
            return await cp.call(
                call.StartTransaction(connector_id=1, id_tag=tag, meter_start=meter, timestamp=now_text())
            )

        assert await authorize("V01") == "Blocked"  # a known vehicle, but no reservation here
        await v1.reserve("NAT-CEN-1", v1.server_now(), 30)
        await v4.reserve("NAT-CEN-1", v4.server_now() + timedelta(minutes=45), 30)
        assert await authorize("V01") == "Accepted"
        assert await authorize("v01") == "Accepted"  # id tags are case-insensitive
        assert await authorize("V04") == "Blocked"  # its slot is later
        assert await authorize("NOBODY") == "Invalid"
        refused = await start("V04", 10_000)
        assert refused.id_tag_info["status"] == "Blocked"
        assert [x.state for x in await v4.reservations()] == ["booked"]
        assert (await start("NOBODY", 10_000)).id_tag_info["status"] == "Invalid"

        started = await start("V01", 50_000)
        assert started.id_tag_info["status"] == "Accepted"
        assert [x.state for x in await v1.reservations()] == ["charging"]
        assert await authorize("V01") == "ConcurrentTx"
        assert (await start("V01", 50_000)).transaction_id == started.transaction_id  # the same start, resent
        tx = started.transaction_id
        await cp.call(
            call.MeterValues(
                connector_id=1,
                transaction_id=tx,
                meter_value=[{"timestamp": now_text(), "sampled_value": [{"value": "52.25", "unit": "kWh"}]}],
            )
        )
        stopped = await cp.call(
            call.StopTransaction(
                meter_stop=54_000, timestamp=now_text(), transaction_id=tx, reason="EVDisconnected", id_tag="V01"
            )
        )
        assert stopped.id_tag_info["status"] == "Accepted"
        [done] = await v1.reservations(include_past=True)
        assert (done.state, done.kwh, done.cost) == ("completed", 4.0, round(4.0 * price, 2))
        assert [s.kwh for s in (await v1.history()).sessions] == [4.0]

        # A transaction the server has no session for is stopped: nobody would pay for it.
        await cp.call(
            call.MeterValues(
                connector_id=1,
                transaction_id=4242,
                meter_value=[{"timestamp": now_text(), "sampled_value": [{"value": "60000"}]}],
            )
        )
        assert await cp.expect("RemoteStopTransaction") == {"transaction_id": 4242}


async def test_bad_credentials_unknown_ids_and_malformed_frames_are_refused_alone(server: Server, world: World) -> None:
    async with running_gateway(server) as gw, charge_point(gw.port, world, "NAT-PN-1") as good:
        await boot(good, server)

        async def refused_with(cp_id: str, **options: Any) -> int:
            with pytest.raises(InvalidStatus) as caught:
                async with charge_point(gw.port, world, cp_id, **options):
                    pass
            return caught.value.response.status_code

        assert await refused_with("NAT-PN-2", password="not-the-secret") == 401
        assert await refused_with("NAT-PN-2", password=secret_of(world, "NAT-PN-1")) == 401  # another's secret
        assert await refused_with("NAT-PN-2", password="") == 401
        assert await refused_with("NO-SUCH-CP") == 404
        assert await refused_with("REC-BV-1") == 404  # another operator's charge point
        assert await refused_with("NAT-PN-2", subprotocol="ocpp1.5") == 400
        with pytest.raises(InvalidStatus) as no_auth:
            async with connect(f"ws://127.0.0.1:{gw.port}/NAT-PN-2", subprotocols=[SUBPROTOCOL], open_timeout=5):
                pass
        assert no_auth.value.response.status_code == 401
        assert no_auth.value.response.headers["WWW-Authenticate"].startswith("Basic")
        assert not server.books.charge_points["NAT-PN-2"].online

        # Malformed OCPP frames from an authenticated charge point: a CallError each, and it stays connected.
        async with connect(
            f"ws://127.0.0.1:{gw.port}/NAT-PN-2",
            subprotocols=[SUBPROTOCOL],
            additional_headers=basic("NAT-PN-2", secret_of(world, "NAT-PN-2")),
            open_timeout=5,
            close_timeout=2,
        ) as raw:

            async def answer(frame: str) -> list[Any]:
                await raw.send(frame)
                return json.loads(await asyncio.wait_for(raw.recv(), 10))

            # OCPP-J 1.6's error table (§4.2.3, with its errata's spelling), frame by frame.
            assert (await answer("this is not json"))[:3] == [4, "-1", "FormationViolation"]
            assert (await answer("[" * 5000 + "]" * 5000))[:3] == [4, "-1", "FormationViolation"]  # too deep
            deep = '[2, "d1", "DataTransfer", {"vendorId": "x", "data": ' + "[" * 500 + "]" * 500 + "}]"
            assert (await answer(deep))[:3] == [4, "d1", "FormationViolation"]
            assert (await answer('{"an": "object"}'))[:3] == [4, "-1", "ProtocolError"]
            assert (await answer('[2, "m1", "BootNotification", "not an object"]'))[:3] == [4, "m1", "ProtocolError"]
            assert (await answer('[2, "m2", ["Heart", "beat"], {}]'))[:3] == [4, "m2", "ProtocolError"]
            assert (await answer('[9, "m3", "Heartbeat", {}]'))[:3] == [4, "m3", "PropertyConstraintViolation"]
            missing = await answer('[2, "m4", "BootNotification", {"chargePointVendor": "Acme"}]')
            assert missing[:3] == [4, "m4", "ProtocolError"]
            assert (await answer('[2, "m5", "Heartbeat", {"unexpected": 1}]'))[:3] == [4, "m5", "FormationViolation"]
            flying = '[2, "m6", "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Flying"}]'
            assert (await answer(flying))[:3] == [4, "m6", "FormationViolation"]
            wrong_type = await answer(
                '[2, "m7", "StatusNotification", {"connectorId": "one", "errorCode": "NoError", "status": "Available"}]'
            )
            assert wrong_type[:3] == [4, "m7", "TypeConstraintViolation"]
            unknown = await answer('[2, "ua-1", "NoSuchAction", {}]')
            assert unknown[:4] == [4, "ua-1", "NotImplemented", "Requested Action is not known by receiver"]
            reset = await answer('[2, "m8", "Reset", {"type": "Hard"}]')  # a 1.6 action, not one a charge point sends
            assert reset[:3] == [4, "m8", "NotSupported"]
            assert reset[3] == "Requested Action is recognized but not supported by the receiver"
            await raw.send('[3, "nobody-asked", {}]')  # an answer to nothing: dropped
            ok = await answer('[2, "m9", "Heartbeat", {}]')
            assert ok[:2] == [3, "m9"] and "currentTime" in ok[2]
            # One too large for the gateway closes only that connection (1009, message too big).
            await raw.send("[" + " " * (300 * 1024) + "]")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(raw.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

        # The good charge point never noticed.
        assert await fresh_status(server, good) == "available"
        await good.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Unavailable"))
        assert await fresh_status(server, good) == "unavailable"
        assert server.books.charge_points["NAT-PN-1"].online
        assert set(gw.links) == {"NAT-PN-1"}


# --- restarts ---------------------------------------------------------------------------------


async def test_a_server_restart_reconnects_and_resyncs(world: World, tmp_path: Path) -> None:
    [port] = free_ports(1)
    data = tmp_path / "data"
    # The gateway comes first: it keeps trying until the server is there.
    gateway = Gateway(world, "A", host="127.0.0.1", port=0, server_host="127.0.0.1", server_port=port)
    await gateway.start()
    try:
        async with charge_point(gateway.port, world, "JPA-1-1") as cp:
            async with running_server(world, data, port=port, time_scale=60.0) as first:
                await boot(cp, first)
                await cp.call(call.StatusNotification(connector_id=1, error_code="OtherError", status="Faulted"))
                assert await fresh_status(first, cp) == "faulted"
            # The server is gone; the charge point stays connected to the gateway.
            await cp.call(call.Heartbeat())
            async with running_server(world, data, port=port, time_scale=60.0) as second:
                # A restarted server knows nothing of the fault until the gateway says it again.
                await until(lambda: second.books.charge_points["JPA-1-1"].online)
                await until(lambda: status(second, "JPA-1-1") == "faulted")
                await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Available"))
                assert await fresh_status(second, cp) == "available"
                async with vehicle(second, "V01") as v:
                    r = await v.reserve("JPA-1-1", v.server_now(), 30)
                    assert (await cp.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(r.id)
    finally:
        await gateway.stop()


async def test_a_session_the_server_ended_while_the_link_was_down_is_stopped_at_the_charge_point(
    server: Server, world: World
) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "MOS-1-1") as cp,
        vehicle(server, "V01") as v,
    ):
        await boot(cp, server)
        r = await v.reserve("MOS-1-1", v.server_now(), 30)
        started = await cp.call(
            call.StartTransaction(connector_id=1, id_tag="V01", meter_start=0, timestamp=now_text())
        )
        assert started.id_tag_info["status"] == "Accepted"
        # The line between gateway and server breaks: the server ends the session of a
        # charge point it cannot see, and the gateway reconnects.
        server.online.charge_points["MOS-1-1"].conn.abort()
        await until(lambda: server.books.reservations[r.id].state == "completed")
        assert await cp.expect("RemoteStopTransaction") == {"transaction_id": started.transaction_id}
        await until(lambda: server.books.charge_points["MOS-1-1"].online)
        # Its StopTransaction is answered, and changes nothing.
        await cp.call(
            call.StopTransaction(meter_stop=9000, timestamp=now_text(), transaction_id=started.transaction_id)
        )
        [done] = await v.reservations(include_past=True)
        assert (done.state, done.kwh) == ("completed", 0.0)


async def a_remote_start_never_started(cp: ChargePoint, server: Server, v: Client) -> p.ReservationInfo:
    """V01's RemoteStart, which the charge point accepts and never follows with a StartTransaction."""
    await boot(cp, server)
    r = await v.reserve(cp.id, v.server_now(), 30)
    assert (await cp.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(r.id)
    assert (await v.start_charging(r.id)).state == "charging"
    assert await cp.expect("RemoteStartTransaction") == {"id_tag": "V01", "connector_id": 1}
    return r


async def the_next_session_is_its_own(cp: ChargePoint, server: Server, v: Client, started_by: str) -> None:
    """V01's next reservation there is charged and billed as itself, however it starts."""
    price = server.world.charge_point(cp.id)[1].price_per_kwh
    r = await v.reserve(cp.id, v.server_now(), 30)
    # The gateway is in step with the server again: it hands this reservation over.
    assert (await cp.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(r.id)
    if started_by == "vehicle":  # RemoteStartTransaction, then the charge point's StartTransaction
        assert (await v.start_charging(r.id)).state == "charging"
        assert await cp.expect("RemoteStartTransaction") == {"id_tag": "V01", "connector_id": 1}
    started = await cp.call(
        call.StartTransaction(
            connector_id=1, id_tag="V01", meter_start=100_000, timestamp=now_text(), reservation_id=m.ocpp_id(r.id)
        )
    )
    assert started.id_tag_info["status"] == "Accepted"
    assert started.transaction_id == m.ocpp_id(r.id), "the new transaction went to an older reservation"
    assert server.books.reservations[r.id].state == "charging"
    await cp.call(
        call.StopTransaction(
            meter_stop=106_000, timestamp=now_text(), transaction_id=started.transaction_id, reason="EVDisconnected"
        )
    )
    done = server.views.reservation_info(server.books.reservations[r.id])
    assert (done.state, done.kwh, done.cost) == ("completed", 6.0, round(6.0 * price, 2))
    assert [(s.kwh, s.cost) for s in (await v.history()).sessions if s.reservation_id == r.id] == [
        (6.0, round(6.0 * price, 2))
    ]


@pytest.mark.parametrize("started_by", ["vehicle", "driver at the charge point"])
async def test_a_remote_start_the_server_ended_while_the_link_was_down_does_not_take_the_next_session(
    server: Server, world: World, started_by: str
) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-CEN-1") as cp,
        vehicle(server, "V01") as v,
    ):
        first = await a_remote_start_never_started(cp, server, v)
        # The gateway's server link breaks: the server ends the session of the charge point it
        # lost, with no RemoteStop (there is nobody to send it to), and the gateway reconnects.
        server.online.charge_points["NAT-CEN-1"].conn.abort()
        await until(lambda: server.books.reservations[first.id].state == "completed")
        await until(lambda: server.books.charge_points["NAT-CEN-1"].online)
        await the_next_session_is_its_own(cp, server, v, started_by)
        assert cp.got_none("RemoteStopTransaction")


@pytest.mark.parametrize("started_by", ["vehicle", "driver at the charge point"])
async def test_a_remote_start_the_server_ended_while_linked_does_not_take_the_next_session(
    server: Server, world: World, started_by: str
) -> None:
    async with (
        running_gateway(server) as gw,
        charge_point(gw.port, world, "NAT-CEN-1") as cp,
        vehicle(server, "V01") as v,
    ):
        first = await a_remote_start_never_started(cp, server, v)
        # A fault ends the session on the server, which tells the gateway only by the
        # reservation's change (no RemoteStop: the charge point is faulted).
        await cp.call(call.StatusNotification(connector_id=1, error_code="GroundFailure", status="Faulted"))
        assert await fresh_status(server, cp) == "faulted"
        assert server.books.reservations[first.id].state == "completed"
        await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Available"))
        assert await fresh_status(server, cp) == "available"
        await the_next_session_is_its_own(cp, server, v, started_by)
        assert cp.got_none("RemoteStopTransaction")


async def test_the_gateway_process_restarts_and_charge_points_come_back(
    server: Server, world: World, gateway_process: Any
) -> None:
    [port] = free_ports(1)
    gateway = gateway_process(server.port, port)
    await gateway.start()
    connections: asyncio.Queue[ChargePoint] = asyncio.Queue()

    async def keep_connected() -> None:
        """What a real charge point does: connect, boot, and connect again when the line drops."""
        while True:
            try:
                async with charge_point(port, world, "NAT-PN-2") as cp:
                    await cp.call(call.BootNotification(charge_point_model="X", charge_point_vendor="Acme"))
                    connections.put_nowait(cp)
                    await cp._connection.wait_closed()
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError):
                pass
            await asyncio.sleep(0.2)

    running = asyncio.create_task(keep_connected())
    try:
        first = await asyncio.wait_for(connections.get(), 20)
        await until(lambda: server.books.charge_points["NAT-PN-2"].online)
        assert await gateway.terminate() == 0
        await until(lambda: not server.books.charge_points["NAT-PN-2"].online)
        await gateway.start()
        second = await asyncio.wait_for(connections.get(), 30)
        assert second is not first
        await until(lambda: server.books.charge_points["NAT-PN-2"].online, timeout=20)
        async with vehicle(server, "V01") as v:
            r = await v.reserve("NAT-PN-2", v.server_now(), 30)
            assert (await second.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(r.id)
        # kill -9 this time: the charge point comes back all the same.
        gateway.kill()
        await gateway.start()
        third = await asyncio.wait_for(connections.get(), 30)
        await until(lambda: server.books.charge_points["NAT-PN-2"].online, timeout=20)
        # The new gateway learns the reservation from the server and hands it over again.
        assert (await third.expect("ReserveNow"))["reservation_id"] == m.ocpp_id(r.id)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# --- TLS to the server ------------------------------------------------------------------------


def station_listener(security: str) -> list[Listen]:
    """The layout README and protocol.md recommend: everyone but peers on one TLS listener."""
    return [Listen(frozenset({"vehicle", "station", "operator"}), "127.0.0.1", 0, security)]  # type: ignore[arg-type]


async def test_the_gateway_speaks_for_its_charge_points_over_mutual_tls(world: World, tmp_path: Path, pki: Pki) -> None:
    mine = pki.files["B"]  # any certificate the operator's CA signed will do for a station
    async with (
        running_server(world, tmp_path / "data", listen=station_listener("mtls"), tls=pki.files["A"]) as server,
        running_gateway(
            server,
            ssl_context=client_context(pki.ca, mine.cert, mine.key),
            server_hostname=pki.name("A"),
        ) as gw,
        charge_point(gw.port, world, "NAT-PN-1") as cp,
    ):
        await boot(cp, server)
        await cp.call(call.StatusNotification(connector_id=1, error_code="GroundFailure", status="Faulted"))
        assert await fresh_status(server, cp) == "faulted"
        [station] = [s for s in server.online.everyone if s.role == "station"]
        assert station.conn._writer.get_extra_info("peercert"), "the station link is not mutual TLS"


@pytest.fixture
def tls_world_path(world_path: Path, tmp_path: Path, pki: Pki) -> Path:
    """The test world where operator A's certificate is for a.evcharge.test, not the address it runs on."""
    text = world_path.read_text(encoding="utf-8")
    secret = 'secret = "operator-a-secret"\n'
    assert secret in text
    path = tmp_path / "tls.toml"
    path.write_text(text.replace(secret, f'{secret}tls_name = "{pki.name("A")}"\n', 1), encoding="utf-8")
    return path


async def test_the_gateway_command_takes_the_client_tls_options(
    tls_world_path: Path, tmp_path: Path, pki: Pki, gateway_process: Any
) -> None:
    world = load_world(str(tls_world_path))
    async with running_server(world, tmp_path / "data", listen=station_listener("tls"), tls=pki.files["A"]) as server:
        [port] = free_ports(1)
        gateway = gateway_process(server.port, port, "--tls-ca", str(pki.ca), world=tls_world_path)
        await gateway.start()
        async with charge_point(port, world, "NAT-PN-2") as cp:
            await boot(cp, server)
            await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Unavailable"))
            assert await fresh_status(server, cp) == "unavailable"
        assert await gateway.terminate() == 0
    assert "(tls)" in gateway.log_path.read_text()
