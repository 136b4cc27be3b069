"""Simulated UTC time that may run faster than the wall clock.

With ``time_scale`` 60 one simulated minute passes per real second, so demos
and tests cover an hour of driving in a minute. Simulated time is anchored to
a (simulated, real) pair; a server stores its anchor so its clock carries on
after a restart instead of jumping back to the wall clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def to_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def to_seconds(moment: datetime) -> int:
    return int(moment.timestamp())


class SimClock:
    def __init__(self, time_scale: float = 1.0, *, anchor_sim: float | None = None, anchor_real: float | None = None):
        if time_scale <= 0:
            raise ValueError("time scale must be positive")
        self.time_scale = time_scale
        self.anchor_real = time.time() if anchor_real is None else anchor_real
        self.anchor_sim = self.anchor_real if anchor_sim is None else anchor_sim

    def now(self) -> float:
        """Simulated seconds since the epoch."""
        return self.anchor_sim + (time.time() - self.anchor_real) * self.time_scale

    def now_dt(self) -> datetime:
        return to_datetime(self.now())

    def real_delay(self, sim_seconds: float) -> float:
        """Real seconds until ``sim_seconds`` of simulated time have passed."""
        return max(0.0, sim_seconds / self.time_scale)

    def rescaled(self, time_scale: float) -> SimClock:
        """The same current instant, running at another speed from now on."""
        return SimClock(time_scale, anchor_sim=self.now(), anchor_real=time.time())
