"""A retry never acts twice: the same key gets the same outcome, and the books are as if sent once."""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evcharge.domain.world import World
from evcharge.links.client import connect
from evcharge.operator.outcomes import KEEP_OUTCOMES, REFUSALS_KEPT
from evcharge.operator.server import Server
from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError, EvchargeError, NotFoundError, UnavailableError

from .conftest import running_server, vehicle

pytestmark = pytest.mark.timeout(300)

CHARGE_POINTS = ("NAT-PN-1", "NAT-PN-2")
VEHICLES = ("V01", "V04")


@dataclass(frozen=True)
class Op:
    vehicle: str
    kind: str  # reserve | cancel
    cp: int = 0
    slot: int = 0
    minutes: int = 30
    target: int = 0  # cancel: the how-many-th earlier reserve
    again: int = 0  # extra deliveries of the same key
    together: bool = False  # the extra ones at the same time as the first


ops = st.lists(
    st.one_of(
        st.builds(
            Op,
            vehicle=st.sampled_from(VEHICLES),
            kind=st.just("reserve"),
            cp=st.integers(0, len(CHARGE_POINTS) - 1),
            slot=st.integers(0, 4),
            minutes=st.sampled_from([30, 60]),
            again=st.integers(0, 3),
            together=st.booleans(),
        ),
        st.builds(
            Op,
            vehicle=st.sampled_from(VEHICLES),
            kind=st.just("cancel"),
            target=st.integers(0, 20),
            again=st.integers(0, 3),
            together=st.booleans(),
        ),
    ),
    min_size=1,
    max_size=14,
)


def outcome(result: p.Reply | EvchargeError, ids: dict[str, int]) -> tuple[object, ...]:
    """A reply with reservation ids replaced by the op that made them (they are random)."""
    if isinstance(result, EvchargeError):
        return ("error", result.code)
    assert isinstance(result, p.ReservationReply)
    r = result.reservation
    return (ids.get(r.id, -1), r.charge_point_id, r.start, r.end, r.state, result.unchanged)


async def play(world: World, data: Path, anchor: float, script: list[Op], duplicates: bool) -> list[object]:
    async with running_server(world, data, clock_anchor=anchor, time_scale=1.0) as server:
        base = datetime.fromtimestamp(anchor, UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=3)
        made: list[str] = []  # reservation ids, by reserve op
        ids: dict[str, int] = {}
        outcomes: list[object] = []
        async with vehicle(server, "V01") as v01, vehicle(server, "V04") as v04:
            clients = {"V01": v01, "V04": v04}
            for n, op in enumerate(script):
                if op.kind == "reserve":
                    request: p.Request = p.Reserve(
                        charge_point_id=CHARGE_POINTS[op.cp],
                        start=base + timedelta(minutes=30 * op.slot),
                        minutes=op.minutes,
                        key=f"k{n}",
                    )
                else:
                    rid = made[op.target % len(made)] if made else "A-none"
                    request = p.CancelReservation(reservation_id=rid, key=f"k{n}")
                replies = await deliver(clients[op.vehicle], request, op, duplicates)
                assert all(outcome(r, ids) == outcome(replies[0], ids) for r in replies), replies
                first = replies[0]
                if op.kind == "reserve" and isinstance(first, p.ReservationReply):
                    ids[first.reservation.id] = len(made)
                    made.append(first.reservation.id)
                outcomes.append(outcome(first, ids))
        books = sorted(
            (ids.get(r.id, -1), r.charge_point_id, r.vehicle_id, r.start, r.end, r.state)
            for r in server.books.reservations.values()
        )
        return [outcomes, books]


async def deliver(client, request: p.Request, op: Op, duplicates: bool) -> list[p.Reply | EvchargeError]:
    async def once() -> p.Reply | EvchargeError:
        try:
            return await client.call(request, p.ReservationReply)
        except EvchargeError as exc:
            return exc

    if not duplicates or not op.again:
        return [await once()]
    if op.together:
        return list(await asyncio.gather(*(once() for _ in range(1 + op.again))))
    return [await once() for _ in range(1 + op.again)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
def test_random_retries_of_random_requests_leave_the_books_of_one_delivery_each(world: World, script: list[Op]) -> None:
    anchor = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        once = asyncio.run(play(world, Path(tmp) / "once", anchor, script, duplicates=False))
        retried = asyncio.run(play(world, Path(tmp) / "retried", anchor, script, duplicates=True))
    assert retried == once


async def test_a_key_names_one_request(server: Server) -> None:
    async with vehicle(server, "V01") as c, vehicle(server, "V04") as other:
        start = c.server_now() + timedelta(hours=2)
        first = await c.call(
            p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key="mine"), p.ReservationReply
        )
        with pytest.raises(BadRequestError, match="key 'mine' was used for a different request"):
            await c.call(p.Reserve(charge_point_id="NAT-PN-2", start=start, minutes=30, key="mine"), p.ReservationReply)
        # Keys are each client's own: another vehicle's "mine" is another request.
        theirs = await other.call(
            p.Reserve(charge_point_id="NAT-PN-2", start=start, minutes=30, key="mine"), p.ReservationReply
        )
        assert theirs.reservation.id != first.reservation.id
        with pytest.raises(msgspec.ValidationError):  # a key is at most 64 characters
            msgspec.msgpack.decode(
                msgspec.msgpack.encode(p.Reserve(charge_point_id="x", start=start, minutes=1, key="k" * 65)),
                type=p.Reserve,
            )


async def test_an_outcome_outlives_a_restart(world: World, tmp_path: Path) -> None:
    anchor = time.time()
    async with running_server(world, tmp_path / "d", clock_anchor=anchor) as server, vehicle(server, "V01") as c:
        request = p.Reserve(charge_point_id="NAT-PN-1", start=c.server_now() + timedelta(hours=1), minutes=30, key="k")
        first = await c.call(request, p.ReservationReply)
    async with running_server(world, tmp_path / "d", clock_anchor=anchor) as server:
        v = world.vehicle("V01")
        async with connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as c:
            again = await c.call(request, p.ReservationReply)
        assert again == first
        assert len(server.books.reservations) == 1


async def test_outcomes_are_forgotten_a_day_later_on_disk_too(world: World, tmp_path: Path) -> None:
    anchor = time.time()
    async with running_server(world, tmp_path / "d", clock_anchor=anchor) as server, vehicle(server, "V01") as c:
        request = p.Reserve(charge_point_id="NAT-PN-1", start=c.server_now() + timedelta(hours=1), minutes=30, key="k")
        await c.call(request, p.ReservationReply)
        await server.outcomes.forget_old(time.time() + KEEP_OUTCOMES - 60)
        assert len(server.books.outcomes) == 1, "kept for a day"
        await server.outcomes.forget_old(time.time() + KEEP_OUTCOMES + 1)
        assert not server.books.outcomes
    async with running_server(world, tmp_path / "d", clock_anchor=anchor) as server:
        assert not server.books.outcomes, "and not read back from the store"
        assert len(server.books.reservations) == 1, "the change itself stays"


async def test_a_retry_hears_its_stored_outcome_while_the_store_refuses_writes(world: World, tmp_path: Path) -> None:
    async with (
        running_server(world, tmp_path / "d", store_max_bytes=256 * 1024) as server,
        vehicle(server, "V01") as c,
        vehicle(server, "V04") as filler,
    ):
        start = c.server_now() + timedelta(hours=1)
        request = p.Reserve(charge_point_id="NAT-PN-1", start=start, minutes=30, key="k")
        first = await c.call(request, p.ReservationReply)
        # Someone else's changes fill the disk: the store refuses every write for now.
        with pytest.raises(UnavailableError):
            for n in range(100_000):
                await filler.reserve("NAT-PN-2", start + timedelta(minutes=20 * n), 15)
        assert server.books.store.failed
        # The reservation was made and stored: the retry says so, not "unavailable".
        again = await c.call(request, p.ReservationReply)
        assert (again.reservation, again.unchanged) == (first.reservation, first.unchanged)


async def test_refusals_are_repeated_from_memory_a_bounded_number_per_client(server: Server) -> None:
    async with vehicle(server, "V01") as c:
        commits = server.books.store.commits
        for n in range(REFUSALS_KEPT + 40):
            with pytest.raises(NotFoundError):
                await c.call(p.CancelReservation(reservation_id="nope", key=f"k{n}"), p.ReservationReply)
        assert server.books.store.commits == commits, "a refusal costs no disk sync"
        kept = [slot for slot in server.books.outcomes if slot[0] == "vehicle:V01"]
        assert len(kept) == REFUSALS_KEPT and ("vehicle:V01", f"k{REFUSALS_KEPT + 39}") in kept
        # The newest is heard again, as it was the first time.
        with pytest.raises(NotFoundError, match="nope"):
            await c.call(p.CancelReservation(reservation_id="nope", key=f"k{REFUSALS_KEPT + 39}"), p.ReservationReply)
