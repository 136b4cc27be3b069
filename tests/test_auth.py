"""Who may connect as whom, and what each identity may see and do.

Vehicles prove themselves with a token, charge points with their secret, the
operator's tools with the operator's secret, and other operators with the HMAC
challenge-response of ``evcharge.wire.auth``. Every identity acts only for itself,
and no secret ever reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from evcharge.domain.world import World, load_world
from evcharge.links.client import Client, connect, open_client
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce, peer_proof
from evcharge.wire.errors import ForbiddenError, NotFoundError, UnauthorizedError

from .conftest import operator, running_federation, running_server, vehicle

pytestmark = pytest.mark.timeout(90)


class Raw:
    """A hand-driven socket that keeps every byte it sent, to replay them later."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = p.FrameBuffer()
        self.sent = bytearray()

    async def send_raw(self, data: bytes) -> None:
        self.sent.extend(data)
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: p.Message) -> None:
        await self.send_raw(p.encode_frame(message))

    async def receive(self, timeout: float = 5.0) -> p.Message | None:
        """The next message, or None once the server closed the connection."""
        async with asyncio.timeout(timeout):
            while True:
                body = self.frames.next_body()
                if body is not None:
                    return p.decode_body(body)
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    return None
                if not data:
                    return None
                self.frames.feed(data)


@asynccontextmanager
async def raw(port: int) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()


async def refused(conn: Raw, code: str) -> p.Error:
    error = await conn.receive()
    assert isinstance(error, p.Error), error
    assert error.code == code, error
    assert await conn.receive() is None, "the server should have closed the connection"
    return error


def hello(role: p.Role, ident: str, credential: str) -> p.Hello:
    return p.Hello(id=1, version=p.PROTOCOL_VERSION, role=role, ident=ident, credential=credential)


async def peer_hello(conn: Raw, ident: str, secret: str) -> p.Message | None:
    """Our side of the peer handshake, by hand: Hello, check the challenge, PeerProof."""
    nonce = new_nonce()
    await conn.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="peer", ident=ident, credential=nonce))
    challenge = await conn.receive()
    assert isinstance(challenge, p.PeerChallenge), challenge
    await conn.send(p.PeerProof(id=2, proof=peer_proof(secret, "client", nonce, challenge.nonce, ident)))
    return await conn.receive()


def station(server: Server, cp_id: str, secret: str | None = None) -> Client:
    cp = server.world.charge_point(cp_id)[1]
    return connect("127.0.0.1", server.port, role="station", ident=cp_id, secret=secret or cp.secret)


def answer_commands(client: Client, final_kwh: float) -> None:
    """A minimal charge point: accepts RemoteStart, reports ``final_kwh`` on RemoteStop."""

    async def handle(request: p.Request) -> p.Reply:
        match request:
            case p.RemoteStart():
                return p.Ok()
            case p.RemoteStop(reservation_id=rid):
                return p.SessionReport(reservation_id=rid, kwh=final_kwh)
        raise ForbiddenError(type(request).__name__)

    client.on_request = handle


# --- vehicles ----------------------------------------------------------------------------


async def test_a_vehicle_needs_its_own_token(server: Server) -> None:
    world = server.world
    for ident, token in (
        ("V01", "not-the-token"),
        ("V01", world.vehicle("V04").token),  # another vehicle's token
        ("V01", ""),
        ("NOBODY", world.vehicle("V01").token),
    ):
        with pytest.raises(UnauthorizedError):
            async with connect("127.0.0.1", server.port, role="vehicle", ident=ident, secret=token):
                pass
    async with vehicle(server, "V01") as c:
        assert await c.heartbeat()


async def test_a_vehicle_cannot_see_or_touch_another_vehicles_reservations(server: Server) -> None:
    async with (
        vehicle(server, "V01") as owner,
        vehicle(server, "V04") as other,
        station(server, "NAT-PN-1") as cp,
    ):
        answer_commands(cp, final_kwh=2.5)
        seen_by_other: list[p.Event] = []
        other.on_event.append(seen_by_other.append)

        later = await owner.reserve("NAT-PN-1", owner.server_now() + timedelta(hours=2), 30)
        now = await owner.reserve("NAT-PN-1", owner.server_now(), 30)
        for rid in (later.id, now.id):  # someone else's reservation is not even disclosed
            with pytest.raises(NotFoundError, match=f"no reservation '{rid}'"):
                await other.cancel(rid)
            with pytest.raises(NotFoundError, match=f"no reservation '{rid}'"):
                await other.start_charging(rid)
        await owner.start_charging(now.id)
        with pytest.raises(NotFoundError, match=f"no reservation '{now.id}'"):
            await other.stop_charging(now.id)
        assert (await owner.stop_charging(now.id)).kwh == 2.5

        # Nothing of the owner's shows to the other: not in its lists, not in a station's
        # status (slots are shown without who holds them), not in its pushes.
        assert await other.reservations(include_past=True) == []
        assert (await other.history()).sessions == []
        status = await other.station_status("NAT-PN")
        encoded = msgspec.msgpack.encode(status)
        assert b"V01" not in encoded and later.id.encode() not in encoded
        await other.heartbeat()  # pushes for it would have arrived before this reply
        assert seen_by_other == []

        # ...and the owner still has both, untouched.
        mine = {r.id: r.state for r in await owner.reservations(include_past=True)}
        assert mine == {later.id: "booked", now.id: "completed"}
        assert [s.reservation_id for s in (await owner.history()).sessions] == [now.id]


async def test_a_vehicle_cannot_see_or_cancel_another_vehicles_trip(fed_world: World, tmp_path: Path) -> None:
    async with running_federation(fed_world, tmp_path / "data") as servers:
        a = servers["A"]
        async with vehicle(a, "V01") as owner, vehicle(a, "V04") as other:
            trip = (await owner.book_trip(p.TripQuery(origin="Natal", destination="Recife", soc_pct=30))).trip
            assert trip.state == "committed"
            assert await other.trips(include_cancelled=True) == []
            with pytest.raises(NotFoundError, match=f"no trip '{trip.id}'"):
                await other.cancel_trip(trip.id)
            for stop in trip.stops:  # at every operator, the same answer
                assert stop.reservation_id is not None
                with pytest.raises(NotFoundError, match=f"no reservation '{stop.reservation_id}'"):
                    await other.cancel(stop.reservation_id)
            assert [(t.id, t.state) for t in await owner.trips()] == [(trip.id, "committed")]


# --- charge points -----------------------------------------------------------------------


async def test_a_charge_point_needs_its_own_secret(server: Server) -> None:
    world = server.world
    own = world.charge_point("NAT-PN-1")[1].secret
    foreign = world.charge_point(world.stations_of("B")[0].charge_points[0].id)[1]
    for ident, secret in (("NAT-PN-2", own), ("NAT-PN-1", "cp-nat-pn-1-secreT"), (foreign.id, foreign.secret)):
        with pytest.raises(UnauthorizedError):
            async with connect("127.0.0.1", server.port, role="station", ident=ident, secret=secret):
                pass
    assert not server.books.charge_points["NAT-PN-2"].online


async def test_a_charge_point_speaks_only_for_itself(server: Server) -> None:
    async with (
        vehicle(server, "V01") as driver,
        station(server, "NAT-PN-1") as x,
        station(server, "NAT-PN-2") as y,
    ):
        answer_commands(y, final_kwh=1.5)
        answer_commands(x, final_kwh=0.0)
        r = await driver.reserve("NAT-PN-2", driver.server_now(), 30)
        await driver.start_charging(r.id)

        # X claims Y's session: a final report is refused, meter values are ignored.
        with pytest.raises(NotFoundError):
            await x.session_complete(r.id, 999.0)
        x.send_meter(r.id, 999.0)
        # X's own status reports change X only.
        await x.report_status("faulted", "X is broken")
        await x.heartbeat()  # the server has read everything X sent before this reply
        cps = {cp.id: cp.status for cp in (await driver.station_status("NAT-PN")).charge_points}
        assert cps["NAT-PN-1"] == "faulted" and cps["NAT-PN-2"] == "charging"

        done = await driver.stop_charging(r.id)
        assert done.state == "completed" and done.kwh == 1.5

        # X's heartbeats do not keep Y online.
        await y.close()
        await x.heartbeat()
        async with asyncio.timeout(5):
            while server.books.charge_points["NAT-PN-2"].online:
                await asyncio.sleep(0.02)
        assert server.books.charge_points["NAT-PN-1"].online


# --- peers -------------------------------------------------------------------------------


async def test_an_incoming_peer_with_a_wrong_secret_is_refused(fed_world: World, tmp_path: Path) -> None:
    async with running_server(fed_world, tmp_path / "data", operator="A") as a:
        async with raw(a.port) as conn:
            answer = await peer_hello(conn, "B", "operator-b-secret-but-wrong")
            assert isinstance(answer, p.Error) and answer.code == "unauthorized", answer
            assert await conn.receive() is None
        # The client library refuses too: it cannot even check the server's proof.
        with pytest.raises(UnauthorizedError, match="could not prove"):
            await open_client("127.0.0.1", a.port, role="peer", ident="B", secret="operator-b-secret-but-wrong")
        async with raw(a.port) as conn:
            assert isinstance(await peer_hello(conn, "B", fed_world.operator("B").secret), p.Welcome)


@pytest.fixture
def stale_world_path(federated_world_path: Path, tmp_path: Path) -> Path:
    """The federated world as an operator with an old secret for B would have it."""
    text = federated_world_path.read_text(encoding="utf-8")
    stale = tmp_path / "stale.toml"
    stale.write_text(text.replace('secret = "operator-b-secret"', 'secret = "operator-b-old-secret"'), "utf-8")
    return stale


async def test_a_peer_link_to_a_server_that_does_not_know_our_secret_stays_down_and_says_why(
    federated_world_path: Path, stale_world_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # A's copy of the world has an old secret for B; B's copy has B's real one.
    world_a, world_b = load_world(str(stale_world_path)), load_world(str(federated_world_path))
    async with (
        running_server(world_a, tmp_path / "A", operator="A", port=world_a.operator("A").port) as a,
        running_server(world_b, tmp_path / "B", operator="B", port=world_b.operator("B").port) as b,
    ):
        assert a.federation is not None and b.federation is not None
        b_to_a = b.federation.peers.links["A"]
        async with asyncio.timeout(15):
            # A still trusts B's own proof of A's secret, so that direction comes up...
            while not a.federation.peers.links["B"].up:
                await asyncio.sleep(0.05)
            # ...but B's link to A never does: A cannot prove it knows B's secret.
            while "could not prove" not in b_to_a.last_error:
                await asyncio.sleep(0.05)
        assert not b_to_a.up and b_to_a.connects == 0
        async with operator(b) as tool:
            peers = {peer.operator_id: peer for peer in (await tool.inspect()).peers}
        assert not peers["A"].up and "could not prove it knows operator B's secret" in peers["A"].last_error
        assert any(
            r.levelno >= logging.WARNING and "peer link to A" in r.getMessage() and "could not prove" in r.getMessage()
            for r in caplog.records
        )


async def test_a_replayed_peer_handshake_is_refused(fed_world: World, tmp_path: Path) -> None:
    async with running_server(fed_world, tmp_path / "data", operator="A") as a:
        async with raw(a.port) as conn:
            assert isinstance(await peer_hello(conn, "B", fed_world.operator("B").secret), p.Welcome)
            recorded = bytes(conn.sent)
        hello_frame_length = 4 + int.from_bytes(recorded[:4], "big")
        hello, proof = recorded[:hello_frame_length], recorded[hello_frame_length:]

        # Replayed step by step, as the recorded client did it...
        async with raw(a.port) as replay:
            await replay.send_raw(hello)
            assert isinstance(await replay.receive(), p.PeerChallenge)  # a fresh nonce...
            await replay.send_raw(proof)  # ...that the old proof does not answer
            error = await refused(replay, "unauthorized")
            assert "wrong proof" in error.message
        # ...and all at once.
        async with raw(a.port) as replay:
            await replay.send_raw(recorded)
            assert isinstance(await replay.receive(), p.PeerChallenge)
            await refused(replay, "unauthorized")


async def test_vehicles_and_operator_tools_cannot_claim_the_peer_role(fed_world: World, tmp_path: Path) -> None:
    async with running_server(fed_world, tmp_path / "data", operator="A") as a:
        v01 = fed_world.vehicle("V01")
        for ident, credential in (
            ("V01", v01.token),  # a vehicle's identity
            ("V01", new_nonce()),
            ("A", new_nonce()),  # the server's own operator: its tools are not a peer
            ("Z", new_nonce()),  # no such operator
        ):
            async with raw(a.port) as conn:
                await conn.send(hello("peer", ident, credential))
                await refused(conn, "unauthorized")
        with pytest.raises(UnauthorizedError):
            await open_client("127.0.0.1", a.port, role="peer", ident="A", secret=fed_world.operator("A").secret)
        # A vehicle or the operator's tools connected as themselves cannot send peer requests.
        prepare = p.Prepare(txn_id="t1", trip_id="A-Tx", vehicle_id="V01", stops=[], deadline=time.time() + 5)
        async with vehicle(a, "V01") as v, operator(a) as tool:
            for client in (v, tool):
                for request in (prepare, p.GetCatalog(), p.QueryDecision(txn_id="t1")):
                    with pytest.raises(ForbiddenError):
                        await client.call(request, p.Reply)


async def test_a_peer_acts_only_as_a_peer_and_only_for_its_own_vehicles(fed_world: World, tmp_path: Path) -> None:
    async with running_server(fed_world, tmp_path / "data", operator="A") as a:
        b = fed_world.operator("B")
        async with connect("127.0.0.1", a.port, role="peer", ident="B", secret=b.secret) as peer:
            for request in (
                p.Reserve(charge_point_id="NAT-PN-1", start=peer.server_now(), minutes=30),
                p.Inspect(),
                p.CancelReservation(reservation_id="A-0000000000"),
            ):
                with pytest.raises(ForbiddenError):
                    await peer.call(request, p.Reply)
            start = peer.server_now() + timedelta(hours=1)
            stops = [p.StopRequest(charge_point_id="NAT-PN-1", start=start, end=start + timedelta(minutes=30))]

            def prepare(vehicle_id: str) -> p.Prepare:
                return p.Prepare(
                    txn_id=f"B-T1.{vehicle_id}",
                    trip_id="B-T1",
                    vehicle_id=vehicle_id,
                    stops=stops,
                    deadline=time.time() + 5,
                )

            # B books for its own vehicles, not for A's (nor for vehicles nobody knows).
            for foreign in ("V01", "NOBODY"):
                with pytest.raises(ForbiddenError, match="not a vehicle of operator B"):
                    await peer.call(prepare(foreign), p.Vote)
            vote = await peer.call(prepare("V02"), p.Vote)
            assert vote.yes
            await peer.call(p.Decide(txn_id="B-T1.V02", trip_id="B-T1", commit=False), p.Ok)
        async with operator(a) as tool:
            states = [(r.vehicle_id, r.state) for r in (await tool.inspect()).reservations]
        assert states == [("V02", "aborted")]


# --- secrets ------------------------------------------------------------------------------


async def test_secrets_never_reach_logs_or_error_messages(
    fed_world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {op.secret for op in fed_world.operators}
    secrets |= {v.token for v in fed_world.vehicles}
    secrets |= {cp.secret for s in fed_world.stations for cp in s.charge_points}
    wrong = ["wrong-token-7f3a91c2", "wrong-secret-5be02d77", "operator-b-secret-but-wrong"]
    errors: list[str] = []
    async with running_federation(fed_world, tmp_path / "data") as servers:  # real peer handshakes
        a = servers["A"]
        v01, v02, op_a = fed_world.vehicle("V01"), fed_world.vehicle("V02"), fed_world.operator("A")
        cp = fed_world.charge_point("NAT-PN-1")[1]
        attempts = [
            ("vehicle", "V01", v01.token),
            ("vehicle", "V01", wrong[0]),
            ("vehicle", "V02", v02.token),  # right token, wrong home
            ("vehicle", "V01", v02.token),  # someone else's token
            ("station", cp.id, cp.secret),
            ("station", cp.id, wrong[1]),
            ("station", "NAT-PN-2", cp.secret),
            ("operator", "A", op_a.secret),
            ("operator", "A", wrong[1]),
            ("operator", "B", fed_world.operator("B").secret),
        ]
        for role, ident, credential in attempts:
            async with raw(a.port) as conn:
                await conn.send(hello(role, ident, credential))
                answer = await conn.receive()
                if isinstance(answer, p.Error):
                    errors.append(answer.message)
        async with raw(a.port) as conn:
            answer = await peer_hello(conn, "B", wrong[2])
            assert isinstance(answer, p.Error)
            errors.append(answer.message)
        with pytest.raises(UnauthorizedError) as exc_info:
            await open_client("127.0.0.1", a.port, role="peer", ident="C", secret=wrong[1])
        errors.append(exc_info.value.message)
    assert len(errors) == len(attempts) - 3 + 2  # every wrong one was refused with a message
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in logged and "peer link to B up" in logged  # the handshakes were logged...
    for secret in sorted(secrets | set(wrong)):
        assert secret not in logged, f"a secret was logged: {secret}"  # ...without a secret
        for message in errors:
            assert secret not in message, f"a secret was sent back: {message}"
