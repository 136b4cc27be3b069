"""Two-phase commit in batches: each trip's fate is its own, whatever shares its frame.

A coordinator's concurrent trips send one owner their PREPAREs, decisions and releases
together (``TwoPhaseBatch``, one writer section and one commit at the owner). Batching is
transport: every item must be answered exactly as it would be alone, in order, so a trip
that loses its slot to an earlier item of the same batch gets NO with the conflict, and a
NO or an error for one trip never aborts, holds or books another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from evcharge.domain.clock import to_datetime
from evcharge.domain.world import World
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, ForbiddenError

from .conftest import as_peer, operator, running_federation, running_server

pytestmark = pytest.mark.timeout(60)

CP, OTHER_CP = "MOS-1-1", "MOS-1-2"  # A's


@pytest.fixture
async def a(fed_world: World, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(fed_world, tmp_path / "data", operator="A", time_scale=1.0) as server:
        yield server


def prepare(trip: str, *stops: tuple[str, datetime, float], vehicle: str = "V02") -> p.Prepare:
    return p.Prepare(
        txn_id=f"{trip}.1",
        trip_id=trip,
        vehicle_id=vehicle,
        stops=[p.StopRequest(charge_point_id=cp, start=at, end=at + timedelta(minutes=m)) for cp, at, m in stops],
        deadline=time.time() + 5.0,
    )


async def live_at(server: Server) -> dict[str, tuple[str, str]]:
    """Live reservations: id -> (trip, state)."""
    async with operator(server) as tool:
        return {
            r.id: (r.trip_id or "", r.state)
            for r in (await tool.inspect()).reservations
            if r.state in ("held", "booked", "charging")
        }


async def test_one_batch_of_conflicting_trips_answers_each_as_alone(a: Server) -> None:
    """B's batch of five PREPAREs: the first of two for one slot won; the other, a trip
    whose two stops overlap, and a PREPARE for another home's vehicle each lost alone."""
    async with as_peer(a, "B") as b:
        soon = b.server_now() + timedelta(hours=1)
        items: list[p.TwoPhaseItem] = [
            prepare("B-T1", (CP, soon, 30)),
            prepare("B-T2", (OTHER_CP, soon, 30), (CP, soon + timedelta(minutes=10), 30)),  # T1 has CP then
            prepare("B-T3", (CP, soon + timedelta(hours=2), 30)),
            prepare("B-T4", (OTHER_CP, soon + timedelta(hours=4), 30), (OTHER_CP, soon + timedelta(hours=4), 30)),
            prepare("B-T5", (OTHER_CP, soon + timedelta(hours=6), 30), vehicle="V01"),  # A's own vehicle
            p.Decide(txn_id="B-T9.1", trip_id="B-T9", commit=True),  # nothing of it here: Ok, nothing done
        ]
        first = await b.call(p.TwoPhaseBatch(items=items), p.TwoPhaseResults)
        t1, t2, t3, t4, t5, t9 = first.results
        assert isinstance(t1, p.Vote) and t1.yes and len(t1.reservation_ids) == 1
        assert isinstance(t2, p.Vote) and not t2.yes and not t2.reservation_ids
        assert [c.charge_point_id for c in t2.conflicts] == [CP]  # its other stop was free: only CP is named
        assert isinstance(t3, p.Vote) and t3.yes
        assert isinstance(t4, p.Vote) and not t4.yes and [c.charge_point_id for c in t4.conflicts] == [OTHER_CP]
        assert isinstance(t5, p.Error) and t5.code == "forbidden" and "V01" in t5.message
        assert isinstance(t9, p.Ok)
        held = await live_at(a)
        assert sorted(held.values()) == [("B-T1", "held"), ("B-T3", "held")]  # T2's free stop is not held either

        # The decisions in one batch too: T1 commits, T3 aborts; T2's abort (it voted NO) is a no-op.
        decisions: list[p.TwoPhaseItem] = [
            p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=True),
            p.Decide(txn_id="B-T3.1", trip_id="B-T3", commit=False),
            p.Decide(txn_id="B-T2.1", trip_id="B-T2", commit=False),
            # T2's slot is still T1's, booked one item earlier.
            prepare("B-T6", (CP, soon + timedelta(minutes=10), 30)),
            # The slot T3 let go of one item earlier is free for the next.
            prepare("B-T7", (CP, soon + timedelta(hours=2), 30)),
        ]
        second = await b.call(p.TwoPhaseBatch(items=decisions), p.TwoPhaseResults)
        ok1, ok3, ok2, t6, t7 = second.results
        assert isinstance(ok1, p.Ok) and isinstance(ok3, p.Ok) and isinstance(ok2, p.Ok)
        assert isinstance(t6, p.Vote) and not t6.yes and [c.charge_point_id for c in t6.conflicts] == [CP]
        assert isinstance(t7, p.Vote) and t7.yes
        assert sorted((await live_at(a)).values()) == [("B-T1", "booked"), ("B-T7", "held")]

        # A repeated PREPARE inside a batch gets the same vote, as alone.
        again = await b.call(
            p.TwoPhaseBatch(items=[prepare("B-T7", (CP, soon + timedelta(hours=2), 30))]), p.TwoPhaseResults
        )
        [t7_again] = again.results
        assert isinstance(t7_again, p.Vote) and t7_again.yes and t7_again.reservation_ids == t7.reservation_ids

        # Release T1 and abort T7 in one batch: nothing is left.
        last: list[p.TwoPhaseItem] = [
            p.ReleaseTrip(trip_id="B-T1"),
            p.Decide(txn_id="B-T7.1", trip_id="B-T7", commit=False),
        ]
        done = await b.call(p.TwoPhaseBatch(items=last), p.TwoPhaseResults)
        assert all(isinstance(r, p.Ok) for r in done.results)
    assert await live_at(a) == {}


async def test_another_coordinators_items_fail_alone(a: Server) -> None:
    """C's batch deciding and releasing B's trip gets forbidden for those, its own PREPARE held."""
    async with as_peer(a, "B") as b, as_peer(a, "C") as c:
        soon = b.server_now() + timedelta(hours=1)
        assert (await b.call(prepare("B-T1", (CP, soon, 30)), p.Vote)).yes
        items: list[p.TwoPhaseItem] = [
            p.Decide(txn_id="B-T1.1", trip_id="B-T1", commit=False),
            p.ReleaseTrip(trip_id="B-T1"),
            prepare("C-T1", (OTHER_CP, soon, 30), vehicle="V03"),
        ]
        results = (await c.call(p.TwoPhaseBatch(items=items), p.TwoPhaseResults)).results
        assert [type(r) for r in results] == [p.Error, p.Error, p.Vote]
        assert all(isinstance(r, p.Error) and r.code == "forbidden" for r in results[:2])
        assert isinstance(results[2], p.Vote) and results[2].yes
        with pytest.raises(BadRequestError, match="at most 64"):
            await c.call(p.TwoPhaseBatch(items=[p.ReleaseTrip(trip_id="C-T9")] * 65), p.TwoPhaseResults)
    assert sorted((await live_at(a)).values()) == [("B-T1", "held"), ("C-T1", "held")]


async def test_a_coordinators_concurrent_prepares_share_one_batch_and_keep_their_fates(
    fed_world: World, tmp_path: Path
) -> None:
    """Six trips of A PREPAREd at B at once, three of them for one slot: one frame, one winner of
    that slot, the other two NO with the conflict, the three on free slots YES."""
    async with running_federation(fed_world, tmp_path / "data") as servers:
        coordinator = servers["A"].services.federation_or_refuse().coordinator
        b = servers["B"]
        cp = next(cp_id for cp_id in b.books.charge_points)
        other = next(cp_id for cp_id in b.books.charge_points if cp_id != cp)
        soon = to_datetime(b.books.clock.now() + 3600)
        vehicle = next(v.id for v in fed_world.vehicles if v.home == "A")
        wanted = [
            prepare("A-T1", (cp, soon, 30), vehicle=vehicle),
            prepare("A-T2", (cp, soon + timedelta(minutes=5), 30), vehicle=vehicle),
            prepare("A-T3", (other, soon, 30), vehicle=vehicle),
            prepare("A-T4", (cp, soon + timedelta(minutes=20), 30), vehicle=vehicle),
            prepare("A-T5", (other, soon + timedelta(hours=1), 30), vehicle=vehicle),
            prepare("A-T6", (cp, soon + timedelta(hours=3), 30), vehicle=vehicle),
        ]
        batcher = coordinator.batcher("B")
        batches, items = batcher.batches, batcher.items
        votes = await asyncio.gather(*(batcher.submit(w, 5.0) for w in wanted))
        assert (batcher.batches - batches, batcher.items - items) == (1, 6)  # submitted in one turn: one frame
        yes = [isinstance(v, p.Vote) and v.yes for v in votes]
        assert yes == [True, False, True, False, True, True]
        for lost in (votes[1], votes[3]):
            assert isinstance(lost, p.Vote) and [c.charge_point_id for c in lost.conflicts] == [cp]
        # The losers' aborts and the winners' commits, in one batch again; each as alone.
        decisions = [p.Decide(txn_id=w.txn_id, trip_id=w.trip_id, commit=y) for w, y in zip(wanted, yes, strict=True)]
        decided = await asyncio.gather(*(batcher.submit(d, 5.0) for d in decisions))
        assert all(isinstance(d, p.Ok) for d in decided)
        async with operator(b) as tool:
            live = sorted(
                (r.trip_id, r.state) for r in (await tool.inspect()).reservations if r.state in ("held", "booked")
            )
        assert live == [("A-T1", "booked"), ("A-T3", "booked"), ("A-T5", "booked"), ("A-T6", "booked")]


async def test_a_peer_refusing_one_prepare_of_a_batch_fails_that_trip_only(fed_world: World, tmp_path: Path) -> None:
    """An Error for one item raises for that trip's caller; the others of the batch get their votes."""
    async with running_federation(fed_world, tmp_path / "data") as servers:
        batcher = servers["A"].services.federation_or_refuse().coordinator.batcher("B")
        b = servers["B"]
        cp = next(iter(b.books.charge_points))
        soon = to_datetime(b.books.clock.now() + 3600)
        ours = next(v.id for v in fed_world.vehicles if v.home == "A")
        theirs = next(v.id for v in fed_world.vehicles if v.home == "B")
        results = await asyncio.gather(
            batcher.submit(prepare("A-T1", (cp, soon, 30), vehicle=theirs), 5.0),
            batcher.submit(prepare("A-T2", (cp, soon, 30), vehicle=ours), 5.0),
            return_exceptions=True,
        )
        assert isinstance(results[0], ForbiddenError)
        assert isinstance(results[1], p.Vote) and results[1].yes
        await batcher.submit(p.Decide(txn_id="A-T2.1", trip_id="A-T2", commit=False), 5.0)
