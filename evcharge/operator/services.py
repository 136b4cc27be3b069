"""What the role handlers may use: the operator's services, and nothing of the server's plumbing."""

from __future__ import annotations

from dataclasses import dataclass, field

from evcharge.domain.world import OperatorConfig, World
from evcharge.operator.charging import Charging
from evcharge.operator.outcomes import Outcomes
from evcharge.operator.pushes import Online
from evcharge.operator.reservations import Reservations
from evcharge.operator.state import Books
from evcharge.operator.trips.federation import Federation
from evcharge.operator.trips.participant import Participant
from evcharge.operator.views import Views
from evcharge.wire.errors import UnavailableError


@dataclass(slots=True)
class Counters:
    requests_served: int = 0  # since start, for request rates


@dataclass(slots=True)
class Services:
    world: World
    operator: OperatorConfig
    books: Books
    views: Views
    reservations: Reservations
    charging: Charging
    participant: Participant
    outcomes: Outcomes
    online: Online
    federation: Federation | None
    push_buffer_limit: int
    counters: Counters = field(default_factory=Counters)
    homes: dict[str, str] = field(init=False)  # vehicle id -> its home operator (the world's, at start)

    def __post_init__(self) -> None:
        self.homes = {v.id: v.home for v in self.world.vehicles}

    def home_of(self, vehicle_id: str) -> str | None:
        return self.homes.get(vehicle_id)

    def federation_or_refuse(self) -> Federation:
        if self.federation is None:
            raise UnavailableError(f"operator {self.operator.id} is not federated with anyone")
        return self.federation
