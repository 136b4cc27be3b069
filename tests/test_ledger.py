"""Ledger of one charge point, checked against a brute-force list of intervals."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from evcharge.domain.ledger import Ledger

TIMES = st.integers(min_value=0, max_value=200)
LENGTHS = st.integers(min_value=1, max_value=40)


def overlaps(s1: int, e1: int, s2: int, e2: int) -> bool:
    """Half-open intervals [s1, e1) and [s2, e2) share at least one point."""
    return s1 < e2 and s2 < e1


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.model: list[tuple[int, int, str]] = []
        self.serial = 0  # ids are r1, r2, ...: one per attempted add, never reused

    def _overlapping(self, start: int, end: int) -> list[tuple[int, int, str]]:
        return sorted(iv for iv in self.model if overlaps(start, end, iv[0], iv[1]))

    def _point(self, data: st.DataObject) -> int:
        """A time, often exactly on (or next to) an existing interval's edge, where off-by-ones live."""
        edges = [t for s, e, _ in self.model for t in (s - 1, s, s + 1, e - 1, e, e + 1)]
        if edges and data.draw(st.booleans()):
            return data.draw(st.sampled_from(edges))
        return data.draw(TIMES)

    def _try_add(self, start: int, end: int) -> None:
        self.serial += 1
        rid = f"r{self.serial}"
        hits = self._overlapping(start, end)
        assert self.ledger.fits(start, end) == (not hits)
        assert self.ledger.conflicts(start, end) == [iv[2] for iv in hits]
        if hits:
            with pytest.raises(ValueError):
                self.ledger.add(start, end, rid)
        else:
            self.ledger.add(start, end, rid)
            self.model.append((start, end, rid))

    @rule(start=TIMES, length=LENGTHS)
    def try_add(self, start: int, length: int) -> None:
        self._try_add(start, start + length)

    @rule(data=st.data())
    def try_add_near_edges(self, data: st.DataObject) -> None:
        start = self._point(data)
        end = self._point(data) if data.draw(st.booleans()) else start + data.draw(LENGTHS)
        if end > start:
            self._try_add(start, end)

    @rule(start=TIMES, length=st.integers(min_value=-10, max_value=0))
    def add_empty(self, start: int, length: int) -> None:
        with pytest.raises(ValueError):
            self.ledger.add(start, start + length, "empty")

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        start, end, rid = data.draw(st.sampled_from(self.model))
        # Wrong id at the right start, and the right id at a wrong start, remove nothing.
        assert self.ledger.remove(start, rid + "x") is False
        assert self.ledger.remove(start - 1, rid) is False
        assert self.ledger.remove(start + 1, rid) is False
        assert len(self.ledger) == len(self.model)
        assert self.ledger.remove(start, rid) is True
        self.model.remove((start, end, rid))
        assert self.ledger.remove(start, rid) is False

    @rule(data=st.data())
    def remove_any(self, data: st.DataObject) -> None:
        start = self._point(data)
        rid = data.draw(st.sampled_from(["nope", *(f"r{n}" for n in range(1, self.serial + 1))]))
        expected = [iv for iv in self.model if (iv[0], iv[2]) == (start, rid)]
        assert self.ledger.remove(start, rid) is bool(expected)
        for iv in expected:
            self.model.remove(iv)

    @rule(data=st.data(), duration=st.integers(min_value=1, max_value=60))
    def next_free(self, data: st.DataObject, duration: int) -> None:
        start = self._point(data)
        t = start
        while self._overlapping(t, t + duration):
            t += 1
        got = self.ledger.next_free(start, duration)
        assert got == t, f"next_free({start}, {duration}) = {got}, expected {t}; intervals {sorted(self.model)}"
        # What next_free promises, the ledger itself agrees with.
        assert self.ledger.fits(got, got + duration)

    @rule(data=st.data())
    def busy(self, data: st.DataObject) -> None:
        a = self._point(data)
        b = self._point(data) if data.draw(st.booleans()) else a + data.draw(st.integers(min_value=0, max_value=80))
        if b < a:
            a, b = b, a
        expected = [(s, e) for s, e, _ in self._overlapping(a, b)] if b > a else []
        assert self.ledger.busy(a, b) == expected

    @invariant()
    def matches_model(self) -> None:
        got = self.ledger.intervals()
        assert got == sorted(self.model)
        assert len(self.ledger) == len(self.model)
        for (_, e1, _), (s2, _, _) in itertools.pairwise(got):
            assert e1 <= s2, f"overlapping intervals in ledger: {got}"


LedgerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestLedgerStateful = LedgerMachine.TestCase


# --- examples -------------------------------------------------------------------------


def test_adjacent_intervals_both_fit() -> None:
    ledger = Ledger()
    assert ledger.fits(0, 10)
    ledger.add(0, 10, "a")
    assert ledger.fits(10, 20)
    assert ledger.conflicts(10, 20) == []
    ledger.add(10, 20, "b")
    assert ledger.intervals() == [(0, 10, "a"), (10, 20, "b")]
    # And adjacent on the left, added after.
    assert ledger.fits(-5, 0)
    ledger.add(-5, 0, "c")
    assert [iv[2] for iv in ledger.intervals()] == ["c", "a", "b"]


def test_straddling_interval_conflicts_with_both() -> None:
    ledger = Ledger()
    ledger.add(0, 10, "a")
    ledger.add(10, 20, "b")
    assert not ledger.fits(5, 15)
    assert ledger.conflicts(5, 15) == ["a", "b"]
    with pytest.raises(ValueError):
        ledger.add(5, 15, "c")
    assert ledger.intervals() == [(0, 10, "a"), (10, 20, "b")]


def test_one_point_overlaps() -> None:
    ledger = Ledger()
    ledger.add(10, 20, "a")
    assert ledger.conflicts(19, 25) == ["a"]
    assert ledger.conflicts(5, 11) == ["a"]
    assert ledger.conflicts(12, 13) == ["a"]
    assert ledger.conflicts(0, 30) == ["a"]
    assert ledger.conflicts(20, 25) == []
    assert ledger.conflicts(5, 10) == []


@pytest.mark.parametrize(("start", "end"), [(5, 5), (10, 3), (0, 0)])
def test_empty_interval_raises(start: int, end: int) -> None:
    ledger = Ledger()
    with pytest.raises(ValueError):
        ledger.add(start, end, "x")
    assert len(ledger) == 0


def test_next_free_skips_a_run_of_adjacent_intervals() -> None:
    ledger = Ledger()
    ledger.add(10, 20, "a")
    ledger.add(20, 30, "b")
    ledger.add(35, 50, "c")
    assert ledger.next_free(0, 10) == 0
    assert ledger.next_free(0, 11) == 50  # only 10 free before a, 5 between b and c
    assert ledger.next_free(15, 5) == 30
    assert ledger.next_free(15, 6) == 50
    assert ledger.next_free(50, 100) == 50


def test_busy_examples() -> None:
    ledger = Ledger()
    ledger.add(10, 20, "a")
    ledger.add(30, 40, "b")
    assert ledger.busy(0, 10) == []
    assert ledger.busy(0, 11) == [(10, 20)]
    assert ledger.busy(19, 31) == [(10, 20), (30, 40)]
    assert ledger.busy(20, 30) == []
    assert ledger.busy(40, 100) == []


def test_remove_then_slot_is_free_again() -> None:
    ledger = Ledger()
    ledger.add(0, 10, "a")
    assert not ledger.fits(5, 8)
    assert ledger.remove(0, "a") is True
    assert ledger.remove(0, "a") is False
    assert ledger.fits(5, 8)
    assert len(ledger) == 0


def test_remove_with_wrong_start_removes_nothing() -> None:
    # Regression: remove() once matched only the id at the bisect position of `start`.
    ledger = Ledger()
    ledger.add(10, 20, "a")
    assert ledger.remove(5, "a") is False
    assert ledger.intervals() == [(10, 20, "a")]
