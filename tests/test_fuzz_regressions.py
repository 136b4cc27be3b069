"""What the fuzzer (tests/test_fuzz.py) found, each pinned by a test named after the bug.

Every test here failed before its fix: the server crashed a connection's task
(an unhandled exception in the event loop, which ``running_server`` turns into
a failure), answered ``internal``, or sent nothing at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from evcharge.apps.ocpp.gateway import Gateway
from evcharge.domain.world import World
from evcharge.operator.server import Server
from evcharge.wire import protocol as p

from .conftest import running_server, vehicle
from .raw import LoopWatch, raw

pytestmark = pytest.mark.timeout(60)

# Just under the frame cap, of a character a Python repr writes as four ("\x01"): an error
# message quoting it would be about four times over the cap.
HUGE = "\x01" * (p.MAX_FRAME - 200)


@pytest.fixture
async def server(world: World, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(world, tmp_path / "data", time_scale=1.0) as srv:
        yield srv


async def test_hello_with_a_huge_ident_is_refused_not_crashed(server: Server) -> None:
    """The refusal quoted the ident: too large to send, so the handshake task died silently."""
    async with raw(server) as peer:
        await peer.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident=HUGE, credential="x"))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "unauthorized", error
        assert len(error.message) < 2000, "an error message should not quote a huge value whole"
        assert await peer.closed_by_server(timeout=5.0)


async def test_first_frame_with_a_huge_unknown_type_is_refused_not_crashed(server: Server) -> None:
    """msgspec's complaint quotes the unknown value; so did the refusal built from it."""
    async with raw(server) as peer:
        # As long as the body allows: the refusal adds its own words around the quote.
        await peer.send_body(msgspec.msgpack.encode({"type": "x" * (p.MAX_FRAME - 32), "id": 3}))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 3, error
        assert await peer.closed_by_server(timeout=5.0)


async def test_undecodable_frame_with_a_huge_value_after_hello_is_answered_not_crashed(server: Server) -> None:
    """The same after the handshake: the session's task died and took the connection with it."""
    async with raw(server) as peer:
        await peer.hello(server, "vehicle", "V01")
        await peer.send_body(msgspec.msgpack.encode({"type": "Hello", "id": 4, "role": HUGE}))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 4, error
        await peer.send(p.Heartbeat(id=5))
        ack = await peer.receive()
        assert isinstance(ack, p.HeartbeatAck) and ack.id == 5, "the connection should have stayed open"


async def test_request_naming_a_huge_unknown_id_gets_not_found(server: Server) -> None:
    async with raw(server) as peer:
        await peer.hello(server, "vehicle", "V01")
        await peer.send(p.GetStationStatus(id=6, station_id=HUGE))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "not_found" and error.id == 6, error
        assert len(error.message) < 2000, "an error message should not quote a huge value whole"


@pytest.mark.parametrize("start", ["0001-01-01T00:00:00+05:00", "0001-01-01T03:00:00+14:00"])
async def test_reserve_starting_before_year_one_utc_is_a_bad_request_not_internal(server: Server, start: str) -> None:
    """The refusal formatted the start as a UTC datetime, which does not exist before year 1."""
    async with raw(server) as peer, vehicle(server, "V04") as good:
        await peer.hello(server, "vehicle", "V01")
        await peer.send_body(
            msgspec.msgpack.encode(
                {"type": "Reserve", "id": 7, "charge_point_id": "NAT-PN-1", "start": start, "minutes": 30}
            )
        )
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 7, error
        assert "in the past" in error.message
        async with asyncio.timeout(5):
            assert await good.reservations() == []


async def test_prepare_with_thousands_of_stops_is_refused_not_checked_for_seconds(server: Server) -> None:
    """A PREPARE's stops were checked against each other pairwise inside one writer section: a
    peer's frame of ~15,000 distinct stops blocked the event loop, so every client, for ~8 s."""
    cps = list(server.books.charge_points)
    now = server.clock.now_dt()
    stops = []
    for i in range(2000):
        start = now + timedelta(minutes=10 + 30 * (i // len(cps)))
        stops.append(p.StopRequest(charge_point_id=cps[i % len(cps)], start=start, end=start + timedelta(minutes=29)))
    async with raw(server) as peer:
        await peer.hello(server, "peer", "B")
        await peer.send(
            p.Prepare(id=8, txn_id="B-T1.1", trip_id="B-T1", vehicle_id="V02", stops=stops, deadline=time.time() + 30)
        )
        vote = await peer.receive(timeout=30.0)
        assert isinstance(vote, p.Vote) and vote.id == 8, vote
        assert not vote.yes and "at most" in vote.reason, vote
    assert not [r for r in server.books.reservations.values() if r.trip_id == "B-T1"]


async def test_trip_from_a_frame_sized_city_name_does_not_hold_up_the_server(server: Server) -> None:
    """Looking a city up folds its name (NFKD, in which "ﷺ" is 18 letters) on the event loop:
    one PlanTrip with a frame-sized origin held every connection up for ~1.7 s."""
    query = p.TripQuery(origin="\ufdfa" * 340_000, destination="Recife")
    async with raw(server) as peer, LoopWatch() as watch:
        await peer.hello(server, "vehicle", "V01")
        watch.reset()
        await peer.send(p.PlanTrip(id=9, query=query))
        error = await peer.receive(timeout=30.0)
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 9, error
        assert "unknown city" in error.message
        assert watch.longest < 1.0, f"the event loop was held for {watch.longest:.2f} s"


def nested(kind: str, depth: int) -> bytes:
    """``depth`` levels of msgpack nesting: arrays, maps (in their values or their keys), or both by turns."""
    match kind:
        case "array":
            return b"\x91" * depth + b"\x01"
        case "map":
            return b"\x81\xa1k" * depth + b"\x01"
        case "map-key":
            return b"\x81" * depth + b"\x01" + b"\x01" * depth
        case "mixed":
            return b"\x91\x81\xa1k" * (depth // 2) + b"\x01"
    raise AssertionError(kind)


NESTING = ["array", "map", "map-key", "mixed"]


def heartbeat_with(field: bytes, value: bytes, request_id: int) -> bytes:
    """A Heartbeat map whose extra field ``field`` holds ``value`` (raw msgpack)."""
    return b"\x83\xa4type\xa9Heartbeat\xa2id" + msgspec.msgpack.encode(request_id) + field + value


@pytest.mark.parametrize("kind", NESTING)
async def test_deeply_nested_frames_get_bad_request_and_no_traceback(
    server: Server, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A thousand nested arrays (a 1 KB frame) raised RecursionError out of the decoder: the
    connection dropped and a traceback was logged, per frame."""
    caplog.set_level(logging.DEBUG)
    deep = nested(kind, 1000)
    assert len(deep) < 4 * 1024
    async with raw(server) as peer:
        await peer.hello(server, "vehicle", "V01")
        for n in range(20):  # many frames: each answered, none kills the connection
            await peer.send_body(heartbeat_with(b"\xa1x", deep, 100 + n))
            error = await peer.receive()
            assert isinstance(error, p.Error) and error.code == "bad_request", error
            assert "nested too deeply" in error.message
        await peer.send_body(deep)  # the whole body nested
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request", error
        await peer.send(p.Heartbeat(id=5))
        ack = await peer.receive()
        assert isinstance(ack, p.HeartbeatAck) and ack.id == 5, "the connection should have stayed open"
    async with raw(server) as peer:  # as the first frame: refused like any bad Hello
        await peer.send_body(heartbeat_with(b"\xa1x", deep, 6))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request", error
        assert await peer.closed_by_server(timeout=5.0)
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_deeply_nested_ocpp_json_gets_a_call_error_and_no_traceback(
    server: Server, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The same in JSON: the OCPP gateway's decoder raised RecursionError out of the frame handler."""
    caplog.set_level(logging.DEBUG)
    cp_id = "NAT-PN-2"
    secret = server.books.charge_points[cp_id].config.secret
    auth = {"Authorization": "Basic " + base64.b64encode(f"{cp_id}:{secret}".encode()).decode()}
    gateway = Gateway(world, "A", host="127.0.0.1", port=0, server_host="127.0.0.1", server_port=server.port)
    await gateway.start()
    try:
        async with ws_connect(
            f"ws://127.0.0.1:{gateway.port}/{cp_id}",
            subprotocols=[Subprotocol("ocpp1.6")],
            additional_headers=auth,
            open_timeout=5,
            close_timeout=2,
        ) as ws:
            for frame in (
                "[" * 50_000 + "]" * 50_000,
                '[2, "n1", "Heartbeat", ' + '{"a":' * 5000 + "1" + "}" * 5000 + "]",
            ):
                await ws.send(frame)
                error = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert error[0] == 4 and error[2] == "FormationViolation", error
            await ws.send('[2, "n2", "Heartbeat", {}]')
            ok = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ok[:2] == [3, "n2"], "the connection should have stayed open"
    finally:
        await gateway.stop()
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
