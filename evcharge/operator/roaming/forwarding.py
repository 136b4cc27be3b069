"""The home operator asking another operator for one of its vehicles (as an eMSP asks a CPO).

A reservation, cancellation, start or stop at another operator's charger is
sent there as ``Roam``; the owner enforces its own rules and ownership and
answers as it would answer the vehicle, and the vehicle hears that answer --
after the owner committed it. The vehicle's idempotency key goes along, so
the owner keeps the outcome: a reply lost on the way (the owner crashed, the
link broke) is asked for again with the same key until ``ROAM_DEADLINE``, and
only then does the vehicle hear that the outcome is not known yet. A request
without a key is sent once; a reply lost after it was sent is ``timeout`` (not known), never
``unavailable`` (nothing done).

Whose charger or reservation it is: charge points by the world file,
reservations by the operator id their ids begin with.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

import msgspec

from evcharge.domain.clock import to_datetime
from evcharge.domain.world import World
from evcharge.operator.trips.peers import Peers
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConnectionLostError, EvchargeError, RequestTimeoutError, UnavailableError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p.Reply)

ROAM_DEADLINE = 8.0  # real seconds the home keeps asking an owner whose reply was lost
LIST_TIMEOUT = 3.0  # an owner's list of a vehicle's reservations; past it, as last heard


class Roaming:
    def __init__(self, world: World, me: str, peers: Peers) -> None:
        self.me = me
        self.peers = peers
        self._owner_of_cp = {cp.id: s.operator for s in world.stations for cp in s.charge_points}
        # Longest first: an operator "AB" is not operator "A".
        self._prefixes = sorted((op.id for op in world.operators), key=len, reverse=True)
        # A vehicle's reservations at each other operator as last heard, with when (simulated).
        self._last_heard: dict[tuple[str, str], tuple[list[p.ReservationInfo], float]] = {}

    def owner(self, request: p.RoamedRequest) -> str | None:
        """The other operator this request is for; None when it is ours (or nobody's: we answer that)."""
        match request:
            case p.Reserve(charge_point_id=cp_id):
                owner = self._owner_of_cp.get(cp_id)
            case (
                p.CancelReservation(reservation_id=rid)
                | p.StartCharging(reservation_id=rid)
                | p.StopCharging(reservation_id=rid)
            ):
                owner = next((op for op in self._prefixes if rid.startswith(f"{op}-")), None)
            case _:
                owner = None
        return owner if owner != self.me else None

    async def forward(self, owner: str, vehicle_id: str, request: p.RoamedRequest, expect: type[R]) -> R:
        """Ask the owner for the vehicle; its answer (or its refusal) is the vehicle's."""
        link = self.peers.link(owner)
        if not link.up:  # nothing sent, nothing done: say so at once
            raise UnavailableError(f"operator {owner} cannot be reached now ({link.last_error}); nothing was done")
        deadline = asyncio.get_running_loop().time() + ROAM_DEADLINE
        roam = p.Roam(vehicle_id=vehicle_id, request=request)
        if getattr(request, "key", ""):
            return await link.call(roam, expect, again_until=deadline)
        # No key: asking again could act twice, so it is asked once; and once it was sent, a reply
        # that never came is not "nothing was done".
        client = link.client
        if client is None:
            raise UnavailableError(f"operator {owner} cannot be reached now ({link.last_error}); nothing was done")
        try:
            return await client.call(roam, expect, timeout=ROAM_DEADLINE)
        except ConnectionLostError as exc:
            raise RequestTimeoutError(
                f"operator {owner} did not answer ({exc.message}); whether it was done is not known yet"
            ) from None

    async def reservations_elsewhere(self, vehicle_id: str, include_past: bool) -> list[p.ReservationInfo]:
        """The vehicle's reservations at every other operator: fresh, or as last heard (``as_of``)."""
        owners = sorted(self.peers.links)
        asked = p.ListReservations(include_past=include_past)
        answers = await asyncio.gather(
            *(self._list_at(owner, vehicle_id, asked) for owner in owners), return_exceptions=True
        )
        found: list[p.ReservationInfo] = []
        for owner, answer in zip(owners, answers, strict=True):
            if isinstance(answer, list):
                found += answer
                continue
            if not isinstance(answer, EvchargeError):
                raise answer
            last = self._last_heard.get((owner, vehicle_id))
            if last is not None:
                heard, when = last
                found += [msgspec.structs.replace(r, as_of=to_datetime(when)) for r in heard]
        return found

    async def _list_at(self, owner: str, vehicle_id: str, asked: p.ListReservations) -> list[p.ReservationInfo]:
        link = self.peers.links[owner]
        if not link.up:
            raise UnavailableError(f"operator {owner} cannot be reached now")
        roam = p.Roam(vehicle_id=vehicle_id, request=asked)
        reply = await link.call(roam, p.ReservationList, timeout=LIST_TIMEOUT)
        if not asked.include_past:
            self._last_heard[(owner, vehicle_id)] = (reply.reservations, self.peers.views.books.clock.now())
        return reply.reservations
