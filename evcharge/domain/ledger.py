"""The live reservations of one charge point, as sorted half-open intervals.

Only live reservations (held, booked, charging) are kept; they never overlap,
so sorting by start also sorts by end, and a conflict check is one bisect.
Times are integer seconds since the epoch (simulated time).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class Ledger:
    __slots__ = ("_ends", "_ids", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._starts)

    def conflicts(self, start: int, end: int) -> list[str]:
        """Ids of the live reservations overlapping ``[start, end)``."""
        found: list[str] = []
        i = bisect_left(self._starts, end) - 1  # last interval starting before `end`
        while i >= 0 and self._ends[i] > start:
            found.append(self._ids[i])
            i -= 1
        found.reverse()
        return found

    def fits(self, start: int, end: int) -> bool:
        i = bisect_left(self._starts, end) - 1
        return i < 0 or self._ends[i] <= start

    def add(self, start: int, end: int, reservation_id: str) -> None:
        if not start < end:
            raise ValueError(f"empty interval [{start}, {end})")
        if not self.fits(start, end):
            raise ValueError(f"[{start}, {end}) overlaps {self.conflicts(start, end)}")
        i = bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._ids.insert(i, reservation_id)

    def remove(self, start: int, reservation_id: str) -> bool:
        i = bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start and self._ids[i] == reservation_id:
            del self._starts[i], self._ends[i], self._ids[i]
            return True
        return False

    def next_free(self, start: int, duration: int) -> int:
        """The earliest ``t >= start`` such that ``[t, t + duration)`` is free."""
        t = start
        i = bisect_right(self._starts, t)
        if i > 0 and self._ends[i - 1] > t:
            t = self._ends[i - 1]
        while i < len(self._starts) and self._starts[i] < t + duration:
            t = max(t, self._ends[i])
            i += 1
        return t

    def busy(self, start: int, end: int) -> list[tuple[int, int]]:
        """The live intervals overlapping ``[start, end)``, in order."""
        if start >= end:
            return []
        i = bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] <= start:
            i += 1
        out: list[tuple[int, int]] = []
        while i < len(self._starts) and self._starts[i] < end:
            out.append((self._starts[i], self._ends[i]))
            i += 1
        return out

    def intervals(self) -> list[tuple[int, int, str]]:
        return list(zip(self._starts, self._ends, self._ids, strict=True))
