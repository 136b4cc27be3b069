"""In-memory records of an operator's state (what the store persists)."""

from __future__ import annotations

from dataclasses import dataclass

# A live reservation holds its slot; the others are history.
LIVE_STATES: frozenset[str] = frozenset({"held", "booked", "charging"})
RESERVATION_STATES: frozenset[str] = LIVE_STATES | {"completed", "cancelled", "expired", "aborted"}
TRIP_STATES: frozenset[str] = frozenset({"committed", "cancelled"})  # a stored trip's (no row: aborted)


@dataclass(slots=True)
class Reservation:
    id: str
    charge_point_id: str
    vehicle_id: str
    start: int  # simulated epoch seconds, half-open [start, end)
    end: int
    state: str
    created: int
    trip_id: str | None = None
    hold_deadline: float | None = None  # real epoch seconds (held only)
    txn_id: str | None = None  # the trip booking that placed it
    coordinator: str | None = None  # operator coordinating that trip

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(slots=True)
class ChargingSession:
    reservation_id: str
    vehicle_id: str
    charge_point_id: str
    started: int
    price_per_kwh: float
    ended: int | None = None
    kwh: float = 0.0
    # A visiting vehicle's home operator: it is sent the charge record once the session ends.
    home: str | None = None
    delivered: bool = False  # the home has stored the charge record

    @property
    def cost(self) -> float:
        return round(self.kwh * self.price_per_kwh, 2)


@dataclass(slots=True)
class Trip:
    """A trip this operator coordinates; its row is the two-phase commit record."""

    id: str
    vehicle_id: str
    state: str  # committed | cancelled
    txn_id: str
    participants: list[str]  # operators owning its stops
    unacked: list[str]  # participants not yet told the latest decision
    info: bytes  # the TripInfo, as JSON
    created: int


@dataclass(slots=True)
class Outcome:
    """The answer to one keyed state-changing request, kept so that a retry gets it again."""

    scope: str  # who asked ("vehicle:V01", also when its home forwards it): keys are theirs, not global
    key: str
    fingerprint: str  # of the request: one key names one request
    reply: bytes  # the reply as it was sent (msgpack)
    created: float  # real epoch seconds (kept for a while, then forgotten)


@dataclass(slots=True)
class ChargeRecord:
    """A session of one of our vehicles at another operator's charger, as its owner reported it."""

    reservation_id: str
    owner: str  # the operator whose charger it was
    vehicle_id: str
    station_id: str
    city: str
    charge_point_id: str
    started: int  # simulated epoch seconds
    ended: int
    kwh: float
    price_per_kwh: float
    cost: float


@dataclass(slots=True)
class Withdrawal:
    """A booked stop of a trip its owner withdrew (its charge point broke), until the coordinator knows."""

    reservation_id: str
    trip_id: str
    coordinator: str
    reason: str
    told: bool = False  # the coordinator acknowledged it
