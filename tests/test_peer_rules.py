"""A peer's trip stops keep the owner's rules, and only a trip's coordinator acts on its stops.

A peer is another operator: trusted to book for its own vehicles, not to hold a charge
point for a month, nor to decide, release or look at another operator's trips.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evcharge.apps.invariants import violations
from evcharge.apps.repl import book_command
from evcharge.apps.vehicle import add_vehicle_commands, check_command, trip_query
from evcharge.domain.model import Trip
from evcharge.domain.world import World
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.operator.state import Actor, Change
from evcharge.operator.store import put_trip
from evcharge.operator.trips.participant import MAX_HOLD_S
from evcharge.operator.views import trip_json
from evcharge.wire import protocol as p
from evcharge.wire.auth import new_nonce
from evcharge.wire.errors import BadRequestError, ConflictError, ForbiddenError

from .conftest import as_peer, operator, running_federation, running_server
from .raw import raw

pytestmark = pytest.mark.timeout(60)

CP = "MOS-1-1"  # one of A's


@pytest.fixture
async def a(fed_world: World, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(fed_world, tmp_path / "data", operator="A", time_scale=1.0) as server:
        yield server


def prepare(
    start: datetime,
    minutes: float,
    *,
    trip: str = "B-T1",
    txn: str = "B-T1.1",
    vehicle: str = "V02",
    deadline_in: float = 5.0,
    cp: str = CP,
) -> p.Prepare:
    stop = p.StopRequest(charge_point_id=cp, start=start, end=start + timedelta(minutes=minutes))
    return p.Prepare(txn_id=txn, trip_id=trip, vehicle_id=vehicle, stops=[stop], deadline=time.time() + deadline_in)


async def live_at(server: Server) -> list[p.ReservationInfo]:
    async with operator(server) as tool:
        return [r for r in (await tool.inspect()).reservations if r.state in ("held", "booked", "charging")]


async def test_a_peers_stop_keeps_the_rules_of_a_single_reservation(a: Server) -> None:
    """B's PREPARE of one 29-day stop with a deadline 10^9 s ahead was voted YES, then booked."""
    rules = a.world.rules
    async with as_peer(a, "B") as b:
        soon = b.server_now() + timedelta(hours=1)
        refused = {
            "29 days": prepare(soon, 29 * 24 * 60),
            "one minute too long": prepare(soon, rules.max_reservation_min + 1),
            "under a minute": prepare(soon, 0.5),
            "deadline 10^9 s ahead": prepare(soon, 30, deadline_in=1e9),
            "deadline just over the bound": prepare(soon, 30, deadline_in=MAX_HOLD_S + 5),
            "deadline passed": prepare(soon, 30, deadline_in=-1),
            "in the past": prepare(b.server_now() - timedelta(hours=2), 30),
            "too far ahead": prepare(b.server_now() + timedelta(days=rules.max_advance_days, hours=1), 30),
            "unknown charge point": prepare(soon, 30, cp="NOPE-1"),
        }
        for n, (what, request) in enumerate(refused.items()):
            request.txn_id = request.trip_id = f"B-T{n}"
            vote = await b.call(request, p.Vote)
            assert not vote.yes and not vote.reservation_ids and vote.reason, (what, vote)
        assert await live_at(a) == [], "a refused PREPARE holds nothing"
        # Within the rules it is held, then booked by B's decision, like any reservation of A's.
        vote = await b.call(prepare(soon, rules.max_reservation_min), p.Vote)
        assert vote.yes, vote
        await b.call(p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=True), p.Ok)
        with pytest.raises(BadRequestError, match="at most 7 days"):
            await b.call(p.GetAvailability(start=soon, end=soon + timedelta(days=30)), p.Availability)
    [booked] = await live_at(a)
    assert booked.state == "booked" and booked.end - booked.start == timedelta(minutes=rules.max_reservation_min)


async def test_a_repeated_prepare_is_matched_with_its_coordinator(a: Server) -> None:
    """C sent A a PREPARE with B's trip and transaction ids, and was told B's vote and hold ids."""
    async with as_peer(a, "B") as b, as_peer(a, "C") as c:
        soon = b.server_now() + timedelta(hours=1)
        vote = await b.call(prepare(soon, 30), p.Vote)
        assert vote.yes
        for vehicle in ("V03", "V02"):  # C's own vehicle, or B's
            with pytest.raises(ForbiddenError) as refused:
                await c.call(prepare(soon + timedelta(hours=2), 30, vehicle=vehicle), p.Vote)
            assert vote.reservation_ids[0] not in refused.value.message
        again = await b.call(prepare(soon, 30), p.Vote)  # B itself still gets its vote
        assert again.yes and again.reservation_ids == vote.reservation_ids
    [held] = await live_at(a)
    assert held.state == "held" and held.vehicle_id == "V02"


async def test_only_the_coordinator_decides_or_releases_its_trip(a: Server) -> None:
    """C's Decide and ReleaseTrip of B's trip were answered Ok (and did nothing)."""
    async with as_peer(a, "B") as b, as_peer(a, "C") as c:
        soon = b.server_now() + timedelta(hours=1)
        assert (await b.call(prepare(soon, 30), p.Vote)).yes
        for request in (
            p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=False),
            p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=True),
            p.ReleaseTrip(trip_id="B-T1"),
        ):
            with pytest.raises(ForbiddenError, match="not a trip of operator C"):
                await c.call(request, p.Ok)
        [held] = await live_at(a)
        assert held.state == "held"
        await b.call(p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=True), p.Ok)
        with pytest.raises(ForbiddenError):
            await c.call(p.ReleaseTrip(trip_id="B-T1"), p.Ok)
        [booked] = await live_at(a)
        assert booked.state == "booked"
        await b.call(p.ReleaseTrip(trip_id="B-T1"), p.Ok)
        assert await live_at(a) == []
        # A trip nobody holds here: nothing to decide, and nothing to refuse (presumed abort).
        await c.call(p.Decide(txn_id="C-T9.1", trip_id="C-T9", commit=False), p.Ok)
        await c.call(p.ReleaseTrip(trip_id="C-T9"), p.Ok)


async def test_a_failed_peer_proof_is_answered_with_the_proofs_id(a: Server) -> None:
    async with raw(a) as peer:
        await peer.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="peer", ident="B", credential=new_nonce()))
        challenge = await peer.receive()
        assert isinstance(challenge, p.PeerChallenge) and challenge.id == 1
        await peer.send(p.PeerProof(id=42, proof="0" * 64))
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "unauthorized" and error.id == 42, error
        assert await peer.closed_by_server(timeout=5.0)
    async with raw(a) as peer:  # a proof that does not decode: bad_request with its id, not a silent close
        await peer.send(p.Hello(id=1, version=p.PROTOCOL_VERSION, role="peer", ident="B", credential=new_nonce()))
        assert isinstance(await peer.receive(), p.PeerChallenge)
        await peer.send_body(b"\x82\xa4type\xa9PeerProof\xa2id\x2b")  # no proof field
        error = await peer.receive()
        assert isinstance(error, p.Error) and error.code == "bad_request" and error.id == 43, error
        assert await peer.closed_by_server(timeout=5.0)


async def test_only_a_participant_may_ask_how_a_transaction_ended(fed_world: World, tmp_path: Path) -> None:
    """Any peer could learn the outcome of any transaction id it asked about."""
    async with running_server(fed_world, tmp_path / "data", operator="B", time_scale=1.0) as b_server:
        trip = await seed_trip(b_server, participants=["B", "A"])
        async with as_peer(b_server, "A") as peer_a, as_peer(b_server, "C") as peer_c:
            decision = await peer_a.call(p.QueryDecision(txn_id=trip.txn_id), p.Decision)
            assert decision.outcome == "commit"
            with pytest.raises(ForbiddenError, match="takes no part"):
                await peer_c.call(p.QueryDecision(txn_id=trip.txn_id), p.Decision)
            # Unknown transactions aborted, whoever asks (presumed abort: nothing to disclose).
            unknown = await peer_c.call(p.QueryDecision(txn_id="B-T404.1"), p.Decision)
            assert unknown.outcome == "abort"


async def seed_trip(server: Server, participants: list[str]) -> Trip:
    """A committed trip of this coordinator, stored as its row (its stops do not matter to the question)."""
    info = p.TripInfo(
        id=f"{server.operator.id}-T1",
        vehicle_id="V02",
        state="committed",
        origin="Natal",
        destination="Recife",
        depart=server.clock.now_dt(),
        arrival=server.clock.now_dt(),
        distance_km=1,
        soc_at_arrival=50,
        total_kwh=0,
        total_cost=0,
    )
    trip = Trip(info.id, "V02", "committed", f"{info.id}.1", participants, [], trip_json(info), 0)
    await server.books.apply(Actor("test", "seed"), "seed a trip", lambda: Change(None, [put_trip(trip)]))
    server.books.remember_trip(trip)
    return trip


# --- an owner withdraws a stop whose charge point broke ---------------------------------------


@pytest.fixture
async def servers(fed_world: World, tmp_path: Path) -> AsyncIterator[dict[str, Server]]:
    async with running_federation(fed_world, tmp_path / "data") as running:
        yield running


def driver(servers: dict[str, Server], vehicle_id: str) -> Any:
    v = servers["A"].world.vehicle(vehicle_id)
    return connect("127.0.0.1", servers[v.home].port, role="vehicle", ident=v.id, secret=v.token)


def station(server: Server, cp_id: str) -> Any:
    secret = server.books.charge_points[cp_id].config.secret
    return connect("127.0.0.1", server.port, role="station", ident=cp_id, secret=secret)


async def book_later(c: Client) -> p.TripInfo:
    """A trip across A, B and C that leaves in three hours (so a new plan can still be offered)."""
    query = p.TripQuery(origin="Natal", destination="Feira de Santana", depart=c.server_now() + timedelta(hours=3))
    trip = (await c.book_trip(query)).trip
    assert {s.operator_id for s in trip.stops} == {"A", "B", "C"}
    return trip


async def until(condition: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``condition`` (a coroutine function) until it returns something true."""
    try:
        async with asyncio.timeout(timeout):
            while not (result := await condition()):
                await asyncio.sleep(0.05)
            return result
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None


async def test_an_owner_withdraws_a_stop_whose_charge_point_broke(servers: dict[str, Server]) -> None:
    """B could not take back its charge point's slot from A's trip: `conflict: cancel the trip`."""
    pushed: list[p.Event] = []
    async with driver(servers, "V01") as v01:
        v01.on_event.append(pushed.append)
        trip = await book_later(v01)
        stop = next(s for s in trip.stops if s.operator_id == "B")
        assert stop.reservation_id is not None
        async with operator(servers["B"]) as b:
            with pytest.raises(ConflictError, match="out of service"):
                await b.cancel(stop.reservation_id)  # a working charge point's stop stays the trip's
            async with station(servers["B"], stop.charge_point_id) as cp:
                await cp.call(p.StatusNotification(status="faulted", info="contactor welded"), p.Ok)
                withdrawn = (await b.cancel(stop.reservation_id)).reservation
                assert withdrawn.state == "cancelled"

                async def told() -> p.TripChanged | None:
                    return next((e for e in pushed if isinstance(e, p.TripChanged) and "lost" in e.reason), None)

                event = await until(told, "the vehicle hears that its trip lost a stop")
                assert stop.charge_point_id in event.reason and "faulted" in event.reason
                [lost] = [s for s in event.trip.stops if s.lost]
                assert lost.reservation_id == stop.reservation_id
                # The driver is offered the same trip planned again, around the broken charge point.
                assert event.offer is not None
                offer = event.offer
                assert offer.plan.state == "planned" and offer.query.depart == trip.depart
                assert offer.query.origin == "Natal" and offer.query.destination == "Feira de Santana"
                assert stop.charge_point_id not in {s.charge_point_id for s in offer.plan.stops}
                [listed] = await v01.trips()
                assert [s.lost for s in listed.stops] == [s.lost for s in event.trip.stops]
                assert listed.state == "committed"
                check_invariants(await inspect_all(servers))
                # The prompt shows the command that books it; typed, it books the plan as shown.
                parser = argparse.ArgumentParser(prog="")
                add_vehicle_commands(parser.add_subparsers(dest="command"))
                args = parser.parse_args(shlex.split(book_command(offer)))
                check_command(args, servers["A"].world)  # as the prompt does: words joined, cities checked
                assert trip_query(args) == offer.query and args.plan == offer.plan.id
                booked = await v01.book_trip(trip_query(args), args.plan)
                assert booked.as_shown, "the plan offered books as shown"
                await v01.cancel_trip(trip.id)  # the rest of the old trip, released as usual
    check_invariants(await inspect_all(servers))


async def test_a_withdrawal_reaches_a_coordinator_that_was_down(
    servers: dict[str, Server], fed_world: World, tmp_path: Path
) -> None:
    """Stored at the owner until the coordinator acknowledges, across restarts of both."""
    async with driver(servers, "V01") as v01:
        trip = await book_later(v01)
    stop = next(s for s in trip.stops if s.operator_id == "B")
    assert stop.reservation_id is not None
    await servers["A"].stop()
    async with operator(servers["B"]) as b, station(servers["B"], stop.charge_point_id) as cp:
        await cp.call(p.StatusNotification(status="unavailable", info="maintenance"), p.Ok)
        assert (await b.cancel(stop.reservation_id)).reservation.state == "cancelled"
    await restart(servers, "B", fed_world, tmp_path)
    assert stop.reservation_id in servers["B"].participant.untold
    await restart(servers, "A", fed_world, tmp_path)

    async def shown_lost() -> bool:
        async with driver(servers, "V01") as c:
            [listed] = await c.trips()
        return any(s.lost for s in listed.stops if s.reservation_id == stop.reservation_id)

    await until(shown_lost, "the coordinator shows the stop lost once it is back")
    await until(lambda: _true(not servers["B"].participant.untold), "the owner stops telling it")
    check_invariants(await inspect_all(servers))


async def _true(value: bool) -> bool:
    return value


async def restart(servers: dict[str, Server], op: str, world: World, tmp_path: Path) -> None:
    """Stop an in-process server (if it runs) and start it again on its data, on the shared clock."""
    old = servers[op]
    await old.stop()
    anchor = old.clock.anchor_real
    servers[op] = Server(world, op, tmp_path / "data" / op, host="127.0.0.1", time_scale=60.0, clock_anchor=anchor)
    await servers[op].start()
    others = {k for k, s in servers.items() if k != op and not s._stopping}
    catalogs = servers[op].federation.peers.catalogs  # type: ignore[union-attr]
    await until(lambda: _true(others <= set(catalogs)), f"{op} has the catalogs of {sorted(others)} again")


async def inspect_all(servers: dict[str, Server]) -> dict[str, p.InspectResult]:
    results = {}
    for op_id, server in servers.items():
        async with operator(server) as c:
            results[op_id] = await c.inspect()
    return results


def check_invariants(states: dict[str, p.InspectResult]) -> None:
    broken = violations(states)
    assert not broken, "\n".join(broken)


async def test_a_charge_record_must_be_its_senders_and_its_numbers_real(a: Server) -> None:
    """C's record with a NaN cost failed A's store every 5 s; C could also take B's reservation id."""
    async with as_peer(a, "C") as c:
        now = c.server_now()

        def record(reservation_id: str, cost: float) -> p.DeliverChargeRecord:
            session = p.SessionInfo(
                reservation_id=reservation_id, operator_id="C", station_id="FEC-1", city="Feira de Santana",
                charge_point_id="FEC-1-1", started=now - timedelta(minutes=30), ended=now, kwh=20.0,
                price_per_kwh=2.0, cost=cost,
            )  # fmt: skip
            info = p.ChargeRecordInfo(vehicle_id="V01", home_operator_id="A", session=session)
            return p.DeliverChargeRecord(record=info)

        with pytest.raises(BadRequestError, match="cost"):
            await c.call(record("C-0123456789", float("nan")), p.Ok)
        with pytest.raises(BadRequestError, match="reservation B-0123456789"):
            await c.call(record("B-0123456789", 40.0), p.Ok)
        assert a.books.records == {} and not a.books.store.failed
        await c.call(record("C-0123456789", 40.0), p.Ok)
        assert list(a.books.records) == ["C-0123456789"]
