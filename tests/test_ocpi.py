"""``evcharge ocpi`` against a real server, driven by an eMSP of the tests' own: the whole OCPI flow.

One server (time 300 times real, so a 15-minute no-show grace passes in 3 s), one
station simulator for some of its charge points (the others stay offline), and one
OCPI edge, all processes, shared by the module; each test registers its own eMSP
party with its own registration token. Every object the edge sends is held
against the spec's tables (``ocpi_schemas``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from evcharge.domain.world import load_world
from evcharge.links.client import connect
from evcharge.links.requests import new_key
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError
from tools.harness import Child, OcpiEdgeProcess, ServerProcess, evcharge_command

from . import ocpi_schemas as s
from .conftest import REPO, run_cli
from .ocpi_harness import Emsp

pytestmark = pytest.mark.timeout(60)

ONLINE = ["NAT-PN-1", "NAT-PN-2", "NAT-CEN-1", "FOR-1-1", "FOR-1-2", "MOS-1-1"]
TOKENS_A = [f"token-a-{n:02d}" for n in range(1, 30)]
V = "/ocpi/2.2.1"


@dataclass
class Setup:
    server: ServerProcess
    edge: OcpiEdgeProcess
    world_path: Path
    tokens: Iterator[str]


@pytest.fixture(scope="module")
def setup(world_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("ocpi")
    tokens_file = tmp / "registration-tokens"
    tokens_file.write_text("# given to eMSPs by the operator\n" + "\n".join(TOKENS_A) + "\n")
    server = ServerProcess(world_path, "A", tmp / "data-A", tmp / "server.log", time_scale=300.0)
    station = Child("stations", tmp / "station.log")
    edge = OcpiEdgeProcess(
        world_path,
        "A",
        0,
        tmp / "edge",
        tmp / "edge.log",
        registration_tokens=tokens_file,
        extra=("--session-updates", "0.3"),
    )
    try:
        server.start()
        ids = [arg for cp in ONLINE for arg in ("--id", cp)]
        station.launch(
            evcharge_command("station", "--world", str(world_path), "--operator", "A", "--server", server.address, *ids)
        )
        edge.server_port = server.port
        edge.start()
        yield Setup(server, edge, world_path, iter(TOKENS_A))
    finally:
        edge.kill()
        station.kill()
        server.kill()


@pytest.fixture
async def emsp(setup: Setup) -> AsyncIterator[Emsp]:
    async with Emsp(setup.edge.url) as e:
        answer = await e.register(next(setup.tokens))
        assert answer.code == 1000, answer.body
        yield e


async def server_now(e: Emsp) -> datetime:
    """The operator's simulated now, as the edge says it (every envelope's timestamp)."""
    answer = await e.call("GET", "/ocpi/versions")
    return datetime.fromisoformat(answer.body["timestamp"])


async def evse_status(e: Emsp, location: str, evse: str) -> str:
    answer = await e.call("GET", f"{V}/locations/{location}/{evse}")
    assert answer.code == 1000, answer.body
    return str(answer.data["status"])


async def until_status(e: Emsp, location: str, evse: str, wanted: str, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while await evse_status(e, location, evse) != wanted:
            await asyncio.sleep(0.1)


_ids = itertools.count(1)


def booking_request(e: Emsp, location: str, start: datetime, minutes: int, **extra: object) -> dict[str, object]:
    n = next(_ids)
    return {
        "country_code": e.country_code,
        "party_id": e.party_id,
        "request_id": f"REQ-{e.party_id}-{n}",
        "location_id": location,
        "tokens": [
            {
                k: v
                for k, v in e.token(f"U{n}").items()
                if k in ("country_code", "party_id", "uid", "type", "contract_id")
            }
        ],
        "period": {"start_from": s_time(start), "end_before": s_time(start + timedelta(minutes=minutes))},
        "authorization_reference": f"AUTH-{n}",
        "unknown_field_is_ignored": True,
        **extra,
    }


def s_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- registration ---------------------------------------------------------------------------


async def test_registration_handshake_update_and_unregister(setup: Setup) -> None:
    async with Emsp(setup.edge.url) as e:
        token_a = next(setup.tokens)
        versions = await e.call("GET", "/ocpi/versions", token=token_a)
        assert versions.code == 1000
        s.check(s.VERSIONS, versions.data)
        details = await e.call("GET", versions.data[0]["url"], token=token_a)
        s.check(s.VERSION_DETAILS, details.data)
        assert {(x["identifier"], x["role"]) for x in details.data["endpoints"]} >= {
            ("credentials", "SENDER"), ("locations", "SENDER"), ("commands", "RECEIVER"), ("bookings", "SENDER"),
        }  # fmt: skip
        answer = await e.register(token_a)
        assert answer.code == 1000 and answer.status == 200, answer.body
        s.check(s.CREDENTIALS, answer.data)
        assert answer.data["roles"][0] == {
            "role": "CPO",
            "business_details": {"name": "Potiguar Energia"},
            "party_id": "POT",
            "country_code": "BR",
        }
        assert answer.headers["OCPI-to-party-id"] == e.party_id and answer.headers["OCPI-from-party-id"] == "POT"
        # Token A is used up; token C works (also without base64, as 2.1.1 parties send it).
        again = await e.call("POST", f"{V}/credentials", answer.data, token=token_a)
        assert again.status == 401 and again.code == 2000
        assert (await e.call("GET", f"{V}/credentials")).data["token"] == e.token_c
        raw = await e.call("GET", f"{V}/locations", headers={"Authorization": f"Token {e.token_c}"})
        assert raw.code == 1000
        # Registered already: POST is refused, PUT updates and turns the old token C away.
        assert (await e.call("POST", f"{V}/credentials", answer.data)).status == 405
        old = e.token_c
        e.token_b = "emsp-token-renewed"
        credentials = {"token": e.token_b, "url": f"{e.base}/ocpi/versions", "roles": answer.data["roles"]}
        credentials["roles"] = [dict(credentials["roles"][0], role="EMSP", party_id=e.party_id, country_code="NL")]
        updated = await e.call("PUT", f"{V}/credentials", credentials)
        assert updated.code == 1000, updated.body
        e.token_c = updated.data["token"]
        assert e.token_c != old
        assert (await e.call("GET", f"{V}/locations", token=old)).status == 401
        assert (await e.call("GET", f"{V}/locations")).code == 1000
        gone = await e.call("DELETE", f"{V}/credentials")
        assert gone.code == 1000
        assert (await e.call("GET", f"{V}/locations")).status == 401


async def test_registration_needs_a_reachable_emsp_and_a_common_version(setup: Setup) -> None:
    async with Emsp(setup.edge.url) as e:
        token_a = next(setup.tokens)
        credentials = {
            "token": "wrong-token-for-their-api",
            "url": f"{e.base}/ocpi/versions",
            "roles": [
                {"role": "EMSP", "business_details": {"name": "x"}, "party_id": e.party_id, "country_code": "NL"}
            ],
        }
        answer = await e.call("POST", f"{V}/credentials", credentials, token=token_a)
        assert answer.code == 3001, answer.body
        # Nothing was used up: the same token A registers once the eMSP's API answers.
        assert (await e.register(token_a)).code == 1000


# --- locations, tariffs, status pushes ------------------------------------------------------------


async def test_locations_paginated_and_mapped(emsp: Emsp) -> None:
    world = load_world("northeast")
    stations = world.stations_of("A")
    first = await emsp.call("GET", f"{V}/locations", limit=2)
    assert first.code == 1000 and len(first.data) == 2
    assert first.headers["X-Total-Count"] == str(len(stations)) and first.headers["X-Limit"] == "100"
    assert 'rel="next"' in first.headers["Link"] and "offset=2" in first.headers["Link"]
    everything = await emsp.all_pages(f"{V}/locations", limit=2)
    assert [loc["id"] for loc in everything] == [st.id for st in stations]
    for location in everything:
        s.check(s.LOCATION, location)
    natal = next(loc for loc in everything if loc["id"] == "NAT-PN")
    assert natal["country_code"] == "BR" and natal["party_id"] == "POT" and natal["country"] == "BRA"
    evse = next(x for x in natal["evses"] if x["uid"] == "NAT-PN-1")
    assert evse["connectors"][0]["standard"] == "IEC_62196_T2_COMBO"
    assert evse["connectors"][0]["power_type"] == "DC" and evse["connectors"][0]["max_electric_power"] == 150000
    assert evse["status"] in ("AVAILABLE", "RESERVED", "CHARGING")
    offline = next(loc for loc in everything if loc["id"] == "JPA-1")
    assert {x["status"] for x in offline["evses"]} == {"UNKNOWN"}  # no charge point there is connected
    one = await emsp.call("GET", f"{V}/locations/NAT-PN/NAT-PN-3/1")
    s.check(s.CONNECTOR, one.data)
    assert one.data["standard"] == "IEC_62196_T2" and one.data["power_type"] == "AC_3_PHASE"
    missing = await emsp.call("GET", f"{V}/locations/NOWHERE")
    assert missing.status == 404 and missing.code == 2003
    later = await emsp.call("GET", f"{V}/locations", date_from="2999-01-01T00:00:00Z")
    assert later.data == [] and later.headers["X-Total-Count"] == "0"
    bad = await emsp.call("GET", f"{V}/locations", offset=-1)
    assert bad.code == 2001
    tariffs = await emsp.all_pages(f"{V}/tariffs")
    for tariff in tariffs:
        s.check(s.TARIFF, tariff)
    assert {t["elements"][0]["price_components"][0]["price"] for t in tariffs} == {
        cp.price_per_kwh for st in stations for cp in st.charge_points
    }
    assert {t["currency"] for t in tariffs} == {"BRL"}


async def test_an_emsp_that_does_not_answer_holds_up_no_one_else(setup: Setup, emsp: Emsp) -> None:
    async with Emsp(setup.edge.url) as stuck:
        assert (await stuck.register(next(setup.tokens))).code == 1000
        stuck.hang = asyncio.Event()
        now = await server_now(emsp)
        reserve = {
            "response_url": f"{emsp.base}/emsp/commands/RESERVE_NOW/h",
            "token": emsp.token("H1"),
            "expiry_date": s_time(now + timedelta(minutes=20)),
            "reservation_id": "R-H",
            "location_id": "NAT-CEN",
            "evse_uid": "NAT-CEN-1",
        }
        began = time.monotonic()
        assert (await emsp.call("POST", f"{V}/commands/RESERVE_NOW", reserve)).data["result"] == "ACCEPTED"
        await emsp.wait_for(
            lambda: [b for m, path, b in emsp.received if m == "PATCH" and path.endswith("NAT-CEN/NAT-CEN-1")],
            timeout=9.5,
        )
        cancel = {"response_url": f"{emsp.base}/emsp/commands/CANCEL_RESERVATION/h", "reservation_id": "R-H"}
        await emsp.call("POST", f"{V}/commands/CANCEL_RESERVATION", cancel)
        await emsp.wait_for(
            lambda: [
                b
                for m, path, b in emsp.received
                if m == "PATCH" and path.endswith("NAT-CEN/NAT-CEN-1") and b["status"] == "AVAILABLE"
            ],
            timeout=9.5,
        )
        # Both changes arrived while the stuck eMSP still held its first push (10 s deadline).
        assert time.monotonic() - began < 9.5


# --- tokens and commands: reserve now, cancel, start, stop, the session and its CDR ------------------


async def test_tokens_and_commands_through_a_session_and_its_cdr(emsp: Emsp) -> None:
    token = emsp.token("DRIVER1")
    put = await emsp.call("PUT", f"{V}/tokens/NL/{emsp.party_id}/DRIVER1", token, type="APP_USER")
    assert put.status == 201 and put.code == 1000
    got = await emsp.call("GET", f"{V}/tokens/NL/{emsp.party_id}/DRIVER1", type="APP_USER")
    assert got.data["uid"] == "DRIVER1" and got.data["whitelist"] == "ALLOWED"
    patched = await emsp.call(
        "PATCH",
        f"{V}/tokens/NL/{emsp.party_id}/DRIVER1",
        {"valid": True, "last_updated": "2026-01-02T00:00:00Z"},
        type="APP_USER",
    )
    assert patched.code == 1000
    foreign = await emsp.call("PUT", f"{V}/tokens/DE/XYZ/DRIVER1", dict(token, country_code="DE", party_id="XYZ"))
    assert foreign.code == 2001  # another party's token is not its to push

    now = await server_now(emsp)
    reserve = {
        "response_url": f"{emsp.base}/emsp/commands/RESERVE_NOW/1",
        "token": token,
        "expiry_date": s_time(now + timedelta(minutes=30)),
        "reservation_id": "R-1",
        "location_id": "NAT-PN",
        "evse_uid": "NAT-PN-1",
    }
    answer = await emsp.call("POST", f"{V}/commands/RESERVE_NOW", reserve)
    s.check(s.COMMAND_RESPONSE, answer.data)
    assert answer.data["result"] == "ACCEPTED"
    result = await emsp.wait_for(lambda: emsp.results("RESERVE_NOW/1"))
    s.check(s.COMMAND_RESULT, result[0])
    assert result[0]["result"] == "ACCEPTED", result
    await until_status(emsp, "NAT-PN", "NAT-PN-1", "RESERVED")
    # The status change reached the eMSP as a PATCH of its Location receiver.
    patch = await emsp.wait_for(
        lambda: [b for m, path, b in emsp.received if m == "PATCH" and path.endswith("BR/POT/NAT-PN/NAT-PN-1")]
    )
    assert patch[-1]["status"] == "RESERVED" and "last_updated" in patch[-1]
    cancel = {"response_url": f"{emsp.base}/emsp/commands/CANCEL_RESERVATION/1", "reservation_id": "R-1"}
    assert (await emsp.call("POST", f"{V}/commands/CANCEL_RESERVATION", cancel)).data["result"] == "ACCEPTED"
    assert (await emsp.wait_for(lambda: emsp.results("CANCEL_RESERVATION/1")))[0]["result"] == "ACCEPTED"
    unknown = {"response_url": f"{emsp.base}/emsp/commands/CANCEL_RESERVATION/2", "reservation_id": "R-404"}
    await emsp.call("POST", f"{V}/commands/CANCEL_RESERVATION", unknown)
    assert (await emsp.wait_for(lambda: emsp.results("CANCEL_RESERVATION/2")))[0]["result"] == "UNKNOWN_RESERVATION"

    start = {
        "response_url": f"{emsp.base}/emsp/commands/START_SESSION/1",
        "token": token,
        "location_id": "NAT-PN",
        "evse_uid": "NAT-PN-2",
    }
    assert (await emsp.call("POST", f"{V}/commands/START_SESSION", start)).data["result"] == "ACCEPTED"
    started = await emsp.wait_for(lambda: emsp.results("START_SESSION/1"))
    assert started[0]["result"] == "ACCEPTED", started
    active = await emsp.wait_for(
        lambda: [
            b
            for m, path, b in emsp.received
            if m == "PUT" and path.startswith("sessions/BR/POT/") and b["status"] == "ACTIVE"
        ]
    )
    s.check(s.SESSION, active[0])
    session_id = active[0]["id"]
    assert active[0]["evse_uid"] == "NAT-PN-2" and active[0]["cdr_token"]["uid"] == "DRIVER1"
    pulled = await emsp.all_pages(f"{V}/sessions")
    assert [x["id"] for x in pulled] == [session_id]
    # While it charges, its kWh and cost grow at the eMSP too.
    growing = await emsp.wait_for(
        lambda: [b for m, path, b in emsp.received if m == "PATCH" and path.endswith(f"sessions/BR/POT/{session_id}")]
    )
    assert growing[-1]["kwh"] > 0 and growing[-1]["total_cost"]["excl_vat"] > 0
    stop = {"response_url": f"{emsp.base}/emsp/commands/STOP_SESSION/1", "session_id": session_id}
    assert (await emsp.call("POST", f"{V}/commands/STOP_SESSION", stop)).data["result"] == "ACCEPTED"
    assert (await emsp.wait_for(lambda: emsp.results("STOP_SESSION/1")))[0]["result"] == "ACCEPTED"
    cdrs = await emsp.wait_for(lambda: [b for m, path, b in emsp.received if m == "POST" and path == "cdrs"])
    cdr = cdrs[0]
    s.check(s.CDR, cdr)
    assert cdr["id"] == session_id and cdr["total_energy"] > 0 and cdr["currency"] == "BRL"
    assert cdr["total_cost"]["excl_vat"] == pytest.approx(round(cdr["total_energy"] * 1.89, 2), abs=0.02)
    completed = await emsp.wait_for(
        lambda: [
            b
            for m, path, b in emsp.received
            if m == "PUT" and path.startswith("sessions/") and b["status"] == "COMPLETED"
        ]
    )
    s.check(s.SESSION, completed[0])
    assert [c["id"] for c in await emsp.all_pages(f"{V}/cdrs")] == [session_id]
    # Someone else's session is no session to another party.
    async with Emsp(emsp.edge_url) as other:
        assert (await other.register(TOKENS_A[-1])).code == 1000
        steal = {"response_url": f"{other.base}/emsp/commands/STOP_SESSION/1", "session_id": session_id}
        assert (await other.call("POST", f"{V}/commands/STOP_SESSION", steal)).data["result"] == "UNKNOWN_SESSION"
        assert await other.all_pages(f"{V}/sessions") == [] and await other.all_pages(f"{V}/cdrs") == []


async def test_real_time_authorization_asks_the_emsp(emsp: Emsp) -> None:
    emsp.allow["BLOCKED1"] = "BLOCKED"
    token = emsp.token("BLOCKED1", whitelist="NEVER")
    assert (await emsp.call("PUT", f"{V}/tokens/NL/{emsp.party_id}/BLOCKED1", token, type="APP_USER")).code == 1000
    start = {"response_url": f"{emsp.base}/emsp/commands/START_SESSION/9", "token": token, "location_id": "NAT-CEN"}
    assert (await emsp.call("POST", f"{V}/commands/START_SESSION", start)).data["result"] == "ACCEPTED"
    result = await emsp.wait_for(lambda: emsp.results("START_SESSION/9"))
    assert result[0]["result"] == "REJECTED" and "BLOCKED" in result[0]["message"][0]["text"]
    assert any(m == "POST" and path == "tokens/BLOCKED1/authorize" for m, path, _ in emsp.received)


# --- bookings --------------------------------------------------------------------------------------------


async def test_book_a_timeslot_same_request_again_conflict_cancel(emsp: Emsp) -> None:
    locations = await emsp.all_pages(f"{V}/bookings/booking_locations")
    for location in locations:
        s.check(s.BOOKING_LOCATION, location)
    mine = next(x for x in locations if x["id"] == "FOR-1-1")
    assert mine["booking_terms"][0]["noshow_timeout"] == 15 and mine["booking_terms"][0]["change_not_allowed"] is True
    assert next(x for x in locations if x["id"] == "JPA-1-1")["calendars"] == []  # offline: nothing bookable
    now = await server_now(emsp)
    start = (now + timedelta(hours=3)).replace(second=0)
    request = booking_request(emsp, "FOR-1", start, 45, evse_uid="FOR-1-1")
    answer = await emsp.call("POST", f"{V}/bookings", request)
    assert answer.code == 1000, answer.body
    s.check(s.BOOKING, answer.data)
    booking = answer.data
    assert booking["reservation_status"] == "RESERVED" and booking["evse_uid"] == "FOR-1-1"
    assert booking["booking_requests"][0]["request_status"] == "ACCEPTED"
    again = await emsp.call("POST", f"{V}/bookings", request)
    assert again.data["id"] == booking["id"] and again.data["reservation_status"] == "RESERVED"
    # The slot is gone from the calendar.
    calendar = (await emsp.call("GET", f"{V}/bookings/booking_locations/FOR-1-1/FOR-1-1")).data
    s.check(s.CALENDAR, calendar)
    slots = [(x["start_from"], x["end_before"]) for x in calendar["available_timeslots"]]
    assert any(b == s_time(start) for _, b in slots) and any(
        a == s_time(start + timedelta(minutes=45)) for a, _ in slots
    )
    # Another request for the same slot on the same EVSE is rejected, with the reason.
    clash = await emsp.call(
        "POST", f"{V}/bookings", booking_request(emsp, "FOR-1", start + timedelta(minutes=10), 30, evse_uid="FOR-1-1")
    )
    assert clash.data["reservation_status"] == "REJECTED" and "taken" in clash.body["status_message"]
    # Without an EVSE, the location's next charge point that fits is booked.
    elsewhere = await emsp.call("POST", f"{V}/bookings", booking_request(emsp, "FOR-1", start, 30))
    assert elsewhere.data["reservation_status"] == "RESERVED" and elsewhere.data["evse_uid"] != "FOR-1-1"
    cancel = dict(request, canceled={"cancellation_reason": "TRAFFIC", "who_canceled": "EMSP"})
    canceled = await emsp.call("POST", f"{V}/bookings", cancel)
    assert canceled.data["reservation_status"] == "CANCELED" and canceled.data["canceled"]["who_canceled"] == "EMSP"
    change = dict(
        booking_request(emsp, "FOR-1", start, 30), request_id=elsewhere.data["request_id"], period=request["period"]
    )
    declined = await emsp.call("POST", f"{V}/bookings", change)
    assert declined.data["booking_requests"][-1]["request_status"] == "DECLINED"
    listed = {b["id"]: b["reservation_status"] for b in await emsp.all_pages(f"{V}/bookings")}
    assert listed[booking["id"]] == "CANCELED" and listed[elsewhere.data["id"]] == "RESERVED"
    for b in await emsp.all_pages(f"{V}/bookings"):
        s.check(s.BOOKING, b)


async def test_no_show_and_fulfilled_are_pushed(emsp: Emsp) -> None:
    now = await server_now(emsp)
    no_show = await emsp.call(
        "POST", f"{V}/bookings", booking_request(emsp, "NAT-CEN", now + timedelta(minutes=5), 60, evse_uid="NAT-CEN-1")
    )
    assert no_show.data["reservation_status"] == "RESERVED", no_show.body
    request = booking_request(emsp, "FOR-1", now + timedelta(minutes=5), 60, evse_uid="FOR-1-2")
    kept = await emsp.call("POST", f"{V}/bookings", request)
    assert kept.data["reservation_status"] == "RESERVED", kept.body
    token = emsp.token(request["tokens"][0]["uid"])  # type: ignore[index]
    start = {
        "response_url": f"{emsp.base}/emsp/commands/START_SESSION/b",
        "token": token,
        "location_id": "FOR-1",
        "evse_uid": "FOR-1-2",
    }
    await emsp.call("POST", f"{V}/commands/START_SESSION", start)
    assert (await emsp.wait_for(lambda: emsp.results("START_SESSION/b")))[0]["result"] == "ACCEPTED"

    def pushed(booking_id: str, status: str) -> bool:
        return any(
            m == "PATCH" and path.endswith(booking_id) and b["reservation_status"] == status
            for m, path, b in emsp.received
        )

    await emsp.wait_for(lambda: pushed(kept.data["id"], "FULFILLED"))
    await emsp.wait_for(lambda: pushed(no_show.data["id"], "NO_SHOW"), timeout=30)
    sessions = await emsp.all_pages(f"{V}/sessions")
    stop = {"response_url": f"{emsp.base}/emsp/commands/STOP_SESSION/b", "session_id": sessions[0]["id"]}
    await emsp.call("POST", f"{V}/commands/STOP_SESSION", stop)
    assert (await emsp.wait_for(lambda: emsp.results("STOP_SESSION/b")))[0]["result"] == "ACCEPTED"


async def test_an_offline_charge_point_is_unknown_and_cannot_be_reserved(emsp: Emsp) -> None:
    assert await evse_status(emsp, "JPA-1", "JPA-1-1") == "UNKNOWN"
    now = await server_now(emsp)
    refused = await emsp.call(
        "POST", f"{V}/bookings", booking_request(emsp, "JPA-1", now + timedelta(hours=1), 30, evse_uid="JPA-1-1")
    )
    assert refused.data["reservation_status"] == "REJECTED" and "UNKNOWN" in refused.body["status_message"]
    reserve = {
        "response_url": f"{emsp.base}/emsp/commands/RESERVE_NOW/x",
        "token": emsp.token("D9"),
        "expiry_date": s_time(now + timedelta(minutes=30)),
        "reservation_id": "R-X",
        "location_id": "JPA-1",
    }
    answer = await emsp.call("POST", f"{V}/commands/RESERVE_NOW", reserve)
    assert answer.data["result"] == "REJECTED"


async def test_a_foreign_booking_and_an_evcharge_vehicle_race_for_one_slot(setup: Setup, emsp: Emsp) -> None:
    world = load_world(str(setup.world_path))
    car = world.vehicle("T002")
    now = await server_now(emsp)
    start = (now + timedelta(hours=5)).replace(second=0)
    async with connect("127.0.0.1", setup.server.port, role="vehicle", ident=car.id, secret=car.token) as client:

        async def by_vehicle() -> bool:
            try:
                await client.call(
                    p.Reserve(charge_point_id="MOS-1-1", start=start, minutes=60, key=new_key()), p.ReservationReply
                )
                return True
            except ConflictError:
                return False

        async def by_booking() -> bool:
            answer = await emsp.call(
                "POST", f"{V}/bookings", booking_request(emsp, "MOS-1", start, 60, evse_uid="MOS-1-1")
            )
            return bool(answer.data["reservation_status"] == "RESERVED")

        results = await asyncio.gather(*(by_vehicle() for _ in range(3)), *(by_booking() for _ in range(3)))
    assert sum(results) == 1, results


async def test_a_foreign_booking_and_an_evcharge_trip_race_for_one_slot(setup: Setup, emsp: Emsp) -> None:
    """The trip's way into A's ledger: operator B, coordinating its vehicle V02's trip, PREPAREs a stop here."""
    world = load_world(str(setup.world_path))
    b = world.operator("B")
    now = await server_now(emsp)
    start = (now + timedelta(hours=6)).replace(second=0)
    async with connect("127.0.0.1", setup.server.port, role="peer", ident="B", secret=b.secret) as peer:
        txn = new_key()

        async def by_trip() -> bool:
            stop = p.StopRequest(charge_point_id="MOS-1-2", start=start, end=start + timedelta(minutes=40))
            prepare = p.Prepare(
                txn_id=txn, trip_id=f"trip-{txn}", vehicle_id="V02", stops=[stop], deadline=time.time() + 10
            )
            vote = await peer.call(prepare, p.Vote)
            if vote.yes:
                await peer.call(p.Decide(txn_id=txn, trip_id=f"trip-{txn}", commit=True), p.Ok)
            return vote.yes

        async def by_booking() -> bool:
            answer = await emsp.call(
                "POST", f"{V}/bookings", booking_request(emsp, "MOS-1", start, 40, evse_uid="MOS-1-2")
            )
            return bool(answer.data["reservation_status"] == "RESERVED")

        results = await asyncio.gather(by_trip(), *(by_booking() for _ in range(3)))
    assert sum(results) == 1, results


async def test_a_hub_speaks_for_its_parties_and_each_hears_of_its_own(setup: Setup) -> None:
    async with Emsp(setup.edge.url) as hub:
        second = f"H{hub.party_id[-2:]}"
        assert (await hub.register(next(setup.tokens), also=(second,))).code == 1000
        now = await server_now(hub)
        request = booking_request(hub, "FOR-1", now + timedelta(hours=9), 30, evse_uid="FOR-1-1")
        token = {"country_code": "NL", "party_id": second, "uid": "HUB-U", "type": "RFID", "contract_id": "C-HUB"}
        mine = await hub.call("POST", f"{V}/bookings", dict(request, party_id=second, tokens=[token]))
        assert mine.data["reservation_status"] == "RESERVED", mine.body
        stranger = dict(request, request_id="REQ-STRANGER", party_id="ZZZ", tokens=[dict(token, party_id="ZZZ")])
        assert (await hub.call("POST", f"{V}/bookings", stranger)).code == 2001  # a party it does not speak for
        cancel = dict(
            request,
            party_id=second,
            tokens=[token],
            canceled={"cancellation_reason": "TRAFFIC", "who_canceled": "EMSP"},
        )
        assert (await hub.call("POST", f"{V}/bookings", cancel)).data["reservation_status"] == "CANCELED"
        # An EVSE status change goes to the hub; a booking's news to the party it is for (OCPI-to-party-id).
        start = {
            "response_url": f"{hub.base}/emsp/commands/START_SESSION/hub",
            "token": hub.token("HUB-D"),
            "location_id": "FOR-1",
            "evse_uid": "FOR-1-1",
        }
        start["token"]["party_id"] = second
        await hub.call("POST", f"{V}/commands/START_SESSION", start)
        assert (await hub.wait_for(lambda: hub.results("START_SESSION/hub")))[0]["result"] == "ACCEPTED"
        sessions = await hub.wait_for(
            lambda: [p for p, to in hub.addressed if p.startswith("sessions/") and to == second]
        )
        assert sessions
        session_id = sessions[0].rpartition("/")[2]
        stop = {"response_url": f"{hub.base}/emsp/commands/STOP_SESSION/hub", "session_id": session_id}
        await hub.call("POST", f"{V}/commands/STOP_SESSION", stop)
        assert (await hub.wait_for(lambda: hub.results("STOP_SESSION/hub")))[0]["result"] == "ACCEPTED"


# --- the envelope, whatever comes ---------------------------------------------------------------------------


async def test_bad_input_gets_the_right_status_and_changes_nothing(emsp: Emsp) -> None:
    before = await emsp.all_pages(f"{V}/bookings")
    start_nowhere = {"response_url": f"{emsp.base}/emsp/commands/x", "token": emsp.token("Z"), "location_id": "NOWHERE"}
    cases = [
        ("POST", f"{V}/bookings", b"{not json", 400, 2001),
        ("POST", f"{V}/bookings", b'{"country_code": "NL"}', 200, 2001),
        ("POST", f"{V}/bookings", b"[]", 200, 2001),
        ("POST", f"{V}/commands/RESERVE_NOW", b'{"response_url": 5}', 200, 2001),
        ("POST", f"{V}/commands/TELEPORT", b"{}", 200, 2001),
        ("PUT", f"{V}/tokens/NL/{emsp.party_id}/U1", b'{"uid": "U1"}', 200, 2001),
        ("GET", f"{V}/tokens/NL/{emsp.party_id}/NOBODY", b"", 404, 2004),
        ("POST", f"{V}/commands/STOP_SESSION", b'{"response_url": "http://x/y", "session_id": "A-0"}', 200, 1000),
        ("POST", f"{V}/commands/START_SESSION", json.dumps(start_nowhere).encode(), 200, 2003),
        ("POST", f"{V}/bookings", b"x" * (65 * 1024), 413, 2001),
        ("GET", f"{V}/nothing/here", b"", 404, 2000),
        ("DELETE", f"{V}/locations", b"", 405, 2000),
    ]
    for method, path, raw, http_status, code in cases:
        answer = await emsp.call(method, path, raw=raw, headers={"X-Request-ID": "req-1", "X-Correlation-ID": "corr-1"})
        assert (answer.status, answer.code) == (http_status, code), (method, path, answer.body)
        assert answer.headers["X-Request-ID"] == "req-1" and answer.headers["X-Correlation-ID"] == "corr-1"
    answer = await emsp.call("GET", f"{V}/locations", token="not-a-token")
    assert answer.status == 401 and answer.code == 2000
    assert await emsp.all_pages(f"{V}/bookings") == before


# --- limits, restarts, the command line ------------------------------------------------------------------


async def test_too_many_requests_are_told_when_to_come_back(emsp: Emsp) -> None:
    answers = await asyncio.gather(*(emsp.call("GET", "/ocpi/versions") for _ in range(160)))
    limited = [a for a in answers if a.status == 429]
    assert limited and all(a.code == 2000 and int(a.headers["Retry-After"]) >= 1 for a in limited)
    assert sum(a.code == 1000 for a in answers) >= 100  # the burst went through


async def test_a_restarted_edge_keeps_its_parties_tokens_and_bookings(setup: Setup, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("restart-token-a\n")
    edge = OcpiEdgeProcess(
        setup.world_path, "A", setup.server.port, tmp_path / "edge", tmp_path / "edge.log", registration_tokens=tokens
    )
    try:
        await asyncio.to_thread(edge.start)
        async with Emsp(edge.url) as e:
            assert (await e.register("restart-token-a")).code == 1000
            assert (
                await e.call("PUT", f"{V}/tokens/NL/{e.party_id}/KEPT", e.token("KEPT"), type="APP_USER")
            ).code == 1000
            now = await server_now(e)
            booked = await e.call("POST", f"{V}/bookings", booking_request(e, "NAT-PN", now + timedelta(hours=8), 30))
            assert booked.data["reservation_status"] == "RESERVED", booked.body
            assert await evse_status(e, "MOS-1", "MOS-1-1") == "AVAILABLE"
            edge.kill()  # kill -9: what was answered was committed before the answer
            kept = b"".join(f.read_bytes() for f in (tmp_path / "edge").iterdir())
            assert e.token_c.encode() not in kept  # only its hash is kept
            # While the edge is down, a vehicle reserves MOS-1-1 from now: RESERVED once the edge is back.
            car = load_world(str(setup.world_path)).vehicle("T003")
            async with connect("127.0.0.1", setup.server.port, role="vehicle", ident=car.id, secret=car.token) as c:
                await c.reserve("MOS-1-1", c.server_now() + timedelta(minutes=1), 20)
            await asyncio.to_thread(edge.start)
            e.edge_url = edge.url
            assert (await e.call("GET", f"{V}/tokens/NL/{e.party_id}/KEPT", type="APP_USER")).code == 1000
            assert [b["id"] for b in await e.all_pages(f"{V}/bookings")] == [booked.data["id"]]
            assert (await e.call("GET", "/ocpi/versions", token="restart-token-a")).status == 401  # used up for good
            changed = await e.wait_for(
                lambda: [b for m, path, b in e.received if m == "PATCH" and path.endswith("MOS-1/MOS-1-1")]
            )
            assert changed[-1]["status"] == "RESERVED"
    finally:
        edge.kill()


def test_the_command_line_says_what_it_needs(tmp_path: Path) -> None:
    helped = run_cli("ocpi", "--help")
    assert helped.returncode == 0
    for words in ("--registration-tokens", "token A", "--public-url", "/ocpi/versions"):
        assert words in " ".join(helped.stdout.split()), words
    shipped = (REPO / "evcharge" / "worlds" / "northeast.toml").read_text()
    bare = tmp_path / "world.toml"
    bare.write_text(re.sub(r"\n# Its party on OCPI.*?\nparty_id = \"[A-Z0-9]+\"\n", "\n", shipped, flags=re.S))
    assert "[operators.ocpi]" not in bare.read_text()
    refused = run_cli("ocpi", "--world", str(bare), "--operator", "A", "--port", "0")
    assert refused.returncode == 2 and "[operators.ocpi]" in refused.stderr
    missing = run_cli("ocpi", "--operator", "A", "--port", "0", "--registration-tokens", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "--registration-tokens" in missing.stderr
